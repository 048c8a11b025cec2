"""Simulated GPU/InfiniBand/EFA hardware shared by the lab's vendor binaries (Python 3 stdlib only).

Every simulated package installs a copy of this module beside its scripts in /usr/lib/fleet-sim/<role>/,
so the scripts (reached through /usr/bin symlinks; Python puts the resolved script directory on
sys.path) import it without any Python package of their own. Three places hold the state:

- the host's hardware, written by the lab: $FLEET_SIM_HW_DIR (default /var/lib/fleet-lab/hw) holds
  hardware.json and fault markers faults/<kind> (gpu-missing, ecc-errors, ib-port-down, nvlink-degraded);
- runtime state, as the kernel would hold it: $FLEET_SIM_RUN_DIR (default /run/nvidia-sim), a tmpfs,
  so it is empty after a reboot: the loaded driver version, daemons' pid files, GPU memory in use;
- what each installed package baked in at build time: $FLEET_SIM_LIB_DIR (default /usr/lib/fleet-sim)
  /<role>/package.json.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# nvidia-smi's product names for the fleet model's GPU names (infra/model/fleet.py GPU_MEMORY_MIB keys).
PRODUCT_NAMES = {
    "A100-SXM4-40GB": "NVIDIA A100-SXM4-40GB",
    "A100-SXM4-80GB": "NVIDIA A100-SXM4-80GB",
    "H100-SXM5-80GB": "NVIDIA H100 80GB HBM3",
    "H200-SXM5-141GB": "NVIDIA H200",
    "T4": "Tesla T4",
    "A10G": "NVIDIA A10G",
}
ARCHITECTURES = {"A100-SXM4-40GB": "Ampere", "A100-SXM4-80GB": "Ampere", "A10G": "Ampere",
                 "H100-SXM5-80GB": "Hopper", "H200-SXM5-141GB": "Hopper", "T4": "Turing"}
# NVLinks per GPU pair through NVSwitch, as `nvidia-smi topo -m` prints them (NV12 A100, NV18 H100/H200).
NVLINKS = {"A100-SXM4-40GB": 12, "A100-SXM4-80GB": 12, "H100-SXM5-80GB": 18, "H200-SXM5-141GB": 18}
# The CUDA version a driver branch reports in nvidia-smi's header (its highest supported CUDA).
CUDA_OF_BRANCH = {535: "12.2", 545: "12.3", 550: "12.4", 555: "12.5", 560: "12.6", 565: "12.7",
                  570: "12.8", 575: "12.9", 580: "13.0"}
# PCI bus ids of the eight SXM GPUs on a DGX A100 board; PCIe cards sit on bus 00 from device 1B
# (g4dn/g5 instances).
SXM_BUS_IDS = ("00000000:07:00.0", "00000000:0F:00.0", "00000000:47:00.0", "00000000:4E:00.0",
               "00000000:87:00.0", "00000000:90:00.0", "00000000:B7:00.0", "00000000:BD:00.0")
# nvlink-degraded: half of every GPU's NVLinks are down (NVSwitch boards), so collectives run at about half
# their bus bandwidth; nothing else notices it (nvidia-smi and dcgmi diag as configured by default do not).
FAULTS = ("gpu-missing", "ecc-errors", "ib-port-down", "nvlink-degraded")


class SimError(Exception):
    """A tool cannot run: the message is what the real tool prints, the code its exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.message = message
        self.code = code


def hw_dir() -> Path:
    """Where the lab writes this host's hardware description and fault markers."""
    return Path(os.environ.get("FLEET_SIM_HW_DIR", "/var/lib/fleet-lab/hw"))


def run_dir() -> Path:
    """Runtime state that a reboot clears (the container's /run is a tmpfs)."""
    return Path(os.environ.get("FLEET_SIM_RUN_DIR", "/run/nvidia-sim"))


def lib_dir() -> Path:
    """Where installed packages keep their baked-in data, one folder per role."""
    return Path(os.environ.get("FLEET_SIM_LIB_DIR", "/usr/lib/fleet-sim"))


@dataclass(frozen=True)
class Gpu:
    """One GPU as the driver enumerates it."""

    index: int
    model: str
    memory_mib: int
    uuid: str
    bus_id: str
    ecc_uncorrected_volatile: int

    @property
    def product_name(self) -> str:
        return PRODUCT_NAMES.get(self.model, f"NVIDIA {self.model}")


@dataclass(frozen=True)
class Hardware:
    """hardware.json with the fault markers applied."""

    hostname: str
    gpu_model: str
    gpu_count: int
    memory_mib: int
    nvswitch: bool
    ib_hcas: list[dict] = field(default_factory=list)
    efa_devices: int = 0
    faults: frozenset[str] = frozenset()

    def gpus(self) -> list[Gpu]:
        """The GPUs the driver sees: one fewer with gpu-missing, ECC errors on GPU 0 with ecc-errors."""
        count = self.gpu_count - (1 if "gpu-missing" in self.faults else 0)
        out = []
        for i in range(max(count, 0)):
            digest = hashlib.sha256(f"{self.hostname}/gpu/{i}".encode()).hexdigest()
            uuid = f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
            bus = SXM_BUS_IDS[i] if self.nvswitch and i < len(SXM_BUS_IDS) else f"00000000:00:{0x1B + i:02X}.0"
            ecc = 2 if i == 0 and "ecc-errors" in self.faults else 0
            out.append(Gpu(i, self.gpu_model, self.memory_mib, uuid, bus, ecc))
        return out


def load_hardware() -> Hardware:
    """Read hardware.json and the fault markers; SimError when the lab wrote none."""
    path = hw_dir() / "hardware.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SimError(f"no hardware description at {path}", 1) from exc
    gpu = data.get("gpu") or {}
    faults = frozenset(f for f in FAULTS if (hw_dir() / "faults" / f).exists())
    return Hardware(
        hostname=data.get("hostname", "localhost"),
        gpu_model=gpu.get("model", ""),
        gpu_count=int(gpu.get("count", 0)),
        memory_mib=int(gpu.get("memory_mib", 0)),
        nvswitch=bool(gpu.get("nvswitch", False)),
        ib_hcas=list(data.get("ib_hcas") or []),
        efa_devices=int(data.get("efa_devices", 0)),
        faults=faults,
    )


def package_info(role: str) -> dict:
    """The package.json a package installed for `role`; SimError (as a missing library) when absent."""
    path = lib_dir() / role / "package.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SimError(f"{path}: cannot open shared object file: No such file or directory", 127) from exc


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that concurrent readers see the old or the new content, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- the "kernel module": the driver version loaded at boot -------------------------------------

def loaded_driver() -> str | None:
    """The driver version the kernel module was loaded at, None when no module is loaded."""
    try:
        return (run_dir() / "loaded-driver-version").read_text().strip() or None
    except FileNotFoundError:
        return None


def load_driver(version: str) -> bool:
    """Load the module at `version` unless one is loaded already (a loaded module stays until reboot)."""
    if loaded_driver() is not None:
        return False
    write_atomic(run_dir() / "loaded-driver-version", version + "\n")
    return True


def nvml_init() -> str:
    """The driver version when NVML can talk to the driver, else SimError with nvidia-smi's message."""
    userspace = package_info("driver")["upstream_version"]
    loaded = loaded_driver()
    if loaded is None:
        raise SimError("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
                       "Make sure that the latest NVIDIA driver is installed and running.\n", 9)
    if loaded != userspace:
        nvml = ".".join(userspace.split(".")[:2])
        raise SimError(f"Failed to initialize NVML: Driver/library version mismatch\nNVML library version: {nvml}\n",
                       18)
    return loaded


def cuda_version(driver_version: str) -> str:
    """The CUDA version nvidia-smi reports for a driver (its branch's highest supported CUDA)."""
    branch = int(driver_version.split(".")[0])
    known = [b for b in CUDA_OF_BRANCH if b <= branch]
    return CUDA_OF_BRANCH[max(known)] if known else "N/A"


# ---- GPU memory in use: each process using GPUs registers its per-GPU MiB ------------------------
#
# A registration is two files in run_dir()/fb: TOKEN.json (MiB per GPU index, rewritten atomically) and
# TOKEN.lock, on which the registering process holds an exclusive flock for as long as it lives. The kernel
# drops the lock when the process dies, however it dies, so liveness needs no pid: a server in a container
# (another PID namespace, /run/nvidia-sim bind-mounted from the host) is seen live by the host's nvidia-smi
# and DCGM exporter, and a recycled pid cannot make a dead registration look live. TOKEN is random, unique
# across PID namespaces and reboots.

_registration: tuple[str, int] | None = None  # (token, fd holding the lock) of this process, once registered


def _registration_live(lock_path: Path) -> bool:
    """Whether the process that registered `lock_path` still holds its lock.

    A shared non-blocking lock fails only while someone holds the exclusive one (the live registrant);
    readers take shared locks, so two readers never mistake each other for a registrant.
    """
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def fb_used() -> dict[int, int]:
    """MiB in use per GPU index, summed over live processes that registered usage."""
    used: dict[int, int] = {}
    folder = run_dir() / "fb"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        if not _registration_live(path.with_suffix(".lock")):
            continue
        try:
            usage = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a writer's rename raced our read; its next write is picked up next time
        for index, mib in usage.items():
            used[int(index)] = used.get(int(index), 0) + int(mib)
    return used


def register_fb_usage(usage: dict[int, int]) -> None:
    """Record this process's GPU memory use (MiB per GPU index); the first call takes the registration's lock."""
    global _registration
    folder = run_dir() / "fb"
    if _registration is None:
        folder.mkdir(parents=True, exist_ok=True)
        token = f"{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(folder / f"{token}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # before the usage file exists, so a reader never sees it unlocked
        _registration = (token, fd)
    token = _registration[0]
    write_atomic(folder / f"{token}.json", json.dumps({str(k): v for k, v in usage.items()}))


def unregister_fb_usage() -> None:
    """Drop this process's GPU memory use (on exit)."""
    global _registration
    if _registration is None:
        return
    token, fd = _registration
    folder = run_dir() / "fb"
    (folder / f"{token}.json").unlink(missing_ok=True)
    (folder / f"{token}.lock").unlink(missing_ok=True)
    os.close(fd)
    _registration = None


# ---- daemons ---------------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pidfile_alive(name: str) -> bool:
    """Whether the daemon that wrote run_dir()/name is still running."""
    try:
        pid = int((run_dir() / name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return False
    return pid_alive(pid)


def daemonize(pidfile: str, ready_message: str) -> None:
    """Fork into the background the way a Type=forking unit expects, then idle until SIGTERM.

    The parent writes the child's pid to run_dir()/pidfile, prints `ready_message` and exits 0, so
    `systemctl start` returns only once the daemon runs. The child detaches from the terminal (its
    stdio goes to /dev/null, so a caller reading our pipes is not kept waiting) and removes its pid
    file when stopped.
    """
    path = run_dir() / pidfile
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        write_atomic(path, f"{pid}\n")
        print(ready_message, flush=True)
        os._exit(0)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)

    def stop(_signum, _frame):
        path.unlink(missing_ok=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        time.sleep(3600)
