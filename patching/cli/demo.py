"""`fleet lab demo`: the whole story on the embedded lab, as an operator would tell it.

Every step is a `fleet` (or `ansible`) command a user could type; the demo only strings them
together and keeps live traffic flowing through the lab's HAProxy while the patches roll.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lab.control import Lab
from patching.hosts.probe import TrafficGenerator

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _fleet(*args: object, expect: tuple[int, ...] = (0,)) -> int:
    shown = " ".join(str(a).replace(str(ROOT) + "/", "") for a in args)
    print(f"$ fleet {shown}", flush=True)
    rc = subprocess.run([str(BIN / "fleet"), *map(str, args)], cwd=ROOT).returncode
    if rc not in expect:
        raise SystemExit(f"demo: `fleet {shown}` exited {rc} (expected {' or '.join(map(str, expect))})")
    return rc


def _traffic(lab: Lab) -> TrafficGenerator:
    """Live load through the pools that keep serving with a host out (the one-host Outposts pool has
    min_serving 0: its policy accepts downtime)."""
    urls = {f"http://127.0.0.1:{port}": lab.fleet.pools[pool].model for pool, port in lab.ports.frontends.items()
            if len(lab.fleet.hosts_in(pool)) > 1}
    return TrafficGenerator(list(urls), urls.get, concurrency=2, max_requests=100_000, max_seconds=1800).start()


def run_demo(stack: str = "lab") -> None:
    """The demo on the embedded lab: converge, verify, roll a bundle out under traffic, catch a bad one."""
    state = ROOT / ".fleet" / "demo"
    state.mkdir(parents=True, exist_ok=True)
    _step("1. The November bundle against October: what changes, and every compatibility rule")
    _fleet("release", "check", "releases/2026-11.yaml", "--against", "releases/2026-10.yaml")
    _fleet("release", "check", "lab/bundles/2026-11.2-fm-mismatch.yaml", expect=(2,))

    _step("2. The lab: five hosts (on-prem DGX, AWS p4d, Outposts g4dn), UPS, BMC, HAProxy, apt repo")
    _fleet("lab", "down", "--stack", stack, expect=(0, 1))
    _fleet("lab", "up", "--stack", stack, "--fresh")
    lab = Lab.open(stack, ROOT)
    inventory = lab.inventory_path()
    # the lab's copies of the bundles: the same files, pinning the serving images the lab built and serves
    releases = lab.releases_dir

    _step("3. Day 0: converge every host to the October bundle, then verify and look for drift")
    _fleet("converge", "--release", releases / "2026-10.yaml", "--inventory", inventory)
    _fleet("verify", "--release", releases / "2026-10.yaml", "--inventory", inventory)
    _fleet("drift", "--release", releases / "2026-10.yaml", "--inventory", inventory)

    journal = state / "journal.db"
    for old in state.glob("journal.db*"):
        old.unlink()
    _step("4. The plan for November: canary first, then waves within every pool's budget")
    _fleet("plan", "--release", releases / "2026-11.yaml", "-i", inventory, "--policy", "lab/policy.yaml",
           "-o", state / "plan.json")

    _step("5. Roll November out as planned (the approved plan), canary first, with live traffic through HAProxy")
    load = _traffic(lab)
    try:
        _fleet("patch", "run", "--release", releases / "2026-11.yaml", "-i", inventory, "--policy", "lab/policy.yaml",
               "--plan", state / "plan.json", "--journal", journal, "--report-dir", state / "reports-2026-11",
               "--ignore-window")
    finally:
        figures = load.stop()
    print(f"live traffic during the rollout: {figures.sent} requests, {figures.failed} failed, "
          f"P99 {figures.p99_ms:.0f} ms", flush=True)

    _step("6. A bad serving release: the canary's SLO gate catches it and rolls the canary back")
    load = _traffic(lab)
    try:
        _fleet("patch", "run", "--release", releases / "2026-11.1-slow-serving.yaml", "-i", inventory,
               "--policy", "lab/policy.yaml", "--journal", journal, "--report-dir", state / "reports-bad",
               "--ignore-window", expect=(1,))
    finally:
        figures = load.stop()
    print(f"live traffic during the failed canary: {figures.sent} requests, {figures.failed} failed", flush=True)
    print((state / "reports-bad" / "summary.md").read_text(), flush=True)
    _fleet("verify", "--release", releases / "2026-11.yaml", "--inventory", inventory)

    _step("7. The lab stays up")
    _fleet("lab", "status", "--stack", stack)
    print("try `.venv/bin/fleet lab fault dgx-a1 ecc-errors`, then `fleet verify ...`; "
          "`.venv/bin/fleet lab down` stops it all", flush=True)
