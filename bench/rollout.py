"""Benchmark: the patch pipeline against the plain playbook a user would write, against the bare operations a
wave cannot avoid, and a weights-only bundle against a driver bundle.

    .venv/bin/python bench/rollout.py               # needs root: uses a lab of its own (ports 25000+)

(The planner at 10,000 hosts: bench/plan_scale.py.)

1. On the lab fleet, October -> November twice, from the same starting point:
   - `fleet patch run` with every gate on and the soak set to zero (the lab policy otherwise); it applies the
     components the bundle change touches only (patching/release/components.py);
   - the baseline: `ansible-playbook playbooks/patch.yml --limit WAVE -e gpu_driver_reboot_deferred=false` for
     the same waves in turn (the role reboots into the new driver, as the pipeline does), no drain, no gates:
     what a user would write, every component converged.
   It prints both times, their ratio, and the pipeline's own overhead: its time not spent inside a
   host action (Ansible runs, probes, host checks, waits).
2. `fleet patch run` of the lab's weights-only bundle (2026-11 -> 2026-11.5-weights-refresh): no reboot, the
   serving role only; its time beside the driver bundle's.
3. The physical bound, on the canary host (dgx-a1, on October), each bare operation timed alone, before the
   pipeline runs (the host is converged back to October after): the drain (HAProxy's runtime API), installing
   the packages November moves with dpkg alone (downloaded first, not timed), the reboot until SSH answers, the
   serving container's restart until /health answers 200, and the gates' own sampling (the SLO probe's
   requests, the DCGM diagnostic, the NCCL all-reduce sweep). Their sum against the pipeline's time for that
   host (its draining to its done, from the journal).
"""

from __future__ import annotations

import argparse
import itertools
import json
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


def converge(inventory: Path, release: Path, limit: str = "all") -> None:
    subprocess.run([BIN / "ansible-playbook", "-i", inventory, "playbooks/site.yml", "-e",
                    f"bundle_file={release}", "--limit", limit], cwd=ROOT, check=True, capture_output=True)


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


def pipeline(inventory: Path, policy: Path, work: Path, release: Path, releases_dir: Path | None = None
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
                  "--ignore-window", *(["--releases-dir", str(releases_dir)] if releases_dir else [])],
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
    """patch.yml wave by wave, every component, the role rebooting into the new driver (no gates, no drain)."""
    started = time.monotonic()
    for hosts in waves:
        subprocess.run([BIN / "ansible-playbook", "-i", inventory, "playbooks/patch.yml", "-e",
                        f"bundle_file={release}", "-e", "gpu_driver_reboot_deferred=false", "--limit",
                        ",".join(hosts)], cwd=ROOT, check=True, capture_output=True)
    return time.monotonic() - started


def host_times(journal: Path, host: str) -> tuple[float, dict[str, float]]:
    """The host's time in the pipeline (its first draining to its done) and the time in each state, from the
    journal."""
    from patching.journal.store import Journal

    rows = [r for r in Journal(journal).of_run(1).host_history() if r.host == host]
    start = next(r.at for r in rows if r.state.value == "draining")
    end = next(r.at for r in rows if r.state.value == "done")
    per_state: dict[str, float] = defaultdict(float)
    for row, after in itertools.pairwise(rows):
        if row.at >= start:
            per_state[row.state.value] += after.at - row.at
    return end - start, dict(per_state)


class BareHost:
    """One lab host reached the way an operator's terminal would: plain ssh with the lab's key, strict host keys."""

    def __init__(self, lab, name: str):
        self.lab, self.name = lab, name
        layout = lab.layout
        self.argv = ["ssh", "-i", str(layout.ssh_key), "-o", f"UserKnownHostsFile={layout.known_hosts}",
                     "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=2",
                     "-p", str(lab.ports.hosts[name].ssh), "root@127.0.0.1"]

    def run(self, command: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.argv, command], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SystemExit(f"{self.name}: `{command}` exited {proc.returncode}: {proc.stderr[-500:]}")
        return proc

    def timed(self, command: str) -> float:
        started = time.monotonic()
        self.run(command)
        return time.monotonic() - started


def bare_operations(lab, name: str, inventory: Path, policy_path: Path, new: Path) -> dict[str, float]:
    """Each operation a wave cannot avoid on host `name` moving to bundle `new`, timed alone (module docstring,
    3.); the host keeps the new packages (the caller converges it back)."""
    from patching.hosts import probe
    from patching.hosts.actions import haproxy_command
    from patching.inventory.reader import load_inventory
    from patching.release.bundle import load_bundle
    from patching.release.pins import host_pins
    from patching.rollout.policy import load_policy

    fleet = load_inventory([inventory])
    host, hostvars = fleet.hosts[name], fleet.vars[name]
    policy, _ = load_policy(policy_path)
    bare = BareHost(lab, name)
    out: dict[str, float] = {}

    # the server in its backend, as drain.yml names it (lb_member_backend, lb_member_server)
    api, server = str(host.lb["api"]), f"{host.lb.get('backend', host.pool)}/{host.lb.get('server', name)}"
    started = time.monotonic()
    haproxy_command(api, f"set server {server} state drain")
    out["drain (HAProxy API)"] = time.monotonic() - started

    # the packages the change moves, downloaded first (not timed), then installed with dpkg alone
    installed = dict(line.split() for line in bare.run(
        "dpkg-query -W -f='${Package} ${Version}\\n'").stdout.splitlines() if len(line.split()) == 2)
    moved = {p: v for p, v in host_pins(load_bundle(new), hostvars).items() if installed.get(p) != v}
    bare.run("rm -rf /var/tmp/bench-debs && mkdir /var/tmp/bench-debs && cd /var/tmp/bench-debs && "
             "apt-get download -q " + " ".join(f"{p}={v}" for p, v in sorted(moved.items())))
    out[f"dpkg -i of the {len(moved)} moved packages"] = bare.timed(
        "dpkg -i --force-hold /var/tmp/bench-debs/*.deb")

    started = time.monotonic()
    bare.run("systemctl reboot", check=False)
    time.sleep(1)
    while bare.run("true", check=False, timeout=10).returncode != 0:
        if time.monotonic() - started > 300:
            raise SystemExit(f"{name}: no SSH 300 s after its reboot")
        time.sleep(0.2)
    out["reboot until SSH answers"] = time.monotonic() - started

    base_url = f"http://{host.serving_address}"
    if probe.wait_healthy(base_url, 300) is not None:
        raise SystemExit(f"{name}: its server did not come back after the reboot")
    started = time.monotonic()
    bare.run("systemctl restart vllm-serving")
    if (why := probe.wait_healthy(base_url, 300, interval_s=0.1)) is not None:
        raise SystemExit(f"{name}: {why}")
    out["serving container restart until /health 200"] = time.monotonic() - started

    slo = policy.gates.slo
    started = time.monotonic()
    probe.slo_probe(base_url, host.model, slo.warmup_requests, slo.needed_requests(),
                    slo.request_timeout.total_seconds())
    out[f"SLO probe's sampling ({slo.warmup_requests} + {slo.needed_requests()} requests)"] = \
        time.monotonic() - started
    hw = policy.gates.hardware
    out[f"dcgmi diag -r {hw.dcgm_level}"] = bare.timed(f"dcgmi diag -r {hw.dcgm_level} -j >/dev/null")
    gpus = host.gpu_count or 8
    out["all_reduce_perf -b 8 -e 8G -f 2"] = bare.timed(
        f"/opt/nccl-tests/build/all_reduce_perf -b 8 -e 8G -f 2 -g {gpus} >/dev/null")
    haproxy_command(api, f"set server {server} state ready")
    return out


def rollout_bench(work: Path) -> None:
    from lab.control import Lab

    lab = Lab.open("lab", ROOT, work / "lab", 25000)
    lab.up(fresh=True, log=lambda line: print(f"  [lab] {line}", flush=True))
    try:
        inventory = lab.inventory_path()
        october, november = lab.releases_dir / "2026-10.yaml", lab.releases_dir / "2026-11.yaml"
        refresh = lab.releases_dir / "2026-11.5-weights-refresh.yaml"
        policy_data = yaml.safe_load((ROOT / "lab/policy.yaml").read_text())
        policy_data["gates"]["soak"]["duration"] = "0s"
        policy = work / "policy.yaml"
        policy.write_text(yaml.safe_dump(policy_data))

        print("converging the lab to 2026-10 (not timed) ...", flush=True)
        converge(inventory, october)
        canary = str(policy_data["canary"]["hosts"][0])
        print(f"the bare operations of 2026-10 -> 2026-11 on {canary}, one at a time ...", flush=True)
        bare = bare_operations(lab, canary, inventory, policy, november)
        for what, seconds in bare.items():
            print(f"  {what:52}{seconds:8.1f} s", flush=True)
        print(f"converging {canary} back to 2026-10 (not timed) ...", flush=True)
        converge(inventory, october, limit=canary)
        print("fleet patch run 2026-10 -> 2026-11, gates on, soak 0 ...", flush=True)
        total, inside, waves = pipeline(inventory, policy, work / "pipeline", november)
        print(f"  {total:.1f} s, waves {[len(w) for w in waves]}", flush=True)
        per_host, per_state = host_times(work / "pipeline" / "journal.db", canary)
        print("fleet patch run 2026-11 -> 2026-11.5-weights-refresh, gates on, soak 0 ...", flush=True)
        weights_total, _, _ = pipeline(inventory, policy, work / "weights", refresh, lab.releases_dir)
        weights_host, weights_states = host_times(work / "weights" / "journal.db", canary)
        print(f"  {weights_total:.1f} s", flush=True)
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
    print("\n== weights-only bundle against the driver bundle (same lab, same policy) ==")
    print(f"{'':34}{'driver (10->11)':>16}{'weights (11->11.5)':>20}")
    print(f"{'fleet patch run, 5 hosts':34}{total:14.1f} s{weights_total:18.1f} s")
    print(f"{'canary ' + canary + ', draining to done':34}{per_host:14.1f} s{weights_host:18.1f} s")
    for state in ("draining", "applying", "rebooting", "verifying", "undraining", "soaking"):
        print(f"  {state:32}{per_state.get(state, 0):14.1f} s{weights_states.get(state, 0):18.1f} s")
    print(f"\n== {canary}: the pipeline against the bare operations of 2026-10 -> 2026-11 ==")
    for what, seconds in bare.items():
        print(f"  {what:52}{seconds:8.1f} s")
    bound = sum(bare.values())
    print(f"  {'sum of the bare operations':52}{bound:8.1f} s")
    print(f"  {'the pipeline, draining to done':52}{per_host:8.1f} s")
    print(f"  {'ratio pipeline / bare sum':52}{per_host / bound:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        rollout_bench(Path(tmp))


if __name__ == "__main__":
    main()
