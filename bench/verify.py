"""Benchmark: `fleet verify` reading every host at once against host by host, and converge with and without SSH
pipelining and ControlPersist.

    .venv/bin/python bench/verify.py --inventory INVENTORY [--release releases/2026-10.yaml] [--rounds 3]
    .venv/bin/python bench/verify.py --lab [--hosts 20]   # boots its own lab (root), converges it, tears it down

Three ways to run the same checks (tests/hosts) over the same hosts, in one run:
- at once (`fleet verify`'s default): one process reads every host before the first check, a thread and one SSH
  session per host;
- host by host (the baseline): one process, each check running its own command when it runs
  (`--command-by-command`), hosts one after another;
- xdist: the hosts spread over worker processes, each reading its host when it reaches it.
The hosts must already run the release (with --lab the script converges them first; `--hosts N` boots the lab
grown to N hosts, lab/scaled.py). Converge is timed on converged hosts, so what differs between its runs is the
SSH transport: each run gets a fresh ControlPath directory, so no run reuses another's master connections.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patching.hosts.converge import run_converge  # noqa: E402
from patching.hosts.verify import run_verify  # noqa: E402
from patching.inventory.target import load_target  # noqa: E402

TRANSPORTS = {
    "pipelining + ControlPersist (ansible.cfg)": {},
    "ControlPersist, no pipelining": {"ANSIBLE_PIPELINING": "False"},
    "neither (a new SSH connection per module, files copied)": {
        "ANSIBLE_PIPELINING": "False",
        # ssh uses the first value it sees for an option, and ssh_args come before the inventory's args
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=no -o ControlPath=none -o ControlPersist=no",
    },
}


def time_verify(release: Path, inventory: Path, hosts: tuple[str, ...], workers: int, rounds: int,
                extra: list[str] | None = None) -> list[float]:
    times = []
    for _ in range(rounds):
        result = run_verify(release, inventory, hosts, workers, extra_args=extra)
        if not result.succeeded:
            raise SystemExit(f"verify failed ({len(result.failures)} check(s), pytest exit {result.rc}); "
                             f"the hosts must run {release} first (log: {result.log})")
        times.append(result.seconds)
    return times


def time_converge(release: Path, inventory: Path, env: dict[str, str], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="bench-cp-") as control_dir:
            result = run_converge(release, inventory, envvars={**env, "ANSIBLE_SSH_CONTROL_PATH_DIR": control_dir})
        if not result.succeeded:
            raise SystemExit(f"converge failed: {[h.first_failure for h in result.hosts.values() if h.first_failure]}")
        times.append(result.seconds)
    return times


def row(label: str, times: list[float]) -> str:
    spread = f" (min {min(times):.1f}, max {max(times):.1f})" if len(times) > 1 else ""
    return f"  {label:<58} {statistics.median(times):7.1f} s{spread}"


def bench(release: Path, inventory: Path, rounds: int, converge_rounds: int) -> None:
    target = load_target(release, inventory)
    hosts = target.hosts
    workers = min(len(hosts), 2 * (os.cpu_count() or 1))
    print(f"{len(hosts)} hosts, release {target.bundle.release}, {os.cpu_count()} CPUs; medians of {rounds} round(s)")
    figures = {}
    # interleaved rounds, so a busy spell of this shared machine falls on every variant alike
    variants = {"at once: one process, one SSH session per host (default)": (0, None),
                "host by host: each check's command when it runs (baseline)": (0, ["--command-by-command"]),
                f"xdist, {workers} workers (one group per host)": (workers, None)}
    for _ in range(rounds):
        for label, (n, extra) in variants.items():
            figures.setdefault(label, []).extend(time_verify(release, inventory, hosts, n, 1, extra))
    print("fleet verify (the tests/hosts suite):", flush=True)
    for label, times in figures.items():
        print(row(label, times))
    at_once, serial, xdist = (statistics.median(v) for v in figures.values())
    print(f"  at once is {serial / at_once:.2f}x faster than host by host ({xdist / at_once:.2f}x than xdist)")
    if converge_rounds <= 0:
        return
    print(f"converge (playbooks/site.yml on converged hosts; medians of {converge_rounds} round(s)):")
    converge = {}
    for label, env in TRANSPORTS.items():
        converge[label] = time_converge(release, inventory, env, converge_rounds)
        print(row(label, converge[label]), flush=True)
    base, worst = (statistics.median(v) for v in (converge[next(iter(TRANSPORTS))], list(converge.values())[-1]))
    print(f"  pipelining + ControlPersist is {worst / base:.2f}x faster than neither")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inventory", type=Path, help="inventory of hosts already on --release")
    parser.add_argument("--release", type=Path, default=ROOT / "releases/2026-10.yaml")
    parser.add_argument("--rounds", type=int, default=3, help="verify runs per variant")
    parser.add_argument("--converge-rounds", type=int, default=1, help="converge runs per transport (0: none)")
    parser.add_argument("--lab", action="store_true", help="boot a lab for the benchmark (root), then tear it down")
    parser.add_argument("--hosts", type=int, help="with --lab: the lab grown to this many hosts (lab/scaled.py)")
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/fleet-bench-lab"))
    parser.add_argument("--port-base", type=int, default=24000)
    args = parser.parse_args()
    if not args.lab:
        if not args.inventory:
            parser.error("give --inventory (hosts on --release) or --lab")
        bench(args.release, args.inventory, args.rounds, args.converge_rounds)
        return
    from lab.control import Lab

    if args.hosts:
        from lab.scaled import scaled_project

        project = scaled_project(args.state_dir.with_name(args.state_dir.name + "-project"), args.hosts)
        lab = Lab.open(f"lab{args.hosts}", project, args.state_dir, args.port_base)
    else:
        lab = Lab.open("lab", ROOT, args.state_dir, args.port_base)
    lab.up(fresh=True)
    release = lab.releases_dir / args.release.name  # the lab's copy: its serving image is the lab's build
    try:
        first = run_converge(release, lab.inventory_path())
        if not first.succeeded:
            raise SystemExit(f"first converge failed: {[h.first_failure for h in first.hosts.values()]}")
        print(f"first converge of a fresh lab: {first.seconds:.0f} s")
        bench(release, lab.inventory_path(), args.rounds, args.converge_rounds)
    finally:
        lab.down()


if __name__ == "__main__":
    main()
