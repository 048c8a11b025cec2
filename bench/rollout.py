"""Benchmark: the patch pipeline against the plain playbook a user would write, and the planner at scale.

    .venv/bin/python bench/rollout.py               # needs root: uses a lab of its own (ports 25000+)
    .venv/bin/python bench/rollout.py --plan-only   # just the 10,000-host plan

1. On the lab fleet, October -> November twice, from the same starting point:
   - `fleet patch run` with every gate on and the soak set to zero (the lab policy otherwise);
   - the baseline: `ansible-playbook playbooks/patch.yml --limit WAVE` for the same waves in turn,
     no drain, no gates.
   It prints both times, their ratio, and the pipeline's own overhead: its time not spent inside a
   host action (Ansible runs, probes, host checks, waits).
2. `fleet plan` over a generated 10,000-host JSON inventory: time and peak memory (a child process,
   so its peak is its own).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))


def converge(inventory: Path, release: Path) -> None:
    subprocess.run([BIN / "ansible-playbook", "-i", inventory, "playbooks/site.yml", "-e",
                    f"bundle_file={release}"], cwd=ROOT, check=True, capture_output=True)


class TimedActions:
    """Wraps the real host actions and adds up the time spent inside each of them."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds: dict[str, float] = defaultdict(float)

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def timed(*args, **kwargs):
            started = time.monotonic()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += time.monotonic() - started

        return timed


def pipeline(inventory: Path, policy: Path, work: Path, release: Path
             ) -> tuple[float, dict[str, float], list[list[str]]]:
    from patching.cli import patch as host_actions  # where `fleet patch run` gets its host actions
    from patching.cli.app import app

    made: list[TimedActions] = []
    real = host_actions.make_actions

    def make(*args, **kwargs):
        made.append(TimedActions(real(*args, **kwargs)))
        return made[-1]

    host_actions.make_actions = make
    reports = work / "reports"
    started = time.monotonic()
    try:
        rc = app(["patch", "run", "--release", str(release), "-i", str(inventory),
                  "--policy", str(policy), "--journal", str(work / "journal.db"), "--report-dir", str(reports),
                  "--ignore-window"],
                 standalone_mode=False)
    finally:
        host_actions.make_actions = real
    total = time.monotonic() - started
    if rc not in (0, None):
        raise SystemExit(f"fleet patch run exited {rc}; see {reports}")
    report = json.loads((reports / "report.json").read_text())
    waves: list[list[str]] = [[] for _ in report["waves"]]
    for name, host in sorted(report["hosts"].items()):
        waves[host["wave"]].append(name)
    return total, dict(made[0].seconds) if made else {}, waves


def baseline(inventory: Path, waves: list[list[str]], release: Path) -> float:
    started = time.monotonic()
    for hosts in waves:
        subprocess.run([BIN / "ansible-playbook", "-i", inventory, "playbooks/patch.yml", "-e",
                        f"bundle_file={release}", "--limit", ",".join(hosts)], cwd=ROOT, check=True,
                       capture_output=True)
    return time.monotonic() - started


def rollout_bench(work: Path) -> None:
    from lab.control import Lab

    lab = Lab.open("lab", ROOT, work / "lab", 25000)
    lab.up(fresh=True, log=lambda line: print(f"  [lab] {line}", flush=True))
    try:
        inventory = lab.inventory_path()
        october, november = lab.releases_dir / "2026-10.yaml", lab.releases_dir / "2026-11.yaml"
        policy_data = yaml.safe_load((ROOT / "lab/policy.yaml").read_text())
        policy_data["gates"]["soak"]["duration"] = "0s"
        policy = work / "policy.yaml"
        policy.write_text(yaml.safe_dump(policy_data))

        print("converging the lab to 2026-10 (not timed) ...", flush=True)
        converge(inventory, october)
        print("fleet patch run 2026-10 -> 2026-11, gates on, soak 0 ...", flush=True)
        total, inside, waves = pipeline(inventory, policy, work / "pipeline", november)
        print("converging back to 2026-10 (not timed) ...", flush=True)
        converge(inventory, october)
        print(f"baseline: ansible-playbook patch.yml, the same {len(waves)} waves, no gates ...", flush=True)
        plain = baseline(inventory, waves, november)
    finally:
        lab.down(log=lambda _: None)
    in_actions = sum(inside.values())
    print("\n== rollout on the lab fleet (5 hosts) ==")
    print(f"waves:                                   {[len(w) for w in waves]}")
    print(f"fleet patch run (gates on, soak 0):      {total:8.1f} s")
    print(f"baseline ansible-playbook patch.yml:     {plain:8.1f} s")
    print(f"ratio pipeline / baseline:               {total / plain:8.2f}x")
    for name, seconds in sorted(inside.items(), key=lambda kv: -kv[1]):
        print(f"  inside {name:<24}         {seconds:8.1f} s")
    print(f"pipeline's own overhead (not in actions):{total - in_actions:8.1f} s "
          f"({(total - in_actions) / total:.1%} of the run)")


def generated_inventory(path: Path, hosts: int) -> None:
    """A JSON inventory of `hosts` hosts in 50 pools over 5 sites, with the documented host vars."""
    hostvars, groups = {}, defaultdict(list)
    for i in range(hosts):
        site, pool = f"site-{i % 5}", f"pool-{i % 50}"
        name = f"gpu-{i:05d}"
        hostvars[name] = {"ansible_host": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", "fleet_site": site,
                          "fleet_site_kind": "onprem", "fleet_pool": pool, "fleet_patch_ring": i % 3,
                          "fleet_serving_port": 8000, "fleet_max_unavailable": "10%", "fleet_min_serving": 150,
                          "fleet_model": "deepseek-ai/DeepSeek-V3",
                          "fleet_lb": {"kind": "haproxy", "api": "10.0.0.1:9999", "backend": pool, "server": name}}
        groups[f"pool_{pool.replace('-', '_')}"].append(name)
    # Ansible's YAML inventory format, written as JSON (which its yaml plugin reads, and faster than YAML)
    children = {g: {"hosts": dict.fromkeys(members)} for g, members in groups.items()}
    path.write_text(json.dumps({"all": {"hosts": hostvars, "children": children}}))


def plan_bench(work: Path, hosts: int = 10_000) -> None:
    inventory = work / "inventory.json"
    generated_inventory(inventory, hosts)
    started = time.monotonic()
    proc = subprocess.run([BIN / "fleet", "plan", "--release", "releases/2026-11.yaml", "-i", inventory,
                           "-o", work / "plan.json"], cwd=ROOT, capture_output=True, text=True)
    seconds = time.monotonic() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    plan = json.loads((work / "plan.json").read_text())
    print(f"\n== fleet plan over a generated {hosts:,}-host JSON inventory ==")
    print(f"waves: {len(plan['waves'])}, planned hosts: {len(plan['hosts'])}")
    print(f"time:        {seconds:8.1f} s")
    print(f"peak memory: {peak_mib:8.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan-only", action="store_true", help="skip the lab rollout")
    parser.add_argument("--hosts", type=int, default=10_000, help="hosts in the generated inventory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        work = Path(tmp)
        plan_bench(work, args.hosts)
        if not args.plan_only:
            rollout_bench(work)


if __name__ == "__main__":
    main()
