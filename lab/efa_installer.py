"""The AWS EFA installer tarball of each EFA release the bundles name, for the lab's artifact store.

AWS ships EFA as `aws-efa-installer-<version>.tar.gz`: extracted, `aws-efa-installer/` holds
`efa_installer.sh`, `common.sh`, `env.sh` (EFA_INSTALLER_VERSION), `package_list.txt` and the packages it
installs, `DEBS/<OS>/<arch>/*.deb` with `rdma-core/` and `efa-driver/` beside them. The lab's tarball has
the same layout for Debian 12 (its hosts): the simulated script of lab/vendor/efa/installer/ and the
simulated packages lab/vendor/efa/efa-versions.yaml lists (libfabric with fi_info, rdma-core, the efa
driver, ...), built here in pure Python.

Reproducible: members sorted, uid/gid 0, fixed mtimes (0 in the tarball, SOURCE_DATE_EPOCH in the
packages), gzip mtime 0, so the tarball's sha256 is a fixed function of the version and the vendor
sources; each bundle states it as `efa_installer_sha256` (a unit test checks every bundle against this
build). Published under `www/artifacts/efa/aws-efa-installer-<version>.tar.gz` (`publish`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

import yaml

from lab.aptrepo import SOURCE_DATE_EPOCH, VENDOR, Deb, RepoBuildError, _control

TOP = "aws-efa-installer"
INSTALLER_SOURCES = VENDOR / "efa/installer"
OS_DIR = "DEBIAN12"  # the lab's hosts: Debian bookworm
ARCH_DIR, DEB_ARCH = "x86_64", "amd64"
BUNDLE_DIRS = (Path(__file__).resolve().parents[1] / "releases", Path(__file__).with_name("bundles"))


def artifact_path(version: str) -> str:
    """Where the tarball of an EFA release lies under the artifact store (fleet_artifacts_url)."""
    return f"efa/{TOP}-{version}.tar.gz"


def shipped(version: str) -> dict:
    """What an EFA installer release ships (lab/vendor/efa/efa-versions.yaml); RepoBuildError when unknown."""
    data = yaml.safe_load((VENDOR / "efa/efa-versions.yaml").read_text()).get(str(version))
    if data is None:
        raise RepoBuildError(f"no data for EFA installer {version}: add it to {VENDOR / 'efa/efa-versions.yaml'}")
    return data


def plan_debs(version: str) -> list[tuple[str, Deb]]:
    """(folder under DEBS/<OS>/<arch>, "" for the top) and package, for every package of the release."""
    info = shipped(version)
    out = []
    for spec in info["debs"]:
        name, deb_version = str(spec["name"]), str(spec["version"])
        deb = Deb(name, deb_version, deb_version.split("-")[0], f"{name} from the AWS EFA installer {version}",
                  arch=str(spec.get("arch", DEB_ARCH)))
        if name == "libfabric1-aws":
            deb.role = name
            deb.info = {"libfabric": info["libfabric"], "provider_version": info["provider_version"],
                        "efa_installer": str(version)}
            deb.add(deb.package_json_path, json.dumps(deb.package_json(), indent=2, sort_keys=True) + "\n")
        elif name == "libfabric-aws-bin":
            deb.role = name
            deb.depends = [f"libfabric1-aws (= {deb_version})", "python3"]
            deb.add_tool("efa/fi_info.py", "/opt/amazon/efa/bin/fi_info")
        elif name == "efa-profile":
            deb.add("/etc/profile.d/efa.sh", "PATH=$PATH:/opt/amazon/efa/bin\n")
            deb.conffiles.append("/etc/profile.d/efa.sh")
        elif name == "efa-config":
            deb.add("/etc/security/limits.d/01_efa.conf", "* soft memlock unlimited\n* hard memlock unlimited\n")
            deb.conffiles.append("/etc/security/limits.d/01_efa.conf")
        elif name == "efa":
            deb.role = name
            deb.info = {"driver_version": deb.upstream}
            deb.add(f"/usr/src/efa-{deb.upstream}/dkms.conf",
                    f'PACKAGE_NAME="efa"\nPACKAGE_VERSION="{deb.upstream}"\nBUILT_MODULE_NAME[0]="efa"\n'
                    'DEST_MODULE_LOCATION[0]="/updates"\nAUTOINSTALL="yes"\n')
            deb.add(deb.package_json_path, json.dumps(deb.package_json(), indent=2, sort_keys=True) + "\n")
        deb.add(f"/usr/share/doc/{name}/README.fleet-lab",
                f"{name} {deb_version}: simulated by the fleet lab, installed by the AWS EFA installer {version}.\n")
        out.append((str(spec.get("dir", "")), deb))
    return out


def _tar_bytes(entries: list[tuple[str, bytes | None, int, str | None]], mtime: int) -> bytes:
    """A tar archive (GNU format) of (path, content or None for a directory, mode, link target) in path order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path, content, mode, link in sorted(entries, key=lambda e: e[0]):
            ti = tarfile.TarInfo(path)
            ti.mode, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = mode, mtime, 0, 0, "root", "root"
            if link is not None:
                ti.type, ti.linkname = tarfile.SYMTYPE, link
                tar.addfile(ti)
            elif content is None:
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
            else:
                ti.size = len(content)
                tar.addfile(ti, io.BytesIO(content))
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def _dirs(paths: Iterable[str]) -> set[str]:
    """Every parent folder of the paths (relative, './'-prefixed as dpkg-deb writes them), and '.'."""
    out = {"."}
    for path in paths:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            out.add("/".join(parts[:i]))
    return out


def build_deb(deb: Deb) -> bytes:
    """The .deb (ar: debian-binary, control.tar.gz, data.tar.gz) of a planned package, byte-for-byte stable."""
    mtime = int(SOURCE_DATE_EPOCH)
    files = {f"./{p.lstrip('/')}": c for p, c in deb.files.items()}
    links = {f"./{p.lstrip('/')}": t for p, t in deb.links.items()}
    data: list[tuple[str, bytes | None, int, str | None]] = [
        (d if d == "." else d + "/", None, 0o755, None) for d in _dirs([*files, *links]) - {"."}]
    data.insert(0, ("./", None, 0o755, None))
    data += [(p, content, mode, None) for p, (content, mode) in files.items()]
    data += [(p, None, 0o777, target) for p, target in links.items()]
    size = sum(len(content) for content, _ in deb.files.values())
    control: list[tuple[str, bytes | None, int, str | None]] = [
        ("./", None, 0o755, None), ("./control", _control(deb, max(1, (size + 1023) // 1024)).encode(), 0o644, None)]
    if deb.conffiles:
        control.append(("./conffiles", "".join(f"{c}\n" for c in deb.conffiles).encode(), 0o644, None))
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", _gzip(_tar_bytes(control, mtime))),
               ("data.tar.gz", _gzip(_tar_bytes(data, mtime)))]
    out = bytearray(b"!<arch>\n")
    for name, content in members:
        out += f"{name:<16}{mtime:<12}{0:<6}{0:<6}{'100644':<8}{len(content):<10}`\n".encode()
        out += content + (b"\n" if len(content) % 2 else b"")
    return bytes(out)


def _installer_source(name: str) -> bytes:
    return (INSTALLER_SOURCES / name).read_bytes()


def tarball(version: str) -> bytes:
    """aws-efa-installer-<version>.tar.gz, the same bytes for the same version and vendor sources."""
    base = f"DEBS/{OS_DIR}/{ARCH_DIR}"
    debs = []
    for folder, deb in plan_debs(version):
        path = "/".join(p for p in (base, folder, deb.filename) if p)
        debs.append((path, build_deb(deb)))
    package_list = "".join(f"{path}\n" for path, _ in sorted(debs))
    files = [("efa_installer.sh", _installer_source("efa_installer.sh"), 0o755),
             ("common.sh", _installer_source("common.sh"), 0o644),
             ("env.sh", f"EFA_INSTALLER_VERSION={version}\n".encode(), 0o644),
             ("package_list.txt", package_list.encode(), 0o644),
             *((path, content, 0o644) for path, content in debs)]
    entries: list[tuple[str, bytes | None, int, str | None]] = [
        (f"{TOP}/{d}/" if d != "." else f"{TOP}/", None, 0o755, None) for d in _dirs(p for p, _, _ in files)]
    entries += [(f"{TOP}/{path}", content, mode, None) for path, content, mode in files]
    return _gzip(_tar_bytes(entries, 0))


def sha256(version: str) -> str:
    """The sha256 of the lab's tarball of an EFA release (what a bundle's efa_installer_sha256 must say)."""
    return hashlib.sha256(tarball(version)).hexdigest()


def bundle_versions(dirs: Iterable[Path] = BUNDLE_DIRS) -> list[str]:
    """Every EFA installer release (`efa_installer`) the bundle files in `dirs` name, sorted."""
    versions = set()
    for folder in dirs:
        for path in sorted(Path(folder).glob("*.yaml")):
            data = yaml.safe_load(path.read_text()) or {}
            if data.get("efa_installer") is not None:
                versions.add(str(data["efa_installer"]))
    return sorted(versions)


def publish(artifacts_dir: Path, dirs: Iterable[Path] = BUNDLE_DIRS) -> list[Path]:
    """Write (or rewrite, when its bytes changed) the tarball of every EFA release the bundles name under
    artifacts_dir/efa/; the paths written or already current."""
    out = []
    for version in bundle_versions(dirs):
        target = Path(artifacts_dir) / artifact_path(version)
        data = tarball(version)
        if not target.exists() or target.read_bytes() != data:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".partial")
            tmp.write_bytes(data)
            tmp.replace(target)
        out.append(target)
    return out
