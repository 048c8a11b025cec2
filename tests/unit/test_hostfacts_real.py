"""patching.hosts.facts against output captured from a real machine: one NVIDIA H200 (driver 580.159.04,
CUDA 13.0, Ubuntu 24.04), by tests/hosts/device/run.sh. The samples are in tests/unit/real/h200/."""

from __future__ import annotations

from pathlib import Path

from infra.model.fleet import GPU_MEMORY_MIB
from patching.hosts import facts as hf
from patching.release.pins import SMI_PRODUCT_NAMES

REAL = Path(__file__).parent / "real" / "h200"
FIELDS = ("index", "name", "driver_version", "memory.total", "persistence_mode", "ecc.mode.current",
          "ecc.errors.uncorrected.volatile.total")


def sample(name: str) -> str:
    return (REAL / name).read_text()


def test_query_csv_from_an_h200():
    [gpu] = hf.gpus_from_csv(hf.parse_smi_csv(sample("nvidia-smi-query.csv"), FIELDS))
    assert (gpu.index, gpu.name, gpu.driver_version) == (0, "NVIDIA H200", "580.159.04")
    assert gpu.memory_total_mib == 143771 and gpu.persistence_mode and gpu.ecc_mode_current
    assert gpu.ecc_uncorrected_volatile == 0


def test_smi_query_from_an_h200():
    query = hf.parse_smi_query(sample("nvidia-smi-q.txt"))
    assert (query.driver_version, query.cuda_version, query.attached_gpus) == ("580.159.04", "13.0", 1)
    [gpu] = query.gpus
    assert gpu.product_name == "NVIDIA H200" and gpu.memory_total_mib == 143771
    assert gpu.ecc_mode_current and gpu.ecc_uncorrected_volatile == 0
    assert gpu.values["Product Architecture"] == "Hopper"


def test_the_h200_facts_the_fleet_model_encodes():
    """The model name nvidia-smi prints and the memory it reports, as the fleet model and the pins encode them."""
    [gpu] = hf.parse_smi_query(sample("nvidia-smi-q.txt")).gpus
    assert SMI_PRODUCT_NAMES["H200-SXM5-141GB"] == gpu.product_name
    assert GPU_MEMORY_MIB["H200-SXM5-141GB"] == gpu.memory_total_mib


def test_topo_matrix_header_has_ansi_underline():
    text = sample("nvidia-smi-topo.txt")
    assert "\x1b[4m" in text  # the real tool writes it even into a file
    assert hf.parse_topo_matrix(text) == {("GPU0", "GPU0"): "X"}


def test_nvidia_smi_table_is_not_an_nvml_failure():
    assert hf.nvml_failure(sample("nvidia-smi.txt")) is None


def test_nvcc_from_cuda_13_0():
    version = hf.parse_nvcc_version(sample("nvcc-version.txt"))
    assert (version.release, version.version) == ("13.0", "13.0.88")
