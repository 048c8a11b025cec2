#!/bin/bash
# The GPU host checks (tests/hosts/test_gpu.py) on a real GPU machine, with testinfra's local backend.
#
#   tests/hosts/device/run.sh OUT_DIR [HOST_VARS] [BUNDLE]
#
# Keeps, under OUT_DIR: the raw output of the NVIDIA tools (raw/), what our parsers make of it
# (parsed.json), and the checks' results (pytest.txt, junit.xml). Needs Python 3.10+; when pytest,
# testinfra, pydantic or PyYAML are missing it unpacks the wheels in .device/wheels (fetched where
# PyPI is reachable with `make device-wheels`), so it runs on a machine without network access.
set -u
out=${1:?usage: run.sh OUT_DIR [HOST_VARS] [BUNDLE]}
vars=${2:-tests/hosts/device/h200.yml}
bundle=${3:-releases/2026-11.yaml}
mkdir -p "$out/raw"

raw() {  # raw NAME COMMAND...: stdout+stderr and the exit status, whatever happens
  local name=$1; shift
  { "$@"; echo "[exit $?]"; } > "$out/raw/$name.txt" 2>&1
}
raw nvidia-smi nvidia-smi
raw nvidia-smi-q nvidia-smi -q
raw nvidia-smi-query nvidia-smi \
  --query-gpu=index,name,driver_version,memory.total,persistence_mode,ecc.mode.current,ecc.errors.uncorrected.volatile.total \
  --format=csv,noheader,nounits
raw nvidia-smi-topo nvidia-smi topo -m
raw proc-driver-version cat /proc/driver/nvidia/version
raw nvcc bash -c 'for n in /usr/local/cuda*/bin/nvcc; do echo "== $n"; "$n" --version; done'
raw ibstat ibstat
raw fi_info fi_info -p efa
raw os-release cat /etc/os-release
raw python python3 --version

py=${PYTHON:-python3}
deps=/tmp/fleet-device-deps
if ! $py -c 'import pytest, testinfra, pydantic, yaml' 2>/dev/null; then
  tag=$($py -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
  mkdir -p "$deps"
  for whl in .device/wheels/*-py3-none-any.whl .device/wheels/*-"$tag"-*.whl; do
    [ -e "$whl" ] && $py -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$whl" "$deps"
  done
  export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

$py - "$out" <<'PY' > "$out/parsed.json" 2> "$out/parsed.err"
import dataclasses, json, pathlib, sys
from patching.hosts import facts as hostfacts
raw = pathlib.Path(sys.argv[1]) / "raw"
def text(name):
    return (raw / f"{name}.txt").read_text().rsplit("[exit", 1)[0]
fields = ("index", "name", "driver_version", "memory.total", "persistence_mode", "ecc.mode.current",
          "ecc.errors.uncorrected.volatile.total")
def attempt(parse):
    try:
        return parse()
    except Exception as exc:  # keep going: the raw output is kept beside it
        return {"error": f"{type(exc).__name__}: {exc}"}
result = {
    "smi_query": attempt(lambda: dataclasses.asdict(hostfacts.parse_smi_query(text("nvidia-smi-q")))),
    "gpus": attempt(lambda: [dataclasses.asdict(g) for g in hostfacts.gpus_from_csv(
        hostfacts.parse_smi_csv(text("nvidia-smi-query"), fields))]),
    "nvml_failure": attempt(lambda: str(hostfacts.nvml_failure(text("nvidia-smi")) or "")),
}
print(json.dumps(result, indent=2, default=str))
PY

$py -m pytest -p no:cacheprovider -rA tests/hosts/test_gpu.py --hosts local:// --host-vars "$vars" \
  --bundle "$bundle" --junitxml "$out/junit.xml" > "$out/pytest.txt" 2>&1
echo "pytest exit $?" >> "$out/pytest.txt"
tail -25 "$out/pytest.txt"
