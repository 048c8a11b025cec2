"""What a bundle pins on one host, and what the host says it has: shared by the host checks and drift.

The playbooks derive the same package names and versions in their roles' vars (group_vars/all/bundle.yml
maps the bundle to role knobs); after a converge, `fleet drift` comparing this module's pins with
dpkg is what holds the two together.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from patching.release.bundle import Bundle

MANIFEST_PATH = "/etc/fleet/bundle.json"
EFA_PACKAGE = "aws-efa-installer"
# Installed packages of these families that the bundle does not pin are drift too (a second driver
# branch, an old toolkit left behind): (dpkg-query glob, exact shape of a family member).
PINNED_FAMILIES = (
    ("cuda-drivers-*", re.compile(r"^cuda-drivers-\d+$")),
    ("nvidia-fabricmanager*", re.compile(r"^nvidia-fabricmanager(-\d+)?$")),
    ("libnvidia-nscq*", re.compile(r"^libnvidia-nscq(-\d+)?$")),
    ("cuda-toolkit-*", re.compile(r"^cuda-toolkit-\d+-\d+$")),
)

# nvidia-smi's product name for each fleet GPU model (infra/model/fleet.py GPU_MEMORY_MIB keys), as the
# driver reports it: "NVIDIA A100-SXM4-40GB" (FORMATS.md), "NVIDIA H100 80GB HBM3" and "NVIDIA H200"
# on SXM5 boards, "Tesla T4" (the T4 kept the Tesla brand), "NVIDIA A10G" on g5 instances.
SMI_PRODUCT_NAMES = {
    "A100-SXM4-40GB": "NVIDIA A100-SXM4-40GB",
    "A100-SXM4-80GB": "NVIDIA A100-SXM4-80GB",
    "H100-SXM5-80GB": "NVIDIA H100 80GB HBM3",
    "H200-SXM5-141GB": "NVIDIA H200",
    "T4": "Tesla T4",
    "A10G": "NVIDIA A10G",
}


def host_pins(bundle: Bundle, hostvars: Mapping[str, Any]) -> dict[str, str]:
    """Debian package -> exact version the bundle pins on a host with these inventory vars.

    The bundle's own packages for the host's kind (fabric manager and libnvidia-nscq on NVSwitch
    boards, OFED on InfiniBand hosts) plus the EFA installer on EFA hosts.
    """
    pins = bundle.packages(nvswitch=bool(hostvars.get("fleet_nvswitch")), ib=bool(hostvars.get("fleet_ib")))
    if hostvars.get("fleet_efa"):
        pins[EFA_PACKAGE] = f"{bundle.efa_installer}-1"
    return pins


def all_pinned_packages(bundle: Bundle) -> list[str]:
    """Every package the bundle can pin on some host, in a stable order."""
    return list(host_pins(bundle, {"fleet_nvswitch": True, "fleet_ib": True, "fleet_efa": True}))


@dataclass(frozen=True)
class PackageState:
    """One package as dpkg has it."""

    name: str
    version: str
    held: bool
    installed: bool


DPKG_FORMAT = r"${Package}\t${Version}\t${Status}\n"


def dpkg_query_command(packages: list[str] | tuple[str, ...]) -> str:
    """The shell command whose output `parse_dpkg_query` reads (unknown names are not an error)."""
    names = " ".join(shlex.quote(p) for p in packages)
    return f"dpkg-query -W -f='{DPKG_FORMAT}' {names} 2>/dev/null || true"


def parse_dpkg_query(text: str) -> dict[str, PackageState]:
    """`dpkg-query -W -f='${Package}\\t${Version}\\t${Status}\\n'` -> installed packages by name.

    Status is "WANT ok STATE": `hold ok installed` is a held package; removed packages that left
    their configuration (`deinstall ok config-files`) and names dpkg only knows are not installed.
    """
    out = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        name, version, status = parts
        words = status.split()
        installed = len(words) == 3 and words[2] in ("installed", "half-configured", "unpacked")
        if installed:
            out[name] = PackageState(name, version, words[0] == "hold", installed)
    return out


def unpinned_family_members(installed: Mapping[str, PackageState], pins: Mapping[str, str]) -> list[str]:
    """Installed packages of a pinned family (driver branch, toolkit release, ...) the bundle does not pin."""
    return sorted(name for name in installed if name not in pins
                  and any(shape.match(name) for _, shape in PINNED_FAMILIES))


def parse_manifest(text: str) -> dict[str, Any] | None:
    """The host's /etc/fleet/bundle.json, or None when it is absent or not a JSON object."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
