"""ansible-runner, testinfra and pytest start Ansible's tools by name (`ansible`, `ansible-playbook`,
`ansible-inventory`): make them the ones installed beside this Python, whoever started us."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BIN = str(Path(sys.executable).parent)


def path_with_our_bin(path: str | None = None) -> str:
    """PATH (default: this process's) with our bin directory first, once."""
    entries = [p for p in (os.environ.get("PATH", "") if path is None else path).split(os.pathsep) if p]
    return os.pathsep.join([BIN, *(p for p in entries if p != BIN)])


def put_our_bin_first() -> None:
    """Put this Python's bin directory first on this process's PATH."""
    os.environ["PATH"] = path_with_our_bin()
