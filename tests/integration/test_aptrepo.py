"""The lab's signed apt repository: built once per session in tmp, checked as apt and dpkg see it."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lab import aptrepo
from patching.release.bundle import CONTAINER_TOOLKIT_PACKAGES, load_bundle

ROOT = Path(__file__).resolve().parents[2]
RELEASE_FILES = sorted((ROOT / "releases").glob("*.yaml"))
BUNDLES = [load_bundle(p) for p in RELEASE_FILES]

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("dpkg-deb", "apt-ftparchive", "gpg", "gpgv")),
                                reason="needs dpkg-dev, apt-utils and gnupg (make system-packages)")


@pytest.fixture(scope="session")
def releases_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("releases")
    for path in RELEASE_FILES:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="session")
def repo(tmp_path_factory, releases_dir) -> aptrepo.RepoInfo:
    return aptrepo.build_repo(tmp_path_factory.mktemp("aptrepo"), releases_dir)


def pins(bundle) -> dict[str, str]:
    """Every package and exact version a host of the richest kind (NVSwitch, IB) installs from the repository
    (EFA's come from its installer tarball, lab/efa_installer.py; the server is an image, lab/images.py)."""
    return bundle.packages(nvswitch=True, ib=True)


def control_stanzas(repo: aptrepo.RepoInfo) -> list[dict[str, str]]:
    stanzas = []
    for block in (repo.served_dir / "Packages").read_text().strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(" "))
        stanzas.append(fields)
    return stanzas


def test_every_bundle_pin_is_in_the_repository(repo):
    available = {(s["Package"], s["Version"]) for s in control_stanzas(repo)}
    for bundle in BUNDLES:
        missing = {name: v for name, v in pins(bundle).items() if (name, v) not in available}
        assert not missing, f"{bundle.release}: not in the repository: {missing}"
    for stanza in control_stanzas(repo):
        assert (repo.served_dir / stanza["Filename"]).is_file()
        assert stanza["Architecture"] in ("amd64", "all")


def test_release_is_signed_and_covers_the_index(repo, tmp_path):
    served = repo.served_dir
    assert not list(served.rglob("*.key")) and not (served / "gnupg").exists()
    assert not any("PRIVATE KEY" in p.read_text(errors="ignore") for p in served.iterdir() if p.is_file())
    verified = subprocess.run(["gpgv", "--keyring", str(repo.keyring), str(served / "InRelease")],
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    detached = subprocess.run(["gpgv", "--keyring", str(repo.keyring), str(served / "Release.gpg"),
                               str(served / "Release")], capture_output=True, text=True)
    assert detached.returncode == 0, detached.stderr
    tampered = tmp_path / "InRelease"
    tampered.write_text((served / "InRelease").read_text().replace("Origin: Fleet Lab", "Origin: Mallory"))
    assert subprocess.run(["gpgv", "--keyring", str(repo.keyring), str(tampered)], capture_output=True).returncode
    release = (served / "Release").read_text()
    sha256 = release.split("SHA256:\n", 1)[1]
    for name in ("Packages", "Packages.gz"):
        digest = hashlib.sha256((served / name).read_bytes()).hexdigest()
        assert f"{digest} {(served / name).stat().st_size:>16} {name}" in sha256


def test_container_toolkit_depends_on_equal_versions(repo):
    for bundle in BUNDLES:
        v = bundle.container_toolkit

        def depends(name: str, version: str) -> str:
            deb = repo.served_dir / f"{name}_{version}_amd64.deb"
            return subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True,
                                  check=True).stdout

        toolkit = depends("nvidia-container-toolkit", v["nvidia-container-toolkit"])
        assert f"nvidia-container-toolkit-base (= {v['nvidia-container-toolkit-base']})" in toolkit
        assert f"libnvidia-container-tools (= {v['libnvidia-container-tools']})" in toolkit
        tools = depends("libnvidia-container-tools", v["libnvidia-container-tools"])
        assert f"libnvidia-container1 (= {v['libnvidia-container1']})" in tools
        assert set(CONTAINER_TOOLKIT_PACKAGES) <= set(pins(bundle))


def test_rebuild_is_cached_and_keeps_the_key(repo, releases_dir):
    again = aptrepo.build_repo(repo.out_dir, releases_dir)
    assert not again.rebuilt and again.fingerprint == repo.fingerprint
    assert again.source_line(8081) == \
        f"deb [signed-by=/usr/share/keyrings/{aptrepo.KEYRING_NAME}] http://127.0.0.1:8081/ /"
    assert again.source_line(8081, "K", "/apt/") == "deb [signed-by=K] http://127.0.0.1:8081/apt/ /"
    assert repo.source_template.format(keyring="K", port=1, path="/") == "deb [signed-by=K] http://127.0.0.1:1/ /"


@pytest.fixture(scope="session", params=[b.release for b in BUNDLES])
def installed(request, repo, tmp_path_factory) -> tuple[Path, object]:
    """One bundle's packages extracted into a throwaway root with dpkg -x (maintainer scripts not run)."""
    bundle = next(b for b in BUNDLES if b.release == request.param)
    root = tmp_path_factory.mktemp(f"root-{bundle.release}")
    owners: dict[str, str] = {}
    for name, version in pins(bundle).items():
        deb = repo.served_dir / f"{name}_{version}_amd64.deb"
        listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
        members = subprocess.run(["tar", "-t"], input=listing, capture_output=True, check=True).stdout.decode()
        for member in members.split():
            if not member.endswith("/"):
                assert member not in owners, f"{member} is in both {owners.get(member)} and {name}"
                owners[member] = name
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    from lab import efa_installer

    for _, efa_deb in efa_installer.plan_debs(bundle.efa_installer):  # what its installer installs
        path = tmp_path_factory.mktemp("efa") / "package.deb"
        path.write_bytes(efa_installer.build_deb(efa_deb))
        subprocess.run(["dpkg", "-x", str(path), str(root)], check=True)
    return root, bundle


def test_installed_layout(installed):
    root, bundle = installed
    for path in ("usr/bin/nvidia-smi", "usr/bin/nvidia-persistenced", "usr/bin/nv-fabricmanager", "usr/sbin/ibstat",
                 "usr/bin/ofed_info", "opt/amazon/efa/bin/fi_info", "usr/bin/nvidia-ctk",
                 "usr/bin/nvidia-container-cli"):
        target = (root / path).resolve()
        assert target.is_file() and os.access(target, os.X_OK), path
        assert target.read_text().startswith("#!/usr/bin/python3\n"), path
        assert (target.parent / "fleetsim.py").is_file(), path
    for unit in ("nvidia-driver-load", "nvidia-persistenced", "nvidia-fabricmanager"):
        assert (root / f"lib/systemd/system/{unit}.service").is_file()
    assert os.readlink(root / "usr/local/cuda") == f"cuda-{bundle.cuda_minor}"
    assert (root / f"usr/local/cuda-{bundle.cuda_minor}/bin/nvcc").is_file()
    info = json.loads((root / "usr/lib/fleet-sim/driver/package.json").read_text())
    assert info["upstream_version"] == bundle.driver.version


def test_installed_tools_run_from_their_package_layout(installed, tmp_path):
    """The packaged tools import fleetsim from beside themselves (no PYTHONPATH), through /usr/bin links."""
    root, bundle = installed
    hw = tmp_path / "hw"
    hw.mkdir()
    (hw / "hardware.json").write_text(json.dumps({
        "hostname": "dgx-a1", "gpu": {"model": "A100-SXM4-80GB", "count": 8, "memory_mib": 81920, "nvswitch": True},
        "ib_hcas": [{"name": "mlx5_0", "guid": "0x0c42a10300010000", "rate": 200}], "efa_devices": 4}))
    env = {"PATH": os.environ["PATH"], "FLEET_SIM_HW_DIR": str(hw), "FLEET_SIM_RUN_DIR": str(tmp_path / "run"),
           "FLEET_SIM_LIB_DIR": str(root / "usr/lib/fleet-sim")}

    def run(path: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(root / path), *args], env=env, capture_output=True, text=True,
                              timeout=30)

    assert run("usr/lib/fleet-sim/driver/nvidia_driver_load.py").returncode == 0
    smi = run("usr/bin/nvidia-smi", "--query-gpu=driver_version,count", "--format=csv,noheader")
    assert smi.stdout.splitlines()[0] == f"{bundle.driver.version}, 8", smi.stderr
    assert run("usr/bin/ofed_info", "-s").stdout.strip() == f"MLNX_OFED_LINUX-{bundle.ofed}:"
    assert run("opt/amazon/efa/bin/fi_info", "-p", "efa", "-t", "FI_EP_RDM").stdout.count("provider: efa") == 4
    assert f"release {bundle.cuda_minor}, V" in run(f"usr/local/cuda-{bundle.cuda_minor}/bin/nvcc", "--version").stdout
    assert not list(root.rglob("__pycache__"))


@pytest.fixture(scope="session")
def served(repo):
    """The repository over HTTP on a free loopback port."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(repo.served_dir))
    handler.log_message = lambda *_: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("apt-get"), reason="apt-get as root")
def test_apt_verifies_and_resolves_exact_pins(repo, served, tmp_path):
    """apt-get update checks the signature with signed-by; an install of the exact pins resolves (simulated)."""
    state = tmp_path / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "sources.list.d"):
        (state / sub).mkdir(parents=True)
    (state / "sources.list").write_text(repo.source_line(served, str(repo.keyring)) + "\n")
    options = ["-o", f"Dir::Etc::sourcelist={state / 'sources.list'}", "-o",
               f"Dir::Etc::sourceparts={state / 'sources.list.d'}", "-o", f"Dir::State::Lists={state / 'lists'}",
               "-o", f"Dir::Cache={state / 'cache'}", "-o", "Dir::State::status=/var/lib/dpkg/status",
               "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root"]
    update = subprocess.run(["apt-get", *options, "update"], capture_output=True, text=True, timeout=120)
    assert update.returncode == 0 and "W:" not in update.stdout + update.stderr, update.stdout + update.stderr
    for bundle in BUNDLES:
        wanted = [f"{n}={v}" for n, v in pins(bundle).items()]
        sim = subprocess.run(["apt-get", *options, "install", "-s", "-y", *wanted], capture_output=True, text=True,
                             timeout=120)
        assert sim.returncode == 0, sim.stdout + sim.stderr
        for name, version in pins(bundle).items():
            assert f"Inst {name} ({version} " in sim.stdout

    other = tmp_path / "other-keyring.gpg"
    other.write_bytes(b"")
    (state / "sources.list").write_text(repo.source_line(served, str(other)) + "\n")
    shutil.rmtree(state / "lists")
    (state / "lists/partial").mkdir(parents=True)
    unsigned = subprocess.run(["apt-get", *options, "update"], capture_output=True, text=True, timeout=120)
    assert unsigned.returncode != 0 and "NO_PUBKEY" in unsigned.stdout + unsigned.stderr
