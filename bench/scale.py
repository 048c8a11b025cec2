"""Benchmark: the lab grown to 20 hosts (lab/scaled.py), a rollout in waves of 5 and in waves of 10: how a
wave's time grows with its size.

    .venv/bin/python bench/scale.py [--hosts 20] [--sizes 5,10]   # needs root: a lab of its own (ports 27000+)

The lab is converged to 2026-10, then for each wave size: `fleet patch run` of 2026-10 -> 2026-11 over the
on-prem pool (`--limit v3-hall`: the canary dgx-a1 alone, then waves of that size; gates on, soak 0, the lab
policy otherwise), and the pool converged back to 2026-10 (not timed) before the next size. Printed per wave:
its hosts, its time (report.json's duration_s) and that time per host, and for each pipeline state the mean
time a host of the wave spent in it (from the journal). `fleet verify` at this size: bench/verify.py --lab
--hosts 20.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
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

POOL = "v3-hall"
POOL_GROUP = "pool_v3_hall"  # the inventory group of the pool
STATES = ("draining", "applying", "rebooting", "verifying", "undraining", "soaking")


def converge(inventory: Path, release: Path, limit: str = "all") -> float:
    started = time.monotonic()
    proc = subprocess.run([BIN / "ansible-playbook", "-i", inventory, "playbooks/site.yml", "-e",
                           f"bundle_file={release}", "--limit", limit], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"converge to {release.name} failed:\n{proc.stdout[-3000:]}")
    return time.monotonic() - started


def patch_run(inventory: Path, policy: Path, work: Path, release: Path) -> tuple[float, dict]:
    from patching.cli.app import app

    reports = work / "reports"
    started = time.monotonic()
    rc = app(["patch", "run", "--release", str(release), "-i", str(inventory), "--limit", POOL_GROUP,
              "--policy", str(policy), "--journal", str(work / "journal.db"), "--report-dir", str(reports),
              "--ignore-window"], standalone_mode=False)
    total = time.monotonic() - started
    if rc not in (0, None):
        raise SystemExit(f"fleet patch run exited {rc}; see {reports}")
    return total, json.loads((reports / "report.json").read_text())


def state_times(journal: Path) -> dict[str, dict[str, float]]:
    """host -> state -> seconds spent in it, from the journal."""
    from patching.journal.store import Journal

    rows = Journal(journal).of_run(1).host_history()
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    by_host: dict[str, list] = defaultdict(list)
    for row in rows:
        by_host[row.host].append(row)
    for host, history in by_host.items():
        for row, after in itertools.pairwise(history):
            out[host][row.state.value] += after.at - row.at
    return out


def scale_bench(work: Path, hosts: int, sizes: list[int], port_base: int, reuse: Path | None = None) -> None:
    from lab.control import Lab
    from lab.scaled import scaled_project

    if reuse:  # a scaled lab already up and on 2026-10 (its pool's max_unavailable must allow the sizes)
        lab = Lab.open(f"lab{hosts}", ".", reuse)
        if not lab.daemon_pid():
            raise SystemExit(f"--reuse {reuse}: no lab is up there")
    else:
        project = scaled_project(work / "project", hosts, max_unavailable=max(sizes))
        lab = Lab.open(f"lab{hosts}", project, work / "lab", port_base)
        started = time.monotonic()
        lab.up(fresh=True, log=lambda line: print(f"  [lab] {line}", flush=True))
        print(f"lab of {hosts} hosts up in {time.monotonic() - started:.0f} s", flush=True)
    results = []
    try:
        inventory = lab.inventory_path()
        october, november = lab.releases_dir / "2026-10.yaml", lab.releases_dir / "2026-11.yaml"
        if not reuse:
            print(f"converging {hosts} hosts to 2026-10 ...", flush=True)
            print(f"  {converge(inventory, october):.0f} s", flush=True)
        for size in sizes:
            policy_data = yaml.safe_load((ROOT / "lab/policy.yaml").read_text())
            policy_data["gates"]["soak"]["duration"] = "0s"
            policy_data["waves"]["size"] = size
            policy = work / f"policy-{size}.yaml"
            policy.write_text(yaml.safe_dump(policy_data))
            print(f"fleet patch run 2026-10 -> 2026-11 over {POOL}, waves of {size} ...", flush=True)
            total, report = patch_run(inventory, policy, work / f"waves-{size}", november)
            print(f"  {total:.1f} s", flush=True)
            results.append((size, total, report, state_times(work / f"waves-{size}" / "journal.db")))
            if size != sizes[-1]:
                print(f"converging {POOL} back to 2026-10 (not timed) ...", flush=True)
                converge(inventory, october, limit=POOL_GROUP)
    finally:
        if not reuse:
            lab.down(log=lambda _: None)
    print_results(hosts, results)


def print_results(hosts: int, results: list[tuple[int, float, dict, dict[str, dict[str, float]]]]) -> None:
    print(f"\n== rollout of 2026-10 -> 2026-11 over {POOL} on a {hosts}-host lab, by wave size ==")
    print(f"{'size':>5} {'wave':>5} {'hosts':>6} {'time':>9} {'per host':>9}  "
          + " ".join(f"{s:>10}" for s in STATES))
    for size, total, report, states in results:
        members: dict[int, list[str]] = defaultdict(list)
        for name, host in report["hosts"].items():
            members[host["wave"]].append(name)
        for wave in report["waves"]:
            names = members[wave["index"]]
            means = [statistics.mean(states[h].get(s, 0.0) for h in names) for s in STATES]
            duration = wave["duration_s"] or 0.0
            print(f"{size:>5} {wave['index']:>5} {len(names):>6} {duration:>7.1f} s {duration / len(names):>7.1f} s  "
                  + " ".join(f"{m:>8.1f} s" for m in means))
        print(f"{size:>5} {'run':>5} {len(report['hosts']):>6} {total:>7.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--sizes", default="5,10", help="wave sizes, comma-separated")
    parser.add_argument("--port-base", type=int, default=27000)
    parser.add_argument("--reuse", type=Path, metavar="STATE_DIR",
                        help="use the scaled lab up at STATE_DIR, on 2026-10 already (left up)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="fleet-bench-scale-") as tmp:
        scale_bench(Path(tmp), args.hosts, sizes, args.port_base, args.reuse)


if __name__ == "__main__":
    main()
