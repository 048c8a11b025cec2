"""The services around the lab's hosts, all on loopback: NUT upsd + dummy-ups, HAProxy, an HTTP
server for the apt repository and the model weights, and the Redfish emulator.

Each is a child process of the lab daemon, started and stopped by PID, its log under
`<lab>/logs/`. Config files are rendered from the fleet model and the lab's port plan.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from infra.model.fleet import Fleet, OnpremSite
from lab import efa_installer
from lab.artifacts import synthetic_weights
from lab.layout import Layout, Ports

NUT_DIR = Path("/lib/nut")


def wait_for_port(port: int, timeout: float, host: str = "127.0.0.1") -> bool:
    """Whether a TCP port accepts a connection within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def ssh_banner(port: int, timeout: float = 2) -> bool:
    """Whether sshd answers on a loopback port (it sends its `SSH-` banner)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False

def port_in_use(port: int) -> bool:
    """Whether something listens on a loopback port."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Service:
    """One service process of the lab."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int | None = None
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the process in its own session, its output appended to its log."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env}, start_new_session=True)

    def ready(self, timeout: float = 20) -> None:
        """Wait until it listens on its port; RuntimeError with its log's last lines when it does not."""
        if self.port and not wait_for_port(self.port, timeout):
            rc = self.proc.poll() if self.proc else None
            tail = self.log.read_text(errors="replace").splitlines()[-10:] if self.log.exists() else []
            raise RuntimeError(f"{self.name} is not listening on 127.0.0.1:{self.port} (exit {rc}):\n"
                               + "\n".join(tail))

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL when it is still running after `timeout` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


# --- NUT ---------------------------------------------------------------------------------------

UPS_ON_LINE = {"battery.charge": "100", "battery.runtime": "3690", "ups.load": "35", "ups.status": "OL",
               "input.voltage": "230.0", "output.voltage": "230.0"}
UPS_ON_BATTERY = {**UPS_ON_LINE, "battery.charge": "42", "battery.runtime": "610", "ups.status": "OB DISCHRG"}


def ups_units(fleet: Fleet) -> list[tuple[str, str]]:
    """(site, ups name) for every UPS unit of the fleet."""
    return [(s.name, u.name) for s in fleet.sites.values() if isinstance(s, OnpremSite) for u in s.ups]


def write_ups_state(nut_dir: Path, ups: str, on_battery: bool) -> None:
    """Rewrite a dummy-ups .dev file; the driver re-reads it when its mtime changes."""
    values = UPS_ON_BATTERY if on_battery else UPS_ON_LINE
    dev = nut_dir / f"{ups}.dev"
    previous = int(dev.stat().st_mtime) if dev.exists() else 0
    tmp = dev.with_suffix(".tmp")
    tmp.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    # dummy-ups compares whole-second mtimes: two writes within one second must still differ
    stamp = max(time.time(), previous + 1)
    os.utime(tmp, (stamp, stamp))
    tmp.replace(dev)


def nut_services(layout: Layout, fleet: Fleet, ports: Ports, monitor_password: str) -> list[Service]:
    """NUT's configuration for the fleet's UPS units and its services: a dummy-ups driver per unit, upsd."""
    conf = layout.service_dir("nut")
    state = conf / "state"
    state.mkdir(parents=True, exist_ok=True)
    nut = pwd.getpwnam("nut")
    os.chown(state, nut.pw_uid, nut.pw_gid)
    os.chmod(state, 0o770)
    units = [u for _, u in ups_units(fleet)]
    (conf / "nut.conf").write_text("MODE=standalone\n")
    (conf / "ups.conf").write_text("maxretry = 3\n" + "".join(
        f"[{u}]\n  driver = dummy-ups\n  port = {u}.dev\n  desc = \"lab UPS {u}\"\n" for u in units))
    (conf / "upsd.conf").write_text(f"LISTEN 127.0.0.1 {ports.upsd}\nMAXAGE 15\n")
    write_private(conf / "upsd.users", f"[monitor]\n  password = {monitor_password}\n  upsmon secondary\n", 0o640)
    for name in ("ups.conf", "upsd.conf", "upsd.users", "nut.conf"):
        os.chown(conf / name, 0, nut.pw_gid)
        os.chmod(conf / name, 0o640)
    os.chmod(conf, 0o755)
    for u in units:
        if not (conf / f"{u}.dev").exists():
            write_ups_state(conf, u, on_battery=False)
    env = {"NUT_CONFPATH": str(conf), "NUT_STATEPATH": str(state)}
    logs = layout.root / "logs"
    drivers = [Service(f"dummy-ups[{u}]", [str(NUT_DIR / "dummy-ups"), "-a", u, "-F", "-u", "root"],
                       logs / f"nut-{u}.log", env) for u in units]
    upsd = Service("upsd", [str(NUT_DIR / "upsd"), "-F", "-u", "root"], logs / "upsd.log", env, ports.upsd)
    return [*drivers, upsd]


# --- HAProxy -----------------------------------------------------------------------------------

def haproxy_service(layout: Layout, fleet: Fleet, ports: Ports) -> Service:
    """HAProxy with a frontend and a backend per pool, health-checking the hosts' serving ports."""
    conf = layout.service_dir("haproxy")
    conf.mkdir(parents=True, exist_ok=True)
    lines = [
        "global",
        f"    stats socket ipv4@127.0.0.1:{ports.haproxy_api} level admin",
        "    maxconn 4096",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    retries 3",
        "    option redispatch",
        "    retry-on conn-failure empty-response response-timeout 503",
    ]
    for pool in sorted(fleet.pools):
        lines += [f"frontend fe_{pool}", f"    bind 127.0.0.1:{ports.frontends[pool]}", f"    default_backend {pool}",
                  f"backend {pool}", "    balance leastconn", "    option httpchk GET /health",
                  "    default-server inter 1s fall 2 rise 1"]
        for host in sorted(h.name for h in fleet.hosts_in(pool)):
            lines.append(f"    server {host} 127.0.0.1:{ports.hosts[host].serving} check")
    (conf / "haproxy.cfg").write_text("\n".join(lines) + "\n")
    return Service("haproxy", ["haproxy", "-db", "-f", str(conf / "haproxy.cfg")], layout.root / "logs/haproxy.log",
                   port=ports.haproxy_api)


# --- HTTP: apt repository + model weights ------------------------------------------------------

def publish_artifacts(layout: Layout, bundle_dirs: Sequence[Path]) -> int:
    """Synthetic weights for every model a bundle in `bundle_dirs` names (the releases and the lab's own bundles,
    lab/releases.py SOURCES), under www/artifacts, and the EFA installer tarball of every EFA release they name
    (www/artifacts/efa/, lab/efa_installer.py); returns the count of weights files."""
    efa_installer.publish(layout.www / "artifacts", bundle_dirs)
    count = 0
    for release in sorted(p for d in bundle_dirs for p in d.glob("*.yaml")):
        data = yaml.safe_load(release.read_text()) or {}
        for model in data.get("models", []):
            weights = model["weights"]
            target = layout.www / "artifacts" / weights["path"]
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(".partial")
                tmp.write_bytes(synthetic_weights(weights["path"], weights["size_bytes"]))
                tmp.replace(target)
            count += 1
    return count


def http_service(layout: Layout, ports: Ports) -> Service:
    """Python's HTTP server over www/ (the apt repository and the artifacts)."""
    return Service("http", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                            str(layout.www), str(ports.http)], layout.root / "logs/http.log", port=ports.http)


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write a file that holds a secret, created with `mode` (never readable by others, not even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), mode)  # an existing file keeps its old mode through O_CREAT
        out.write(text)


def new_secret() -> str:
    """A random password for a lab service (the UPS monitor user, the BMCs)."""
    return secrets.token_urlsafe(18)


def require_commands(commands: list[str]) -> list[str]:
    """The commands the lab needs that are missing, with the Debian package that has each."""
    packages = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container", "haproxy": "haproxy",
                "ssh-keygen": "openssh-client", "ssh": "openssh-client", "dpkg-deb": "dpkg-dev",
                "gpg": "gnupg", "apt-ftparchive": "apt-utils", "upsc": "nut-client",
                "docker-registry": "docker-registry", "nft": "nftables"}
    missing = [f"{c} (Debian package {packages.get(c, c)})" for c in commands if not shutil.which(c)]
    if not (NUT_DIR / "upsd").exists():
        missing.append("/lib/nut/upsd (Debian package nut-server)")
    return missing
