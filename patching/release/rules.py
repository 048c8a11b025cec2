"""The compatibility data (patching/release/compat.yaml) and what follows from it without a bundle:
version order and the NVIDIA package names per driver branch. The bundle model and the rules both read
it; it imports neither."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

RULES_FILE = Path(__file__).with_name("compat.yaml")


@cache
def rules() -> dict[str, Any]:
    """The compatibility rules from compat.yaml, read once."""
    return yaml.safe_load(RULES_FILE.read_text())


def version_key(version: str) -> tuple[int, ...]:
    """'580.95.05' -> (580, 95, 5); debian revisions and +suffixes are ignored."""
    core = version.split("-")[0].split("+")[0]
    return tuple(int(p) for p in core.split(".") if p.isdigit())


def fabric_manager_package(branch: int) -> str:
    """The fabric manager's Debian package for a driver branch (no branch suffix from newer branches on)."""
    cut = rules()["fabric_manager"]["unversioned_package_from_branch"]
    return "nvidia-fabricmanager" if branch >= cut else f"nvidia-fabricmanager-{branch}"


def nscq_package(branch: int) -> str:
    """libnvidia-nscq's Debian package for a driver branch (no branch suffix from newer branches on)."""
    cut = rules()["fabric_manager"]["unversioned_package_from_branch"]
    return "libnvidia-nscq" if branch >= cut else f"libnvidia-nscq-{branch}"
