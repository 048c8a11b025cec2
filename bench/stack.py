"""How one mock run of the Pulumi program grows with the fleet: 10, 100 and 1,000 hosts.

    .venv/bin/python bench/stack.py                # all sizes, a table
    .venv/bin/python bench/stack.py --sizes 10 100 --repeat 3

Each size runs in a fresh interpreter (so peak memory is that run's alone) the same way the unit
tests do: `__main__.py` under `pulumi.runtime.set_mocks` (tests/stack_mocks.py), every resource
registered, every invoke answered, the inventory output resolved. No engine, no provider plugins, no
AWS: this is the program's own cost, the part a `pulumi preview` pays before talking to providers.

What the figures compare against:
- the previous size: `x prev` is the growth factor of the time for 10x the hosts (10 = linear);
- the same fleet's inventory built without Pulumi (`build_inventory` alone, `inv only`): the floor
  for what the program computes, so the rest is the Pulumi SDK's per-resource cost (registration,
  serialization, one dill pickle per bare-metal host);
- `RSS base` is the interpreter after importing pulumi, pulumi_aws and the project; `RSS peak - base`
  is what the run itself added.

Fleet shape per size: 40% p4d.24xlarge in two AWS sites, 10% g4dn.12xlarge on an Outpost, 50%
on-prem 8-GPU hosts with a BMC, 2+2 PSUs on a UPS pair per 4 hosts and 8 HCAs rail-aligned in
scalable units of 32 hosts.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES = (10, 100, 1000)


def fleet_config(hosts: int) -> dict[str, Any]:
    """A stack config (`fleet:*` keys) with `hosts` hosts in the shape described above."""
    aws = max(2, hosts * 4 // 10)
    outpost = max(1, hosts // 10)
    onprem = max(1, hosts - aws - outpost)
    groups = (onprem + 3) // 4
    ups = [{"name": f"ups-{g}{feed}", "host": f"10.64.{g // 200}.{g % 200 + 1}", "capacity_w": 40000}
           for g in range(groups) for feed in "ab"]
    sites = [
        {"name": "use1-az-a", "kind": "aws", "region": "us-east-1", "availability_zone": "us-east-1a",
         "vpc_cidr": "10.42.0.0/16", "ssh_cidrs": ["10.0.0.0/8"]},
        {"name": "use1-az-b", "kind": "aws", "region": "us-east-1", "availability_zone": "us-east-1b",
         "vpc_cidr": "10.44.0.0/16", "ssh_cidrs": ["10.0.0.0/8"]},
        {"name": "outpost-fra1", "kind": "outpost", "region": "eu-central-1", "availability_zone": "eu-central-1a",
         "outpost_arn": "arn:aws:outposts:eu-central-1:123456789012:outpost/op-0a1b2c3d4e5f60718",
         "local_gateway_route_table_id": "lgw-rtb-0a1b2c3d4e5f60718", "haproxy_api": "10.43.0.5:9999"},
        {"name": "hall-a", "kind": "onprem", "haproxy_api": "10.64.0.5:9999", "require_n_plus_one": True,
         "ib_rail_aligned": True, "ups": ups,
         "ib_rails": {f"leaf-su{su}-rail{r}": f"mlx5_{r}" for su in range(onprem // 32 + 1) for r in range(8)}},
    ]
    v3 = {"model": "deepseek-ai/DeepSeek-V3", "gpu_count": 8, "max_unavailable": "10%", "min_serving": 1}
    pools = [
        {"name": "v3-use1a", "site": "use1-az-a", "instance_type": "p4d.24xlarge", "gpu_model": "A100-SXM4-40GB",
         "count": aws // 2, **v3},
        {"name": "v3-use1b", "site": "use1-az-b", "instance_type": "p4d.24xlarge", "gpu_model": "A100-SXM4-40GB",
         "count": aws - aws // 2, **v3},
        {"name": "r1-outpost", "site": "outpost-fra1", "instance_type": "g4dn.12xlarge", "gpu_model": "T4",
         "gpu_count": 4, "count": outpost, "model": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"},
        {"name": "v3-hall-a", "site": "hall-a", "gpu_model": "A100-SXM4-80GB", **v3},
    ]
    listed = []
    for i in range(onprem):
        group, su, slot = i // 4, i // 32, i % 32
        listed.append({
            "name": f"dgx-{i:04d}", "pool": "v3-hall-a", "address": f"10.65.{i // 250}.{i % 250 + 1}",
            "bmc": {"endpoint": f"https://10.66.{i // 250}.{i % 250 + 1}", "system_id": "System.Embedded.1"},
            "psus": [{"feed": "A", "ups": f"ups-{group}a"}] * 2 + [{"feed": "B", "ups": f"ups-{group}b"}] * 2,
            "max_draw_w": 6500,
            "ib_hcas": [{"name": f"mlx5_{r}", "guid": f"0x1070a103{i:06x}{r:02x}", "switch": f"leaf-su{su}-rail{r}",
                         "port": slot + 1, "rate": 200} for r in range(8)],
        })
    return {"aws:region": "us-east-1", "fleet:name": f"bench-{hosts}", "fleet:sites": sites, "fleet:pools": pools,
            "fleet:hosts": listed}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def measure(hosts: int) -> dict[str, Any]:
    """One mock run of the program for a fleet of `hosts` hosts, in this process."""
    sys.path.insert(0, str(ROOT))
    import pulumi_aws

    from infra.model.fleet import fleet_config_from_stack, parse_fleet
    from infra.model.inventory import Endpoint, build_inventory
    from tests.stack_mocks import run_program

    # pulumi_aws loads its submodules on first use: load them now, so the base includes them
    for module in (pulumi_aws.ec2, pulumi_aws.lb, pulumi_aws.iam, pulumi_aws.outposts):
        assert module is not None
    config = fleet_config(hosts)
    base = _rss_mb()
    start = time.perf_counter()
    run = run_program(config, {"fleet:bmcPassword": "bench"}, stack=f"bench-{hosts}")
    seconds = time.perf_counter() - start
    peak = _rss_mb()
    inventory = run.outputs["ansible_inventory"]
    assert len(inventory["all"]["hosts"]) == hosts, "the run must export every host"

    start = time.perf_counter()
    fleet = parse_fleet(fleet_config_from_stack(config), "bench", "config.fleet:")
    build_inventory(fleet, {name: Endpoint("10.0.0.1") for name in fleet.hosts})
    inventory_only = time.perf_counter() - start
    return {"hosts": hosts, "resources": len(run.resources), "seconds": seconds, "inventory_only": inventory_only,
            "rss_base_mb": base, "rss_peak_mb": peak}


def main() -> None:
    """Run each size in a fresh interpreter and print the table (or, as a child, measure one size)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeat", type=int, default=1, help="runs per size; the fastest is reported")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)   # child mode: one size, JSON out
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return

    print(f"{'hosts':>6} {'resources':>9} {'seconds':>8} {'ms/host':>8} {'x prev':>7} {'inv only':>9} "
          f"{'RSS base':>9} {'RSS peak':>9} {'peak-base':>9}")
    previous = None
    for size in args.sizes:
        runs = []
        for _ in range(args.repeat):
            out = subprocess.run([sys.executable, __file__, "--one", str(size)], check=True, capture_output=True,
                                 text=True, cwd=ROOT)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        best = min(runs, key=lambda r: r["seconds"])
        growth = f"{best['seconds'] / previous:.1f}" if previous else "-"
        print(f"{size:>6} {best['resources']:>9} {best['seconds']:>8.2f} {1000 * best['seconds'] / size:>8.1f} "
              f"{growth:>7} {best['inventory_only']:>8.3f}s {best['rss_base_mb']:>7.0f}MB "
              f"{best['rss_peak_mb']:>7.0f}MB {best['rss_peak_mb'] - best['rss_base_mb']:>7.0f}MB")
        previous = best["seconds"]


if __name__ == "__main__":
    main()
