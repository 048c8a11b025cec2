"""A Redfish BMC for the lab: sushy-tools' emulator with its fake driver, on loopback.

    with RedfishEmulator(state_dir, systems=["dgx-a1", "dgx-a2"]) as bmc:
        bmc.url                      # http://127.0.0.1:PORT, the BMC endpoint a host's `bmc:` names
        bmc.power_state("dgx-a1")    # 'Off'

The fake driver needs no libvirt or VMs: it keeps each system in SQLite under the state dir, so power
state survives a restart of the emulator (one state dir per lab). Like a real BMC it applies a power
change some seconds after accepting it (1 to 11 s here): callers poll. Each system's Redfish `Id` is
the id given here (the emulator also reports it as the system's UUID); it is off at first start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType


class EmulatorError(RuntimeError):
    """The emulator did not start, or answered something unexpected."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the emulator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class RedfishEmulator:
    """One sushy-emulator process serving the given systems; start() and stop() it, or use `with`."""

    def __init__(self, state_dir: str | Path, systems: Sequence[str], port: int | None = None,
                 host: str = "127.0.0.1", username: str | None = None, password: str | None = None):
        if not systems:
            raise ValueError("a BMC needs at least one system")
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        self.state_dir = Path(state_dir)
        self.systems = list(systems)
        self.host = host
        self.port = port or free_port(host)
        self.username = username
        self.password = password
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The BMC endpoint, as a host's `bmc.endpoint` names it."""
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the emulator's output goes (appended across restarts)."""
        return self.state_dir / "sushy-emulator.log"

    def start(self, timeout: float = 30.0) -> RedfishEmulator:
        """Start the emulator and wait until it lists every system; raise EmulatorError with its log if not."""
        if self._proc is not None:
            raise EmulatorError(f"already running as PID {self.pid}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        env = dict(os.environ, SUSHY_EMULATOR_STATE_DIR=str(self.state_dir))
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [_emulator_binary(), "--config", str(config), "--fake", "-i", self.host, "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # its own process group: a Ctrl-C in the lab's terminal does not kill it
            )
        self.pid = self._proc.pid
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the emulator process this object started (by PID): SIGTERM, then SIGKILL after `timeout`."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self.pid = None

    def __enter__(self) -> RedfishEmulator:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def system(self, system_id: str) -> dict:
        """The system's Redfish resource, as JSON."""
        return self._get(f"/redfish/v1/Systems/{system_id}")

    def power_state(self, system_id: str) -> str:
        """'On' or 'Off' as the BMC reports it now."""
        return self.system(system_id)["PowerState"]

    def _write_config(self) -> Path:
        systems = [
            {
                "uuid": sid,
                "name": sid,
                "power_state": "Off",
                # the notifier would PUT every power change to an HTTP endpoint; the lab has none
                "external_notifier": False,
                "nics": [{"mac": _mac(sid), "ip": "127.0.0.1"}],
            }
            for sid in self.systems
        ]
        lines = [
            "SUSHY_EMULATOR_FAKE_DRIVER = True",
            f"SUSHY_EMULATOR_FAKE_SYSTEMS = {systems!r}",
            f"SUSHY_EMULATOR_STATE_DIR = {str(self.state_dir)!r}",
        ]
        if self.username is not None and self.password is not None:
            lines.append(f"SUSHY_EMULATOR_AUTH_FILE = {str(self._write_htpasswd())!r}")
        path = self.state_dir / "emulator.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _write_htpasswd(self) -> Path:
        import bcrypt  # a sushy-tools dependency; its basic-auth middleware only reads bcrypt hashes

        assert self.username is not None and self.password is not None
        digest = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
        path = self.state_dir / "htpasswd"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(f"{self.username}:{digest}\n")
        return path

    def _get(self, path: str) -> dict:
        request = urllib.request.Request(self.url + path)
        if self.username is not None and self.password is not None:
            token = b64encode(f"{self.username}:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise EmulatorError(f"sushy-emulator exited with status {self._proc.returncode}:\n{self._log_tail()}")
            try:
                members = self._get("/redfish/v1/Systems")["Members"]
                listed = {m["@odata.id"].rsplit("/", 1)[-1] for m in members}
                if set(self.systems) <= listed:
                    return
                last = EmulatorError(f"systems listed: {sorted(listed)}")
            except (OSError, urllib.error.URLError, KeyError, ValueError) as exc:
                last = exc
            time.sleep(0.1)
        raise EmulatorError(f"sushy-emulator on {self.url} not ready after {timeout:g}s ({last}):\n{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _emulator_binary() -> str:
    beside = Path(sys.executable).parent / "sushy-emulator"
    found = str(beside) if beside.exists() else shutil.which("sushy-emulator")
    if not found:
        raise EmulatorError("sushy-emulator not found: install sushy-tools (the project's dev extra)")
    return found


def _mac(system_id: str) -> str:
    # a stable, locally administered MAC per system, so PXE-style identities do not change between runs
    digest = hashlib.sha256(system_id.encode()).digest()
    return "02:00:" + ":".join(f"{b:02x}" for b in digest[:4])
