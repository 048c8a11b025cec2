"""The lab's signed apt repository of simulated vendor packages.

`build_repo(out_dir, releases_dir)` builds, with dpkg-deb, every package version the release files
name (driver, fabric manager, libnvidia-nscq, CUDA toolkit, NCCL, the four container-toolkit
packages, MLNX OFED; EFA is an installer tarball, lab/efa_installer.py, and the serving engine an image,
lab/images.py), the GPU diagnostics every release gets at the versions fixed in lab/vendor (DCGM:
datacenter-gpu-manager-4-core and -4-cuda12, from lab/vendor/dcgm/dcgm.yaml; nccl-tests, from
lab/vendor/nccl/nccl-versions.yaml), plus the known-bad NCCL releases of
lab/vendor/nccl/nccl-versions.yaml (libnccl2 for every CUDA minor the release files use), into a flat
repository like NVIDIA's CUDA repository:

    out_dir/repo/                              served over HTTP: *.deb, Packages(.gz), Release,
                                               InRelease, Release.gpg
    out_dir/fleet-lab-archive-keyring.gpg      binary public keyring for `signed-by`
    out_dir/gnupg/                             GNUPGHOME with the signing key (never served)

apt source line: `deb [signed-by=KEYRING] http://127.0.0.1:PORT/ /` (RepoInfo.source_line; a path
prefix replaces the first `/` when the directory is served below the web root).
The signing key is generated once (batch mode, no passphrase) and kept across rebuilds, so hosts
that trust it keep trusting the repository. A rebuild is skipped while a hash of the package
sources (lab/vendor/, this file) and the release files is unchanged.

Package names and versions follow NVIDIA's (and Mellanox's, AWS's) conventions for the values of a
release file; the repository's own integration test checks them against the bundles' pins. Release
files are read with plain PyYAML: the lab does not import the patch pipeline.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

VENDOR = Path(__file__).with_name("vendor")
LIB = "/usr/lib/fleet-sim"
KEYRING_NAME = "fleet-lab-archive-keyring.gpg"
KEYRING_IN_HOST = f"/usr/share/keyrings/{KEYRING_NAME}"
SOURCE_TEMPLATE = "deb [signed-by={keyring}] http://127.0.0.1:{port}{path} /"
MAINTAINER = "Fleet lab simulated packages <fleet-lab@localhost>"
KEY_NAME = "Fleet Lab Archive Signing Key <fleet-lab@localhost>"
# NVIDIA names the fabric manager and libnvidia-nscq packages without the branch from R580 on
# (nvidia-fabricmanager-570 before, nvidia-fabricmanager from 580).
UNVERSIONED_FM_FROM_BRANCH = 580
# Fixed timestamps in the packages, so the same sources give byte-identical .deb files.
SOURCE_DATE_EPOCH = "1760000000"


class RepoBuildError(RuntimeError):
    """A release names something the lab cannot simulate, or a build tool failed."""


@dataclass(frozen=True)
class RepoInfo:
    """Where the built repository is and how hosts use it."""

    out_dir: Path
    served_dir: Path
    keyring: Path
    fingerprint: str
    packages: dict[str, tuple[str, ...]]
    rebuilt: bool
    source_template: str = SOURCE_TEMPLATE

    def source_line(self, port: int, keyring: str = KEYRING_IN_HOST, path: str = "/") -> str:
        """The apt source line for a host that has the keyring at `keyring` and reaches served_dir at
        http://127.0.0.1:`port``path` (path "/" when served_dir is the web root, "/apt/" under a prefix)."""
        return self.source_template.format(keyring=keyring, port=port, path=path)


@dataclass
class Deb:
    """One binary package to build: control fields and the files it installs."""

    name: str
    version: str
    upstream: str
    summary: str
    role: str | None = None
    arch: str = "amd64"
    depends: list[str] = field(default_factory=list)
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    scripts: dict[str, str] = field(default_factory=dict)
    conffiles: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        """The .deb file name, NAME_VERSION_ARCH.deb, without the version's epoch (as dpkg-name writes it)."""
        return f"{self.name}_{self.version.partition(':')[2] or self.version}_{self.arch}.deb"

    @property
    def package_json_path(self) -> str:
        """Where the package installs the package.json its role's simulated tools read."""
        return f"{LIB}/{self.role}/package.json"

    def package_json(self) -> dict[str, Any]:
        """What the package's tools read at run time: its name and versions plus role-specific data."""
        return {"package": self.name, "version": self.version, "upstream_version": self.upstream, **self.info}

    def add(self, path: str, content: bytes | str, mode: int = 0o644) -> None:
        """Put a file (text or bytes) with its mode into the package."""
        self.files[path] = (content.encode() if isinstance(content, str) else content, mode)

    def add_tool(self, source: str, *links: str) -> None:
        """Install a vendor script into the role's folder (beside fleetsim.py) and link it from `links`."""
        target = f"{LIB}/{self.role}/{Path(source).name}"
        self.add(target, (VENDOR / source).read_bytes(), 0o755)
        self.add(f"{LIB}/{self.role}/fleetsim.py", (VENDOR / "common/fleetsim.py").read_bytes())
        for link in links:
            self.links[link] = os.path.relpath(target, os.path.dirname(link))

    def add_maintainer_scripts(self, prefix: str) -> None:
        """Take postinst/prerm/postrm from the vendor folder's `PREFIX.<script>` files that exist."""
        for kind in ("postinst", "prerm", "postrm"):
            path = VENDOR / f"{prefix}.{kind}"
            if path.exists():
                self.scripts[kind] = path.read_text()


def _vendor_yaml(name: str) -> dict:
    return yaml.safe_load((VENDOR / name).read_text())


def _commit(*parts: str) -> str:
    """A stable fake git commit id for a simulated build."""
    return hashlib.sha1("/".join(parts).encode()).hexdigest()


def _driver_debs(release: dict) -> list[Deb]:
    version = str(release["driver"]["version"])
    branch = int(version.split(".")[0])
    driver = Deb(f"cuda-drivers-{branch}", f"{version}-1", version, f"NVIDIA driver {version} (R{branch})",
                 role="driver", depends=["python3"])
    driver.add_tool("driver/nvidia_smi.py", "/usr/bin/nvidia-smi")
    driver.add_tool("driver/nvidia_persistenced.py", "/usr/bin/nvidia-persistenced")
    driver.add_tool("driver/nvidia_driver_load.py")
    for unit in ("nvidia-driver-load.service", "nvidia-persistenced.service"):
        driver.add(f"/lib/systemd/system/{unit}", (VENDOR / "driver" / unit).read_bytes())
    driver.add_maintainer_scripts("driver/cuda-drivers")

    suffix = "" if branch >= UNVERSIONED_FM_FROM_BRANCH else f"-{branch}"
    fm_version = str(release["fabric_manager"])
    fm = Deb(f"nvidia-fabricmanager{suffix}", f"{fm_version}-1", fm_version,
             f"NVIDIA fabric manager {fm_version} for NVSwitch systems", role="fabricmanager", depends=["python3"])
    fm.add_tool("driver/nv_fabricmanager.py", "/usr/bin/nv-fabricmanager")
    fm.add("/lib/systemd/system/nvidia-fabricmanager.service",
           (VENDOR / "driver/nvidia-fabricmanager.service").read_bytes())
    fm.add_maintainer_scripts("driver/fabricmanager")

    nscq_version = str(release["nscq"])
    nscq = Deb(f"libnvidia-nscq{suffix}", f"{nscq_version}-1", nscq_version,
               f"NVSwitch configuration and query library {nscq_version}", role="nscq")
    return [driver, fm, nscq]


def _cuda_debs(release: dict) -> list[Deb]:
    cuda = str(release["cuda"])
    minor = ".".join(cuda.split(".")[:2])
    nvcc = _vendor_yaml("cuda/nvcc-versions.yaml").get(cuda)
    if nvcc is None:
        raise RepoBuildError(f"no nvcc data for CUDA {cuda}: add it to {VENDOR / 'cuda/nvcc-versions.yaml'}")
    toolkit = Deb(f"cuda-toolkit-{minor.replace('.', '-')}", f"{cuda}-1", cuda, f"CUDA Toolkit {cuda}",
                  depends=["python3"])
    root = f"/usr/local/cuda-{minor}"
    toolkit.add(f"{root}/bin/nvcc", (VENDOR / "cuda/nvcc.py").read_bytes(), 0o755)
    toolkit.add(f"{root}/version.json", json.dumps({
        "cuda": {"name": "CUDA SDK", "version": cuda},
        "cuda_nvcc": {"name": "CUDA NVCC", "version": nvcc["nvcc"], "built_on": nvcc["built_on"],
                      "build": nvcc["build"], "copyright_year": nvcc["copyright_year"]},
    }, indent=3) + "\n")
    toolkit.links["/usr/local/cuda"] = f"cuda-{minor}"

    return [toolkit, _nccl_deb(str(release["nccl"]), minor)]


def _nccl_deb(version: str, cuda_minor: str) -> Deb:
    """libnccl2 = VERSION+cudaX.Y, with the behaviour lab/vendor/nccl/nccl-versions.yaml gives that version."""
    upstream = version.split("-")[0]
    profiles = _vendor_yaml("nccl/nccl-versions.yaml")
    behaviour = {**profiles["default"], **profiles["bad"].get(version, {})}
    return Deb("libnccl2", f"{version}+cuda{cuda_minor}", upstream,
               f"NVIDIA Collective Communication Library (NCCL) {upstream} for CUDA {cuda_minor}", role="libnccl2",
               info={"busbw_factor": float(behaviour["busbw_factor"])})


def bad_nccl_versions() -> list[str]:
    """The known-bad NCCL releases (libnccl2 versions without +cudaX.Y) the repository carries."""
    return sorted(_vendor_yaml("nccl/nccl-versions.yaml")["bad"])


def _diagnostics_debs() -> list[Deb]:
    """DCGM (dcgmi, nv-hostengine, its CUDA plugins) and nccl-tests, at the versions fixed in lab/vendor."""
    dcgm = _vendor_yaml("dcgm/dcgm.yaml")
    upstream = str(dcgm["version"])
    version = f"{dcgm['epoch']}:{upstream}-{dcgm['revision']}"
    core = Deb("datacenter-gpu-manager-4-core", version, upstream,
               f"NVIDIA Datacenter GPU Manager (DCGM) {upstream}: dcgmi, nv-hostengine and the software diagnostics",
               role="dcgm", depends=["python3"])
    core.add_tool("dcgm/dcgmi.py", "/usr/bin/dcgmi")
    core.add_tool("dcgm/nv_hostengine.py", "/usr/bin/nv-hostengine")
    core.add("/usr/lib/systemd/system/nvidia-dcgm.service", (VENDOR / "dcgm/nvidia-dcgm.service").read_bytes())
    core.add_maintainer_scripts("dcgm/datacenter-gpu-manager-4-core")
    plugins = str(dcgm["cuda_plugins"])
    cuda = Deb(f"datacenter-gpu-manager-4-{plugins}", version, upstream,
               f"NVIDIA Datacenter GPU Manager (DCGM) {upstream}: diagnostic plugins for {plugins.upper()} "
               "(memory, pcie, diagnostic, stress tests)",
               role=f"dcgm-{plugins}", depends=[f"datacenter-gpu-manager-4-core (= {version})"])

    exporter_version = str(dcgm["exporter"]["version"])
    exporter = Deb("datacenter-gpu-manager-exporter", f"{exporter_version}-{dcgm['exporter']['revision']}",
                   exporter_version, f"NVIDIA DCGM exporter {exporter_version}: GPU telemetry for Prometheus on :9400",
                   role="dcgm-exporter", depends=[f"datacenter-gpu-manager-4-core (= {version})"])
    exporter.add_tool("dcgm/dcgm_exporter.py", "/usr/bin/dcgm-exporter")
    exporter.add("/etc/dcgm-exporter/default-counters.csv", (VENDOR / "dcgm/default-counters.csv").read_bytes())
    exporter.add("/lib/systemd/system/nvidia-dcgm-exporter.service",
                 (VENDOR / "dcgm/nvidia-dcgm-exporter.service").read_bytes())

    nccl = _vendor_yaml("nccl/nccl-versions.yaml")["nccl_tests"]
    tests_version = str(nccl["version"])
    tests = Deb("nccl-tests", f"{tests_version}-1", tests_version,
                f"NCCL tests {tests_version} (a from-source build in /opt/nccl-tests/build)", role="nccl-tests",
                depends=["python3"], info={"nccl_headers": int(nccl["nccl_headers"])})
    tests.add_tool("nccl/all_reduce_perf.py", "/opt/nccl-tests/build/all_reduce_perf")
    return [core, cuda, exporter, tests]


def _container_toolkit_debs(release: dict) -> list[Deb]:
    versions = {name: str(v) for name, v in release["container_toolkit"].items()}
    debs = []
    for name, version in versions.items():
        upstream = version.split("-")[0]
        deb = Deb(name, version, upstream, f"NVIDIA container toolkit: {name}", role=name,
                  info={"commit": _commit(name, version)})
        if name == "nvidia-container-toolkit":
            deb.depends = [f"nvidia-container-toolkit-base (= {versions['nvidia-container-toolkit-base']})",
                           f"libnvidia-container-tools (= {versions['libnvidia-container-tools']})", "python3"]
            deb.add_tool("container-toolkit/nvidia_container_runtime_hook.py", "/usr/bin/nvidia-container-runtime-hook")
        elif name == "nvidia-container-toolkit-base":
            deb.depends = ["python3"]
            deb.add_tool("container-toolkit/nvidia_ctk.py", "/usr/bin/nvidia-ctk")
        elif name == "libnvidia-container-tools":
            deb.depends = [f"libnvidia-container1 (= {versions['libnvidia-container1']})", "python3"]
            deb.add_tool("container-toolkit/nvidia_container_cli.py", "/usr/bin/nvidia-container-cli")
        debs.append(deb)
    return debs


def _network_debs(release: dict) -> list[Deb]:
    ofed_version = str(release["ofed"])
    ofed = Deb("mlnx-ofed-basic", ofed_version, ofed_version, f"MLNX_OFED {ofed_version} basic user-space tools",
               role="mlnx-ofed-basic", depends=["python3"])
    ofed.add_tool("ofed/ibstat.py", "/usr/sbin/ibstat")
    ofed.add_tool("ofed/ofed_info.py", "/usr/bin/ofed_info")

    # EFA is not a package of this repository: AWS ships it as an installer tarball (lab/efa_installer.py,
    # served from the artifact store), whose packages the installer installs from its own folder.
    return [ofed]


def load_releases(releases_dir: Path) -> list[dict]:
    """Every release file (releases_dir/*.yaml) as plain data, in name order."""
    return [yaml.safe_load(p.read_text()) for p in sorted(Path(releases_dir).glob("*.yaml"))]


def plan_packages(releases: list[dict]) -> list[Deb]:
    """Every package the release files call for, once per (name, version), the GPU diagnostics, and the bad
    NCCL releases (libnccl2 for every CUDA minor a release uses)."""
    debs: dict[tuple[str, str], Deb] = {}
    for release in releases:
        for deb in [*_driver_debs(release), *_cuda_debs(release), *_container_toolkit_debs(release),
                    *_network_debs(release)]:
            debs.setdefault((deb.name, deb.version), deb)
    cuda_minors = sorted({".".join(str(r["cuda"]).split(".")[:2]) for r in releases})
    for deb in [*_diagnostics_debs(), *(_nccl_deb(v, m) for v in bad_nccl_versions() for m in cuda_minors)]:
        debs.setdefault((deb.name, deb.version), deb)
    for deb in debs.values():
        if deb.role:
            deb.add(deb.package_json_path, json.dumps(deb.package_json(), indent=2, sort_keys=True) + "\n")
    return sorted(debs.values(), key=lambda d: (d.name, d.version))


def _control(deb: Deb, installed_kib: int) -> str:
    lines = [f"Package: {deb.name}", f"Version: {deb.version}", f"Architecture: {deb.arch}",
             f"Maintainer: {MAINTAINER}", f"Installed-Size: {installed_kib}", "Section: misc", "Priority: optional"]
    if deb.depends:
        lines.append(f"Depends: {', '.join(deb.depends)}")
    lines += [f"Description: {deb.summary}",
              " Simulated by the fleet lab: same package name, version and file layout as the vendor's,",
              " with tools that print the real formats from the host's simulated hardware."]
    return "\n".join(lines) + "\n"


def _build_deb(deb: Deb, staging: Path, dest: Path) -> None:
    root = staging / f"{deb.name}_{deb.version}"
    for path, (content, mode) in deb.files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)
    for path, link_target in deb.links.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(link_target)
    control = root / "DEBIAN"
    control.mkdir(parents=True)
    size = sum(len(content) for content, _ in deb.files.values())
    (control / "control").write_text(_control(deb, max(1, (size + 1023) // 1024)))
    if deb.conffiles:
        (control / "conffiles").write_text("".join(f"{c}\n" for c in deb.conffiles))
    for kind, text in deb.scripts.items():
        (control / kind).write_text(text)
        (control / kind).chmod(0o755)
    # Directories as dpkg expects them whatever the caller's umask; files carry their own modes.
    for entry in [root, *root.rglob("*")]:
        if entry.is_dir() and not entry.is_symlink():
            entry.chmod(0o755)
    _run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(dest / deb.filename)],
         env={**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH})


def _run(cmd: list[str], **kwargs: Any) -> str:
    try:
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)
    except FileNotFoundError as exc:
        raise RepoBuildError(f"{cmd[0]} is missing (Debian packages dpkg-dev, apt-utils, gnupg)") from exc
    except subprocess.CalledProcessError as exc:
        raise RepoBuildError(f"{' '.join(cmd)} failed ({exc.returncode}): {exc.stderr.strip()}") from exc
    return proc.stdout


def _gpg(home: Path, *args: str, **kwargs: Any) -> str:
    return _run(["gpg", "--homedir", str(home), "--batch", "--no-tty", *args], **kwargs)


def _signing_key(home: Path) -> str:
    """The fingerprint of the lab's signing key in `home`, generated on first use."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    home.chmod(0o700)

    def fingerprint() -> str | None:
        listing = _gpg(home, "--with-colons", "--list-secret-keys")
        return next((line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")), None)

    fpr = fingerprint()
    if fpr is None:
        spec = ("%no-protection\nKey-Type: eddsa\nKey-Curve: ed25519\nKey-Usage: sign\n"
                f"Name-Real: {KEY_NAME.split(' <')[0]}\nName-Email: {KEY_NAME.split('<')[1].rstrip('>')}\n"
                "Expire-Date: 0\n%commit\n")
        _gpg(home, "--gen-key", input=spec)
        fpr = fingerprint()
    if fpr is None:
        raise RepoBuildError(f"gpg generated no key in {home}")
    return fpr


def _inputs_hash(releases_dir: Path) -> str:
    digest = hashlib.sha256()
    vendor = sorted(p for p in VENDOR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    sources = [Path(__file__), *vendor]
    sources += sorted(Path(releases_dir).glob("*.yaml"))
    for path in sources:
        digest.update(str(path.relative_to(path.anchor)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _index(repo: Path, home: Path, fpr: str) -> None:
    """Packages(.gz), Release, InRelease and Release.gpg for a flat repository in `repo`."""
    packages = _run(["apt-ftparchive", "packages", "."], cwd=repo)
    (repo / "Packages").write_text(packages)
    with gzip.GzipFile(repo / "Packages.gz", "wb", mtime=0) as gz:
        gz.write(packages.encode())
    options = []
    for key, value in (("Origin", "Fleet Lab"), ("Label", "Fleet Lab simulated vendor packages"),
                       ("Suite", "fleet-lab"), ("Codename", "fleet-lab"), ("Architectures", "amd64 all"),
                       ("Description", "Simulated NVIDIA and Mellanox packages for the fleet lab")):
        options += ["-o", f"APT::FTPArchive::Release::{key}={value}"]
    release = _run(["apt-ftparchive", *options, "release", "."], cwd=repo)
    (repo / "Release").write_text(release)
    sign = ["--yes", "--local-user", fpr, "--digest-algo", "SHA512"]
    _gpg(home, *sign, "--clearsign", "--output", str(repo / "InRelease"), str(repo / "Release"))
    _gpg(home, *sign, "--armor", "--detach-sign", "--output", str(repo / "Release.gpg"), str(repo / "Release"))


def _package_versions(repo: Path) -> dict[str, tuple[str, ...]]:
    versions: dict[str, list[str]] = {}
    name = None
    for line in (repo / "Packages").read_text().splitlines():
        if line.startswith("Package: "):
            name = line.split(": ", 1)[1]
        elif line.startswith("Version: ") and name:
            versions.setdefault(name, []).append(line.split(": ", 1)[1])
    return {k: tuple(v) for k, v in sorted(versions.items())}


def build_repo(out_dir: Path, releases_dir: Path) -> RepoInfo:
    """Build (or reuse, when its inputs are unchanged) the signed flat repository under out_dir.

    Raises RepoBuildError when a release names something the lab has no data for, or a tool fails.
    Safe to call from several processes at once: they serialise on out_dir/.lock.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    served, home, keyring = out_dir / "repo", out_dir / "gnupg", out_dir / KEYRING_NAME
    stamp = out_dir / ".inputs-sha256"
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            fpr = _signing_key(home)
            inputs = _inputs_hash(Path(releases_dir))
            fresh = stamp.exists() and stamp.read_text() == inputs and (served / "InRelease").exists()
            if not fresh:
                debs = plan_packages(load_releases(releases_dir))
                with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
                    staging, new = Path(tmp) / "staging", Path(tmp) / "repo"
                    staging.mkdir()
                    new.mkdir()
                    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
                        list(pool.map(lambda d: _build_deb(d, staging, new), debs))
                    _index(new, home, fpr)
                    # Swap the new tree in by rename, so an HTTP server never serves half a repository.
                    old = Path(tmp) / "old"
                    if served.exists():
                        served.rename(old)
                    new.rename(served)
                stamp.write_text(inputs)
            if not fresh or not keyring.exists():
                keyring.write_bytes(_export(home, fpr))
        finally:
            # gpg starts an agent per GNUPGHOME; the lab must leave no process behind.
            subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, check=False)
    return RepoInfo(out_dir, served, keyring, fpr, _package_versions(served), rebuilt=not fresh)


def _export(home: Path, fpr: str) -> bytes:
    proc = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--export", fpr], capture_output=True, check=True)
    if not proc.stdout:
        raise RepoBuildError(f"gpg exported no key {fpr} from {home}")
    return proc.stdout
