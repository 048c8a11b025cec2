"""Host keys and secrets on the lab (issue 11).

One host's SSH host key is replaced behind the tool's back; converge, verify, drift and patch run must
each refuse that host, saying its host key changed, and touch nothing on it, while the other host of
its pool goes on. The replacement is what a man-in-the-middle or a silently reinstalled host looks like
to the client: the same address and port answering with a key that is not the one in known_hosts.

The commands run with secrets exported (as a CI job has them) and with the lab's own (the NUT monitor
and BMC passwords); afterwards no file the tool wrote holds any of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import lab_release

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
FLEET = str(Path(sys.executable).parent / "fleet")
LAB_POLICY = ROOT / "lab/policy.yaml"
# the victim has a pool of its own: an unreachable host counts as out of service, so a victim in the
# peer's pool would (rightly) leave the peer no room under max_unavailable 1
VICTIM, PEER = "r1-outpost-0", "dgx-a2"
CHANGED = "host key changed"
# what a CI job exports; none of it may reach a file the tool writes
EXPORTED = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-fleet-test-secret", "AWS_SESSION_TOKEN": "FQoGZXIv-fleet-test",
            "GITHUB_TOKEN": "ghp_fleetTestToken0123456789", "ANSIBLE_BECOME_PASS": "become-fleet-test-pass"}
STARTED = time.time()


def fleet(*args, timeout=1500) -> subprocess.CompletedProcess:
    proc = subprocess.run([FLEET, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **EXPORTED})
    print(f"$ fleet {' '.join(map(str, args))} -> exit {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


def _close_ssh_masters() -> None:
    """Ansible's (and testinfra's) multiplexed connections outlive a run by 60 s: a master opened before the key
    changed would carry new sessions without a new handshake. Close them, so each command connects afresh."""
    for sock in (Path.home() / ".ansible/cp").glob("*"):
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"], capture_output=True, timeout=10)


def _footprint(lab, host: str) -> dict[str, str]:
    """What a converge or a patch changes on a host, read from its overlay (not over SSH)."""
    root = lab.lab.layout.host(host).merged
    out = {}
    for rel in ("etc/fleet/bundle.json", "var/lib/dpkg/status"):
        path = root / rel
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"
    return out


def _release(lab, host: str) -> str:
    return json.loads((lab.lab.layout.host(host).merged / "etc/fleet/bundle.json").read_text())["release"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Where the module's commands write (journal, Ansible artifacts, reports, JUnit)."""
    return tmp_path_factory.mktemp("security")


@pytest.fixture(scope="module")
def replaced_key(lab):
    """VICTIM answers with a new host key until the module ends; then its old key is back."""
    for host in (VICTIM, PEER):
        if not (lab.lab.layout.host(host).merged / "etc/fleet/bundle.json").exists():
            pytest.fail(f"{host} was never converged: run the module after test_pin_verify/test_rollout")
    swap = ("cd /etc/ssh && mv ssh_host_ed25519_key ssh_host_ed25519_key.orig && "
            "mv ssh_host_ed25519_key.pub ssh_host_ed25519_key.pub.orig && "
            "ssh-keygen -q -t ed25519 -N '' -C impostor -f ssh_host_ed25519_key && systemctl restart ssh")
    lab.ssh(VICTIM, swap)
    _close_ssh_masters()
    probe = subprocess.run([*lab.ssh_argv(VICTIM), "true"], capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0 and "REMOTE HOST IDENTIFICATION HAS CHANGED" in probe.stderr, probe.stderr
    yield lab
    # back to the key the lab's known_hosts holds, through a connection that trusts the new one on purpose
    new_key = (lab.lab.layout.host(VICTIM).merged / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[1]
    trust = lab.lab.layout.root / "impostor_known_hosts"
    trust.write_text(f"[127.0.0.1]:{lab.lab.ports.hosts[VICTIM].ssh} ssh-ed25519 {new_key}\n")
    argv = [f"UserKnownHostsFile={trust}" if a.startswith("UserKnownHostsFile=") else a
            for a in lab.ssh_argv(VICTIM)]
    restore = ("cd /etc/ssh && mv ssh_host_ed25519_key.orig ssh_host_ed25519_key && "
               "mv ssh_host_ed25519_key.pub.orig ssh_host_ed25519_key.pub && systemctl restart ssh")
    subprocess.run([*argv, restore], capture_output=True, text=True, timeout=60, check=True)
    trust.unlink()
    _close_ssh_masters()
    assert lab.ssh(VICTIM, "true").returncode == 0


def test_converge_refuses_the_host_whose_key_changed(replaced_key, work):
    lab = replaced_key
    release = _release(lab, PEER)
    before = _footprint(lab, VICTIM)
    run = fleet("converge", "--release", lab_release(release), "--inventory", lab.inventory, "--limit",
                f"{VICTIM},{PEER}", "--report", work / "converge.json")
    out = run.stdout + run.stderr
    assert run.returncode == 1 and CHANGED in out, out[-3000:]
    assert _footprint(lab, VICTIM) == before
    assert f"{PEER}" in out and _release(lab, PEER) == release


def test_verify_refuses_the_host_whose_key_changed(replaced_key, work):
    lab = replaced_key
    _close_ssh_masters()
    run = fleet("verify", "--release", lab_release(_release(lab, PEER)), "--inventory", lab.inventory,
                "--limit", f"{VICTIM},{PEER}", "--junit", work / "junit.xml")
    out = run.stdout + run.stderr
    assert run.returncode == 1 and CHANGED in out, out[-3000:]
    junit = (work / "junit.xml").read_text()  # pytest's own report: OpenSSH's words
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in junit or CHANGED in junit


def test_drift_refuses_the_host_whose_key_changed(replaced_key):
    lab = replaced_key
    run = fleet("drift", "--release", lab_release(_release(lab, PEER)), "--inventory", lab.inventory, "--limit",
                f"{VICTIM},{PEER}", "--json")
    assert run.returncode == 1
    found = json.loads(run.stdout)
    victim = [d for d in found if d["host"] == VICTIM]
    assert victim and all(CHANGED in d["found"] for d in victim), found
    assert not [d for d in found if d["host"] == PEER], "the peer does not drift"


def test_patch_run_skips_the_host_whose_key_changed_and_patches_the_other(replaced_key, work):
    lab = replaced_key
    _close_ssh_masters()
    current = _release(lab, PEER)
    target = "2026-10" if current == "2026-11" else "2026-11"
    before = _footprint(lab, VICTIM)
    run = fleet("patch", "run", "--release", lab_release(target), "-i", lab.inventory, "--policy", LAB_POLICY,
                "--limit", f"{VICTIM},{PEER}", "--journal", work / "journal.db", "--ignore-window",
                "--report-dir", work / "reports")
    out = run.stdout + run.stderr
    assert f"{VICTIM}: skipped: unreachable at preflight: {CHANGED}" in out, out[-4000:]
    # the peer patched, the victim not: partly done, and the summary says which host and why
    assert run.returncode == 5 and f"{VICTIM}: skipped unreachable: unreachable at preflight" in out, out[-4000:]
    report = json.loads((work / "reports/report.json").read_text())
    assert report["skipped"][VICTIM].startswith(f"unreachable at preflight: {CHANGED}")
    assert report["hosts"][PEER]["state"] == "done", report["hosts"]
    assert _footprint(lab, VICTIM) == before and _release(lab, PEER) == target
    # the run's Ansible was told to check host keys, whatever ansible-runner's default is
    commands = list((work / "ansible").rglob("artifacts/*/command"))
    assert commands
    for command in commands:
        env = json.loads(command.read_text())["env"]
        assert env["ANSIBLE_HOST_KEY_CHECKING"] == "True", command


def test_no_secret_reaches_a_file_the_tool_wrote(replaced_key, work):
    """Journal, reports, events, Ansible's artifacts, the recap, JUnit and the host checks' logs."""
    lab = replaced_key
    lab_secrets = json.loads((lab.lab.layout.root / "secrets.json").read_text())
    secrets = [*EXPORTED.values(), *lab_secrets.values()]
    written = [p for p in work.rglob("*") if p.is_file()]
    written += [p for d in Path("/tmp").glob("fleet-verify-*") if d.stat().st_mtime >= STARTED
                for p in d.rglob("*") if p.is_file()]
    assert len(written) > 20 and any(p.name == "command" for p in written) and any(p.suffix == ".db" for p in written)
    leaks = [(str(p), s[:6]) for p in written for s in secrets if s.encode() in p.read_bytes()]
    assert leaks == []
