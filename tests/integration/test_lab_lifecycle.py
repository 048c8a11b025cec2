"""`fleet lab up` then `fleet lab down` leaves no process, mount, listening port or lock behind."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLEET = str(Path(sys.executable).parent / "fleet")


def _lab_processes(state_dir: Path) -> list[str]:
    marker = str(state_dir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes():
                    found.append(f"{entry.name}: {(entry / 'comm').read_text().strip()}")
            except OSError:
                continue
    return found


def _mounts(state_dir: Path) -> list[str]:
    return [line for line in Path("/proc/self/mounts").read_text().splitlines() if str(state_dir) in line]


def _listening(ports: range) -> list[int]:
    out = []
    for port in ports:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                out.append(port)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")
def test_up_then_down_leaves_nothing(tmp_path):
    state = tmp_path / "lab"
    base = 26000
    fleet = [FLEET, "lab"]
    args = ["--state-dir", str(state)]
    up = subprocess.run([*fleet, "up", *args, "--port-base", str(base)], capture_output=True, text=True,
                        cwd=ROOT, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    ports = range(base, base + 306)
    assert len(_listening(ports)) >= 5 + 4, "hosts' sshd and the services should be listening"
    assert _mounts(state) and _lab_processes(state) and (state / "lab.lock").exists()
    assert _nft_table(base), "the cloud-like hosts' firewall should be loaded"
    inv = subprocess.run([*fleet, "inventory", *args], capture_output=True, text=True, cwd=ROOT)
    ping = subprocess.run([Path(sys.executable).parent / "ansible", "-i", inv.stdout.strip(), "all", "-m", "ping",
                           "-o"], capture_output=True, text=True, timeout=120)
    assert ping.returncode == 0 and ping.stdout.count("SUCCESS") == 5, ping.stdout + ping.stderr

    down = subprocess.run([*fleet, "down", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert _lab_processes(state) == []
    assert _mounts(state) == []
    assert _listening(ports) == []
    assert not (state / "lab.lock").exists()
    assert not _nft_table(base)


def _nft_table(base: int) -> bool:
    return subprocess.run(["nft", "list", "table", "inet", f"fleet_lab_{base}"], capture_output=True).returncode == 0


def test_lab_up_refuses_without_root():
    """Not root: a clear error and exit 2, nothing started."""
    state = Path(tempfile.mkdtemp(prefix="fleet-lab-noroot-"))
    try:
        cmd = [FLEET, "lab", "up", "--state-dir", str(state / "lab"), "--port-base", "26500"]
        if os.geteuid() == 0:  # drop to nobody for this one command
            os.chmod(state, 0o777)
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "needs root" in r.stdout + r.stderr
        assert _lab_processes(state) == [] and not (state / "lab" / "hosts").exists()
    finally:
        shutil.rmtree(state)


@pytest.mark.skipif(os.geteuid() != 0, reason="the package check comes after the root check")
def test_lab_up_names_missing_packages(tmp_path):
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))  # no system tools on PATH
    r = subprocess.run([FLEET, "lab", "up", "--state-dir", str(tmp_path / "lab"), "--port-base", "26600"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 2
    out = r.stdout + r.stderr
    assert "missing system packages" in out and "systemd-container" in out and "haproxy" in out
    assert not (tmp_path / "lab" / "hosts").exists()
