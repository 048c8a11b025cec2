"""`fleet plan` at scale on the inventory `fleet inventory` renders: the direct reader against Ansible's parser.

    .venv/bin/python bench/plan_scale.py                  # fast path at 10,000 hosts, Ansible at 1,000
    .venv/bin/python bench/plan_scale.py --with-ansible   # Ansible at 10,000 hosts too (minutes, GiB)
    .venv/bin/python bench/plan_scale.py --sizes 1000 10000

The example stack (Pulumi.example-hybrid.yaml) with its cloud pools' `count` raised until the fleet has the
size asked for, rendered with `render_inventory` (every var on each host, as `fleet inventory` writes it: YAML
whose body is JSON), and the same inventory as Pulumi's plain JSON and as block-style YAML.
Each measurement runs in a fresh interpreter: `load_inventory` + `build_plan` (the default policy, the
2026-11 bundle), as `fleet plan` does without a journal. `seconds` is that call's wall time (imports
excluded); `RSS MiB` is the child's peak resident memory (VmHWM, imports included: Linux's ru_maxrss would
include this parent's peak, which it inherits over fork and exec). The Ansible path is
forced with FLEET_INVENTORY_PARSER=ansible (patching/inventory/fast.py).

Target (issue 16): the fast path at 10,000 hosts under 1 s and under 200 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def scaled_inventory(hosts: int, path: Path) -> int:
    """Write the example stack's inventory with about `hosts` hosts to `path`, as `render_inventory` writes it
    (YAML whose body is JSON), as Pulumi's output (`.pulumi.json`) or as block-style YAML (`.block.yml`); the
    exact host count."""
    import yaml

    from infra.model.fleet import fleet_config_from_stack, parse_fleet
    from infra.model.inventory import render_inventory

    stack = ROOT / "Pulumi.example-hybrid.yaml"
    config = fleet_config_from_stack(yaml.safe_load(stack.read_text())["config"], stack)
    cloud = [p for p in config["pools"] if "count" in p]
    fixed = parse_fleet(config, str(stack), "config.fleet:")
    others = len(fixed.hosts) - sum(p["count"] for p in cloud)
    each, extra = divmod(max(len(cloud), hosts - others), len(cloud))
    for i, pool in enumerate(cloud):
        pool["count"] = each + (i < extra)
    fleet = parse_fleet(config, f"{stack} (cloud pools scaled to {hosts} hosts)", "config.fleet:")
    from infra.model.inventory import build_inventory

    if path.name.endswith(".pulumi.json"):  # `pulumi stack output ansible_inventory`: plain JSON
        path.write_text(json.dumps(build_inventory(fleet), indent=2))
    elif path.name.endswith(".block.yml"):  # the same as block-style YAML (what `fleet inventory` wrote before)
        path.write_text(yaml.safe_dump(build_inventory(fleet), sort_keys=False, width=120))
    else:
        path.write_text(render_inventory(fleet))
    return len(fleet.hosts)


FORMATS = {"rendered": "yml", "pulumi": "pulumi.json", "block-yaml": "block.yml"}


def measure(inventory: str) -> dict[str, Any]:
    """One child run: load_inventory + build_plan, timed; the child's peak RSS."""
    from patching.inventory.reader import load_inventory
    from patching.release.bundle import load_bundle
    from patching.rollout.plan import build_plan
    from patching.rollout.policy import load_policy

    policy, _ = load_policy(None)
    bundle = load_bundle(ROOT / "releases/2026-11.yaml")
    start = time.perf_counter()
    fleet = load_inventory([inventory])
    loaded = time.perf_counter()
    plan = build_plan(fleet, policy, bundle)
    done = time.perf_counter()
    return {"hosts": len(fleet.hosts), "waves": len(plan.waves), "load_s": loaded - start, "plan_s": done - loaded,
            "seconds": done - start, "rss_mib": _peak_rss_mib()}


def _peak_rss_mib() -> float:
    """This interpreter's peak RSS: VmHWM (ru_maxrss would carry the parent's peak over fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def _child(inventory: Path, parser: str) -> dict[str, Any]:
    env = {**os.environ, "FLEET_INVENTORY_PARSER": parser}
    out = subprocess.run([sys.executable, __file__, "--one", str(inventory)], check=True, capture_output=True,
                         text=True, env=env, cwd=ROOT)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    """Render each size, measure both paths in fresh interpreters, print them side by side."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--with-ansible", action="store_true", help="measure Ansible's parser above 1,000 hosts too")
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS),
                        help="rendered: as `fleet inventory` writes it (YAML whose body is JSON); pulumi: plain JSON "
                             "as `pulumi stack output` prints it; block-yaml: the same as block-style YAML")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    print(f"{'hosts':>6} {'file':>10} {'MiB':>5} | {'fast s':>7} {'(load':>7} {'plan)':>6} {'RSS MiB':>8} | "
          f"{'ansible s':>9} {'(load':>7} {'plan)':>6} {'RSS MiB':>8} | {'speed-up':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for size, fmt in [(s, f) for s in args.sizes for f in args.formats]:
            path = Path(tmp) / f"inventory-{size}.{FORMATS[fmt]}"
            hosts = scaled_inventory(size, path)
            quick = _child(path, "fast")
            slow = _child(path, "ansible") if args.with_ansible or size <= 1000 else None
            if slow is not None:
                assert (slow["hosts"], slow["waves"]) == (quick["hosts"], quick["waves"]), (slow, quick)
            line = (f"{hosts:>6} {fmt:>10} {path.stat().st_size / 2**20:>5.1f} | {quick['seconds']:>7.3f} "
                    f"{quick['load_s']:>7.3f} {quick['plan_s']:>6.3f} {quick['rss_mib']:>8.0f} | ")
            if slow is None:
                line += f"{'(skipped: --with-ansible)':>35} | {'':>8}"
            else:
                line += (f"{slow['seconds']:>9.2f} {slow['load_s']:>7.2f} {slow['plan_s']:>6.3f} "
                         f"{slow['rss_mib']:>8.0f} | {slow['seconds'] / quick['seconds']:>7.0f}x")
            print(line, flush=True)


if __name__ == "__main__":
    main()
