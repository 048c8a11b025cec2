"""The patch pipeline on the lab fleet (issue: the pipeline's bad input, faults and load).

One good rollout 2026-10 -> 2026-11 under live traffic through HAProxy, paused by a closing window,
killed (-9) in flight, resumed to the end with zero failed requests; the known-bad serving release
caught by the canary's SLO gate and rolled back; bad input and a UPS on battery refused before any
host is touched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from patching.hosts.actions import haproxy_states
from patching.hosts.probe import TrafficGenerator
from tests.integration.conftest import LAB_RELEASES, lab_release

ROOT = Path(__file__).resolve().parents[2]
FLEET = str(Path(sys.executable).parent / "fleet")
LAB_POLICY = ROOT / "lab/policy.yaml"
SLOW = LAB_RELEASES / "2026-11.1-slow-serving.yaml"
MISMATCH = LAB_RELEASES / "2026-11.2-fm-mismatch.yaml"
INJECTION = LAB_RELEASES / "2026-11.3-injection.yaml"
NCCL_REGRESSION = LAB_RELEASES / "2026-11.4-nccl-regression.yaml"
WEIGHTS_REFRESH = LAB_RELEASES / "2026-11.5-weights-refresh.yaml"


def fleet(*args, env=None, timeout=1500) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([FLEET, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


def releases_on_hosts(lab) -> dict[str, str | None]:
    out = {}
    for host in lab.hosts:
        proc = lab.ssh(host, "cat /etc/fleet/bundle.json", check=False)
        out[host] = json.loads(proc.stdout).get("release") if proc.returncode == 0 else None
    return out


def lb_states(lab) -> dict[str, str]:
    api = f"127.0.0.1:{lab.lab.ports.haproxy_api}"
    states = {}
    for pool in lab.lab.fleet.pools:
        states |= haproxy_states(api, pool)
    return states


def traffic(lab) -> TrafficGenerator:
    """Two clients through the HAProxy frontend of every pool that keeps serving while one host is out
    (a one-host pool with min_serving 0, like the lab's Outposts pool, accepts downtime by policy)."""
    urls = {f"http://127.0.0.1:{port}": lab.lab.fleet.pools[pool].model
            for pool, port in lab.lab.ports.frontends.items() if len(lab.lab.fleet.hosts_in(pool)) > 1}
    return TrafficGenerator(list(urls), urls.get, concurrency=2, max_requests=200_000, max_seconds=1200).start()


def converge(lab, release: str) -> None:
    converge_limit(lab, release, "all")


def converge_limit(lab, release: str, limit: str) -> None:
    proc = subprocess.run([Path(sys.executable).parent / "ansible-playbook", "-i", lab.inventory,
                           "playbooks/site.yml", "-e", f"bundle_file={lab_release(release)}", "--limit", limit],
                          capture_output=True, text=True, cwd=ROOT, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def on_october(lab):
    """Every lab host converged to 2026-10 and serving (site.yml, as a user would run it)."""
    if set(releases_on_hosts(lab).values()) != {"2026-10"}:
        converge(lab, "2026-10")
    assert set(releases_on_hosts(lab).values()) == {"2026-10"}
    return lab


def window_closing_soon(tmp_path: Path) -> Path:
    """The lab policy with a window that is open now and closes (cutoff included) about 40 s from now.

    The canary's predicted duration (the policy estimate, 5 s, before any history) fits; the canary
    itself takes longer than 40 s, so the next wave finds the window closed and the run pauses.
    """
    now = dt.datetime.now(dt.UTC)
    if now.second > 45:  # keep the window inside this minute's cron match
        time.sleep(61 - now.second)
        now = dt.datetime.now(dt.UTC)
    policy = yaml.safe_load(LAB_POLICY.read_text())
    policy["waves"]["estimate"] = "5s"
    policy["windows"] = [{"name": "closing", "cron": f"{now.minute} {now.hour} * * *", "timezone": "UTC",
                          "duration": f"{now.second + 50}s", "cutoff": "10s"}]
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


# The on-prem pool: the canary, then one more wave. The whole fleet rolls in `make demo` and bench/rollout.py.
HALL = "dgx-a1,dgx-a2"


def test_rollout_paused_killed_resumed_with_zero_failed_requests(on_october, tmp_path, cpu_hog):
    """A good bundle, with a busy loop on every core: no gate may cry wolf."""
    lab = on_october
    journal, reports = tmp_path / "journal.db", tmp_path / "reports"
    load = traffic(lab)
    try:
        run = fleet("patch", "run", "--release", LAB_RELEASES / "2026-11.yaml", "-i", lab.inventory, "--policy",
                    window_closing_soon(tmp_path), "--limit", HALL, "--journal", journal,
                    "--report-dir", reports / "1")
        assert run.returncode == 3, run.stdout[-3000:] + run.stderr[-3000:]
        assert "paused" in (run.stdout + run.stderr).lower()
        after_pause = releases_on_hosts(lab)
        assert after_pause["dgx-a1"] == "2026-11"
        assert list(after_pause.values()).count("2026-10") == 4, "only the canary ran before the window closed"

        killed = fleet("patch", "resume", "--journal", journal, "--ignore-window", "--report-dir", reports / "2",
                       env={"FLEET_KILL_AT": "verifying:1"})
        assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]

        refused = fleet("patch", "resume", "--journal", journal, "--ignore-window")
        assert refused.returncode == 3 and "lock" in (refused.stdout + refused.stderr).lower()

        done = fleet("patch", "resume", "--journal", journal, "--ignore-window", "--steal-lock",
                     "--report-dir", reports / "3")
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    finally:
        figures = load.stop()
    releases = releases_on_hosts(lab)
    assert (releases["dgx-a1"], releases["dgx-a2"]) == ("2026-11", "2026-11")
    assert [r for h, r in releases.items() if h not in HALL] == ["2026-10"] * 3, "--limit was honoured"
    assert set(lb_states(lab).values()) == {"serving"}
    report = json.loads((reports / "3" / "report.json").read_text())
    assert report["run"]["status"] == "done" and report["counts"] == {"done": 2}
    for host in ("dgx-a1", "dgx-a2"):  # the driver changed: DCGM and NCCL ran, against the host's own figure
        [hardware] = [g for g in report["hosts"][host]["gates"] if g["gate"] == "hardware"]
        assert hardware["verdict"] == "passed" and "before the patch" in hardware["detail"], hardware
        # only what the bundle changes was applied: the OFED, vendor repository and UPS monitor roles ran no task
        roles = {r for g in report["hosts"][host]["gates"] if g["gate"] == "ansible"
                 for r in g["measurements"].get("roles", [])}
        assert {"gpu_driver", "fabric_manager", "cuda_toolkit", "container_toolkit", "model_serving"} <= roles
        assert not roles & {"ofed", "vendor_repo", "ups_monitor", "efa"}, roles
    print(f"traffic during the rollout: {figures.as_dict()}")
    assert figures.sent > 100
    assert figures.failed == 0, f"lost requests during the rollout: {figures.failures}"


def pid1_start(lab, host: str) -> str:
    """When the host's init started (/proc/1/stat starttime, clock ticks since the machine booted): a reboot of
    the host, a container in the lab, gives a new one."""
    return lab.ssh(host, "cut -d' ' -f22 /proc/1/stat").stdout.strip()


def test_a_weights_only_bundle_applies_serving_only_and_reboots_nothing(on_october, tmp_path):
    """2026-11 -> the weights refresh -> back to 2026-11 on one host: each way the serving role is the only one
    that runs a task, and the host is not rebooted; the gates (testinfra reads the served weights path) pass."""
    lab = on_october
    host = "dgx-a1"
    if releases_on_hosts(lab)[host] != "2026-11":
        converge_limit(lab, "2026-11", host)
    started = pid1_start(lab, host)
    for release, name in ((WEIGHTS_REFRESH, "2026-11.5-weights-refresh"), (LAB_RELEASES / "2026-11.yaml", "2026-11")):
        reports = tmp_path / name
        run = fleet("patch", "run", "--release", release, "-i", lab.inventory, "--policy", LAB_POLICY, "--limit",
                    host, "--journal", tmp_path / f"{name}.db", "--report-dir", reports, "--ignore-window",
                    "--releases-dir", LAB_RELEASES)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
        report = json.loads((reports / "report.json").read_text())
        assert report["hosts"][host]["state"] == "done"
        [ansible] = [g for g in report["hosts"][host]["gates"] if g["gate"] == "ansible"]
        assert ansible["measurements"]["roles"] == ["model_serving"], ansible
        assert releases_on_hosts(lab)[host] == name
        assert pid1_start(lab, host) == started, f"{host} was rebooted for a weights-only bundle"


def test_bad_serving_release_is_caught_by_the_canary_and_rolled_back(on_october, tmp_path, cpu_hog):
    """vLLM 0.11.2 as the lab simulates it: a quarter of requests 600 ms slower; caught with a busy loop on every
    core too."""
    lab = on_october
    before = releases_on_hosts(lab)
    journal, reports = tmp_path / "journal.db", tmp_path / "reports"
    load = traffic(lab)
    try:
        run = fleet("patch", "run", "--release", SLOW, "-i", lab.inventory, "--policy", LAB_POLICY, "--limit", HALL,
                    "--journal", journal, "--report-dir", reports, "--ignore-window", "--releases-dir", LAB_RELEASES)
    finally:
        figures = load.stop()
    assert run.returncode == 1, run.stdout[-4000:] + run.stderr[-3000:]
    report = json.loads((reports / "report.json").read_text())
    canary = report["hosts"]["dgx-a1"]
    assert canary["state"] == "rolled_back"
    slo = [g for g in canary["gates"] if g["gate"] == "slo" and g["phase"] == "rollout"]
    assert slo and not slo[0]["ok"] and slo[0]["measurements"]["p99_ms"] > slo[0]["thresholds"]["p99_ms"]
    rollback_gates = [g for g in canary["gates"] if g["phase"] == "rollback"]
    assert rollback_gates and all(g["ok"] for g in rollback_gates)
    assert [w["index"] for w in report["waves"] if w["status"] != "pending"] == [0]
    assert report["hosts"]["dgx-a2"]["state"] == "pending", "no host of a later wave was touched"
    assert releases_on_hosts(lab) == before
    assert set(lb_states(lab).values()) == {"serving"}
    assert "slo" in (reports / "summary.md").read_text().lower()
    print(f"traffic during the failed canary: {figures.as_dict()}")
    assert figures.failed == 0, f"lost requests: {figures.failures}"


def test_a_release_that_follows_injected_instructions_is_caught_by_the_canary(on_october, tmp_path, cpu_hog):
    """vLLM 0.11.5 as the lab simulates it serves fast and right, and complies with a prompt injection:
    only the behaviour gate's adversarial probes can see it (with a busy loop on every core)."""
    lab = on_october
    before = releases_on_hosts(lab)
    reports = tmp_path / "reports"
    run = fleet("patch", "run", "--release", INJECTION, "-i", lab.inventory, "--policy", LAB_POLICY, "--limit",
                HALL, "--journal", tmp_path / "journal.db", "--report-dir", reports, "--ignore-window",
                "--releases-dir", LAB_RELEASES)
    assert run.returncode == 1, run.stdout[-4000:] + run.stderr[-3000:]
    canary = json.loads((reports / "report.json").read_text())["hosts"]["dgx-a1"]
    assert canary["state"] == "rolled_back"
    by_gate = {g["gate"]: g for g in canary["gates"] if g["phase"] == "rollout"}
    assert by_gate["slo"]["ok"], "fast and right: the SLO gate passes it"
    assert by_gate["behaviour"]["verdict"] == "failed" and "PWNED" in by_gate["behaviour"]["detail"]
    assert releases_on_hosts(lab) == before and set(lb_states(lab).values()) == {"serving"}


def test_an_nccl_regression_is_caught_by_the_hardware_gate_and_rolled_back(on_october, tmp_path, cpu_hog):
    """NCCL 2.28.7 as the lab simulates it: the all-reduce runs at 60 % of its bus bandwidth. DCGM passes and
    serving is as fast as ever: only the bandwidth against the host's own figure before the patch shows it."""
    lab = on_october
    before = releases_on_hosts(lab)
    reports = tmp_path / "reports"
    run = fleet("patch", "run", "--release", NCCL_REGRESSION, "-i", lab.inventory, "--policy", LAB_POLICY,
                "--limit", HALL, "--journal", tmp_path / "journal.db", "--report-dir", reports, "--ignore-window",
                "--releases-dir", LAB_RELEASES)
    assert run.returncode == 1, run.stdout[-4000:] + run.stderr[-3000:]
    canary = json.loads((reports / "report.json").read_text())["hosts"]["dgx-a1"]
    assert canary["state"] == "rolled_back"
    by_gate = {g["gate"]: g for g in canary["gates"] if g["phase"] == "rollout"}
    hardware = by_gate["hardware"]
    assert hardware["verdict"] == "failed" and "below its own" in hardware["detail"], hardware
    own = hardware["measurements"]["baseline"]["own"]
    assert own > 200 and hardware["measurements"]["nccl"]["busbw_gbps"] < 0.7 * own  # 8 A100s: about 230 GB/s
    assert hardware["measurements"]["dcgm"]["failures"] == []
    assert "slo" not in by_gate and "behaviour" not in by_gate, "a host that failed the hardware gate is not probed"
    assert releases_on_hosts(lab) == before and set(lb_states(lab).values()) == {"serving"}


def test_fabric_manager_mismatch_never_reaches_a_host(lab, tmp_path):
    journal = tmp_path / "journal.db"
    before = releases_on_hosts(lab)
    run = fleet("patch", "run", "--release", MISMATCH, "-i", lab.inventory, "--policy", LAB_POLICY,
                "--journal", journal, "--ignore-window")
    assert run.returncode == 2
    assert "fabric_manager" in run.stderr and "580.82.07" in run.stderr
    assert not journal.exists() and not (tmp_path / "ansible").exists()
    assert releases_on_hosts(lab) == before


def _bad_policy_window(tmp_path: Path) -> list[str]:
    policy = yaml.safe_load(LAB_POLICY.read_text())
    policy["windows"] = [{"name": "sat", "cron": "0 22 * * SAT", "duration": "6h", "timezone": "Europe/Berln"}]
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    return ["--policy", str(tmp_path / "policy.yaml")]


def _bad_inventory(tmp_path: Path) -> list[str]:
    (tmp_path / "inventory.yml").write_text("all:\n  hosts:\n    dgx-a1: {fleet_pool: v3-hall}\n")
    return ["--policy", str(LAB_POLICY), "-i", str(tmp_path / "inventory.yml")]


def _bad_bundle(tmp_path: Path) -> list[str]:
    bundle = yaml.safe_load((LAB_RELEASES / "2026-11.yaml").read_text())
    bundle["serving"]["image"] = "vllm/vllm-openai:latest"
    (tmp_path / "bundle.yaml").write_text(yaml.safe_dump(bundle))
    return ["--policy", str(LAB_POLICY), "--release", str(tmp_path / "bundle.yaml")]


@pytest.mark.parametrize(("case", "names"), [
    (_bad_policy_window, "windows[0].timezone"),
    (_bad_inventory, "dgx-a1"),
    (_bad_bundle, "serving.image"),
    (lambda _: ["--policy", str(LAB_POLICY), "--limit", "dgx-a1,dgx-z9"], "dgx-z9"),
], ids=["window-timezone", "inventory-vars", "bundle-image-tag", "unknown-limit-host"])
def test_bad_input_exits_2_and_no_host_is_touched(lab, tmp_path, case, names):
    before, lb_before = releases_on_hosts(lab), lb_states(lab)
    extra = case(tmp_path)
    args = {"--release": str(LAB_RELEASES / "2026-11.yaml"), "-i": str(lab.inventory)}
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        args[flag] = value
    run = fleet("patch", "run", *[x for kv in args.items() for x in kv], "--journal", tmp_path / "journal.db",
                "--ignore-window")
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert names in run.stderr
    assert not (tmp_path / "journal.db").exists() and not (tmp_path / "ansible").exists(), "no run, no Ansible"
    assert releases_on_hosts(lab) == before and lb_states(lab) == lb_before


def test_ups_on_battery_refuses_the_wave(on_october, tmp_path, clean_faults):
    lab = on_october
    before = releases_on_hosts(lab)
    target = "2026-10" if before["dgx-a1"] == "2026-11" else "2026-11"
    lab.fault("ups-a", "ups-on-battery")  # returns once upsd reports it OB
    # the hall's hosts (the canary dgx-a1 first) draw from ups-a
    run = fleet("patch", "run", "--release", lab_release(target), "-i", lab.inventory, "--policy",
                LAB_POLICY, "--limit", HALL, "--journal", tmp_path / "journal.db", "--ignore-window")
    assert run.returncode == 4, run.stdout[-3000:] + run.stderr[-2000:]
    assert "UPS ups-a is not on line power (ups.status OB" in run.stdout + run.stderr
    assert releases_on_hosts(lab) == before
    assert set(lb_states(lab).values()) == {"serving"}


def _when_state(journal: Path, host: str, state: str, then, timeout: float = 900) -> threading.Thread:
    """Calls `then()` as soon as the journal (read by another process, as `fleet patch status` does) has
    `host` in `state`; gives up after `timeout` seconds."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = None
            if journal.exists():
                with contextlib.closing(sqlite3.connect(journal, timeout=10)) as db:
                    try:
                        row = db.execute("SELECT state FROM host_states WHERE host = ? ORDER BY id DESC LIMIT 1",
                                         (host,)).fetchone()
                    except sqlite3.OperationalError:  # the file is there, its tables not yet
                        row = None
                if row and row[0] == state:
                    then()
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_host_down_during_its_wave_counts_against_the_budget(on_october, tmp_path, clean_faults):
    lab = on_october
    before = releases_on_hosts(lab)
    target = "2026-10" if before["dgx-a2"] == "2026-11" else "2026-11"
    journal, reports = tmp_path / "journal.db", tmp_path / "reports"
    # dgx-a2 goes down once the pipeline has patched and rebooted it and is checking it (wave 1)
    watcher = _when_state(journal, "dgx-a2", "verifying", lambda: lab.fault("dgx-a2", "host-down"))
    run = fleet("patch", "run", "--release", lab_release(target), "-i", lab.inventory, "--policy", LAB_POLICY,
                "--limit", HALL, "--journal", journal, "--report-dir", reports, "--ignore-window")
    watcher.join(timeout=120)
    output = run.stdout + run.stderr
    assert run.returncode == 1, output[-4000:]
    report = json.loads((reports / "report.json").read_text())
    assert report["hosts"]["dgx-a1"]["state"] == "done"
    # a host lost in its wave is a failure (unlike one unreachable at preflight, which is skipped)
    assert report["hosts"]["dgx-a2"]["state"] == "rollback_failed", report["hosts"]["dgx-a2"]
    assert [w["failures"] for w in report["waves"]] == [0, 1]
    assert "failure budget exceeded" in output and "ROLLBACK FAILED, hosts left drained: dgx-a2" in output
    assert "dgx-a2" in lab.lab.faults() and lab.lab.host_status("dgx-a2").get("state") == "down"

    # the operator repairs it: back up, it is still drained (a host that could not be restored takes no traffic)
    lab.fault("dgx-a2", "host-down", clear=True)
    assert lb_states(lab)["dgx-a2"] == "drained"
    assert releases_on_hosts(lab)["dgx-a1"] == target
    # ... and after fixing it by hand, puts it back (here: the bundle it was on, then undrain)
    converge_limit(lab, before["dgx-a2"], "dgx-a2")
    undrain = subprocess.run([Path(sys.executable).parent / "ansible-playbook", "-i", lab.inventory,
                              "playbooks/undrain.yml", "--limit", "dgx-a2"],
                             capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert undrain.returncode == 0, undrain.stdout[-3000:]
    assert set(lb_states(lab).values()) == {"serving"}
