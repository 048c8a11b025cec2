"""Where the lab keeps its state and which loopback ports it uses.

Everything of one lab lives under its state directory (default `./.lab/<stack>`, or
`$FLEET_LAB_DIR`); the debootstrap'd base image is cached once per machine under
`/var/cache/fleet-lab` (or `$FLEET_LAB_CACHE`). Ports are a pure function of the fleet and a base
port, so the inventory, HAProxy and the containers agree without talking to each other.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra.model.fleet import Fleet

# below Linux's ephemeral range (32768-60999): a lab port must never be taken by an outgoing connection
DEFAULT_PORT_BASE = 22000
CONTAINER_HW_DIR = "/var/lib/fleet-lab/hw"


@dataclass(frozen=True)
class HostPorts:
    """A lab host's loopback SSH, serving and DCGM exporter ports."""

    ssh: int
    serving: int
    gpu_metrics: int


@dataclass(frozen=True)
class Ports:
    """Every loopback port of one lab."""

    base: int
    hosts: dict[str, HostPorts]
    frontends: dict[str, int]  # pool -> HAProxy frontend port
    haproxy_api: int
    upsd: int
    redfish: int
    http: int  # apt repository and model-weights artifacts
    registry: int  # the OCI registry of the serving images (Debian's docker-registry)
    bastion: int  # SSH of the bastion the cloud-like hosts are reached through (lab/cloud.py)

    @classmethod
    def plan(cls, fleet: Fleet, base: int = DEFAULT_PORT_BASE) -> Ports:
        """Ports from `base`: hosts by name, then one HAProxy frontend per pool, then the services."""
        names = sorted(fleet.hosts)
        if len(names) > 99 or len(fleet.pools) > 90:
            raise ValueError("the lab supports at most 99 hosts and 90 pools")
        return cls(
            base=base,
            hosts={n: HostPorts(ssh=base + 1 + i, serving=base + 101 + i, gpu_metrics=base + 401 + i)
                   for i, n in enumerate(names)},
            frontends={p: base + 201 + i for i, p in enumerate(sorted(fleet.pools))},
            haproxy_api=base + 300,
            upsd=base + 301,
            redfish=base + 302,
            http=base + 303,
            registry=base + 304,
            bastion=base + 305,
        )

    def all(self) -> list[int]:
        """Every port the lab listens on."""
        ports = [p for hp in self.hosts.values() for p in (hp.ssh, hp.serving, hp.gpu_metrics)]
        return [*ports, *self.frontends.values(), self.haproxy_api, self.upsd, self.redfish, self.http, self.registry,
                self.bastion]


@dataclass
class LabState:
    """What `lab up` recorded: the stack, the ports and the daemon, read by every other lab command."""

    stack: str
    project_dir: str
    port_base: int
    daemon_pid: int | None = None
    hosts: list[str] = field(default_factory=list)

    def save(self, layout: Layout) -> None:
        """Write lab.json (atomically)."""
        layout.root.mkdir(parents=True, exist_ok=True)
        tmp = layout.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(layout.state_file)

    @classmethod
    def load(cls, layout: Layout) -> LabState | None:
        """The recorded state, None when the lab was never brought up."""
        try:
            return cls(**json.loads(layout.state_file.read_text()))
        except FileNotFoundError:
            return None


@dataclass(frozen=True)
class Layout:
    """Where a lab keeps its state (`root`) and where base images are cached (`cache`)."""

    root: Path
    cache: Path

    @classmethod
    def for_stack(cls, stack: str, state_dir: str | Path | None = None) -> Layout:
        """A stack's layout: root from `state_dir`, $FLEET_LAB_DIR or .lab/STACK; cache from $FLEET_LAB_CACHE."""
        root = Path(state_dir or os.environ.get("FLEET_LAB_DIR") or Path(".lab") / stack).absolute()
        cache = Path(os.environ.get("FLEET_LAB_CACHE", "/var/cache/fleet-lab"))
        return cls(root, cache)

    @property
    def state_file(self) -> Path:
        """lab.json, the recorded LabState."""
        return self.root / "lab.json"

    @property
    def lock_file(self) -> Path:
        """The lock the daemon holds while the lab is up."""
        return self.root / "lab.lock"

    @property
    def daemon_log(self) -> Path:
        """The daemon's log."""
        return self.root / "logs" / "daemon.log"

    @property
    def ssh_dir(self) -> Path:
        """The lab's SSH key pair and known_hosts."""
        return self.root / "ssh"

    @property
    def ssh_key(self) -> Path:
        """The private key Ansible and the drift check log in with."""
        return self.ssh_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        """The lab hosts' host keys, checked strictly."""
        return self.ssh_dir / "known_hosts"

    @property
    def inventory_dir(self) -> Path:
        """The lab's Ansible inventory folder."""
        return self.root / "inventory"

    @property
    def www(self) -> Path:
        """What the lab's HTTP service serves: the apt repository and the model-weights artifacts."""
        return self.root / "www"

    @property
    def releases_dir(self) -> Path:
        """The lab's copies of the bundles, pinning the serving images it built (written at `lab up`)."""
        return self.root / "releases"

    @property
    def repo_dir(self) -> Path:
        """Where the simulated vendor apt repository is built."""
        return self.root / "apt"

    def host(self, name: str) -> HostDirs:
        """The folders of one lab host."""
        return HostDirs(self.root / "hosts" / name)

    def service_dir(self, name: str) -> Path:
        """Configuration and state of one lab service (nut, haproxy, redfish)."""
        return self.root / "services" / name


@dataclass(frozen=True)
class HostDirs:
    """The folders of one lab host: overlay layers, simulated hardware, supervisor files."""

    root: Path

    @property
    def upper(self) -> Path:
        """The overlay's upper dir: what the host changed on top of the base image."""
        return self.root / "upper"

    @property
    def work(self) -> Path:
        """The overlay's work dir."""
        return self.root / "work"

    @property
    def merged(self) -> Path:
        """The host's root file system, the mounted overlay."""
        return self.root / "rootfs"

    @property
    def hw(self) -> Path:
        """The host's simulated hardware (hardware.json, faults), bound into the container."""
        return self.root / "hw"

    @property
    def containers(self) -> Path:
        """The host's container storage (/var/lib/containers), a plain folder: podman's overlay driver
        refuses an overlayfs below it."""
        return self.root / "containers"

    @property
    def desired(self) -> Path:
        """The file with the container's wanted state, `up` or `down`."""
        return self.root / "desired"

    @property
    def status(self) -> Path:
        """The supervisor's report on the container (status.json)."""
        return self.root / "status.json"

    @property
    def console_log(self) -> Path:
        """The container's console output."""
        return self.root / "console.log"
