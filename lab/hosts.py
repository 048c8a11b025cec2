"""Lab hosts: one systemd-nspawn container per fleet host, booting real systemd.

Each host is an overlayfs (base image + its own upper dir) with its sshd on its own 127.0.0.1
port. Containers share the machine's network namespace, so everything a host serves listens on a
loopback port the lab assigned. A `systemctl reboot` inside makes systemd-nspawn exit with 133;
`HostSupervisor` starts it again, as `systemd-nspawn@.service` does with RestartForceExitStatus=133.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from lab.layout import CONTAINER_HW_DIR, HostDirs

REBOOT_EXIT = 133


def is_mounted(path: Path) -> bool:
    """Whether something is mounted at `path` (per /proc/self/mounts)."""
    target = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def mount_overlay(base: Path, dirs: HostDirs) -> None:
    """Mount a host's root: its upper dir over the base image, unless it is mounted already."""
    for d in (dirs.upper, dirs.work, dirs.merged, dirs.hw, dirs.containers):
        d.mkdir(parents=True, exist_ok=True)
    if is_mounted(dirs.merged):
        return
    opts = f"lowerdir={base},upperdir={dirs.upper},workdir={dirs.work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs.merged)], check=True)


def unmount_overlay(dirs: HostDirs) -> None:
    """Unmount a host's root if it is mounted."""
    if is_mounted(dirs.merged):
        subprocess.run(["umount", str(dirs.merged)], check=True)


def write_host_files(dirs: HostDirs, name: str, ssh_port: int, authorized_key: str,
                     user_data: str | None = None) -> str | None:
    """Per-host identity written into the overlay before boot; returns the host's public SSH key.

    With `user_data`, the host is cloud-like (lab/cloud.py): cloud-init makes its keys and users at first
    boot from that user data, nothing of ours goes in, and None is returned (its keys are on its console).
    """
    root = dirs.merged
    machine_id = root / "etc/machine-id"
    if not machine_id.read_text().strip():
        machine_id.write_text(os.urandom(16).hex() + "\n")
    # The container's systemd cannot kill a unit's cgroup here (no delegation from a host systemd:
    # "Failed to kill control group ... Input/output error"), so a service that leaves a child behind
    # (upsmon's privileged parent and unprivileged child) would block a reboot forever. Bounded stop
    # timeouts let shutdown go on; systemd-shutdown then kills what is left process by process.
    conf = root / "etc/systemd/system.conf.d"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "10-fleet-lab.conf").write_text("[Manager]\nDefaultTimeoutStopSec=10s\n")
    # upsmon is that service: at stop its parent exits, its child stays until the timeout's SIGKILL, so every
    # lab reboot stood 10 s longer than a real host's. What a real host's systemd does at stop (KillMode=
    # control-group: SIGTERM to every process of the unit), from the unit's process list in the named cgroup
    # hierarchy (systemd reads the cgroup v2 one, where this host lists them as pid 0: hence the error).
    dropin = root / "etc/systemd/system/nut-monitor.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "10-fleet-lab-stop.conf").write_text(
        "[Service]\nExecStop=-/bin/sh -c 'for pid in $$(cat /sys/fs/cgroup/systemd/system.slice/%n/cgroup.procs "
        "2>/dev/null); do [ \"$$pid\" = $$$$ ] || kill -TERM \"$$pid\" 2>/dev/null; done; exit 0'\n")
    if user_data is not None:
        from lab.cloud import write_cloud_host_files

        write_cloud_host_files(dirs, name, ssh_port, user_data)
        return None
    (root / "etc/cloud").mkdir(parents=True, exist_ok=True)
    (root / "etc/cloud/cloud-init.disabled").write_text("a lab host of a hall or an outpost, not an EC2 instance\n")
    (root / "etc/hostname").write_text(name + "\n")
    hosts = root / "etc/hosts"
    hosts.write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    (root / "etc/ssh/sshd_config.d/10-fleet-lab-listen.conf").write_text(
        f"Port {ssh_port}\nListenAddress 127.0.0.1\n"
    )
    key = root / "etc/ssh/ssh_host_ed25519_key"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}", "-f", str(key)],
                       check=True)
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(authorized_key.strip() + "\n")
    os.chmod(ssh_dir / "authorized_keys", 0o600)
    return (root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[1]


def nspawn_command(name: str, dirs: HostDirs) -> list[str]:
    """The systemd-nspawn command that boots a lab host, its hardware folder bound read-only.

    What podman needs inside it: its storage on a plain folder (bound over /var/lib/containers, as a real
    host's disk), and the kernel keyring calls (crun joins a session keyring; nspawn's default filter
    refuses them). nspawn mounts the cgroup controllers read-only, so the lab's inventory turns podman's
    cgroups off (fleet_container_cgroups); a real host keeps them.
    """
    return [
        "systemd-nspawn", "-D", str(dirs.merged), "-M", name, "--boot", "--register=no", "--keep-unit",
        "--console=read-only", "--quiet", f"--bind-ro={dirs.hw}:{CONTAINER_HW_DIR}",
        f"--bind={dirs.containers}:/var/lib/containers", "--system-call-filter=@keyring",
    ]


def _pids_with_parent(parent: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # field 4 is the parent pid; the command name (field 2) may contain spaces
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                out.append(int(entry.name))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: children, their children, and so on."""
    result, todo = [], [pid]
    while todo:
        children = _pids_with_parent(todo.pop())
        result += children
        todo += children
    return result


def process_name(pid: int) -> str:
    """A process's command name (/proc/PID/comm); empty when it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class HostSupervisor(threading.Thread):
    """Keeps one container in its desired state (`up`/`down`), restarting it after a reboot."""

    def __init__(self, name: str, dirs: HostDirs, log):
        super().__init__(name=f"host-{name}", daemon=True)
        self.host = name
        self.dirs = dirs
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.boots = 0
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def desired(self) -> str:
        """The state the lab wants the container in, `up` unless its desired file says otherwise."""
        try:
            return self.dirs.desired.read_text().strip() or "up"
        except FileNotFoundError:
            return "up"

    def _write_status(self, state: str, init_pid: int | None = None) -> None:
        status = {"state": state, "pid": self.proc.pid if self.proc else None, "init_pid": init_pid,
                  "boots": self.boots, "since": time.time()}
        tmp = self.dirs.status.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        tmp.replace(self.dirs.status)

    def run(self) -> None:
        """Boot the container whenever it should be up, again after each reboot, until stopped."""
        while not self.stopping.is_set():
            if self.desired() != "up":
                self._write_status("down")
                self.stopping.wait(0.3)
                continue
            with self.lock:
                if self.stopping.is_set():
                    break
                console = open(self.dirs.console_log, "ab")  # noqa: SIM115 - handed to the child, closed below
                self.proc = subprocess.Popen(nspawn_command(self.host, self.dirs), stdin=subprocess.DEVNULL,
                                             stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
                console.close()
                self.boots += 1
                self._write_status("running", self._find_init())
            rc = self._wait_or_stop()
            self.log(f"{self.host}: container exited with {rc}" + (" (reboot)" if rc == REBOOT_EXIT else ""))
            if rc not in (0, REBOOT_EXIT) and not self.stopping.is_set() and self.desired() == "up":
                self.stopping.wait(2)  # crashed: back off a little before starting it again
        self._write_status("down")

    def _wait_or_stop(self) -> int:
        assert self.proc is not None
        while True:
            try:
                return self.proc.wait(timeout=0.3)
            except subprocess.TimeoutExpired:
                if self.stopping.is_set() or self.desired() != "up":
                    return self.poweroff()

    def poweroff(self, timeout: float = 60) -> int:
        """Clean shutdown through the container's init (SIGTERM to nspawn halts it; exit 0)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else 0
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.log(f"{self.host}: container did not power off within {timeout:.0f}s; killing it")
            for pid in [proc.pid, *descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop supervising: power the container off and wait for the thread to end."""
        self.stopping.set()
        with self.lock:
            self.poweroff()
        self.join(timeout=90)

    def _find_init(self, timeout: float = 5) -> int | None:
        """PID (in the machine's namespace) of the container's systemd, once nspawn has forked it."""
        deadline = time.monotonic() + timeout
        while self.proc is not None and self.proc.poll() is None and time.monotonic() < deadline:
            children = _pids_with_parent(self.proc.pid)
            if children:
                return children[0]
            time.sleep(0.05)
        return None
