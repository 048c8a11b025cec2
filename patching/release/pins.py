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
# What AWS's EFA installer (efa_installer.sh, write_package_file) records after it installed: three comment
# lines, "# EFA installer version: 1.43.2", "# Debug packages installed: no", "# Packages installed:", then
# the package files it installed, without .deb, space-separated (deb: NAME_VERSION_ARCH). EFA is no Debian
# package of its own: the installer's packages are held by the efa role at the versions this names.
EFA_RECORD_PATH = "/opt/amazon/efa_installed_packages"
EFA_RECORD_SEPARATOR = "----- efa packages -----"
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
    boards, OFED on InfiniBand hosts). Not EFA: the bundle names an installer release, whose packages
    are known from the installer's record on the host (`parse_efa_record`, `efa_differences`).
    """
    return bundle.packages(nvswitch=bool(hostvars.get("fleet_nvswitch")), ib=bool(hostvars.get("fleet_ib")))


def all_pinned_packages(bundle: Bundle) -> list[str]:
    """Every package the bundle can pin on some host, in a stable order."""
    return list(host_pins(bundle, {"fleet_nvswitch": True, "fleet_ib": True}))


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


@dataclass(frozen=True)
class EfaRecord:
    """What the EFA installer recorded in /opt/amazon/efa_installed_packages."""

    installer_version: str
    debug_packages: bool
    packages: dict[str, str]  # Debian package -> the version the installer's package file had


def parse_efa_record(text: str) -> EfaRecord | None:
    """The EFA installer's record (EFA_RECORD_PATH), None when there is none (no installer version line).

    Package entries are the installer's file names without .deb: NAME_VERSION_ARCH on Debian and Ubuntu
    (`libfabric1-aws_2.1.0amzn5.0_amd64`). An entry without two underscores (an RPM name) is kept whole,
    with an empty version.
    """
    version = None
    debug = False
    packages: dict[str, str] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            key, _, value = stripped.lstrip("#").partition(":")
            if key.strip().lower() == "efa installer version":
                version = value.strip() or None
            elif key.strip().lower() == "debug packages installed":
                debug = value.strip().lower() == "yes"
            continue
        for entry in stripped.split():
            parts = entry.split("_")
            name, pkg_version = (parts[0], parts[1]) if len(parts) >= 3 else (entry, "")
            packages[name] = pkg_version
    return None if version is None else EfaRecord(version, debug, packages)


def efa_read_command() -> str:
    """The shell command whose output `split_efa_answer` reads: the installer's record, then dpkg's view of
    the packages it names (so one SSH round trip gives both)."""
    return (f"cat {EFA_RECORD_PATH} 2>/dev/null; echo {shlex.quote(EFA_RECORD_SEPARATOR)}; "
            f"grep -v '^#' {EFA_RECORD_PATH} 2>/dev/null | tr ' ' '\\n' | cut -d_ -f1 | grep . | "
            f"xargs -r dpkg-query -W -f='{DPKG_FORMAT}' 2>/dev/null || true")


def split_efa_answer(text: str) -> tuple[EfaRecord | None, dict[str, PackageState]]:
    """The host's answer to `efa_read_command`: its record and the installed packages it names."""
    record_text, _, dpkg_text = text.partition(EFA_RECORD_SEPARATOR)
    return parse_efa_record(record_text), parse_dpkg_query(dpkg_text)


def efa_differences(bundle: Bundle, record: EfaRecord | None,
                    installed: Mapping[str, PackageState] | None = None) -> list[tuple[str, str, str]]:
    """(what, expected, found) for every way an EFA host's installer record, and with `installed` dpkg's view
    of the packages it names, differs from the bundle: the installer release first, then each recorded
    package not installed at the version its installer shipped (the installer skips a package already
    installed at a newer version) or not held."""
    what = f"EFA installer ({EFA_RECORD_PATH})"
    if record is None:
        return [(what, bundle.efa_installer, f"no record (no {EFA_RECORD_PATH})")]
    out = []
    if record.installer_version != bundle.efa_installer:
        out.append((what, bundle.efa_installer, record.installer_version))
    for name, version in (record.packages.items() if installed is not None else ()):
        state = installed.get(name) if installed is not None else None
        shipped = f"{version} (recorded by the EFA installer {record.installer_version})"
        if state is None:
            out.append((name, shipped, "not installed"))
            continue
        if version and (state.version.partition(":")[2] or state.version) != version:  # files carry no epoch
            out.append((name, shipped, state.version))
        if not state.held:
            out.append((f"{name} hold", "held", "not held"))
    return out
