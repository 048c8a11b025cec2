"""The driver NVML reports, CUDA, and the GPUs the inventory says the host has."""

from __future__ import annotations

from patching.hosts import facts as hostfacts
from patching.release.compat import version_key
from patching.release.pins import SMI_PRODUCT_NAMES
from tests.hosts.checks import expect, gpus_or_fail, nvcc_command


def test_nvml_driver_version(name, facts, bundle):
    want = bundle.driver.version
    found = sorted({g.driver_version for g in gpus_or_fail(facts, name, "NVML driver version", want)})
    expect(found == [want], name, "NVML driver version", want, ", ".join(v or "N/A" for v in found) or "no GPU")


def test_cuda_supported_by_driver(name, facts, bundle):
    want = f">= {bundle.cuda_minor}"
    query = facts.smi_query
    if isinstance(query, hostfacts.NvmlFailure):
        expect(False, name, "CUDA version the driver supports", want, f"no answer from NVML ({query.message})")
    if isinstance(query, str):
        expect(False, name, "CUDA version the driver supports", want, query)
    found = query.cuda_version or "N/A"
    expect(found != "N/A" and version_key(found) >= version_key(bundle.cuda_minor), name,
           "CUDA version the driver supports", want, found)


def test_nvcc_release(name, facts, bundle):
    nvcc = f"/usr/local/cuda-{bundle.cuda_minor}/bin/nvcc"
    result = facts.run(nvcc_command(bundle.cuda_minor))
    if result.rc != 0:
        expect(False, name, f"{nvcc} release", bundle.cuda_minor, f"exit {result.rc}: {result.stderr.strip()}")
    found = hostfacts.parse_nvcc_version(result.stdout).release
    expect(found == bundle.cuda_minor, name, f"{nvcc} release", bundle.cuda_minor, found)


def test_gpu_count(name, facts, hostvars):
    want = hostvars["fleet_gpu_count"]
    found = len(gpus_or_fail(facts, name, "GPU count", want))
    expect(found == want, name, "GPU count", want, found)


def test_gpu_model(name, facts, hostvars):
    want = SMI_PRODUCT_NAMES.get(hostvars["fleet_gpu_model"], hostvars["fleet_gpu_model"])
    found = sorted({g.name or "N/A" for g in gpus_or_fail(facts, name, "GPU model", want)})
    expect(found == [want], name, "GPU model", want, ", ".join(found) or "no GPU")


def test_gpu_memory(name, facts, hostvars):
    want = hostvars["fleet_gpu_memory_mib"]
    found = sorted({g.memory_total_mib for g in gpus_or_fail(facts, name, "GPU memory (MiB)", want)}, key=str)
    expect(found == [want], name, "GPU memory (MiB)", want, ", ".join(map(str, found)) or "no GPU")


def test_persistence_mode(name, facts):
    gpus = gpus_or_fail(facts, name, "persistence mode", "Enabled on every GPU")
    off = [str(g.index) for g in gpus if not g.persistence_mode]
    expect(not off, name, "persistence mode", "Enabled on every GPU", f"Disabled on GPU {', '.join(off)}")


def test_ecc_enabled(name, facts):
    gpus = gpus_or_fail(facts, name, "ECC mode", "Enabled on every GPU")
    off = [str(g.index) for g in gpus if not g.ecc_mode_current]
    expect(not off, name, "ECC mode", "Enabled on every GPU", f"Disabled on GPU {', '.join(off)}")


def test_ecc_uncorrected_errors(name, facts):
    gpus = gpus_or_fail(facts, name, "uncorrected volatile ECC errors", 0)
    bad = [f"GPU {g.index}: {g.ecc_uncorrected_volatile}" for g in gpus if g.ecc_uncorrected_volatile]
    expect(not bad, name, "uncorrected volatile ECC errors", "0 on every GPU", "; ".join(bad))
