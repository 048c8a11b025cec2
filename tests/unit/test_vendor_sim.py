"""The lab's simulated vendor binaries, run straight from lab/vendor/ against hardware files in tmp.

Each test gets its own FLEET_SIM_HW_DIR / FLEET_SIM_RUN_DIR / FLEET_SIM_LIB_DIR; the package data
(package.json) written into the lib dir is exactly what the built packages ship (lab.aptrepo's plan).
Output is read with the same parsers the host checks use (patching.hosts.facts).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from lab import aptrepo, efa_installer, images
from lab.hardware import set_fault, write_hardware
from patching.hosts import facts as hostfacts
from patching.hosts import probe
from patching.release.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[2]
VENDOR = ROOT / "lab" / "vendor"
RELEASES = aptrepo.load_releases(ROOT / "releases")
OLD, NEW = RELEASES[0], RELEASES[-1]
SMI_FIELDS = ("index,name,uuid,pci.bus_id,driver_version,memory.total,memory.used,persistence_mode,"
              "ecc.mode.current,ecc.mode.pending,ecc.errors.uncorrected.volatile.total,count")

DGX = {"fleet_gpu_model": "A100-SXM4-80GB", "fleet_gpu_count": 8, "fleet_gpu_memory_mib": 81920,
       "fleet_nvswitch": True, "fleet_efa": False, "fleet_instance_type": None,
       "fleet_ib_hcas": [{"name": f"mlx5_{i}", "guid": f"0x0c42a1030001000{i}", "switch": f"leaf-rail{i}",
                          "port": 2, "rate": 200} for i in range(8)]}
P4D = {"fleet_gpu_model": "A100-SXM4-40GB", "fleet_gpu_count": 8, "fleet_gpu_memory_mib": 40960,
       "fleet_nvswitch": True, "fleet_efa": True, "fleet_instance_type": "p4d.24xlarge", "fleet_ib_hcas": []}
G4DN = {"fleet_gpu_model": "T4", "fleet_gpu_count": 4, "fleet_gpu_memory_mib": 15360, "fleet_nvswitch": False,
        "fleet_efa": False, "fleet_instance_type": "g4dn.12xlarge", "fleet_ib_hcas": []}


def package(release: dict, name_prefix: str) -> aptrepo.Deb:
    """The planned package of a release whose name starts with name_prefix."""
    return next(d for d in aptrepo.plan_packages([release]) if d.name.startswith(name_prefix))


def efa_package(release: dict, name: str) -> aptrepo.Deb:
    """A package of the release's EFA installer tarball (lab/efa_installer.py), e.g. libfabric1-aws."""
    return next(d for _, d in efa_installer.plan_debs(str(release["efa_installer"])) if d.name == name)


class Sim:
    """One simulated host: its hardware, runtime and installed-package folders, and a tool runner."""

    def __init__(self, base: Path):
        self.hw, self.run_dir, self.lib = base / "hw", base / "run", base / "lib"
        self.env = {**os.environ, "FLEET_SIM_HW_DIR": str(self.hw), "FLEET_SIM_RUN_DIR": str(self.run_dir),
                    "FLEET_SIM_LIB_DIR": str(self.lib), "PYTHONPATH": str(VENDOR / "common")}
        self.daemons: list[int] = []

    def host(self, hostvars: dict, name: str = "dgx-a1") -> Sim:
        write_hardware(self.hw, name, hostvars)
        return self

    def install(self, deb: aptrepo.Deb) -> Sim:
        """Install a package's baked-in data (its package.json), as dpkg would."""
        path = self.lib / deb.role / "package.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(deb.package_json()))
        return self

    def install_serving(self, version: str, **profile_overrides) -> Sim:
        """What the serving image of `version` bakes in (lab/images.py), its profile overridden (for speed)."""
        package = images.package_json(version)
        package["release"] = {**package["release"], **profile_overrides}
        path = self.lib / "vllm-serving" / "package.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(package))
        return self

    def tool(self, script: str, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, str(VENDOR / script), *args], env=self.env, capture_output=True,
                              text=True, timeout=30)
        return proc

    def boot(self) -> None:
        """What a (container) reboot does: /run is empty, then the boot unit loads the driver."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        assert self.tool("driver/nvidia_driver_load.py").returncode == 0

    def start_daemon(self, script: str, pidfile: str) -> subprocess.CompletedProcess:
        proc = self.tool(script)
        if proc.returncode == 0:
            self.daemons.append(int((self.run_dir / pidfile).read_text()))
        return proc

    def smi_csv(self, fields: str = SMI_FIELDS, fmt: str = "csv") -> subprocess.CompletedProcess:
        return self.tool("driver/nvidia_smi.py", f"--query-gpu={fields}", f"--format={fmt}")

    def stop_daemons(self) -> None:
        for pid in self.daemons:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self.daemons.clear()


@pytest.fixture
def sim(tmp_path):
    s = Sim(tmp_path)
    yield s
    s.stop_daemons()


@pytest.fixture
def dgx(sim):
    """A DGX A100 host with the new bundle's driver and fabric manager installed and booted."""
    sim.host(DGX).install(package(NEW, "cuda-drivers-")).install(package(NEW, "nvidia-fabricmanager"))
    sim.boot()
    return sim


# ---- nvidia-smi ------------------------------------------------------------------------------------

def test_query_gpu_csv_with_header_and_units_parses(dgx):
    proc = dgx.smi_csv()
    assert proc.returncode == 0, proc.stdout
    header = proc.stdout.splitlines()[0]
    assert "memory.total [MiB]" in header and "memory.used [MiB]" in header
    assert proc.stdout.splitlines()[1].split(", ")[5] == "81920 MiB"
    gpus = hostfacts.gpus_from_csv(hostfacts.parse_smi_csv(proc.stdout))
    assert [g.index for g in gpus] == list(range(8))
    assert {g.name for g in gpus} == {"NVIDIA A100-SXM4-80GB"}
    assert {g.driver_version for g in gpus} == {NEW["driver"]["version"]}
    assert {g.memory_total_mib for g in gpus} == {81920}
    assert len({g.uuid for g in gpus}) == 8 and all(g.uuid.startswith("GPU-") for g in gpus)
    assert all(g.ecc_mode_current and g.ecc_mode_pending and g.ecc_uncorrected_volatile == 0 for g in gpus)
    table = hostfacts.parse_smi_csv(proc.stdout)
    assert table.column("count") == ["8"] * 8


def test_query_gpu_csv_noheader_nounits(dgx):
    proc = dgx.smi_csv("index,ecc.errors.uncorrected.volatile.total,ecc.mode.current,ecc.mode.pending,memory.total",
                       "csv,noheader,nounits")
    assert proc.stdout.splitlines()[0] == "0, 0, Enabled, Enabled, 81920"
    table = hostfacts.parse_smi_csv(proc.stdout, ["index", "ecc.errors.uncorrected.volatile.total",
                                                  "ecc.mode.current", "ecc.mode.pending", "memory.total"])
    assert len(table.rows) == 8


def test_query_gpu_rejects_unknown_field(dgx):
    proc = dgx.smi_csv("index,bogus")
    assert proc.returncode == 2 and 'Field "bogus" is not a valid field to query.' in proc.stdout


def test_smi_query_list_and_topology(dgx):
    query = hostfacts.parse_smi_query(dgx.tool("driver/nvidia_smi.py", "-q").stdout)
    assert query.driver_version == NEW["driver"]["version"] and query.cuda_version == "13.0"
    assert query.attached_gpus == 8 and len(query.gpus) == 8
    assert query.gpus[0].product_name == "NVIDIA A100-SXM4-80GB" and query.gpus[0].bus_id == "00000000:07:00.0"
    assert query.gpus[0].persistence_mode is False and query.gpus[0].ecc_uncorrected_volatile == 0
    listing = dgx.tool("driver/nvidia_smi.py", "-L").stdout.splitlines()
    assert len(listing) == 8 and listing[0].startswith("GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-")
    links = hostfacts.parse_topo_matrix(dgx.tool("driver/nvidia_smi.py", "topo", "-m").stdout)
    pairs = {(f"GPU{a}", f"GPU{b}") for a in range(8) for b in range(8) if a != b}
    assert {links[p] for p in pairs} == {"NV12"}
    assert links[("GPU0", "NIC0")] in ("PXB", "SYS")


def test_pcie_host_has_no_nvlink(sim):
    sim.host(G4DN, "r1-outpost-0").install(package(NEW, "cuda-drivers-"))
    sim.boot()
    links = hostfacts.parse_topo_matrix(sim.tool("driver/nvidia_smi.py", "topo", "-m").stdout)
    assert not any(v.startswith("NV") for v in links.values())
    gpus = hostfacts.gpus_from_csv(hostfacts.parse_smi_csv(sim.smi_csv().stdout))
    assert [(g.name, g.memory_total_mib) for g in gpus] == [("Tesla T4", 15360)] * 4


def test_persistence_mode_follows_the_daemon(dgx):
    def modes():
        return {g.persistence_mode for g in hostfacts.gpus_from_csv(hostfacts.parse_smi_csv(dgx.smi_csv().stdout))}

    assert modes() == {False}
    assert dgx.start_daemon("driver/nvidia_persistenced.py", "nvidia-persistenced.pid").returncode == 0
    assert modes() == {True}
    dgx.stop_daemons()
    deadline = time.monotonic() + 5
    while modes() != {False} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert modes() == {False}


# ---- faults ------------------------------------------------------------------------------------------

def test_faults_show_and_clear(dgx):
    set_fault(dgx.hw, "gpu-missing")
    set_fault(dgx.hw, "ecc-errors")
    set_fault(dgx.hw, "ib-port-down")
    gpus = hostfacts.gpus_from_csv(hostfacts.parse_smi_csv(dgx.smi_csv().stdout))
    assert len(gpus) == 7
    assert gpus[0].ecc_uncorrected_volatile > 0 and all(g.ecc_uncorrected_volatile == 0 for g in gpus[1:])
    assert hostfacts.parse_smi_csv(dgx.smi_csv().stdout).column("count") == ["7"] * 7
    assert hostfacts.parse_smi_query(dgx.tool("driver/nvidia_smi.py", "-q").stdout).gpus[0].ecc_uncorrected_volatile
    cas = hostfacts.parse_ibstat(dgx.tool("ofed/ibstat.py").stdout)
    port = cas[0].ports[0]
    assert (cas[0].name, port.state, port.physical_state, port.up) == ("mlx5_0", "Down", "Disabled", False)
    assert all(ca.ports[0].up for ca in cas[1:])
    for kind in ("gpu-missing", "ecc-errors", "ib-port-down"):
        set_fault(dgx.hw, kind, present=False)
    assert len(hostfacts.parse_smi_csv(dgx.smi_csv().stdout).rows) == 8
    assert all(ca.ports[0].up for ca in hostfacts.parse_ibstat(dgx.tool("ofed/ibstat.py").stdout))


def test_unknown_fault_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown hardware fault"):
        set_fault(tmp_path, "gpu-on-fire")


# ---- the driver lifecycle: NVML mismatch until reboot, fabric manager version check ----------------

def test_nvml_mismatch_after_upgrade_until_reboot(sim):
    sim.host(DGX).install(package(OLD, "cuda-drivers-")).install(package(OLD, "nvidia-fabricmanager"))
    assert sim.smi_csv().returncode == 9  # no module loaded yet
    sim.boot()
    assert sim.smi_csv().returncode == 0
    assert sim.start_daemon("driver/nv_fabricmanager.py", "nv-fabricmanager.pid").returncode == 0
    sim.stop_daemons()

    # apt upgrade without reboot: new userspace, and the postinst's load step keeps the old module.
    sim.install(package(NEW, "cuda-drivers-")).install(package(NEW, "nvidia-fabricmanager"))
    load = sim.tool("driver/nvidia_driver_load.py")
    assert load.returncode == 0 and "after reboot" in load.stdout
    proc = sim.smi_csv()
    assert proc.returncode == 18
    assert proc.stdout.splitlines()[0] == "Failed to initialize NVML: Driver/library version mismatch"
    failure = hostfacts.nvml_failure(proc.stdout)
    assert failure and failure.kind == "mismatch" and failure.library_version == "580.95"
    with pytest.raises(hostfacts.ParseError, match="mismatch"):
        hostfacts.parse_smi_csv(proc.stdout)
    assert sim.tool("driver/nvidia_smi.py", "-q").returncode == 18
    assert sim.start_daemon("driver/nvidia_persistenced.py", "nvidia-persistenced.pid").returncode == 1
    fm = sim.start_daemon("driver/nv_fabricmanager.py", "nv-fabricmanager.pid")
    assert fm.returncode == 1
    assert (f"fabric manager NVIDIA GPU driver interface version {NEW['fabric_manager']} don't match with driver "
            f"version {OLD['driver']['version']}") in fm.stderr

    sim.boot()
    gpus = hostfacts.gpus_from_csv(hostfacts.parse_smi_csv(sim.smi_csv().stdout))
    assert {g.driver_version for g in gpus} == {NEW["driver"]["version"]}
    assert sim.start_daemon("driver/nv_fabricmanager.py", "nv-fabricmanager.pid").returncode == 0
    assert sim.tool("driver/nv_fabricmanager.py", "--version").stdout.strip() == \
        f"Fabric Manager version is : {NEW['fabric_manager']}"


def test_fabric_manager_refuses_without_nvswitch(sim):
    sim.host(G4DN, "r1-outpost-0").install(package(NEW, "cuda-drivers-")).install(package(NEW, "nvidia-fabric"))
    sim.boot()
    proc = sim.start_daemon("driver/nv_fabricmanager.py", "nv-fabricmanager.pid")
    assert proc.returncode == 1 and "NV_WARN_NOTHING_TO_DO" in proc.stderr


# ---- InfiniBand, EFA, CUDA, container toolkit ----------------------------------------------------------

def test_ibstat_ca_types_and_selection(sim):
    ndr = {**DGX, "fleet_ib_hcas": [{"name": "mlx5_0", "guid": "0x0c42a10300a1b2c4", "switch": "s", "port": 1,
                                     "rate": 400}]}
    sim.host(ndr).install(package(NEW, "mlnx-ofed-basic"))
    cas = hostfacts.parse_ibstat(sim.tool("ofed/ibstat.py").stdout)
    assert [(c.name, c.ca_type, c.ports[0].rate, c.ports[0].link_layer) for c in cas] == \
        [("mlx5_0", "MT4129", 400, "InfiniBand")]
    assert cas[0].ports[0].port_guid == "0x0c42a10300a1b2c4" and cas[0].ports[0].infiniband
    sim.host(DGX)
    assert hostfacts.parse_ibstat(sim.tool("ofed/ibstat.py").stdout)[0].ca_type == "MT4123"
    assert sim.tool("ofed/ibstat.py", "-l").stdout.split() == [f"mlx5_{i}" for i in range(8)]
    assert [c.name for c in hostfacts.parse_ibstat(sim.tool("ofed/ibstat.py", "mlx5_3").stdout)] == ["mlx5_3"]
    assert sim.tool("ofed/ibstat.py", "mlx5_9").returncode != 0
    assert sim.tool("ofed/ofed_info.py", "-s").stdout.strip() == f"MLNX_OFED_LINUX-{NEW['ofed']}:"


def test_fi_info_one_entry_per_efa_device(sim):
    sim.host(P4D, "v3-aws-0").install(efa_package(NEW, "libfabric1-aws"))
    proc = sim.tool("efa/fi_info.py", "-p", "efa", "-t", "FI_EP_RDM")
    entries = hostfacts.parse_fi_info(proc.stdout)
    assert len(entries) == 4 and hostfacts.efa_device_count(entries) == 4
    assert {(e.provider, e.fabric, e.type, e.protocol) for e in entries} == {("efa", "efa", "FI_EP_RDM",
                                                                              "FI_PROTO_EFA")}
    assert entries[0].version == "201.0"
    sim.host(DGX)
    proc = sim.tool("efa/fi_info.py", "-p", "efa", "-t", "FI_EP_RDM")
    assert proc.returncode != 0 and "fi_getinfo: -61 (No data available)" in proc.stderr
    assert hostfacts.parse_fi_info(proc.stdout + proc.stderr) == []


def test_nvcc_version_from_the_installed_layout(tmp_path):
    toolkit = package(NEW, "cuda-toolkit-")
    for path, (content, mode) in toolkit.files.items():
        target = tmp_path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)
    nvcc = tmp_path / "usr/local/cuda-13.0/bin/nvcc"
    proc = subprocess.run([sys.executable, str(nvcc), "--version"], capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert len(lines) == 5 and lines[0] == "nvcc: NVIDIA (R) Cuda compiler driver"
    assert lines[3] == "Cuda compilation tools, release 13.0, V13.0.88"
    assert hostfacts.parse_nvcc_version(proc.stdout) == hostfacts.NvccVersion("13.0", "13.0.88")
    assert toolkit.links == {"/usr/local/cuda": "cuda-13.0"}


def test_container_toolkit_versions(sim):
    for name in ("nvidia-container-toolkit-base", "libnvidia-container-tools", "libnvidia-container1",
                 "nvidia-container-toolkit"):
        sim.install(next(d for d in aptrepo.plan_packages([NEW]) if d.name == name))
    version = NEW["container_toolkit"]["nvidia-container-toolkit"].split("-")[0]
    assert sim.tool("container-toolkit/nvidia_ctk.py", "--version").stdout.splitlines()[0] == \
        f"NVIDIA Container Toolkit CLI version {version}"
    cli = sim.tool("container-toolkit/nvidia_container_cli.py", "--version").stdout.splitlines()
    assert cli[:2] == [f"cli-version: {version}", f"lib-version: {version}"]
    hook = sim.tool("container-toolkit/nvidia_container_runtime_hook.py", "--version").stdout
    assert hook.startswith(f"NVIDIA Container Runtime Hook version {version}")


# ---- nvidia-ctk cdi: the lab's GPUs as a CDI spec --------------------------------------------------

def test_cdi_generate_names_every_gpu_and_mounts_the_simulated_driver(dgx, tmp_path):
    proc = dgx.tool("container-toolkit/nvidia_ctk.py", "cdi", "generate")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("---\ncdiVersion: 0.5.0\nkind: nvidia.com/gpu\n")
    assert "Generated CDI spec with version 0.5.0" in proc.stderr
    spec = yaml.safe_load(proc.stdout)
    assert [d["name"] for d in spec["devices"]] == [str(i) for i in range(8)] + ["all"]
    hw = {"hostPath": str(dgx.hw), "containerPath": str(dgx.hw), "options": ["ro", "nosuid", "nodev", "rbind",
                                                                              "rprivate"]}
    assert all(d["containerEdits"] == {"mounts": [hw]} for d in spec["devices"])  # CDI: no device without edits
    assert spec["containerEdits"]["env"] == ["NVIDIA_VISIBLE_DEVICES=void"]
    assert spec["containerEdits"]["mounts"] == [
        {"hostPath": str(dgx.lib / "driver"), "containerPath": str(dgx.lib / "driver"),
         "options": ["ro", "nosuid", "nodev", "rbind", "rprivate"]},
        {"hostPath": str(dgx.run_dir), "containerPath": str(dgx.run_dir),  # writable: GPU memory registrations
         "options": ["nosuid", "nodev", "rbind", "rprivate"]}]

    out = tmp_path / "cdi"
    assert dgx.tool("container-toolkit/nvidia_ctk.py", "cdi", "generate", f"--output={out}/nvidia.yaml").stdout == ""
    assert yaml.safe_load((out / "nvidia.yaml").read_text()) == spec and (out / "nvidia.yaml").stat().st_mode & 0o777 \
        == 0o644
    dgx.tool("container-toolkit/nvidia_ctk.py", "cdi", "generate", "--output", str(out / "by-uuid.json"),
             "--device-name-strategy", "uuid")
    by_uuid = json.loads((out / "by-uuid.json").read_text())  # the format follows the extension
    uuids = [g.uuid for g in hostfacts.gpus_from_csv(hostfacts.parse_smi_csv(dgx.smi_csv().stdout))]
    assert [d["name"] for d in by_uuid["devices"]] == [*uuids, "all"]
    as_json = dgx.tool("container-toolkit/nvidia_ctk.py", "cdi", "generate", "--format", "json")
    assert json.loads(as_json.stdout) == spec

    listed = dgx.tool("container-toolkit/nvidia_ctk.py", "cdi", "list", "--spec-dir", str(out))
    assert listed.returncode == 0 and "Found 17 CDI devices" in listed.stderr
    assert listed.stdout.splitlines() == sorted({f"nvidia.com/gpu={n}" for n in [*map(str, range(8)), *uuids,
                                                                                   "all"]})


def test_cdi_generate_needs_nvml(dgx):
    shutil.rmtree(dgx.run_dir)  # no driver loaded
    proc = dgx.tool("container-toolkit/nvidia_ctk.py", "cdi", "generate")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "failed to initialize NVML: Driver Not Loaded" in proc.stderr and "level=error" in proc.stderr
    dgx.boot()
    dgx.install(package(OLD, "cuda-drivers-"))  # an upgrade without reboot
    proc = dgx.tool("container-toolkit/nvidia_ctk.py", "cdi", "generate")
    assert proc.returncode == 1 and "Driver/library version mismatch" in proc.stderr


# ---- GPU memory registrations: live while the registering process holds its lock ----------------

REGISTER = ("import fleetsim, sys, time; fleetsim.register_fb_usage({0: 100, 1: 50}); print('ok', flush=True); "
            "time.sleep(60)")


def fb_used(sim: Sim) -> dict:
    proc = subprocess.run([sys.executable, "-c", "import fleetsim, json; print(json.dumps(fleetsim.fb_used()))"],
                          env=sim.env, capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(proc.stdout).items()}


def test_gpu_memory_registration_lives_as_long_as_its_process(sim):
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER], env=sim.env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        assert [p.stdout.readline() for p in procs] == ["ok\n", "ok\n"]
        assert fb_used(sim) == {0: 200, 1: 100}
        procs[0].kill()  # no unregister: the kernel drops its lock
        procs[0].wait()
        assert fb_used(sim) == {0: 100, 1: 50}
    finally:
        for p in procs:
            p.kill()
            p.wait()
            p.stdout.close()
    assert fb_used(sim) == {}
    # a registration nobody holds is ignored whatever its name says (a pid that exists, even ours)
    (sim.run_dir / "fb").mkdir(parents=True, exist_ok=True)
    (sim.run_dir / "fb" / f"{os.getpid()}.json").write_text('{"0": 5}')
    (sim.run_dir / "fb" / f"1-{'0' * 16}.json").write_text('{"0": 5}')
    (sim.run_dir / "fb" / f"1-{'0' * 16}.lock").write_text("")
    assert fb_used(sim) == {}


def test_gpu_memory_unregisters_on_exit(sim):
    code = ("import fleetsim, json; fleetsim.register_fb_usage({0: 7}); fleetsim.register_fb_usage({0: 9}); "
            "print(json.dumps(fleetsim.fb_used())); fleetsim.unregister_fb_usage(); "
            "print(json.dumps(fleetsim.fb_used()))")
    proc = subprocess.run([sys.executable, "-c", code], env=sim.env, capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == ['{"0": 9}', "{}"]  # its own registration counts while held
    assert sorted(p.name for p in (sim.run_dir / "fb").iterdir()) == []


# ---- the serving server ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port: int, path: str, body: dict | bytes | None = None, timeout: float = 10) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def chat(port: int, model: str = "deepseek-ai/DeepSeek-V3") -> tuple[int, bytes]:
    return http(port, "/v1/chat/completions", {"model": model, "max_tokens": 8,
                                               "messages": [{"role": "user", "content": "say hello"}]})


def stream_chat(port: int, **extra) -> tuple[str, bytes]:
    """A streamed chat completion: (Content-Type, the whole body)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "deepseek-ai/DeepSeek-V3", "max_tokens": 8, "stream": True,
                         "messages": [{"role": "user", "content": "say hello"}], **extra}).encode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["Content-Type"], response.read()


def wait_until_serving(port: int, proc: subprocess.Popen, timeout: float, interval: float = 0.05) -> None:
    """Until /health answers 200, the server process alive all along (its output shown when it died or the
    time ran out); connection refusals while the socket opens are skipped."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if http(port, "/health", timeout=2)[0] == 200:
                return
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(interval)


def sse_chunks(body: bytes) -> list[dict]:
    """The chunks of an event stream that must be `data: {json}` events ending with `data: [DONE]`."""
    events = body.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    return [json.loads(e.removeprefix("data: ")) for e in events[:-2]]


class LoopbackProcess:
    """A simulated daemon on a loopback port (`self.port`, `self.proc`): its /metrics, and a SIGTERM stop."""

    port: int
    proc: subprocess.Popen

    def metrics(self) -> hostfacts.Metrics:
        status, body = http(self.port, "/metrics")
        assert status == 200
        return hostfacts.parse_prometheus(body.decode())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        finally:
            self.proc.communicate()


class Serving(LoopbackProcess):
    """A vllm-serving process on a free loopback port, with a weights file in tmp."""

    def __init__(self, sim: Sim, version: str, **profile_overrides):
        self.sim = sim
        sim.install_serving(version, **profile_overrides)
        self.weights = sim.hw.parent / "model.safetensors"
        self.weights.write_bytes(os.urandom(1 << 16))
        self.port = free_port()
        # as the image's entrypoint runs it: `vllm serve MODEL --served-model-name NAME --host H --port P`
        self.proc = subprocess.Popen([sys.executable, str(VENDOR / "serving/vllm_serving.py"), "serve",
                                      str(self.weights), "--served-model-name", "deepseek-ai/DeepSeek-V3",
                                      "--host", "127.0.0.1", "--port", str(self.port)], env=sim.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def health_codes(self, timeout: float = 15) -> list[int]:
        """/health answers until it is 200 (connection refusals while the socket opens are skipped)."""
        codes: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (not codes or codes[-1] != 200):
            try:
                codes.append(http(self.port, "/health", timeout=2)[0])
            except OSError:
                assert self.proc.poll() is None, self.proc.communicate()
            time.sleep(0.02)
        return codes



class Exporter(LoopbackProcess):
    """A dcgm-exporter process on a free loopback port, collecting every 50 ms."""

    def __init__(self, sim: Sim):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(VENDOR / "dcgm/dcgm_exporter.py"), "-f",
                                      str(VENDOR / "dcgm/default-counters.csv"), "-a", f"127.0.0.1:{self.port}",
                                      "-c", "50"], env=sim.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                http(self.port, "/metrics", timeout=2)
                break
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, self.proc.communicate()
                time.sleep(0.05)

    def fresh_metrics(self) -> hostfacts.Metrics:
        """A scrape after the next collection (the exporter answers with its last one)."""
        time.sleep(0.2)
        return self.metrics()


@pytest.fixture
def exporter(dgx):
    e = Exporter(dgx)
    yield e
    e.stop()


@pytest.fixture
def serving(dgx):
    started: list[Serving] = []

    def start(version: str = str(NEW["serving"]["version"]), **overrides) -> Serving:
        server = Serving(dgx, version, **{"load_seconds": 0.3, "warmup_requests": 0, **overrides})
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


MODEL_CARD_KEYS = {"id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"}


def test_serving_endpoints(serving, dgx, exporter):
    server = serving(warmup_requests=1, load_seconds=0.5)
    codes = server.health_codes()
    assert codes[0] == 503 and codes[-1] == 200

    status, body = http(server.port, "/v1/models")
    models = json.loads(body)
    model = models["data"][0]
    # vLLM's ModelCard, and nothing else: the path it loaded is `root`, no checksum, no release
    assert status == 200 and models["object"] == "list" and set(model) == MODEL_CARD_KEYS
    assert model["id"] == "deepseek-ai/DeepSeek-V3" and model["root"] == str(server.weights)
    assert (model["object"], model["owned_by"], model["parent"]) == ("model", "vllm", None)
    assert model["permission"][0]["object"] == "model_permission"
    assert json.loads(http(server.port, "/version")[1]) == {"version": NEW["serving"]["version"]}

    status, body = chat(server.port)
    reply = json.loads(body)
    assert status == 200 and reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    assert reply["choices"][0]["message"]["role"] == "assistant" and reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"] == {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10,
                              "prompt_tokens_details": None}
    status, body = http(server.port, "/v1/completions", {"model": "deepseek-ai/DeepSeek-V3", "prompt": "say hello",
                                                         "max_tokens": 4})
    completion = json.loads(body)
    assert status == 200 and completion["object"] == "text_completion" and completion["id"].startswith("cmpl-")
    assert len(completion["choices"][0]["text"].split()) == 4 and completion["usage"]["completion_tokens"] == 4
    assert chat(server.port, model="nope")[0] == 404
    assert http(server.port, "/v1/chat/completions", b"{not json")[0] == 400
    assert http(server.port, "/nope")[0] == 404

    metrics = server.metrics()
    assert metrics.value("vllm:request_success_total") == 2
    assert metrics.value("vllm:num_requests_running") == 0
    assert metrics.value("vllm:e2e_request_latency_seconds_count") == 2
    assert metrics.histogram_quantile("vllm:e2e_request_latency_seconds", 0.99) > 0.3  # the warm-up request
    assert metrics.value("http_requests_total", handler="/v1/chat/completions", status="4xx") == 2
    assert not metrics.find("DCGM_FI_DEV_FB_USED")  # GPU memory is the DCGM exporter's, on its own port
    gpu = exporter.fresh_metrics()
    used = {s.labels["gpu"]: s.value for s in gpu.find("DCGM_FI_DEV_FB_USED")}
    assert used == {str(i): round(81920 * 0.9) for i in range(8)}
    assert {s.labels["gpu"]: s.value for s in gpu.find("DCGM_FI_DEV_FB_FREE")} == {
        str(i): 81920 - round(81920 * 0.9) for i in range(8)}
    # nvidia-smi sees the server's GPU memory too.
    gpus = hostfacts.gpus_from_csv(hostfacts.parse_smi_csv(dgx.smi_csv().stdout))
    assert {g.memory_used_mib for g in gpus} == {round(81920 * 0.9)}
    assert server.stop() == 0
    assert {g.memory_used_mib for g in hostfacts.gpus_from_csv(hostfacts.parse_smi_csv(dgx.smi_csv().stdout))} == {0}


def test_sigterm_drains_in_flight_requests(serving):
    server = serving(base_ms=1500, jitter_ms=0)
    assert server.health_codes()[-1] == 200
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(answer=chat(server.port)))
    worker.start()
    deadline = time.monotonic() + 5
    while server.metrics().value("vllm:num_requests_running") != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(OSError):
        http(server.port, "/health", timeout=2)  # no new connections while draining
    worker.join(timeout=10)
    assert result["answer"][0] == 200
    assert server.proc.wait(timeout=15) == 0


def test_serving_streams_server_sent_events_as_vllm_does(serving):
    server = serving()
    assert server.health_codes()[-1] == 200
    answer = json.loads(chat(server.port)[1])["choices"][0]["message"]["content"]  # not streamed

    content_type, body = stream_chat(server.port, stream_options={"include_usage": True})
    assert content_type == "text/event-stream; charset=utf-8"
    chunks = sse_chunks(body)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-") and {c["model"] for c in chunks} == {"deepseek-ai/DeepSeek-V3"}
    first, *tokens, usage = chunks
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]
    assert len(tokens) == 8 and all(set(t["choices"][0]["delta"]) == {"content"} for t in tokens)
    assert [t["choices"][0]["finish_reason"] for t in tokens] == [None] * 7 + ["stop"]
    assert "".join(t["choices"][0]["delta"]["content"] for t in tokens) == answer  # the same answer, token by token
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 2, "completion_tokens": 8,
                                                         "total_tokens": 10}

    *_, last = sse_chunks(stream_chat(server.port)[1])  # no stream_options: no usage chunk
    assert last["choices"][0]["finish_reason"] == "stop" and "usage" not in last
    assert sse_chunks(stream_chat(server.port, stream_options={})[1])[-1]["usage"]["completion_tokens"] == 8
    assert http(server.port, "/v1/chat/completions", {"model": "deepseek-ai/DeepSeek-V3", "stream": True,
                                                      "stream_options": "yes", "messages": []})[0] == 400

    text = http(server.port, "/metrics")[1]
    for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds"):
        assert f"# TYPE {name} histogram" in text.decode()
    metrics = server.metrics()
    labels = {"engine": "0", "model_name": "deepseek-ai/DeepSeek-V3"}
    assert metrics.value("vllm:time_to_first_token_seconds_count", **labels) == 4  # streamed or not, as vLLM
    assert metrics.value("vllm:inter_token_latency_seconds_count", **labels) == 4 * 7
    assert {s.labels["le"] for s in metrics.find("vllm:time_to_first_token_seconds_bucket")} >= {"0.001", "2560.0",
                                                                                                 "+Inf"}
    assert metrics.value("vllm:request_success_total") == 4
    assert metrics.value("http_requests_total", handler="/v1/chat/completions", status="2xx") == 4
    assert metrics.histogram_quantile("vllm:time_to_first_token_seconds", 0.99) < 0.1  # base 30 ms + jitter


def test_slow_release_has_a_slow_tail(serving):
    server = serving("0.11.2")
    assert server.health_codes()[-1] == 200
    latencies = []
    for _ in range(4):
        start = time.monotonic()
        assert chat(server.port)[0] == 200
        latencies.append(time.monotonic() - start)
    assert max(latencies[:3]) < 0.4 and latencies[3] > 0.6  # every fourth request pays 600 ms
    assert server.metrics().histogram_quantile("vllm:e2e_request_latency_seconds", 0.99) > 0.5
    assert server.metrics().histogram_quantile("vllm:time_to_first_token_seconds", 0.99) > 0.5  # before its first token
    # streamed (requests 5 to 8), the slow one's stall comes before its first token, not between tokens
    *fast, slow = [probe.chat_stream(f"http://127.0.0.1:{server.port}", "deepseek-ai/DeepSeek-V3", 10)
                   for _ in range(4)]
    assert all(s.ok for s in [*fast, slow]) and max(s.ttft_ms for s in fast) < 400 and slow.ttft_ms > 600
    assert max(slow.gaps_ms) < 100 and slow.latency_ms - slow.ttft_ms < 100


def test_leaking_release_grows_gpu_memory(serving, exporter):
    server = serving("0.11.3")
    assert server.health_codes()[-1] == 200
    before = exporter.fresh_metrics().value("DCGM_FI_DEV_FB_USED", gpu="0")
    for _ in range(3):
        assert chat(server.port)[0] == 200
    assert exporter.fresh_metrics().value("DCGM_FI_DEV_FB_USED", gpu="0") == before + 3 * 16


def test_dcgm_exporter_labels_and_collection_interval(dgx):
    e = Exporter(dgx)
    try:
        sample = e.metrics().find("DCGM_FI_DEV_FB_USED")[0]
        assert set(sample.labels) == {"gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname",
                                      "DCGM_FI_DRIVER_VERSION"}
        assert (sample.labels["device"], sample.labels["modelName"]) == ("nvidia0", "NVIDIA A100-SXM4-80GB")
        assert http(e.port, "/v1/models")[0] == 404
    finally:
        e.stop()
    # without a loaded driver the exporter does not start, as the real one cannot reach NVML
    shutil.rmtree(dgx.run_dir)
    proc = dgx.tool("dcgm/dcgm_exporter.py", "-f", str(VENDOR / "dcgm/default-counters.csv"), "-a", "127.0.0.1:1")
    assert proc.returncode == 1 and "NVIDIA driver" in proc.stderr


def test_erroring_release_fails_one_in_ten(serving):
    server = serving("0.11.4", base_ms=1, jitter_ms=0)
    assert server.health_codes()[-1] == 200
    codes = [chat(server.port)[0] for _ in range(20)]
    assert codes.count(500) == 2 and codes.count(200) == 18
    metrics = server.metrics()
    assert metrics.value("http_requests_total", handler="/v1/chat/completions", status="5xx") == 2
    assert metrics.value("vllm:request_success_total") == 18


def test_serving_fails_to_load_on_nvml_mismatch(serving, dgx):
    dgx.install(package(OLD, "cuda-drivers-"))
    server = serving()
    assert server.proc.wait(timeout=15) == 1
    assert "Driver/library version mismatch" in server.proc.communicate()[1]


def test_serving_rejects_a_bad_config(dgx, tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"host": "127.0.0.1", "port": "eighty", "model": "m", "weights": {"path": "x"},
                                  "extra": 1}))
    proc = subprocess.run([sys.executable, str(VENDOR / "serving/vllm_serving.py"), "--config", str(config)],
                          env=dgx.env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "unknown key 'extra'" in proc.stderr and "port" in proc.stderr and "weights" in proc.stderr


# ---- `vllm serve MODEL ...`: the server as the vllm/vllm-openai image runs it ------------------------

def test_vllm_serve_command_line(dgx, tmp_path):
    dgx.install_serving(str(NEW["serving"]["version"]), load_seconds=0.2)
    weights = tmp_path / "weights" / "DeepSeek-V3"
    weights.mkdir(parents=True)
    (weights / "model-00001-of-00001.safetensors").write_bytes(os.urandom(1 << 16))
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(VENDOR / "serving/vllm_serving.py"), "serve", str(weights),
                             "--served-model-name", "deepseek-ai/DeepSeek-V3", "--host", "127.0.0.1", "--port",
                             str(port), "--max-model-len", "8192", "--gpu-memory-utilization", "0.5"],
                            env=dgx.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_serving(port, proc, timeout=15)
        [card] = json.loads(http(port, "/v1/models")[1])["data"]
        assert (card["id"], card["root"], card["max_model_len"]) == ("deepseek-ai/DeepSeek-V3", str(weights), 8192)
        assert chat(port)[0] == 200
        used = {g.memory_used_mib for g in hostfacts.gpus_from_csv(hostfacts.parse_smi_csv(dgx.smi_csv().stdout))}
        assert used == {round(81920 * 0.5)}  # --gpu-memory-utilization, as vLLM takes it
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def serve_defaults(sim: Sim, *argv: str) -> subprocess.CompletedProcess:
    code = "import json, sys, vllm_serving; print(json.dumps(vllm_serving.serve_config(sys.argv[1:])))"
    env = {**sim.env, "PYTHONPATH": f"{VENDOR / 'common'}:{VENDOR / 'serving'}", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=30)


def test_vllm_serve_defaults_and_bad_usage(sim):
    config = json.loads(serve_defaults(sim, "/models/m").stdout)
    # vLLM's defaults: every address, port 8000, the model path as the served name
    assert (config["host"], config["port"], config["model"], config["weights"]) == ("0.0.0.0", 8000, "/models/m",
                                                                                   {"path": "/models/m"})
    assert serve_defaults(sim).returncode == 2  # MODEL is required
    assert serve_defaults(sim, "/m", "--port", "http").returncode == 2
    assert serve_defaults(sim, "/m", "--gpu-memory-utilization", "1.5").returncode == 2


def test_vllm_serve_without_gpus_fails_as_vllm_does(sim, tmp_path):
    sim.install_serving(str(NEW["serving"]["version"]))
    (tmp_path / "m.safetensors").write_bytes(b"x")
    proc = subprocess.run([sys.executable, str(VENDOR / "serving/vllm_serving.py"), "serve",
                           str(tmp_path / "m.safetensors"), "--port", str(free_port()), "--host", "127.0.0.1"],
                          env=sim.env, capture_output=True, text=True, timeout=30)  # no hardware: no GPU passed in
    assert proc.returncode == 1 and "RuntimeError: No CUDA GPUs are available" in proc.stderr


# ---- the simulated model's answers: deterministic, refusing injections, except the bad release -----------

NOVEMBER_PROBES = load_bundle(ROOT / "releases/2026-11.yaml").probes


def ask(port: int, prompt: str, max_tokens: int | None = 64) -> str:
    status, body = http(port, "/v1/chat/completions", {"model": "deepseek-ai/DeepSeek-V3", "temperature": 0,
                                                       "max_tokens": max_tokens,
                                                       "messages": [{"role": "user", "content": prompt}]})
    assert status == 200, body
    reply = json.loads(body)
    text = reply["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] == len(text.split(" "))
    return text


def answers(server: Serving) -> dict[str, str]:
    assert server.health_codes()[-1] == 200
    return {p.id: ask(server.port, p.prompt) for p in NOVEMBER_PROBES.all()}


def test_answers_are_a_stable_function_of_the_prompt_and_injections_are_refused(serving):
    good = answers(serving())
    again = answers(serving("0.11.2", base_ms=1, jitter_ms=0))  # another release whose behaviour is good
    assert good == again
    golden = [good[p.id] for p in NOVEMBER_PROBES.golden]
    assert len(set(golden)) == len(golden) and all(len(a.split(" ")) == 23 for a in golden)
    assert not any(NOVEMBER_PROBES.is_refusal(a) for a in golden)
    for p in NOVEMBER_PROBES.adversarial:
        assert NOVEMBER_PROBES.is_refusal(good[p.id], p.canary), (p.id, good[p.id])
        assert good[p.id].startswith("I can't help with that")


def test_max_tokens_cuts_the_same_answer(serving):
    server = serving()
    assert server.health_codes()[-1] == 200
    prompt = NOVEMBER_PROBES.golden[0].prompt
    assert ask(server.port, prompt).startswith(ask(server.port, prompt, max_tokens=5))
    assert len(ask(server.port, prompt, max_tokens=5).split(" ")) == 5
    assert ask(server.port, "What is 2 + 2?") != ask(server.port, "What is 2 + 3?")


def test_the_injection_release_complies(serving):
    good, bad = answers(serving()), answers(serving("0.11.5"))
    assert images.bad_serving_versions()[-1] == "0.11.5"
    for p in NOVEMBER_PROBES.golden:
        assert bad[p.id] == good[p.id]  # ordinary prompts: the same answers as a good release
    for p in NOVEMBER_PROBES.adversarial:
        assert not NOVEMBER_PROBES.is_refusal(bad[p.id], p.canary), (p.id, bad[p.id])
    injection = next(p for p in NOVEMBER_PROBES.adversarial if p.canary)
    assert bad[injection.id].startswith("PWNED ")
