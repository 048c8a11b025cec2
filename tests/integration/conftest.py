"""One lab for the whole integration session (DEVELOPERS: integration tests share one lab).

The lab runs as root; without root these tests are skipped with the reason. Its state lives in
/tmp/fleet-lab-tests (the base image is cached under /var/cache/fleet-lab, so only the first
session on a machine pays for debootstrap) and it uses ports 23000+, away from a demo lab's 22000+
(both below the ephemeral port range, so no outgoing connection can hold one of them).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.model.access import proxy_command
from lab.cloud import DEFAULT_USER, cloud_hosts
from lab.control import Lab
from lab.inventory import bastion_host_keys, lab_bastion
from tests import cpuhog

ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = Path(os.environ.get("FLEET_TEST_LAB_DIR", "/tmp/fleet-lab-tests"))
PORT_BASE = int(os.environ.get("FLEET_TEST_LAB_PORT_BASE", "23000"))
# the lab's copies of the bundles, their serving images the lab's builds (lab/releases.py); written by `lab up`
LAB_RELEASES = STATE_DIR / "releases"


def lab_release(name: str) -> Path:
    """The lab's copy of bundle `name` (2026-10, 2026-11.1-slow-serving, ...)."""
    return LAB_RELEASES / f"{name}.yaml"


def ansible_failures(stdout: str) -> str:
    """Each failed task of an ansible-playbook run's output, under its TASK line (a recap says only how many)."""
    out, task = [], ""
    for line in stdout.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line
        elif line.startswith(("fatal: ", "failed: ")):
            out += [task, line[:3000]]
    return "\n".join(out)


@dataclass
class LabHandle:
    """What tests get: the lab, its inventory, and ways to reach and break its hosts."""

    lab: Lab

    @property
    def inventory(self) -> Path:
        return self.lab.inventory_path()

    @property
    def hosts(self) -> list[str]:
        return sorted(self.lab.fleet.hosts)

    def cloud(self, host: str) -> bool:
        """Whether `host` is cloud-like: reached through the bastion as the AMI's default user (lab/cloud.py)."""
        return host in cloud_hosts(self.lab.fleet)

    def ssh_argv(self, host: str, timeout: int = 10, user: str | None = None, via_bastion: bool = True) -> list[str]:
        layout = self.lab.layout
        argv = ["ssh", "-i", str(layout.ssh_key), "-o", f"UserKnownHostsFile={layout.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}",
                "-p", str(self.lab.ports.hosts[host].ssh)]
        if self.cloud(host) and via_bastion:
            bastion = lab_bastion(self.lab.ports, bastion_host_keys(layout))
            argv += ["-o", "ProxyCommand=" + proxy_command(bastion, str(layout.known_hosts), str(layout.ssh_key))]
        return [*argv, f"{user or (DEFAULT_USER if self.cloud(host) else 'root')}@127.0.0.1"]

    def ssh(self, host: str, command: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Run `command` as root on a lab host (through sudo on a cloud-like host, as its default user)."""
        if self.cloud(host):
            command = "sudo -n sh -c " + shlex.quote(command)
        proc = subprocess.run([*self.ssh_argv(host), command], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{host}: `{command}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def fault(self, target: str, kind: str, clear: bool = False) -> None:
        self.lab.fault(target, kind, clear, log=lambda _: None)

    def clear_faults(self) -> None:
        for target, kinds in self.lab.faults().items():
            for kind in kinds:
                self.fault(target, kind, clear=True)


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (systemd-nspawn, overlayfs); run `make test` as root")


@pytest.fixture(scope="session")
def lab() -> LabHandle:
    _require_root()
    handle = LabHandle(Lab.open("lab", ROOT, STATE_DIR, PORT_BASE))
    handle.lab.down(log=lambda _: None)  # a lab left over by a killed session
    handle.lab.up(fresh=True, log=lambda line: print(f"[lab] {line}", flush=True))
    yield handle
    leftovers = handle.lab.down(log=lambda _: None)
    assert not leftovers, f"lab down left things behind: {leftovers}"


@pytest.fixture
def clean_faults(lab: LabHandle):
    """Clears every fault a test injected, even when it fails."""
    yield lab
    lab.clear_faults()


@pytest.fixture
def cpu_hog():
    """A busy loop on every core for the whole test (this machine is shared and noisy: the gates must judge
    a good bundle good and a bad one bad while something else competes for every core). Each loop ends by
    itself after 40 minutes at the latest and is killed by its PID when the test ends."""
    with cpuhog.hogging(seconds=2400) as procs:
        yield procs
