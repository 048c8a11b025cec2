"""DCGM's `dcgmi diag -j` and nccl-tests' `all_reduce_perf`: the parsers on real output (tests/unit/formats,
SOURCES.md says where each sample comes from), the lab's simulations of both tools, and checks that the
simulations print nothing the real tools do not."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import aptrepo
from lab.hardware import set_fault
from patching.hosts import facts as hf
from patching.release.bundle import load_bundle
from tests.unit.test_vendor_sim import DGX, G4DN, NEW, OLD, VENDOR, Sim, package

FORMATS = Path(__file__).with_name("formats")
H100 = {**DGX, "fleet_gpu_model": "H100-SXM5-80GB", "fleet_gpu_memory_mib": 81559}
SWEEP = ("-b", "8", "-e", "8G", "-f", "2")


def sample(name: str) -> str:
    return (FORMATS / name).read_text()


# ---- the parsers on real output ----------------------------------------------------------------------------

def test_dcgm_4x_capture_with_a_failure():
    diag = hf.parse_dcgm_diag(sample("dcgmi-diag-r1-gb10-4.2.3-fail.json"))
    assert diag.version == "4.2.3" and not diag.passed
    assert diag.results == diag.failures == (hf.DiagResult(
        "software", "Deployment", "0", "Fail",
        'Persistence Mode: Persistence mode for GPU 0 is disabled. Enable persistence mode by running "nvidia-smi '
        '-i <gpuId> -pm 1 " as root.'),)


def test_dcgm_4x_level_one_and_two():
    r1 = hf.parse_dcgm_diag(sample("dcgmi-diag-r1.json"))
    assert r1.version == "4.2.3" and r1.passed and r1.failures == ()
    assert [(r.test, r.category, r.gpu, r.status) for r in r1.results] == \
        [("software", "Deployment", str(i), "Pass") for i in range(8)]
    r2 = hf.parse_dcgm_diag(sample("dcgmi-diag-r2-fail.json"))
    assert [(r.test, r.category) for r in r2.results[::8]] == [("software", "Deployment"), ("memory", "Hardware"),
                                                               ("pcie", "Integration")]
    assert len(r2.results) == 24 and not r2.passed
    [failure] = r2.failures
    assert (failure.test, failure.gpu, failure.status) == ("memory", "5", "Fail")
    assert failure.info.startswith("CUDA APIs have indicated that a double-bit ECC error has occured on GPU 5.")


def test_dcgm_3x_shape_and_statuses():
    diag = hf.parse_dcgm_diag(sample("dcgmi-diag-3.x-gcm-fail.json"))
    assert diag.version is None and len(diag.results) == 9
    assert {r.category for r in diag.results} == {"Deployment"} and {r.gpu for r in diag.results} == {None}
    assert [r.test for r in diag.failures] == ["Persistence Mode"]
    assert next(r for r in diag.results if r.test == "Environment Variables").status == "Warn"  # not a failure
    three = '{"DCGM GPU Diagnostic": {"test_categories": [{"category": "Integration", "tests": [{"name": "PCIe", ' \
            '"results": [{"gpu_ids": "0,1", "status": "Pass"}]}]}], "version": "3.3.9"}}'
    assert [(r.test, r.gpu) for r in hf.parse_dcgm_diag("Successfully ran diagnostic for group.\n" + three).results] \
        == [("PCIe", "0"), ("PCIe", "1")]


def test_dcgm_runtime_error_and_garbage_raise():
    with pytest.raises(hf.ParseError, match=r"could not run: Error: Unable to complete diagnostic .*Return: \(-56\)"):
        hf.parse_dcgm_diag(sample("dcgmi-diag-runtime-error.json"))
    capture = sample("dcgmi-diag-r1-gb10-4.2.3-fail.json")
    for text, why in [("", "no JSON"), ("Error: unable to establish a connection to the specified host: localhost\n"
                                        "Error: Unable to connect to host engine. Host engine connection "
                                        "invalid/disconnected.\n", "no JSON"),
                      (capture[: len(capture) // 2], "not complete JSON"), ('{"foo": 1}', "no \"DCGM Diagnostic\""),
                      ('{"DCGM Diagnostic": {"test_categories": []}}', "no results"),
                      ('{"DCGM Diagnostic": {"test_categories": [{"tests": [{"name": "x", "results": [{}]}]}]}}',
                       "not a dcgmi diag result")]:
        with pytest.raises(hf.ParseError, match=why):
            hf.parse_dcgm_diag(text)


def test_nccl_captures():
    a100 = hf.parse_nccl_perf(sample("all_reduce_perf-8xA100.txt"))
    assert (a100.gpus, a100.devices) == (8, ("NVIDIA A100-SXM4-80GB",) * 8)
    assert len(a100.rows) == 6 and a100.rows[0] == hf.NcclRow(33554432, 8388608, "float", "sum", 344.8, 97.32, 170.31,
                                                              0, 349.5, 95.99, 167.99, 0)
    assert (a100.avg_busbw_gbps, a100.peak_busbw_gbps, a100.out_of_bounds, a100.wrong) == (210.99, 231.72, 0, 0)

    new = hf.parse_nccl_perf(sample("all_reduce_perf-2.18.3-16gpu.txt"))
    assert new.gpus == 16 and set(new.devices) == {"NVIDIA Graphics Device"} and len(new.rows) == 24
    assert (new.rows[0].size_bytes, new.rows[-1].size_bytes, new.rows[-1].oop_time_us) == (1024, 8589934592, 323195)
    assert (new.avg_busbw_gbps, new.peak_busbw_gbps, new.out_of_bounds) == (21.0721, 49.85, 0)

    wrong = hf.parse_nccl_perf(sample("all_reduce_perf-2.17.8-2xGH200-wrong.txt"))
    assert (wrong.gpus, wrong.out_of_bounds, wrong.wrong, wrong.avg_busbw_gbps) == (2, 4, 128, 4.79995)
    assert [(r.oop_wrong, r.ip_wrong) for r in wrong.rows if r.size_bytes == 1048576] == [(96, 32)]


def test_nccl_failures_and_garbage_raise():
    with pytest.raises(hf.ParseError, match="busy or unavailable"):
        hf.parse_nccl_perf(sample("all_reduce_perf-2.17.8-8xGH200-cuda-failure.txt"))
    full = sample("all_reduce_perf-2.18.3-16gpu.txt")
    truncated = full[: full.index("  8589934592")]
    for text, why in [("", "no nccl-tests summary"), ("hello\nworld\n", "no nccl-tests summary"),
                      (truncated, "no nccl-tests summary"),
                      (full.replace("    37.89    0.03    0.05", "    37.89"), "expected 12 or 13 columns"),
                      (full.replace("49.83       0", "49.xx       0"), "not a number")]:
        with pytest.raises(hf.ParseError, match=why):
            hf.parse_nccl_perf(text)
    # N/A #wrong (run without validation) counts 0; mpirun's prefixes are dropped
    no_check = "\n".join("[1,0]<stdout>:" + line for line in full.replace("       0    ", "     N/A    ").splitlines())
    perf = hf.parse_nccl_perf(no_check.replace("       0\n", "     N/A\n"))
    assert perf.rows[0].oop_wrong is None and perf.wrong == 0 and perf.gpus == 16


# ---- the simulations ---------------------------------------------------------------------------------------

def deb(name: str, version: str | None = None) -> aptrepo.Deb:
    """A planned package by exact name (and version)."""
    return next(d for d in aptrepo.plan_packages([NEW]) if d.name == name and version in (None, d.version))


class Host(Sim):
    """A simulated GPU host with the driver, DCGM, NCCL and nccl-tests installed."""

    def setup(self, hostvars: dict = DGX, nccl: str = f"{NEW['nccl']}+cuda13.0", persistence: bool = True) -> Host:
        self.host(hostvars)
        for d in (package(NEW, "cuda-drivers-"), deb("datacenter-gpu-manager-4-core"),
                  deb("datacenter-gpu-manager-4-cuda12"), deb("libnccl2", nccl), deb("nccl-tests")):
            self.install(d)
        self.boot()
        if persistence:
            assert self.start_daemon("driver/nvidia_persistenced.py", "nvidia-persistenced.pid").returncode == 0
        return self

    def diag(self, level: int = 1, json_output: bool = True) -> subprocess.CompletedProcess:
        return self.tool("dcgm/dcgmi.py", "diag", "-r", str(level), *(["-j"] if json_output else []))

    def all_reduce(self, gpus: int = 8, *args: str) -> subprocess.CompletedProcess:
        return self.tool("nccl/all_reduce_perf.py", *(args or SWEEP), "-g", str(gpus))


@pytest.fixture
def host(tmp_path):
    h = Host(tmp_path)
    yield h
    h.stop_daemons()


def test_healthy_a100_passes_diag_and_reaches_235(host):
    host.setup()
    proc = host.diag(1)
    diag = hf.parse_dcgm_diag(proc.stdout)
    assert proc.returncode == 0 and diag.passed and diag.version == "4.2.3"
    assert [(r.test, r.gpu, r.status) for r in diag.results] == [("software", str(i), "Pass") for i in range(8)]
    r2 = hf.parse_dcgm_diag(host.diag(2).stdout)
    assert [(r.test, r.category) for r in r2.results[::8]] == [("software", "Deployment"), ("memory", "Hardware"),
                                                               ("pcie", "Integration")] and r2.passed
    r3 = hf.parse_dcgm_diag(host.diag(3).stdout)
    assert {r.category for r in r3.results} == {"Deployment", "Hardware", "Integration", "Stress"} and r3.passed
    document = json.loads(host.diag(1).stdout)
    assert document["metadata"] == {"Driver Version Detected": NEW["driver"]["version"], "version": "4.2.3"}
    assert {e["device_id"] for e in document["entity_groups"][0]["entities"]} == {"20b2"}
    text = host.diag(1, json_output=False)
    assert text.returncode == 0 and text.stdout.startswith("Successfully ran diagnostic for group.\n")
    assert "| software                  | Pass" in text.stdout
    assert "| GPU Device IDs Detected   | 20b2, 20b2" in text.stdout

    started = time.monotonic()
    proc = host.all_reduce()
    assert time.monotonic() - started < 2 and proc.returncode == 0, proc.stderr
    perf = hf.parse_nccl_perf(proc.stdout)
    assert (perf.gpus, perf.devices, len(perf.rows)) == (8, ("NVIDIA A100-SXM4-80GB",) * 8, 31)
    assert 228 <= perf.peak_busbw_gbps <= 242 and perf.out_of_bounds == 0 and perf.wrong == 0
    by_size = {r.size_bytes: r.oop_busbw for r in perf.rows}
    assert by_size[8] < 0.01 and by_size[1 << 20] < by_size[32 << 20] < by_size[8 << 30]  # the real curve's shape
    assert 0.8 < by_size[32 << 20] / by_size[8 << 30] < 0.95
    assert proc.stdout.splitlines()[0] == "# nccl-tests version 2.19.6 nccl-headers=22803 nccl-library=22803"


def test_bus_bandwidth_by_gpu_model_and_jitter(host):
    host.setup(H100)
    h100 = [hf.parse_nccl_perf(host.all_reduce().stdout).peak_busbw_gbps for _ in range(3)]
    assert all(455 <= p <= 485 for p in h100) and len(set(h100)) > 1  # a little jitter, run to run
    host.host(G4DN, "r1-outpost-0")
    t4 = host.all_reduce(4)
    perf = hf.parse_nccl_perf(t4.stdout)
    assert 9 <= perf.peak_busbw_gbps <= 12 and set(perf.devices) == {"Tesla T4"} and perf.gpus == 4
    # 15 GiB per T4: nccl-tests caps the sweep at a third of what is left after its reserve
    assert "#\n# Reducing maxBytes to 4652881237 due to memory limitation\n" in t4.stdout
    assert perf.rows[-1].size_bytes == 4 << 30


def test_ecc_errors_fail_the_row_remap_check_and_stop_nvvs(host):
    host.setup()
    set_fault(host.hw, "ecc-errors")
    proc = host.diag(2)
    diag = hf.parse_dcgm_diag(proc.stdout)
    assert proc.returncode == 226  # DCGM_ST_NVVS_ERROR (-30)
    [failure] = diag.failures
    assert (failure.test, failure.gpu) == ("software", "0")
    assert failure.info.startswith("Page Retirement/Row Remap: GPU 0 had memory errors and row remappings are pending")
    assert {r.test for r in diag.results} == {"software"}  # NVVS stops after a pending row remap: no memory test
    warning = json.loads(proc.stdout)["DCGM Diagnostic"]["test_categories"][0]["tests"][0]["results"][0]["warnings"]
    assert warning == [{"error_category": 10, "error_id": 85, "error_severity": 6, "warning": failure.info}]

    host.host(G4DN, "r1-outpost-0")  # Turing: a pending page retirement fails the whole test
    t4 = hf.parse_dcgm_diag(host.diag(1).stdout)
    assert [r.gpu for r in t4.failures] == ["0", "1", "2", "3"]
    assert "Pending page retirements together with a DBE were detected on GPU 0" in t4.failures[0].info


def test_missing_gpu_and_degraded_nvlink_and_persistence(host):
    host.setup()
    set_fault(host.hw, "gpu-missing")
    assert len(hf.parse_dcgm_diag(host.diag(1).stdout).results) == 7
    proc = host.all_reduce(8)
    assert proc.returncode == 5
    assert proc.stderr == ("Invalid number of GPUs: 8 requested but only 7 were found.\n"
                           "Please check the number of processes and GPUs per process.\n")
    lines = proc.stdout.splitlines()  # the rank lines are printed after the check that failed: none here
    assert lines[-2] == "# Using devices"
    assert re.fullmatch(r" \.\. \S+ pid \d+: Test failure common\.cu:1454", lines[-1])
    with pytest.raises(hf.ParseError):
        hf.parse_nccl_perf(proc.stdout + proc.stderr)
    assert hf.parse_nccl_perf(host.all_reduce(7).stdout).gpus == 7
    set_fault(host.hw, "gpu-missing", present=False)

    set_fault(host.hw, "nvlink-degraded")
    assert 110 <= hf.parse_nccl_perf(host.all_reduce().stdout).peak_busbw_gbps <= 122
    assert hf.parse_dcgm_diag(host.diag(2).stdout).passed  # DCGM's default checks do not see it
    set_fault(host.hw, "nvlink-degraded", present=False)

    stop_persistence(host)  # no nvidia-persistenced: persistence mode off fails every GPU's software result
    proc = host.diag(1)
    diag = hf.parse_dcgm_diag(proc.stdout)
    assert proc.returncode == 226 and len(diag.failures) == 8 and "Persistence mode for GPU 7" in diag.failures[7].info


def test_bad_nccl_release_cuts_bus_bandwidth(host):
    host.setup(nccl="2.28.7-1+cuda13.0")
    proc = host.all_reduce()
    perf = hf.parse_nccl_perf(proc.stdout)
    assert 135 <= perf.peak_busbw_gbps <= 146 and perf.wrong == 0  # 0.6 x 235, results still right
    assert "nccl-library=22807" in proc.stdout.splitlines()[0]
    assert aptrepo.bad_nccl_versions() == ["2.28.7-1"]
    root = VENDOR.parents[1]
    planned = {(d.name, d.version) for d in aptrepo.plan_packages(aptrepo.load_releases(root / "releases"))}
    regression = load_bundle(root / "lab/bundles/2026-11.4-nccl-regression.yaml")
    assert set(regression.packages(nvswitch=True, ib=True).items()) <= planned  # every pin of the lab bundle is built
    assert regression.packages()["libnccl2"] == "2.28.7-1+cuda13.0"


def test_nvml_mismatch_refuses_like_the_real_tools(host):
    host.setup(persistence=False)
    host.install(package(OLD, "cuda-drivers-"))  # userspace changed under the loaded module: NVML mismatch
    proc = host.diag(1)
    assert proc.returncode == 200  # DCGM_ST_NVML_NOT_LOADED (-56)
    assert json.loads(proc.stdout) == {"DCGM Diagnostic": {
        "runtime_error": "Error: Unable to complete diagnostic for entities *,cpu:*. Return: (-56) \n",
        "version": "4.2.3"}}
    with pytest.raises(hf.ParseError, match="could not run"):
        hf.parse_dcgm_diag(proc.stdout)
    text = host.diag(1, json_output=False)
    assert (text.returncode, text.stdout) == (200, "Error: Unable to complete diagnostic for entities *,cpu:*. "
                                                   "Return: (-56) \n\n")
    perf = host.all_reduce()
    assert perf.returncode == 2 and perf.stdout.splitlines()[-2].endswith(
        ": Test CUDA failure util.cu:674 'system has unsupported display driver / cuda driver combination'")
    with pytest.raises(hf.ParseError, match="Test CUDA failure"):
        hf.parse_nccl_perf(perf.stdout)


def test_host_engine_and_missing_packages(host):
    host.setup()
    # no nv-hostengine running: dcgmi diag starts an embedded host engine, as the real one does
    assert host.diag(1).returncode == 0
    start = host.start_daemon("dcgm/nv_hostengine.py", "nv-hostengine.pid")
    assert (start.returncode, start.stdout) == (0, "Started host engine version 4.2.3 using port number: 5555 \n")
    again = host.tool("dcgm/nv_hostengine.py")
    assert again.returncode == 1 and again.stdout.startswith("Host engine already running with pid ")
    term = host.tool("dcgm/nv_hostengine.py", "--term")
    assert (term.returncode, term.stdout) == (0, "Host engine successfully terminated.\n")
    assert host.tool("dcgm/nv_hostengine.py", "--term").returncode == 1
    # the packaged unit's form: -n stays in the foreground until SIGTERM
    unit = subprocess.Popen([sys.executable, str(VENDOR / "dcgm/nv_hostengine.py"), "-n", "--service-account",
                             "nvidia-dcgm"], env=host.env, stdout=subprocess.PIPE, text=True)
    assert unit.stdout.readline() == "Started host engine version 4.2.3 using port number: 5555 \n"
    assert int((host.run_dir / "nv-hostengine.pid").read_text()) == unit.pid
    unit.send_signal(signal.SIGTERM)
    assert unit.wait(timeout=10) == 0 and not (host.run_dir / "nv-hostengine.pid").exists()
    unit.stdout.close()

    (host.lib / "dcgm-cuda12" / "package.json").unlink()  # without the CUDA plugins: the software test alone
    assert {r.test for r in hf.parse_dcgm_diag(host.diag(2).stdout).results} == {"software"}
    (host.lib / "libnccl2" / "package.json").unlink()
    proc = host.all_reduce()
    assert proc.returncode == 127 and proc.stderr.endswith(
        ": error while loading shared libraries: libnccl.so.2: cannot open shared object file: No such file or "
        "directory\n")


def test_packages_layout():
    core, cuda, tests = (deb(n) for n in ("datacenter-gpu-manager-4-core", "datacenter-gpu-manager-4-cuda12",
                                          "nccl-tests"))
    assert (core.version, core.filename) == ("1:4.2.3-1", "datacenter-gpu-manager-4-core_4.2.3-1_amd64.deb")
    assert cuda.depends == ["datacenter-gpu-manager-4-core (= 1:4.2.3-1)"]
    assert set(core.links) == {"/usr/bin/dcgmi", "/usr/bin/nv-hostengine"}
    unit = core.files["/usr/lib/systemd/system/nvidia-dcgm.service"][0].decode()
    assert "ExecStart=/usr/bin/nv-hostengine -n --service-account nvidia-dcgm" in unit
    assert "useradd -Urs /usr/sbin/nologin ${service_user}" in core.scripts["postinst"]
    assert set(tests.links) == {"/opt/nccl-tests/build/all_reduce_perf"} and tests.version == "2.19.6-1"
    assert deb("libnccl2", f"{NEW['nccl']}+cuda13.0").info == {"busbw_factor": 1.0}
    # NVIDIA's host package of dcgm-exporter: its binary, counters file and (not enabled) unit, paired with DCGM
    exporter = deb("datacenter-gpu-manager-exporter")
    assert exporter.version == "4.1.3-1" and exporter.depends == ["datacenter-gpu-manager-4-core (= 1:4.2.3-1)"]
    assert set(exporter.links) == {"/usr/bin/dcgm-exporter"}
    unit = exporter.files["/lib/systemd/system/nvidia-dcgm-exporter.service"][0].decode()
    assert "ExecStart=/usr/bin/dcgm-exporter -f /etc/dcgm-exporter/default-counters.csv" in unit
    assert "DCGM_FI_DEV_FB_USED" in exporter.files["/etc/dcgm-exporter/default-counters.csv"][0].decode()


# ---- fidelity: nothing the real tools do not print ----------------------------------------------------------

def key_paths(value: object, path: tuple = ()) -> set[tuple]:
    """Every key path of a JSON document, list positions collapsed ("[]")."""
    if isinstance(value, dict):
        return {(*path, k) for k in value} | {p for k, v in value.items() for p in key_paths(v, (*path, k))}
    if isinstance(value, list):
        return {p for v in value for p in key_paths(v, (*path, "[]"))}
    return set()


def schema_paths(schema: dict, path: tuple = ()) -> set[tuple]:
    """The key paths a JSON schema allows (properties, array items)."""
    out = set()
    for key, sub in (schema.get("properties") or {}).items():
        out |= {(*path, key)} | schema_paths(sub, (*path, key))
    if "items" in schema:
        out |= schema_paths(schema["items"], (*path, "[]"))
    return out


def stop_persistence(host: Host) -> None:
    host.stop_daemons()
    deadline = time.monotonic() + 5
    while (host.run_dir / "nvidia-persistenced.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def simulated_documents(host: Host) -> list[str]:
    host.setup()
    outputs = [host.diag(level).stdout for level in (1, 2, 3)]
    set_fault(host.hw, "ecc-errors")
    outputs.append(host.diag(2).stdout)
    set_fault(host.hw, "ecc-errors", present=False)
    stop_persistence(host)
    outputs.append(host.diag(1).stdout)
    host.install(package(OLD, "cuda-drivers-"))
    outputs.append(host.diag(1).stdout)
    return outputs


def test_dcgm_simulation_prints_only_real_keys_values_and_layout(host):
    captured = sample("dcgmi-diag-r1-gb10-4.2.3-fail.json")
    real = key_paths(json.loads(captured))
    # ... or NVIDIA's schema allows, or dcgmi's failure message writes (Diag::HelperDisplayFailureMessage puts the
    # version beside runtime_error; the schema does not list it)
    allowed = real | schema_paths(json.loads(sample("dcgm_diag_schema-4.2.3.json"))) | {("DCGM Diagnostic", "version")}
    # the simulation's jsoncpp writer lays the captured document out line for line (its trailing spaces aside)
    rewritten = subprocess.run([sys.executable, "-B", "-c", "import dcgmi, json, sys; "
                                "sys.stdout.write(dcgmi.styled(json.load(sys.stdin)))"], input=captured, text=True,
                               capture_output=True, check=True,
                               env={**os.environ, "PYTHONPATH": f"{VENDOR / 'dcgm'}{os.pathsep}{VENDOR / 'common'}"})
    assert [line.rstrip() for line in rewritten.stdout.splitlines()] == captured.splitlines()
    for output in simulated_documents(host):
        document = json.loads(output)
        assert key_paths(document) <= allowed, key_paths(document) - allowed
        if "runtime_error" not in document["DCGM Diagnostic"]:
            assert key_paths(document) <= real, key_paths(document) - real  # only what the capture has
            results = [r for c in document["DCGM Diagnostic"]["test_categories"] for t in c["tests"]
                       for r in [*t["results"], t["test_summary"]]]
            assert {r["status"] for r in results} <= {"Pass", "Fail", "Skip"}  # 4.x JSON never says Warn
            assert all(re.fullmatch(r'\t*([{}\[\]],?|"[^"]+" : ([\d"].*|)|".*",?)', line)
                       for line in output.splitlines()), output  # jsoncpp's line forms


LINE_KINDS = [
    ("version", r"# nccl-tests version \d+\.\d+\.\d+ nccl-headers=\d+ nccl-library=\d+"),
    ("starting", r"# Collective test starting: all_reduce_perf"),
    ("run", r"# nThread \d+ nGpus \d+ minBytes \d+ maxBytes \d+ step: \d+\((factor|bytes)\) warmup iters: \d+ "
            r"iters: \d+ agg iters: \d+ validation: \d+ graph: \d+( unalign: \d+)?"),
    ("hash", r"#"),
    ("using", r"# Using devices"),
    ("rank", r"#  Rank [ \d]{2} Group [ \d]{2} Pid [ \d]{6,} on [ \S]{10,} device [ \d]{2} \[[0-9a-f:x]+\] .+"),
    ("nccl", r"NCCL version \d+\.\d+\.\d+\+cuda\d+\.\d+"),
    ("table", r"# +(out-of-place|size|\(B\)) .*"),
    ("row", r" *\d+ +\d+ +float +sum +-1( +[\d.e+]+ +[\d.e+]+ +[\d.e+]+ +(\d+|N/A)){2}"),
    ("oob", r"# Out of bounds values : \d+ (OK|FAILED)"),
    ("avg", r"# Avg bus bandwidth    : [\d.e+-]+ "),
    ("concluded", r"# Collective test concluded: all_reduce_perf"),
    ("blank", r""),
    ("failure", r"\S+: Test CUDA failure \S+:\d+ '.+'"),
    ("test-failure", r" \.\. \S+ pid \d+: Test failure \S+:\d+"),
]


def kinds(text: str) -> list[str]:
    out = []
    for line in text.split("\n")[:-1]:
        kind = next((k for k, pattern in LINE_KINDS if re.fullmatch(pattern, line)), None)
        assert kind, f"a line of no known kind: {line!r}"
        out.append(kind)
    return out


def token_ends(line: str) -> list[int]:
    return [m.end() for m in re.finditer(r"\S+", line)]


def test_nccl_simulation_prints_only_real_line_kinds_and_layout(host):
    real = {name: sample(name) for name in ("all_reduce_perf-2.18.3-16gpu.txt",
                                            "all_reduce_perf-2.17.8-2xGH200-wrong.txt",
                                            "all_reduce_perf-2.17.8-8xGH200-cuda-failure.txt")}
    real_kinds = {k for text in real.values() for k in kinds(text)}
    reference = real["all_reduce_perf-2.18.3-16gpu.txt"].split("\n")
    reference_rows = [line for line, kind in zip(reference, kinds("\n".join(reference)), strict=False) if kind == "row"]
    host.setup()
    outputs = [host.all_reduce().stdout, host.all_reduce(4, "-b", "1K", "-e", "1G", "-f", "2").stdout]
    host.env = {**host.env, "NCCL_DEBUG": "WARN"}
    outputs.append(host.all_reduce(8, "-b", "1M", "-e", "64M", "-f", "4").stdout)
    host.install(package(OLD, "cuda-drivers-"))
    outputs.append(host.all_reduce().stdout)
    for output in outputs:
        found = kinds(output)
        assert set(found) <= real_kinds, set(found) - real_kinds
        lines = output.split("\n")
        for line, kind in zip(lines, found, strict=False):
            if kind in ("table", "hash", "using", "starting", "oob", "concluded"):
                assert line in reference or kind == "oob", line  # the real text, trailing spaces included
            if kind == "row":
                assert token_ends(line) == token_ends(reference_rows[0]), line  # the real columns
        if "row" in found:  # the header, table and footer in the real order
            order = [k for i, k in enumerate(found) if i == 0 or found[i - 1] != k]
            assert order[:5] == ["version", "starting", "run", "hash", "using"]
            assert order[-6:] == ["oob", "avg", "hash", "concluded", "hash", "blank"]


def test_sims_leave_no_bytecode():
    assert not list((VENDOR / "dcgm").rglob("__pycache__")) and not list((VENDOR / "nccl").rglob("__pycache__"))
    assert os.access(VENDOR / "dcgm/dcgmi.py", os.R_OK)
