"""The lab daemon: runs the lab's services and supervises its containers until told to stop.

Started detached by `fleet lab up` (`python -m lab.daemon STATE_DIR`); `fleet lab down` sends it
SIGTERM, and it powers the containers off through their init, stops the services, unmounts the
overlays and releases the lab lock before it exits.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from infra.model.fleet import load_stack
from lab import images, services
from lab.cloud import cloud_hosts, firewall_down, firewall_up, machines
from lab.hosts import HostSupervisor, unmount_overlay
from lab.layout import LabState, Layout, Ports
from lab.redfish import RedfishEmulator


class Daemon:
    """The lab daemon: the lab's services, Redfish emulator and one supervisor per host container."""

    def __init__(self, root: Path):
        self.layout = Layout(root, Path("/nonexistent"))
        state = LabState.load(self.layout)
        if state is None:
            raise SystemExit(f"{root}: no lab.json; run `fleet lab up`")
        self.state = state
        self.fleet = load_stack(state.stack, state.project_dir)
        self.ports = Ports.plan(self.fleet, state.port_base)
        self.stop_requested = threading.Event()
        self.services: list[services.Service] = []
        self.hosts: dict[str, HostSupervisor] = {}
        self.redfish: RedfishEmulator | None = None
        self.log_file = open(self.layout.daemon_log, "a", buffering=1)  # noqa: SIM115 - lives as long as the daemon

    def log(self, message: str) -> None:
        """Append a time-stamped line to the daemon log."""
        self.log_file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")

    def run(self) -> int:
        """Take the lab lock, start everything, serve until SIGTERM/SIGINT, shut down; the exit status."""
        lock = open(self.layout.lock_file, "w")  # noqa: SIM115 - held (flock) until shutdown
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.log("another lab daemon holds the lock; exiting")
            return 3
        lock.write(json.dumps({"pid": os.getpid(), "started": time.time()}))
        lock.flush()
        signal.signal(signal.SIGTERM, lambda *_: self.stop_requested.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_requested.set())
        try:
            self.start()
            self._write_ready("running")
            while not self.stop_requested.wait(1):
                pass
        except Exception as exc:  # report why the lab could not start, then clean up
            self.log(f"error: {exc}")
            self._write_ready(f"failed: {exc}")
        finally:
            self.shutdown()
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
            self.layout.lock_file.unlink(missing_ok=True)
        return 0

    def start(self) -> None:
        """Start the HTTP, NUT and HAProxy services, the Redfish emulator when a host has a BMC, the hosts."""
        secrets = json.loads((self.layout.root / "secrets.json").read_text())
        self.services = [services.http_service(self.layout, self.ports),
                         *services.nut_services(self.layout, self.fleet, self.ports, secrets["ups_monitor"]),
                         services.haproxy_service(self.layout, self.fleet, self.ports),
                         images.registry_service(self.layout.service_dir("registry"), self.ports.registry)]
        systems = sorted(h.name for h in self.fleet.hosts.values() if h.bmc)
        if systems:
            self.log("starting the Redfish emulator")
            self.redfish = RedfishEmulator(self.layout.service_dir("redfish"), systems, self.ports.redfish,
                                           username="admin", password=secrets["bmc"]).start()
        for svc in self.services:
            self.log(f"starting {svc.name}")
            svc.start()
        for svc in self.services:
            svc.ready()
        cloud = cloud_hosts(self.fleet)
        if cloud:  # the cloud-like hosts' private subnet, before any of them boots
            firewall_up(self.ports.base, [self.ports.hosts[n].ssh for n in cloud])
            self.log(f"firewall: SSH to {', '.join(cloud)} only through the bastion")
        for name in machines(self.fleet):
            sup = HostSupervisor(name, self.layout.host(name), self.log)
            self.hosts[name] = sup
            sup.start()

    def shutdown(self) -> None:
        """Power the containers off, stop the services and the emulator, unmount the overlays."""
        self.log("stopping containers")
        with ThreadPoolExecutor(max_workers=max(1, len(self.hosts))) as pool:
            list(pool.map(lambda sup: sup.stop(), self.hosts.values()))
        for svc in reversed(self.services):
            self.log(f"stopping {svc.name}")
            svc.stop()
        if self.redfish is not None:
            self.redfish.stop()
        for name in machines(self.fleet):
            try:
                unmount_overlay(self.layout.host(name))
            except Exception as exc:
                self.log(f"{name}: unmount failed: {exc}")
        firewall_down(self.ports.base)
        self._write_ready("stopped")
        self.log("stopped")

    def _write_ready(self, state: str) -> None:
        path = self.layout.root / "daemon.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"state": state, "pid": os.getpid(), "at": time.time()}))
        tmp.replace(path)


def main() -> None:
    """`python -m lab.daemon STATE_DIR`: run the daemon of the lab in STATE_DIR."""
    sys.exit(Daemon(Path(sys.argv[1])).run())


if __name__ == "__main__":
    main()
