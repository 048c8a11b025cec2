"""`fleet lab up|down|status|fault|inventory`: bring the lab up, inspect it, break it, tear it down."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infra.model.errors import InputError
from infra.model.fleet import Fleet, load_stack
from infra.model.inventory import host_vars
from lab import cloud as labcloud
from lab import hosts as labhosts
from lab import services
from lab.base import ensure_base
from lab.hardware import set_fault, write_hardware
from lab.layout import DEFAULT_PORT_BASE, LabState, Layout, Ports
from lab.services import ssh_banner

HOST_FAULTS = ("gpu-missing", "ecc-errors", "ib-port-down", "nvlink-degraded", "host-down", "ssh-hang")
UPS_FAULTS = ("ups-on-battery",)
FAULTS = HOST_FAULTS + UPS_FAULTS
NEEDED_COMMANDS = ["debootstrap", "systemd-nspawn", "nft", "haproxy", "ssh-keygen", "ssh", "dpkg-deb", "gpg",
                   "apt-ftparchive", "upsc", "docker-registry"]

Log = Callable[[str], None]


class LabError(Exception):
    """The lab cannot do what was asked (not root, a package missing, a port taken, ...)."""


def _wait_until(done: Callable[[], bool], timeout: float, interval: float, failure: str) -> None:
    """Poll `done` until it holds; LabError "<failure> within <timeout>s" when it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(interval)
    raise LabError(f"{failure} within {timeout:.0f}s")


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is as good as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ancestors(pid: int) -> set[int]:
    """pid and every process above it."""
    out = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            break
    return out



@dataclass
class Lab:
    """One lab: its fleet, its layout and its ports."""

    stack: str
    project_dir: Path
    layout: Layout
    fleet: Fleet
    ports: Ports

    @classmethod
    def open(cls, stack: str = "lab", project_dir: str | Path = ".", state_dir: str | Path | None = None,
             port_base: int | None = None) -> Lab:
        """The lab of a stack; when it is up, the stack, project directory and ports it was started with. A lab
        that is down (its daemon gone) is the caller's when the caller has the stack file: the recorded project
        directory may be another checkout, whose stack file says something else."""
        layout = Layout.for_stack(stack, state_dir)
        state = LabState.load(layout)
        mine = (Path(project_dir) / f"Pulumi.{stack}.yaml").exists()
        if state is not None and (_pid_alive(state.daemon_pid) or not mine):
            stack, project_dir, port_base = state.stack, state.project_dir, port_base or state.port_base
        fleet = load_stack(stack, project_dir)
        ports = Ports.plan(fleet, port_base or DEFAULT_PORT_BASE)
        return cls(stack, Path(project_dir).absolute(), layout, fleet, ports)

    # --- queries ---------------------------------------------------------------------------------

    def daemon_pid(self) -> int | None:
        """PID of the running lab daemon, None when none runs."""
        try:
            pid = json.loads((self.layout.root / "daemon.json").read_text())["pid"]
        except (FileNotFoundError, KeyError, json.JSONDecodeError):
            return None
        return pid if _pid_alive(pid) else None

    def host_status(self, name: str) -> dict:
        """A lab host's container state as its supervisor last wrote it (`down` when there is none)."""
        try:
            return json.loads(self.layout.host(name).status.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"state": "down"}

    def faults(self) -> dict[str, list[str]]:
        """The faults injected now, by target."""
        try:
            return json.loads((self.layout.root / "faults.json").read_text())
        except FileNotFoundError:
            return {}

    def inventory_path(self) -> Path:
        """The folder of the lab's Ansible inventory."""
        return self.layout.inventory_dir

    @property
    def releases_dir(self) -> Path:
        """The lab's copies of the bundles, pinning the serving images the lab built (lab/releases.py)."""
        return self.layout.releases_dir

    # --- up ----------------------------------------------------------------------------------------

    def up(self, log: Log = print, fresh: bool = False, timeout: float = 180) -> None:
        """Bring the lab up (root only): base image, repository and artifacts, hosts, daemon; torn down if it fails."""
        if os.geteuid() != 0:
            raise LabError("the lab needs root (systemd-nspawn, overlayfs mounts); run `fleet lab up` as root")
        missing = services.require_commands(NEEDED_COMMANDS)
        if missing:
            raise LabError("missing system packages: " + "; ".join(missing)
                           + " — `make demo` / `make test` install them, or apt-get install them")
        if self.daemon_pid():
            log(f"lab {self.stack!r} is already up ({self.layout.root})")
            return
        taken = [p for p in self.ports.all() if services.port_in_use(p)]
        if taken:
            raise LabError(f"loopback ports already in use: {taken[:8]}; choose another --port-base")
        if fresh and (self.layout.root / "hosts").exists():
            shutil.rmtree(self.layout.root / "hosts")
        for stale in ("faults.json", "daemon.json"):
            (self.layout.root / stale).unlink(missing_ok=True)
        try:
            self._up(log, timeout)
        except BaseException:
            self.down(log=lambda _: None)  # nothing half-started stays behind
            raise

    def _up(self, log: Log, timeout: float) -> None:
        started = time.monotonic()
        self.layout.root.mkdir(parents=True, exist_ok=True)
        (self.layout.root / "logs").mkdir(exist_ok=True)
        base = ensure_base(self.layout.cache, log)
        self._publish(log)
        pubkey = self._ssh_key()
        secrets_file = self.layout.root / "secrets.json"
        if not secrets_file.exists():  # the lab's controller-side secrets: NUT monitor and BMC passwords
            services.write_private(secrets_file, json.dumps({"ups_monitor": services.new_secret(),
                                                             "bmc": services.new_secret()}))
        secrets = json.loads(secrets_file.read_text())
        known = []
        cloud = set(labcloud.cloud_hosts(self.fleet))
        for name in sorted(self.fleet.hosts):
            dirs = self.layout.host(name)
            labhosts.mount_overlay(base, dirs)
            hostkey = labhosts.write_host_files(dirs, name, self.ports.hosts[name].ssh, pubkey,
                                                self._user_data(name, pubkey) if name in cloud else None)
            if hostkey:
                known.append(f"[127.0.0.1]:{self.ports.hosts[name].ssh} ssh-ed25519 {hostkey}")
            write_hardware(dirs.hw, name, host_vars(self.fleet, self.fleet.hosts[name]))
            dirs.desired.write_text("up")
        if cloud:
            dirs = self.layout.host(labcloud.BASTION)
            labhosts.mount_overlay(base, dirs)
            bastion_key = labcloud.write_bastion_files(dirs, self.ports.bastion, pubkey)
            known.append(f"[127.0.0.1]:{self.ports.bastion} {bastion_key}")
            dirs.desired.write_text("up")
        self.layout.known_hosts.write_text("\n".join(known) + "\n")
        LabState(self.stack, str(self.project_dir), self.ports.base, hosts=sorted(self.fleet.hosts)).save(self.layout)
        log(f"starting {len(self.fleet.hosts)} hosts" + (" and the bastion" if cloud else "") + " and the lab services")
        with open(self.layout.daemon_log, "a") as out:
            subprocess.Popen([sys.executable, "-m", "lab.daemon", str(self.layout.root)], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                             cwd=Path(__file__).resolve().parents[1])
        self._wait_daemon(timeout=60)
        self._publish_images(base, log)
        host_keys = self._learn_host_keys(sorted(cloud), timeout, log)
        from lab.inventory import write_inventory

        write_inventory(self.fleet, self.layout, self.ports, secrets, host_keys)
        self.wait_hosts(sorted(self.fleet.hosts), timeout, log)
        for _, ups in services.ups_units(self.fleet):  # upsd answers WAIT until dummy-ups has read its file
            self._wait_ups(ups, {"OL", "OB"}, 30, "on line or battery power")
        log(f"lab up in {time.monotonic() - started:.0f}s; inventory: {self.inventory_path()}")

    def _publish(self, log: Log) -> None:
        www = self.layout.www
        www.mkdir(parents=True, exist_ok=True)
        from lab.releases import SOURCES

        releases = self.project_dir / "releases"
        count = services.publish_artifacts(self.layout, [self.project_dir / d for d in SOURCES])
        log(f"artifact store: {count} weights file(s)")
        try:
            from lab.aptrepo import build_repo
        except ImportError:
            return
        info = build_repo(self.layout.repo_dir, releases)
        # serve the repository and the public keyring only: the signing key sits beside them, unserved
        apt = www / "apt"
        apt.mkdir(exist_ok=True)
        for name, target in (("repo", info.served_dir), (info.keyring.name, info.keyring)):
            link = apt / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
        log(f"apt repository: {info.served_dir}")

    def _publish_images(self, base: Path, log: Log) -> None:
        """Build the serving images (one per simulated release), push them to the lab's registry (the daemon
        runs it), and write the lab's copies of the bundles pinning their digests (lab/releases.py)."""
        from lab import images
        from lab.releases import SOURCES, write_releases

        digests = images.push_all(f"127.0.0.1:{self.ports.registry}", base, self.layout.cache,
                                  [self.project_dir / d for d in SOURCES], log=log)
        written = write_releases(self.project_dir, self.layout.releases_dir, digests)
        log(f"the lab's bundles ({len(written)}), pinning its serving images: {self.layout.releases_dir}")

    def _user_data(self, name: str, pubkey: str) -> str:
        """A cloud-like host's user data, rendered by the Pulumi program's own template (infra/userdata.j2)."""
        from infra.aws_common import render_user_data

        return render_user_data(self.fleet, self.fleet.hosts[name], [pubkey.strip()])

    def _learn_host_keys(self, names: list[str], timeout: float, log: Log) -> dict[str, list[str]]:
        """Each cloud-like host's SSH host keys, read from its console output as the Pulumi program reads an
        instance's (infra.model.access.host_keys_from_console): printed there by cloud-init at first boot."""
        from infra.model.access import host_keys_from_console

        keys: dict[str, list[str]] = {}
        deadline = time.monotonic() + timeout
        for name in names:
            dirs = self.layout.host(name)
            power_cycled = False
            while True:
                text = dirs.console_log.read_text(errors="replace") if dirs.console_log.exists() else ""
                if found := host_keys_from_console(text):
                    keys[name] = found
                    log(f"  {name}: {len(found)} host key(s) from its console output")
                    break
                if time.monotonic() > deadline and power_cycled:
                    raise LabError(f"{name}: cloud-init printed no SSH host keys to its console within "
                                   f"{timeout:.0f}s, nor after a power cycle (see {dirs.console_log})")
                if time.monotonic() > deadline:
                    # Seen once on a loaded 2-core machine: cloud-config.service never finished, so cloud-final
                    # (which prints the keys, once per instance) never ran. Stop and start it, as one would an
                    # instance stuck at first boot; cloud-final runs on the next boot.
                    log(f"  {name}: no host keys on its console after {timeout:.0f}s; power-cycling it once")
                    dirs.desired.write_text("down")
                    self._wait_state(name, "down", 120)
                    dirs.desired.write_text("up")
                    power_cycled, deadline = True, time.monotonic() + timeout
                time.sleep(0.5)
        return keys

    def _ssh_key(self) -> str:
        self.layout.ssh_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = self.layout.ssh_key
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet-lab", "-f", str(key)],
                           check=True)
        return key.with_suffix(".pub").read_text()

    def _wait_daemon(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = json.loads((self.layout.root / "daemon.json").read_text())["state"]
            except (FileNotFoundError, json.JSONDecodeError):
                state = "starting"
            if state == "running":
                return
            if state.startswith("failed"):
                raise LabError(f"the lab daemon failed to start: {state} (see {self.layout.daemon_log})")
            time.sleep(0.3)
        raise LabError(f"the lab daemon did not start within {timeout:.0f}s (see {self.layout.daemon_log})")

    def wait_hosts(self, names: list[str], timeout: float, log: Log = print) -> None:
        """Wait until each host's sshd answers with its banner."""
        deadline = time.monotonic() + timeout
        pending = list(names)
        cloud = set(labcloud.cloud_hosts(self.fleet))
        if cloud:
            pending.append(labcloud.BASTION)

        def answers(name: str) -> bool:
            if name == labcloud.BASTION:
                return ssh_banner(self.ports.bastion)
            if name in cloud:  # behind the bastion: only its jump user gets through
                return labcloud.banner_as_jump_user(self.ports.hosts[name].ssh)
            return ssh_banner(self.ports.hosts[name].ssh)

        while pending and time.monotonic() < deadline:
            pending = [n for n in pending if not answers(n)]
            if pending:
                time.sleep(0.5)
        if pending:
            raise LabError(f"hosts not reachable over SSH after {timeout:.0f}s: {', '.join(pending)} "
                           f"(console logs under {self.layout.root / 'hosts'})")
        for n in names:
            log(f"  {n}: ssh on 127.0.0.1:{self.ports.hosts[n].ssh}" + (" (through the bastion)" if n in cloud else ""))

    # --- down --------------------------------------------------------------------------------------

    def down(self, log: Log = print, timeout: float = 150) -> list[str]:
        """Stop everything; returns what was left behind (empty when clean)."""
        pid = self.daemon_pid()
        if pid:
            log(f"stopping the lab daemon (pid {pid}) and its hosts")
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.3)
            if _pid_alive(pid):
                log("the lab daemon did not stop in time; killing what is left")
                os.kill(pid, signal.SIGKILL)
        self._reap_leftovers(log)
        leftovers = self.leftovers()
        for item in leftovers:
            log(f"left behind: {item}")
        if not leftovers:
            (self.layout.root / "faults.json").unlink(missing_ok=True)
            log("lab down: no process, mount, port or lock left")
        return leftovers

    def _processes(self) -> list[int]:
        """PIDs that belong to this lab: anything whose command line or environment names its directory."""
        # the directory as a whole path component (/tmp/lab must not match /tmp/lab-other), in a command
        # line or in the variables that hand it to NUT and the Redfish emulator; never our own ancestors,
        # whose environment may name the lab (FLEET_TEST_LAB_DIR) without belonging to it
        root = re.escape(str(self.layout.root).encode())
        in_argv = re.compile(root + rb"(?=/|\x00|$)")
        in_env = re.compile(rb"(?:^|\x00)(?:NUT_CONFPATH|NUT_STATEPATH|SUSHY_EMULATOR_STATE_DIR)=" + root
                            + rb"(?=/|\x00|$)")
        ancestors = _ancestors(os.getpid())
        mine = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in ancestors:
                continue
            try:
                argv, env = (entry / "cmdline").read_bytes(), (entry / "environ").read_bytes()
            except OSError:
                continue
            if (in_argv.search(argv) or in_env.search(env)) and _pid_alive(int(entry.name)):
                mine.append(int(entry.name))
        for name in self.fleet.hosts:
            pid = self.host_status(name).get("init_pid")
            if pid and _pid_alive(pid) and labhosts.process_name(pid) == "systemd":
                mine.append(pid)
        return sorted(set(mine))

    def _reap_leftovers(self, log: Log) -> None:
        for pid in self._processes():
            log(f"killing leftover process {pid} ({labhosts.process_name(pid)})")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        for name in self.machines():
            try:
                labhosts.unmount_overlay(self.layout.host(name))
            except subprocess.CalledProcessError:
                subprocess.run(["umount", "-l", str(self.layout.host(name).merged)], check=False)
        labcloud.firewall_down(self.ports.base)
        self.layout.lock_file.unlink(missing_ok=True)

    def machines(self) -> list[str]:
        """Every container of the lab (lab.cloud.machines)."""
        return labcloud.machines(self.fleet)

    def leftovers(self) -> list[str]:
        """What a stopped lab left behind: processes, mounts, ports still in use, its lock file."""
        out = [f"process {pid} ({labhosts.process_name(pid)})" for pid in self._processes()]
        out += [f"mount {self.layout.host(n).merged}" for n in self.machines()
                if labhosts.is_mounted(self.layout.host(n).merged)]
        if labcloud.firewall_present(self.ports.base):
            out.append(f"nftables table inet {labcloud.firewall_table(self.ports.base)}")
        out += [f"port 127.0.0.1:{p}" for p in self.ports.all() if services.port_in_use(p)]
        if self.layout.lock_file.exists():
            out.append(f"lock {self.layout.lock_file}")
        return out

    # --- faults ------------------------------------------------------------------------------------

    def fault(self, target: str, kind: str, clear: bool = False, log: Log = print) -> None:
        """Inject a fault on a UPS or a host (remove it with `clear`) and wait until it shows."""
        ups = [u for _, u in services.ups_units(self.fleet)]
        if kind not in FAULTS:
            raise InputError.single("fleet lab fault", "KIND", kind, f"unknown fault; known: {', '.join(FAULTS)}")
        if kind in UPS_FAULTS and target not in ups:
            raise InputError.single("fleet lab fault", "TARGET", target, f"{kind} takes a UPS: {', '.join(ups)}")
        if kind in HOST_FAULTS and target not in self.fleet.hosts:
            raise InputError.single("fleet lab fault", "TARGET", target,
                                    f"no such host; hosts: {', '.join(sorted(self.fleet.hosts))}")
        if not self.daemon_pid():
            raise LabError("the lab is not up")
        if kind == "ups-on-battery":
            services.write_ups_state(self.layout.service_dir("nut"), target, on_battery=not clear)
            self._wait_ups(target, {"OL"} if clear else {"OB"}, 30, "as OL" if clear else "as OB")
        elif kind == "host-down":
            dirs = self.layout.host(target)
            dirs.desired.write_text("up" if clear else "down")
            if clear:
                self.wait_hosts([target], 120, log=lambda _: None)
            else:
                self._wait_state(target, "down", 90)
        elif kind == "ssh-hang":
            self._signal_sshd(target, signal.SIGCONT if clear else signal.SIGSTOP)
        else:
            set_fault(self.layout.host(target).hw, kind, not clear)
        faults = self.faults()
        active = set(faults.get(target, []))
        (active.discard if clear else active.add)(kind)
        faults[target] = sorted(active)
        (self.layout.root / "faults.json").write_text(json.dumps({k: v for k, v in faults.items() if v}))
        log(f"{target}: {kind} {'cleared' if clear else 'injected'}")

    def _ups_flags(self, ups: str) -> set[str]:
        """ups.status as upsd reports it now: {"OL"}, {"OB", "DISCHRG"}, {"WAIT"} before the driver is read."""
        proc = subprocess.run(["upsc", f"{ups}@127.0.0.1:{self.ports.upsd}", "ups.status"],
                              capture_output=True, text=True, timeout=10)
        return set(proc.stdout.split())

    def _wait_ups(self, ups: str, flags: set[str], timeout: float, what: str) -> None:
        """Until upsd reports one of `flags` for the UPS (dummy-ups polls its file every few seconds)."""
        _wait_until(lambda: bool(self._ups_flags(ups) & flags), timeout, 0.5, f"upsd did not report {ups} {what}")

    def _wait_state(self, name: str, state: str, timeout: float) -> None:
        _wait_until(lambda: self.host_status(name).get("state") == state, timeout, 0.3,
                    f"{name} did not reach {state}")

    def _signal_sshd(self, name: str, sig: signal.Signals) -> None:
        pid = self.host_status(name).get("pid")
        if not pid or not _pid_alive(pid):
            raise LabError(f"{name} is not running")
        # the listener is the sshd whose parent is the container's systemd
        for child in labhosts.descendants(pid):
            if labhosts.process_name(child) == "sshd":
                os.kill(child, sig)
