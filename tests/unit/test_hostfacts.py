"""patching.hosts.facts against the real tools' output (FORMATS.md samples and known quirks)."""

from __future__ import annotations

import math

import pytest

from patching.hosts import facts as hf

# ---- nvidia-smi ----------------------------------------------------------------------------------

CSV_HEADER = """index, name, driver_version, memory.total [MiB]
0, NVIDIA A100-SXM4-40GB, 550.127.08, 40960 MiB
1, NVIDIA A100-SXM4-40GB, 550.127.08, 40960 MiB
"""


def test_csv_with_header_strips_units():
    table = hf.parse_smi_csv(CSV_HEADER)
    assert table.fields == ("index", "name", "driver_version", "memory.total")
    assert table.rows[0] == {"index": "0", "name": "NVIDIA A100-SXM4-40GB", "driver_version": "550.127.08",
                             "memory.total": "40960"}
    gpus = hf.gpus_from_csv(table)
    assert [(g.index, g.memory_total_mib, g.driver_version) for g in gpus] == [(0, 40960, "550.127.08"),
                                                                              (1, 40960, "550.127.08")]


def test_csv_noheader_nounits_needs_the_fields():
    # imbue-ai/cluster-health's ECC query.
    fields = ["index", "ecc.errors.uncorrected.volatile.total", "ecc.mode.current", "ecc.mode.pending"]
    gpu = hf.gpus_from_csv(hf.parse_smi_csv("0, 0, Enabled, Enabled\n", fields))[0]
    assert (gpu.index, gpu.ecc_uncorrected_volatile, gpu.ecc_mode_current, gpu.ecc_mode_pending) == (0, 0, True, True)
    with pytest.raises(hf.ParseError, match="pass the queried fields"):
        hf.parse_smi_csv("")


def test_csv_quirks_na_values_and_unexpected_header():
    text = "persistence_mode, ecc.errors.uncorrected.volatile.total, memory.used [MiB]\n" \
           "Disabled, [N/A], 4 MiB\nEnabled, [Not Supported], 0 MiB\n"
    table = hf.parse_smi_csv(text, ["persistence_mode", "ecc.errors.uncorrected.volatile.total", "memory.used"])
    gpus = hf.gpus_from_csv(table)
    assert [(g.persistence_mode, g.ecc_uncorrected_volatile, g.memory_used_mib) for g in gpus] == \
        [(False, None, 4), (True, None, 0)]
    with pytest.raises(hf.ParseError, match="expected 2 values"):
        hf.parse_smi_csv("0, a, b\n", ["index", "name"])
    with pytest.raises(hf.ParseError, match="not a valid field"):
        hf.parse_smi_csv('Field "bogus" is not a valid field to query.\n\n')


MISMATCH = "Failed to initialize NVML: Driver/library version mismatch\nNVML library version: 580.95\n"
NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the "
             "latest NVIDIA driver is installed and running.\n")


def test_nvml_failures_are_detected():
    assert hf.nvml_failure(MISMATCH) == hf.NvmlFailure(
        "mismatch", "Failed to initialize NVML: Driver/library version mismatch", "580.95")
    # Older drivers print the first line only.
    assert hf.nvml_failure("Failed to initialize NVML: Driver/library version mismatch\n").library_version is None
    assert hf.nvml_failure(NO_DRIVER).kind == "no-driver"
    assert hf.nvml_failure(CSV_HEADER) is None
    for parse in (hf.parse_smi_csv, hf.parse_smi_query, hf.parse_topo_matrix):
        with pytest.raises(hf.ParseError, match="version mismatch"):
            parse(MISMATCH)


SMI_Q = """
==============NVSMI LOG==============

Timestamp                                 : Mon Oct 13 10:00:00 2026
Driver Version                            : 550.127.08
CUDA Version                              : 12.4

Attached GPUs                             : 2
GPU 00000000:07:00.0
    Product Name                          : NVIDIA A100-SXM4-80GB
    Persistence Mode                      : Enabled
    GPU UUID                              : GPU-11111111-2222-3333-4444-555555555555
    FB Memory Usage
        Total                             : 81920 MiB
        Reserved                          : 573 MiB
        Used                              : 4 MiB
        Free                              : 81342 MiB
    ECC Mode
        Current                           : Enabled
        Pending                           : Enabled
    ECC Errors
        Volatile
            SRAM Correctable              : 0
            SRAM Uncorrectable Parity     : 0
            SRAM Uncorrectable SEC-DED    : 0
            DRAM Correctable              : 3
            DRAM Uncorrectable            : 2
        Aggregate
            DRAM Uncorrectable            : 7

GPU 00000000:0F:00.0
    Product Name : NVIDIA A100-SXM4-80GB
    Persistence Mode : Disabled
    ECC Mode
        Current : Disabled
        Pending : Enabled
"""


def test_smi_query_header_and_gpu_sections():
    q = hf.parse_smi_query(SMI_Q)
    assert (q.driver_version, q.cuda_version, q.attached_gpus) == ("550.127.08", "12.4", 2)
    first, second = q.gpus
    assert first.bus_id == "00000000:07:00.0" and first.product_name == "NVIDIA A100-SXM4-80GB"
    assert first.persistence_mode is True and first.uuid.startswith("GPU-1111")
    assert (first.memory_total_mib, first.memory_used_mib) == (81920, 4)
    assert first.ecc_uncorrected_volatile == 2  # volatile only: correctable and aggregate counts excluded
    assert first.values["ECC Errors/Aggregate/DRAM Uncorrectable"] == "7"
    # FORMATS.md's short form "Persistence Mode : Enabled" (no column padding) reads the same.
    assert (second.persistence_mode, second.ecc_mode_current, second.ecc_mode_pending) == (False, False, True)
    assert second.ecc_uncorrected_volatile is None


def test_smi_query_old_ecc_layout():
    text = ("Driver Version : 470.57.02\nGPU 00000000:00:1E.0\n    ECC Errors\n        Volatile\n"
            "            Single Bit\n                Total : 0\n            Double Bit\n"
            "                Device Memory : 1\n                Total : 1\n")
    assert hf.parse_smi_query(text).gpus[0].ecc_uncorrected_volatile == 1


TOPO = """\tGPU0\tGPU1\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tNV12\tPXB\t0-63\t0\t\tN/A
GPU1\tNV12\t X \tSYS\t0-63\t0\t\tN/A
NIC0\tPXB\tSYS\t X \t\t\t\t

Legend:

  X    = Self
  NV#  = Connection traversing a bonded set of # NVLinks

NIC Legend:

  NIC0: mlx5_0
"""


def test_topo_matrix():
    links = hf.parse_topo_matrix(TOPO)
    assert links[("GPU0", "GPU1")] == links[("GPU1", "GPU0")] == "NV12"
    assert links[("GPU0", "GPU0")] == "X" and links[("GPU1", "NIC0")] == "SYS"
    assert not any(k[0].startswith("Legend") for k in links)


# ---- ibstat ----------------------------------------------------------------------------------------

IBSTAT = """CA 'mlx5_0'
\tCA type: MT4123
\tNumber of ports: 1
\tFirmware version: 20.31.1014
\tPort 1:
\t\tState: Active
\t\tPhysical state: LinkUp
\t\tRate: 200
\t\tBase lid: 12
\t\tSM lid: 1
\t\tPort GUID: 0x0c42a10300a1b2c4
\t\tLink layer: InfiniBand
"""

# Space-indented, two CAs, a dual-port card with a down port and a RoCE port, blank line between.
IBSTAT_MIXED = """CA 'mlx4_0'
        CA type: MT4099
        Number of ports: 2
        Node GUID: 0xf45214030091ba10
        Port 1:
                State: Active
                Physical state: LinkUp
                Rate: 40
                Link layer: InfiniBand
        Port 2:
                State: Down
                Physical state: Disabled
                Rate: 10
                Base lid: 0
                Link layer: Ethernet

CA 'mlx5_1'
        CA type: MT4129
        Port 1:
                State: Active
                Physical state: LinkUp
                Rate: 400
                Link layer: Ethernet
"""


def test_ibstat_formats_sample():
    (ca,) = hf.parse_ibstat(IBSTAT)
    assert (ca.name, ca.ca_type, ca.firmware) == ("mlx5_0", "MT4123", "20.31.1014")
    (port,) = ca.ports
    assert port == hf.IbPort(1, "Active", "LinkUp", 200, 12, 1, "0x0c42a10300a1b2c4", "InfiniBand")
    assert port.up and port.infiniband


def test_ibstat_down_ports_roce_and_spaces():
    cas = hf.parse_ibstat(IBSTAT_MIXED)
    assert [c.name for c in cas] == ["mlx4_0", "mlx5_1"]
    up, down = cas[0].ports
    assert up.up and not down.up and (down.state, down.physical_state, down.rate) == ("Down", "Disabled", 10)
    assert cas[0].node_guid == "0xf45214030091ba10"
    assert cas[1].ports[0].up and not cas[1].ports[0].infiniband  # RoCE, not IB
    assert hf.parse_ibstat("") == []
    with pytest.raises(hf.ParseError):
        hf.parse_ibstat("ibwarn: [1234] umad_init: can't read ABI version\n")


# ---- nvcc -------------------------------------------------------------------------------------------

def test_nvcc_version():
    text = ("nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) 2005-2025 NVIDIA Corporation\n"
            "Built on Wed_Aug_20_01:58:59_PM_PDT_2025\nCuda compilation tools, release 13.0, V13.0.88\n"
            "Build cuda_13.0.r13.0/compiler.36424714_0\n")
    assert hf.parse_nvcc_version(text) == hf.NvccVersion("13.0", "13.0.88")
    with pytest.raises(hf.ParseError):
        hf.parse_nvcc_version("bash: nvcc: command not found\n")


# ---- fi_info ----------------------------------------------------------------------------------------

# AWS's p4d example (libfabric 1.11): unindented keys, efa_N names.
FI_INFO_AWS = "".join(
    f"provider: efa\nfabric: EFA-fe80::c6e:8fff:fef6:e7f{i}\ndomain: efa_{i}-rdm\nversion: 111.0\n"
    "type: FI_EP_RDM\nprotocol: FI_PROTO_EFA\n" for i in range(4))
# libfabric 2.x lists each device under fabric efa-direct and efa; rdmapXsY names; indented keys.
FI_INFO_2X = "".join(
    f"provider: efa\n    fabric: {fabric}\n    domain: rdmap{bus}s27-rdm\n    version: 201.0\n"
    "    type: FI_EP_RDM\n    protocol: FI_PROTO_EFA\n" for bus in (16, 32) for fabric in ("efa-direct", "efa"))


def test_fi_info_counts_devices_not_names():
    entries = hf.parse_fi_info(FI_INFO_AWS)
    assert len(entries) == 4 and hf.efa_device_count(entries) == 4
    assert entries[0] == hf.FiInfoEntry("efa", "EFA-fe80::c6e:8fff:fef6:e7f0", "efa_0-rdm", "111.0", "FI_EP_RDM",
                                        "FI_PROTO_EFA")
    two = hf.parse_fi_info(FI_INFO_2X)
    assert len(two) == 4 and hf.efa_device_count(two) == 2


def test_fi_info_quirks():
    rxd = ("provider: efa;ofi_rxd\n    fabric: efa\n    domain: efa_0-dgrm\n    version: 1.0\n"
           "    type: FI_EP_RDM\n    protocol: FI_PROTO_RXD\n")
    assert hf.efa_device_count(hf.parse_fi_info(rxd)) == 0
    mpirun = "".join(f"[1,{i}]<stdout>:provider: efa\n[1,{i}]<stdout>:    domain: rdmap197s0-rdm\n"
                     f"[1,{i}]<stdout>:    type: FI_EP_RDM\n" for i in range(2))
    assert hf.efa_device_count(hf.parse_fi_info(mpirun)) == 1
    assert hf.parse_fi_info("fi_getinfo: -61 (No data available)\n") == []


# ---- upsc ---------------------------------------------------------------------------------------------

def test_upsc_on_line():
    ups = hf.parse_upsc("Init SSL without certificate database\nbattery.charge: 90\nbattery.runtime: 3690\n"
                        "ups.load: 10\nups.status: OL CHRG\ndevice.mfr: Eaton\n")
    assert ups.status == ("OL", "CHRG") and ups.on_line and not ups.on_battery
    assert (ups.number("battery.charge"), ups.number("battery.runtime"), ups.number("ups.load")) == (90, 3690, 10)
    assert ups.number("battery.voltage") is None and ups.error is None
    assert ups.variables["device.mfr"] == "Eaton"


def test_upsc_on_battery_wait_and_errors():
    ups = hf.parse_upsc("battery.charge: 18\nups.status: OB DISCHRG LB\n")
    assert ups.on_battery and not ups.on_line
    assert hf.parse_upsc("ups.status: WAIT\n").status == ("WAIT",)
    assert hf.parse_upsc("Error: Data stale\n") == hf.UpsStatus({}, "Data stale")
    assert hf.parse_upsc("Error: Driver not connected\n").error == "Driver not connected"


# ---- Prometheus ----------------------------------------------------------------------------------------

PROM = r"""# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="deepseek-ai/DeepSeek-V3"} 90.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="deepseek-ai/DeepSeek-V3"} 10.0
vllm:e2e_request_latency_seconds_bucket{le="0.1",model_name="m"} 50
vllm:e2e_request_latency_seconds_bucket{le="0.2",model_name="m"} 90
vllm:e2e_request_latency_seconds_bucket{le="0.3",model_name="m"} 100
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 100
vllm:e2e_request_latency_seconds_count{model_name="m"} 100
DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-1",modelName="NVIDIA A100-SXM4-80GB",Hostname="dgx-a1"} 73728 1700000000000
odd_labels{path="C:\\dir",quote="say \"hi\"",nl="a\nb",comma="a,b",} NaN
no_labels 1e3
"""


def test_prometheus_samples_and_lookups():
    metrics = hf.parse_prometheus(PROM)
    assert metrics.value("vllm:request_success_total") == 100
    assert metrics.value("vllm:request_success_total", finished_reason="stop") == 90
    assert metrics.value("missing") is None
    (fb,) = metrics.find("DCGM_FI_DEV_FB_USED", gpu="0")
    assert fb.value == 73728 and fb.timestamp_ms == 1700000000000 and fb.labels["modelName"].endswith("80GB")
    (odd,) = metrics.find("odd_labels")
    assert odd.labels == {"path": "C:\\dir", "quote": 'say "hi"', "nl": "a\nb", "comma": "a,b"}
    assert math.isnan(odd.value)
    assert metrics.value("no_labels") == 1000
    assert metrics.find("vllm:e2e_request_latency_seconds_bucket", le="+Inf")[0].value == 100


def test_prometheus_histogram_quantile_and_errors():
    metrics = hf.parse_prometheus(PROM)
    assert metrics.histogram_quantile("vllm:e2e_request_latency_seconds", 0.5) == pytest.approx(0.1)
    assert metrics.histogram_quantile("vllm:e2e_request_latency_seconds", 0.99) == pytest.approx(0.29)
    assert metrics.histogram_quantile("nope", 0.5) is None
    with pytest.raises(hf.ParseError, match="line 1"):
        hf.parse_prometheus("this is not a sample\n")
    with pytest.raises(hf.ParseError, match="bad labels"):
        hf.parse_prometheus('x{a=unquoted} 1\n')
