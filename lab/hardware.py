"""Per-host simulated hardware: the files the lab's vendor binaries read inside each host.

The lab writes one folder per host and bind-mounts it at /var/lib/fleet-lab/hw in the host's
container (the binaries honour FLEET_SIM_HW_DIR instead, for tests). It holds `hardware.json`:

    {"hostname": "dgx-a1",
     "gpu": {"model": "A100-SXM4-80GB", "count": 8, "memory_mib": 81920, "nvswitch": true},
     "ib_hcas": [{"name": "mlx5_0", "guid": "0x0c42a10300010000", "rate": 200}],
     "efa_devices": 0}

and fault markers `faults/<kind>` (empty files) for the faults in FAULTS: gpu-missing (one GPU
fewer), ecc-errors (uncorrected volatile ECC errors on GPU 0), ib-port-down (mlx5_0 Down/Disabled),
nvlink-degraded (half of each GPU's NVLinks down: collectives such as nccl-tests' all_reduce_perf reach
about half their bus bandwidth).
The binaries read these files on every call, so a change shows at once, with no restart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FAULTS = ("gpu-missing", "ecc-errors", "ib-port-down", "nvlink-degraded")
# EFA devices (one per network card) of the instance types the lab simulates. p4d.24xlarge has four
# network cards, each with an EFA (AWS EC2 User Guide, "Maximize network bandwidth on EC2 instances
# with multiple network cards").
EFA_DEVICES = {"p4d.24xlarge": 4}


def hardware_from_hostvars(hostname: str, hostvars: dict[str, Any]) -> dict[str, Any]:
    """hardware.json content for a host from its inventory vars (docs/inventory.md).

    Uses fleet_gpu_model, fleet_gpu_count, fleet_gpu_memory_mib, fleet_nvswitch, fleet_ib_hcas and
    fleet_efa with fleet_instance_type: an EFA host gets its instance type's EFA devices, others none.
    """
    efa = EFA_DEVICES.get(hostvars.get("fleet_instance_type") or "", 0) if hostvars.get("fleet_efa") else 0
    return {
        "hostname": hostname,
        "gpu": {
            "model": hostvars["fleet_gpu_model"],
            "count": int(hostvars["fleet_gpu_count"]),
            "memory_mib": int(hostvars["fleet_gpu_memory_mib"]),
            "nvswitch": bool(hostvars.get("fleet_nvswitch", False)),
        },
        "ib_hcas": [{"name": h["name"], "guid": h["guid"], "rate": int(h["rate"])}
                    for h in hostvars.get("fleet_ib_hcas") or []],
        "efa_devices": efa,
    }


def write_hardware(hw_dir: Path, hostname: str, hostvars: dict[str, Any]) -> Path:
    """Write hw_dir/hardware.json for the host (atomically: binaries may be reading it) and create
    hw_dir/faults; returns the hardware.json path. Existing fault markers are left as they are."""
    hw_dir = Path(hw_dir)
    (hw_dir / "faults").mkdir(parents=True, exist_ok=True)
    path = hw_dir / "hardware.json"
    tmp = path.with_name(".hardware.json.tmp")
    tmp.write_text(json.dumps(hardware_from_hostvars(hostname, hostvars), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def set_fault(hw_dir: Path, kind: str, present: bool = True) -> None:
    """Inject (present=True) or clear a hardware fault; ValueError for an unknown kind."""
    if kind not in FAULTS:
        raise ValueError(f"unknown hardware fault {kind!r} (known: {', '.join(FAULTS)})")
    marker = Path(hw_dir) / "faults" / kind
    if present:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    else:
        marker.unlink(missing_ok=True)


def faults(hw_dir: Path) -> list[str]:
    """The faults injected now."""
    return [k for k in FAULTS if (Path(hw_dir) / "faults" / k).exists()]
