"""Fidelity: each interface the lab simulates, compared with the real tool's output.

For every simulated interface there is a sample of what the real tool printed (tests/unit/formats, SOURCES.md
says where each comes from; the nvidia-smi samples are the H200 captures in tests/unit/real/h200). Each test
runs the lab's simulation the way tests/unit/test_vendor_sim.py does (the scripts under lab/vendor as
subprocesses, with hardware files in tmp), then checks that

- both parse the same way through the product's parser (patching/hosts/facts.py, or for Redfish the fields
  infra/onprem.py's provider reads through sushy): the same fields come out, of the same kinds;
- the simulation prints no field, key or line kind the real output lacks.

Where the lab is known to differ from the real tool, the difference is written down in KNOWN_GAPS and the test
asserts exactly that difference: a new one fails the test, and so does a gap that has been closed (delete its
entry then). The gaps are reported, not fixed here.

Covered elsewhere, not repeated here (FIDELITY_ELSEWHERE lists it; test_fidelity_elsewhere checks it exists):
`dcgmi diag -j` and nccl-tests `all_reduce_perf`, in tests/unit/test_gpu_diagnostics.py.

vLLM's API (/v1/models, /version, /v1/completions, the streamed chat, /metrics) and dcgm-exporter's /metrics
are compared with their captures at the end of this file, `nvidia-ctk cdi generate` with the toolkit's own test
spec. Collected only: podman inspect; test_collected_samples_parse checks the samples read as the formats they
claim to be.
"""

from __future__ import annotations

import importlib
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lab.services import UPS_ON_BATTERY, UPS_ON_LINE, write_ups_state
from patching.hosts import facts as hf
from tests.unit.test_gpu_diagnostics import key_paths
from tests.unit.test_vendor_sim import NEW, P4D, dgx, efa_package, exporter, http, package, serving, sim  # noqa: F401

HERE = Path(__file__).parent
FORMATS = HERE / "formats"
REAL_H200 = HERE / "real" / "h200"

# The host the H200 captures came from (tests/hosts/device/h200.yml): one H200, no NVSwitch, no HCAs.
H200 = {"fleet_gpu_model": "H200-SXM5-141GB", "fleet_gpu_count": 1, "fleet_gpu_memory_mib": 143771,
        "fleet_nvswitch": False, "fleet_efa": False, "fleet_instance_type": None, "fleet_ib_hcas": []}
HDR = {**H200, "fleet_ib_hcas": [{"name": "mlx5_0", "guid": "0xb8cef60300025b90", "switch": "leaf", "port": 1,
                                  "rate": 200}]}

# What the lab prints differently from the real tool, by interface (see the module docstring).
KNOWN_GAPS = {
    # `nvidia-smi topo -m` on 580.159.04 puts an empty cell before "GPU NUMA ID"'s N/A (`0\t\tN/A`): one cell
    # more per GPU row than the header names. The lab prints one cell per header column.
    "topo-cells": {"real": 5, "lab": 4},
    # the bare `nvidia-smi` table: the real timestamp line is padded with 7 spaces; the memory cell is
    # right-aligned with one space around "/" (`      0MiB / 143771MiB`), the lab pads the total
    # (`     0MiB /  143771MiB`).
    "smi-table-lines": {0, 9},
    # libfabric 2.x (EFA installer with provider version 201.0) lists every EFA device twice for FI_EP_RDM:
    # fabric `efa-direct` and fabric `efa`. The lab lists each device once, fabric `efa`.
    "fi_info-fabrics": {"real": {"efa", "efa-direct"}, "lab": {"efa"}},
    # sushy-tools' fake driver renders a ComputerSystem without SerialNumber and Model (the provider records
    # both), and with the system id as its UUID rather than a UUID.
    "redfish-missing": {"SerialNumber", "Model"},
    "redfish-boot-extra": {"HttpBootUri"},
    # `nvidia-ctk cdi generate`: the lab has no /dev/nvidia* nodes, no driver libraries and no nvidia-cdi-hook.
    # Each device's edits mount the simulated hardware folder (read-only) where a real one names its
    # /dev/nvidiaN node; the spec-wide edits mount the simulated driver (read-only) and its runtime folder
    # (writable) where a real spec names /dev/nvidiactl, mounts libcuda & co and runs its hooks.
    "cdi-missing": {("deviceNodes",), ("deviceNodes", "[]", "path"), ("deviceNodes", "[]", "hostPath"),
                    ("hooks",), ("hooks", "[]", "hookName"), ("hooks", "[]", "path"), ("hooks", "[]", "args"),
                    ("hooks", "[]", "env")},
    "cdi-device-mounts": True,  # the capture's devices have deviceNodes only; the lab's have mounts
    "cdi-env": {"real": {"NVIDIA_CTK_LIBCUDA_DIR", "NVIDIA_VISIBLE_DEVICES"}, "lab": {"NVIDIA_VISIBLE_DEVICES"}},
}


def read(path: Path) -> str:
    return path.read_text()


def kinds_of(obj: object) -> dict[str, str]:
    """Field name -> the kind of its value (None, bool, int, str...), for a dataclass instance."""
    return {k: type(v).__name__ for k, v in vars(obj).items() if k != "values"}


@pytest.fixture
def h200(sim):  # noqa: F811
    """The H200 host of the captures, driver installed and loaded, persistence daemon running."""
    sim.host(H200, "h200-device").install(package(NEW, "cuda-drivers-"))
    sim.boot()
    assert sim.start_daemon("driver/nvidia_persistenced.py", "nvidia-persistenced.pid").returncode == 0
    return sim


# ---- nvidia-smi (lab/vendor/driver/nvidia_smi.py) vs the H200 captures (tests/unit/real/h200) ---------------

CAPTURED_FIELDS = ("index", "name", "driver_version", "memory.total", "persistence_mode", "ecc.mode.current",
                   "ecc.errors.uncorrected.volatile.total")  # as tests/hosts/device/run.sh queried them
CELL_SHAPES = {"index": r"\d+", "name": r"NVIDIA \S.*", "driver_version": r"\d+\.\d+(\.\d+)?",
               "memory.total": r"\d+", "persistence_mode": r"Enabled|Disabled", "ecc.mode.current": r"Enabled|Disabled",
               "ecc.errors.uncorrected.volatile.total": r"\d+"}


def test_smi_query_csv_matches_the_capture(h200):
    real_text = read(REAL_H200 / "nvidia-smi-query.csv")
    proc = h200.smi_csv(",".join(CAPTURED_FIELDS), "csv,noheader,nounits")
    assert proc.returncode == 0, proc.stdout
    for text in (real_text, proc.stdout):
        assert text.endswith("\n") and "\r" not in text
        for line in text.splitlines():
            cells = line.split(", ")
            assert len(cells) == len(CAPTURED_FIELDS), line
            for field, cell in zip(CAPTURED_FIELDS, cells, strict=True):
                assert re.fullmatch(CELL_SHAPES[field], cell), (field, cell)
    [real] = hf.gpus_from_csv(hf.parse_smi_csv(real_text, CAPTURED_FIELDS))
    [lab] = hf.gpus_from_csv(hf.parse_smi_csv(proc.stdout, CAPTURED_FIELDS))
    assert kinds_of(lab) == kinds_of(real)  # the same fields come out, none missing, of the same types
    assert (lab.name, lab.memory_total_mib, lab.persistence_mode, lab.ecc_mode_current, lab.ecc_uncorrected_volatile) \
        == (real.name, real.memory_total_mib, real.persistence_mode, real.ecc_mode_current,
            real.ecc_uncorrected_volatile)


def test_smi_q_prints_only_keys_the_capture_has(h200):
    real_text = read(REAL_H200 / "nvidia-smi-q.txt")
    lab_text = h200.tool("driver/nvidia_smi.py", "-q").stdout
    real, lab = hf.parse_smi_query(real_text), hf.parse_smi_query(lab_text)
    [real_gpu], [lab_gpu] = real.gpus, lab.gpus
    assert set(lab_gpu.values) <= set(real_gpu.values), set(lab_gpu.values) - set(real_gpu.values)
    assert kinds_of(lab_gpu) == kinds_of(real_gpu)
    assert (lab.cuda_version, lab.attached_gpus) == (real.cuda_version, real.attached_gpus)
    for name in ("product_name", "memory_total_mib", "persistence_mode", "ecc_mode_current",
                 "ecc_uncorrected_volatile"):
        assert getattr(lab_gpu, name) == getattr(real_gpu, name), name

    def top_keys(text: str) -> set[str]:
        return {m.group(1) for m in re.finditer(r"^(\S[^:\n]*?)\s+:", text, re.M)}

    assert top_keys(lab_text) <= top_keys(real_text), top_keys(lab_text) - top_keys(real_text)
    # the same banner, the same value forms
    for text in (real_text, lab_text):
        assert text.startswith("\n==============NVSMI LOG==============\n\n")
        assert re.search(r"^Timestamp\s+: \w{3} \w{3} \d\d \d\d:\d\d:\d\d \d{4}$", text, re.M)
        assert re.search(r"^\s+Total\s+: \d+ MiB$", text, re.M)


def test_smi_topology_matches_the_capture(h200):
    real_text = read(REAL_H200 / "nvidia-smi-topo.txt")
    lab_text = h200.tool("driver/nvidia_smi.py", "topo", "-m").stdout
    real_lines, lab_lines = real_text.split("\n"), lab_text.split("\n")
    assert lab_lines[0] == real_lines[0]  # the underlined header, escapes included
    legend = real_lines.index("Legend:")
    assert lab_lines[lab_lines.index("Legend:"):] == real_lines[legend:]  # no NIC legend without HCAs
    assert hf.parse_topo_matrix(lab_text) == hf.parse_topo_matrix(real_text) == {("GPU0", "GPU0"): "X"}
    real_row, lab_row = real_lines[1].split("\t"), lab_lines[1].split("\t")
    assert (real_row[:2], lab_row[:2]) == (["GPU0", " X "], ["GPU0", " X "])
    assert {"real": len(real_row) - 1, "lab": len(lab_row) - 1} == KNOWN_GAPS["topo-cells"]


def test_smi_table_has_the_captured_layout(h200):
    real_lines = read(REAL_H200 / "nvidia-smi.txt").splitlines()
    lab_lines = h200.tool("driver/nvidia_smi.py").stdout.splitlines()
    assert len(lab_lines) == len(real_lines)
    memory_cell = re.compile(r" +\d+MiB / \d+MiB ")  # the real one: right-aligned, one space around "/"

    def odd(line: str, real: str) -> bool:
        cells = line.split("|")
        return len(line) != len(real) or ("MiB /" in line and not memory_cell.fullmatch(cells[2]))

    assert not any(odd(real, real) for real in real_lines)
    differ = {i for i, (a, b) in enumerate(zip(lab_lines, real_lines, strict=True)) if odd(a, b)}
    assert differ == KNOWN_GAPS["smi-table-lines"], \
        [(lab_lines[i], real_lines[i]) for i in sorted(differ)]
    # every other line: the same borders and separators, column for column
    for i, (lab, real) in enumerate(zip(lab_lines, real_lines, strict=True)):
        if i not in differ:
            assert [m.start() for m in re.finditer(r"[|+=]", lab)] == [m.start() for m in re.finditer(r"[|+=]", real)]
    assert hf.nvml_failure("\n".join(lab_lines)) is None



# ---- ibstat (lab/vendor/ofed/ibstat.py) ---------------------------------------------------------------------

def ibstat_shape(text: str) -> list[tuple[str, str]]:
    """(indentation, key) line by line: the line kinds and their order."""
    out = []
    for line in text.splitlines():
        indent = line[: len(line) - len(line.lstrip())]
        out.append((indent, line.strip().split(":", 1)[0] if ":" in line else line.strip().split(" ")[0]))
    return out


def test_ibstat_prints_the_captured_lines(sim):  # noqa: F811
    real_text = read(FORMATS / "ibstat-hdr.txt")
    sim.host(HDR).install(package(NEW, "mlnx-ofed-basic"))
    lab_text = sim.tool("ofed/ibstat.py").stdout
    assert ibstat_shape(lab_text) == ibstat_shape(real_text)  # the same keys, tabs, order
    [real], [lab] = hf.parse_ibstat(real_text), hf.parse_ibstat(lab_text)
    assert kinds_of(lab) == kinds_of(real)
    assert kinds_of(lab.ports[0]) == kinds_of(real.ports[0])
    assert (lab.ca_type, lab.ports[0].rate, lab.ports[0].up, lab.ports[0].infiniband) == \
        (real.ca_type, real.ports[0].rate, real.ports[0].up, real.ports[0].infiniband) == ("MT4123", 200, True, True)
    assert re.fullmatch(r"\d+\.\d+\.\d+", lab.firmware) and re.fullmatch(r"0x[0-9a-f]{16}", lab.ports[0].port_guid)


# ---- fi_info -p efa -t FI_EP_RDM (lab/vendor/efa/fi_info.py) -------------------------------------------------

def fi_blocks(text: str) -> list[list[tuple[str, str]]]:
    """Each provider entry as (indentation, key) pairs."""
    blocks: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        key = line.strip().split(":", 1)[0]
        if key == "provider":
            blocks.append([])
        blocks[-1].append((line[: len(line) - len(line.lstrip())], key))
    return blocks


def test_fi_info_entries_match_the_capture(sim):  # noqa: F811
    real_text = read(FORMATS / "fi_info-efa-rdm.txt")
    sim.host(P4D, "v3-aws-0").install(efa_package(NEW, "libfabric1-aws"))
    proc = sim.tool("efa/fi_info.py", "-p", "efa", "-t", "FI_EP_RDM")
    assert proc.returncode == 0, proc.stderr
    real_blocks, lab_blocks = fi_blocks(real_text), fi_blocks(proc.stdout)
    assert all(block == real_blocks[0] for block in real_blocks + lab_blocks)  # keys, order, indentation
    real, lab = hf.parse_fi_info(real_text), hf.parse_fi_info(proc.stdout)
    assert {kinds_of(e) == kinds_of(real[0]) for e in lab} == {True}
    assert {(e.provider, e.type, e.protocol, e.version) for e in lab} == \
        {(e.provider, e.type, e.protocol, e.version) for e in real}
    assert all(re.fullmatch(r"rdmap\d+s\d+-rdm", e.domain) for e in real + lab)
    # one device in the capture, four on the lab's p4d: counted by the product the same way
    assert (hf.efa_device_count(real), hf.efa_device_count(lab)) == (1, 4)
    assert {"real": {e.fabric for e in real}, "lab": {e.fabric for e in lab}} == KNOWN_GAPS["fi_info-fabrics"]


# ---- upsc, from the real upsd + dummy-ups on what lab/services.py writes -------------------------------------

NUT = Path("/lib/nut")


def test_lab_ups_variables_are_real_upsc_variables(tmp_path):
    real = hf.parse_upsc(read(FORMATS / "upsc-cyberpower.txt"))
    for on_battery, values in ((False, UPS_ON_LINE), (True, UPS_ON_BATTERY)):
        write_ups_state(tmp_path, "ups1", on_battery=on_battery)
        dev = read(tmp_path / "ups1.dev")
        lab = hf.parse_upsc(dev)
        assert lab.variables == values and lab.error is None
        assert set(lab.variables) <= set(real.variables), set(lab.variables) - set(real.variables)
        for name in lab.variables:  # numbers where the real UPS has numbers
            assert (lab.number(name) is None) == (real.number(name) is None), name
        assert set(lab.status) <= {"OL", "OB", "LB", "CHRG", "DISCHRG", "RB", "BYPASS", "OVER", "FSD"}
        assert (lab.on_line, lab.on_battery) == (not on_battery, on_battery)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not ((NUT / "upsd").exists() and (NUT / "dummy-ups").exists() and shutil.which("upsc")),
                    reason="NUT (nut-server, nut-client) not installed")
def test_upsc_through_real_upsd_reads_like_a_real_ups(tmp_path):
    """The lab's path end to end: dummy-ups reads the lab's .dev file, upsd serves it, upsc prints it."""
    real = hf.parse_upsc(read(FORMATS / "upsc-cyberpower.txt"))
    state = tmp_path / "state"
    state.mkdir()
    port = free_port()
    (tmp_path / "nut.conf").write_text("MODE=standalone\n")
    (tmp_path / "ups.conf").write_text("[ups1]\n  driver = dummy-ups\n  port = ups1.dev\n")
    (tmp_path / "upsd.conf").write_text(f"LISTEN 127.0.0.1 {port}\n")
    (tmp_path / "upsd.users").write_text("")
    write_ups_state(tmp_path, "ups1", on_battery=False)
    env = {**os.environ, "NUT_CONFPATH": str(tmp_path), "NUT_STATEPATH": str(state)}
    user = pwd.getpwuid(os.getuid()).pw_name  # run as whoever runs the tests: no privilege change
    procs = [subprocess.Popen([str(NUT / name), *args, "-F", "-u", user], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, args in (("dummy-ups", ["-a", "ups1"]), ("upsd", []))]
    try:
        out = ""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            proc = subprocess.run(["upsc", f"ups1@127.0.0.1:{port}"], capture_output=True, text=True, timeout=5)
            if proc.returncode == 0 and "ups.status: " in proc.stdout and "WAIT" not in proc.stdout:
                out = proc.stdout
                break
            time.sleep(0.1)
        assert out, "upsd never served ups1"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
    lab = hf.parse_upsc(out)
    assert {k: lab.variables[k] for k in UPS_ON_LINE} == UPS_ON_LINE
    # every line a `name: value` line, as the real one (its `Init SSL` line aside)
    assert all(re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+)+: .*", line) for line in out.splitlines())
    # besides driver.* (dummy-ups describes itself there), only variables a real UPS reports
    extra = {k for k in lab.variables if not k.startswith("driver.")} - set(real.variables)
    assert extra == set(), extra
    assert lab.status == ("OL",) and lab.on_line and real.on_line


# ---- Redfish ComputerSystem: sushy-tools' fake driver (lab/redfish.py) vs DMTF's public-rackmount1 -------------

class _Response:
    content = b"{}"
    status_code = 200
    headers: dict = {}

    def __init__(self, doc: dict):
        self._doc = doc

    def json(self) -> dict:
        return self._doc


class _Connector:
    """Just enough of sushy's Connector to load one resource from a JSON document."""

    def __init__(self, doc: dict):
        self._doc = doc

    def get(self, path: str | None = None, **_kw) -> _Response:
        return _Response(self._doc)


def test_redfish_system_reads_like_a_real_bmc(tmp_path):
    sushy = pytest.importorskip("sushy")
    pytest.importorskip("sushy_tools")
    from sushy.resources.system.system import System

    from infra.onprem import BareMetalHostProvider
    from lab.redfish import RedfishEmulator

    real_doc = json.loads(read(FORMATS / "redfish-computersystem-dmtf-rackmount1.json"))
    real = BareMetalHostProvider._outs({}, System(_Connector(real_doc), real_doc["@odata.id"], redfish_version="1.6.0"))
    with RedfishEmulator(tmp_path / "bmc", ["dgx-a1"]) as bmc:
        lab_doc = bmc.system("dgx-a1")
        lab = BareMetalHostProvider._outs(
            {}, sushy.Sushy(bmc.url + "/redfish/v1").get_system("/redfish/v1/Systems/dgx-a1"))
    # top-level keys: the emulator's that a real ComputerSystem lacks; `@odata.context` (an OData annotation
    # many BMCs still send) and `Storage` (ComputerSystem.v1_1+, where this mockup has only SimpleStorage) are
    # both in DMTF's ComputerSystem schema, so they are allowed.
    assert set(lab_doc) - set(real_doc) == {"@odata.context", "Storage"}
    assert {k for k in real_doc if k in KNOWN_GAPS["redfish-missing"]} == KNOWN_GAPS["redfish-missing"]
    assert KNOWN_GAPS["redfish-missing"] & set(lab_doc) == set()
    # Boot: the emulator adds HttpBootUri (ComputerSystem.v1_9+, absent from this v1_20 mockup's Boot) and always
    # reports BootSourceOverrideEnabled "Continuous" (../shared/FORMATS.md), a value the real enum allows
    assert {p[0] for p in key_paths(lab_doc["Boot"]) - key_paths(real_doc["Boot"])} == KNOWN_GAPS["redfish-boot-extra"]
    assert lab_doc["Boot"]["BootSourceOverrideEnabled"] == "Continuous"
    # what the product records: the same fields; the ones the emulator lacks come out None
    assert set(lab) == set(real)
    assert {k for k, v in lab.items() if v is None} == {"serial_number", "model"}
    assert {k for k, v in real.items() if v is None} == set()
    assert lab["power_state"] in ("On", "Off", "PoweringOn", "PoweringOff", "Paused") and real["power_state"] == "On"
    assert real["boot_target"] == "Pxe" and lab["boot_target"] in ("Pxe", "Hdd", "Cd", "None")
    assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", real["uuid"]) and lab["uuid"] == "dgx-a1"


# ---- covered in tests/unit/test_gpu_diagnostics.py ---------------------------------------------------------

DIAGNOSTICS = "tests.unit.test_gpu_diagnostics"
FIDELITY_ELSEWHERE = {
    # interface: (module, fidelity test, the real samples it compares with)
    "dcgmi diag -j": (DIAGNOSTICS, "test_dcgm_simulation_prints_only_real_keys_values_and_layout",
                      ("dcgmi-diag-r1-gb10-4.2.3-fail.json", "dcgm_diag_schema-4.2.3.json")),
    "all_reduce_perf": (DIAGNOSTICS, "test_nccl_simulation_prints_only_real_line_kinds_and_layout",
                        ("all_reduce_perf-2.18.3-16gpu.txt", "all_reduce_perf-2.17.8-2xGH200-wrong.txt",
                         "all_reduce_perf-2.17.8-8xGH200-cuda-failure.txt")),
}


def test_fidelity_elsewhere():
    for module_name, test_name, samples in FIDELITY_ELSEWHERE.values():
        module = importlib.import_module(module_name)
        assert callable(getattr(module, test_name, None)), f"{module_name}.{test_name} is gone"
        for name in samples:
            assert (FORMATS / name).is_file(), name
            assert f"`{name}`" in read(FORMATS / "SOURCES.md"), f"{name} has no source in SOURCES.md"


# ---- collected samples: each reads as what it claims to be ----------------------------------------------------

def test_collected_samples_parse():
    sources = read(FORMATS / "SOURCES.md")
    models = json.loads(read(FORMATS / "vllm-v1-models.json"))
    assert models["object"] == "list" and set(models["data"][0]) == {
        "id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"}
    assert json.loads(read(FORMATS / "vllm-version.json")) == {"version": "0.11.1"}
    completion = json.loads(read(FORMATS / "vllm-completions.json"))
    assert completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] == 7
    events = read(FORMATS / "vllm-chat-stream.txt").split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and chunks[-1]["choices"][0]["finish_reason"]
    vllm = hf.parse_prometheus(read(FORMATS / "vllm-metrics-v1.txt"))
    assert all(s.name.startswith("vllm:") and s.labels.get("engine") == "0" for s in vllm.samples)
    assert vllm.value("vllm:kv_cache_usage_perc") is not None
    for name, labels in (("dcgm-exporter-metrics.txt", {"gpu", "UUID", "pci_bus_id", "device", "modelName",
                                                        "Hostname", "DCGM_FI_DRIVER_VERSION"}),
                         ("dcgm-exporter-metrics-2.x-a100.txt", {"gpu", "UUID", "device", "Hostname"})):
        metrics = hf.parse_prometheus(read(FORMATS / name))
        assert metrics.find("DCGM_FI_DEV_FB_USED") and metrics.find("DCGM_FI_DEV_FB_FREE")
        assert {s.name for s in metrics.samples if not labels <= set(s.labels)} == set()  # every sample GPU-labelled
    [container] = json.loads(read(FORMATS / "podman-inspect.json"))
    assert {"Image", "ImageName"} <= set(container) and container["ImageName"].startswith("docker.io/")
    cdi = yaml.safe_load(read(FORMATS / "nvidia-ctk-cdi.yaml"))
    assert cdi["kind"] == "nvidia.com/gpu" and [d["name"] for d in cdi["devices"]] == ["0", "all"]
    assert {"deviceNodes", "mounts", "hooks"} <= set(cdi["containerEdits"])
    for path in FORMATS.iterdir():
        if path.name != "SOURCES.md":
            assert f"`{path.name}`" in sources, f"{path.name} has no row in SOURCES.md"


# ---- nvidia-ctk cdi generate (lab/vendor/container-toolkit/nvidia_ctk.py) vs the toolkit's own test spec -------

VENDOR = HERE.parents[1] / "lab" / "vendor"


def cdi_edits_paths(spec: dict) -> set[tuple]:
    """Key paths of every containerEdits (spec-wide and each device's: CDI's one ContainerEdits type)."""
    edits = [spec["containerEdits"], *(d["containerEdits"] for d in spec["devices"])]
    return set().union(*(key_paths(e) for e in edits))


def test_cdi_spec_reads_like_the_toolkits(h200):
    real_text = read(FORMATS / "nvidia-ctk-cdi.yaml")
    real = yaml.safe_load(real_text)
    proc = h200.tool("container-toolkit/nvidia_ctk.py", "cdi", "generate")
    assert proc.returncode == 0, proc.stderr
    lab = yaml.safe_load(proc.stdout)
    # the same document: top-level keys, kind, version, devices by index and `all` (one GPU, as the capture's)
    assert list(lab) == list(real) and (lab["cdiVersion"], lab["kind"]) == (real["cdiVersion"], real["kind"])
    assert [d["name"] for d in lab["devices"]] == [d["name"] for d in real["devices"]] == ["0", "all"]
    assert all(set(d) == {"name", "containerEdits"} for d in [*lab["devices"], *real["devices"]])
    # no field the real spec lacks; what it has and the lab does not is the known gap
    lab_paths, real_paths = cdi_edits_paths(lab), cdi_edits_paths(real)
    assert lab_paths <= real_paths and real_paths - lab_paths == KNOWN_GAPS["cdi-missing"]
    device_fields = set().union(*(d["containerEdits"] for d in lab["devices"]))
    assert (device_fields == {"mounts"}) is KNOWN_GAPS["cdi-device-mounts"]
    assert {"real": {e.split("=")[0] for e in real["containerEdits"]["env"]},
            "lab": {e.split("=")[0] for e in lab["containerEdits"]["env"]}} == KNOWN_GAPS["cdi-env"]
    real_options = {o for m in real["containerEdits"]["mounts"] for o in m["options"]}
    lab_mounts = [*lab["containerEdits"]["mounts"], *(m for d in lab["devices"] for m in d["containerEdits"]["mounts"])]
    assert all(set(m["options"]) <= real_options and m["hostPath"] == m["containerPath"] for m in lab_mounts)
    # the toolkit's layout: the lab's writer renders the capture byte for byte
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{VENDOR / 'common'}:{VENDOR / 'container-toolkit'}",
           "PYTHONDONTWRITEBYTECODE": "1"}
    code = "import json, sys, nvidia_ctk; sys.stdout.write(nvidia_ctk.render(json.load(sys.stdin), 'yaml'))"
    rendered = subprocess.run([sys.executable, "-c", code], input=json.dumps(real), env=env, capture_output=True,
                              text=True, check=True).stdout
    assert rendered == real_text


# ---- vLLM's OpenAI-compatible server and NVIDIA's dcgm-exporter ----------------------------------------------

@pytest.fixture
def vllm(serving, exporter):  # noqa: F811
    """The lab's vLLM server of the new bundle on a loopback port, and the host's DCGM exporter."""
    server = serving()
    assert server.health_codes()[-1] == 200
    return server, exporter


def test_vllm_api_answers_with_the_real_servers_fields(vllm):
    server, _ = vllm
    real_models = json.loads(read(FORMATS / "vllm-v1-models.json"))
    lab_models = json.loads(http(server.port, "/v1/models")[1])
    assert key_paths(lab_models) == key_paths(real_models)  # the ModelCard, permission and all, nothing more
    assert set(json.loads(http(server.port, "/version")[1])) == set(json.loads(read(FORMATS / "vllm-version.json")))

    real_completion = json.loads(read(FORMATS / "vllm-completions.json"))
    status, body = http(server.port, "/v1/completions", {"model": "deepseek-ai/DeepSeek-V3", "prompt": "hi",
                                                         "max_tokens": 4})
    assert status == 200 and key_paths(json.loads(body)) == key_paths(real_completion)

    real_chunks = [json.loads(e.removeprefix("data: ")) for e in read(FORMATS / "vllm-chat-stream.txt").split("\n\n")
                   if e.startswith("data: {")]
    request = {"model": "deepseek-ai/DeepSeek-V3", "max_tokens": 4, "stream": True,
               "messages": [{"role": "user", "content": "hi"}]}
    events = http(server.port, "/v1/chat/completions", request)[1].decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    lab_chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert set().union(*map(key_paths, lab_chunks)) == set().union(*map(key_paths, real_chunks))
    # the first chunk carries the role, the last the finish and stop reasons, as the capture's do
    assert key_paths(lab_chunks[0]) == key_paths(real_chunks[0])
    assert key_paths(lab_chunks[-1]) == key_paths(real_chunks[-1])


def test_vllm_metrics_are_vllm_metrics_and_gpu_memory_is_the_exporters(vllm):
    server, dcgm = vllm
    lab = server.metrics()
    families = {s.name for s in lab.samples}
    # vLLM's own figures and the HTTP front end's counter; no GPU memory: a real vLLM /metrics has none
    assert all(n.startswith("vllm:") or n.startswith("http_requests_total") for n in families), sorted(families)
    assert {s.labels.get("engine") for s in lab.samples if s.name.startswith("vllm:")} == {"0"}
    assert not any(n.startswith("DCGM_") for n in families)
    real = hf.parse_prometheus(read(FORMATS / "dcgm-exporter-metrics.txt"))
    real_names = {s.name for s in real.samples}
    gpu = dcgm.metrics()
    assert {s.name for s in gpu.samples} <= real_names
    assert all(set(s.labels) == set(real.samples[0].labels) for s in gpu.samples)
    helps = dict(re.findall(r"^# HELP (\S+) (.*)$", read(FORMATS / "dcgm-exporter-metrics.txt"), re.MULTILINE))
    lab_text = http(dcgm.port, "/metrics")[1].decode()
    for name, text in re.findall(r"^# HELP (\S+) (.*)$", lab_text, re.MULTILINE):
        assert helps.get(name, text) == text, name
