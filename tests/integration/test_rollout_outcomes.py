"""Honest outcomes on the lab (issue 12): a run never reports a success it did not achieve.

A relative `-i` from another directory reads the hosts (ansible-runner works elsewhere); the approved
plan is what runs; a run whose hosts are all unreachable, or whose load balancer API is down, is
"nothing done" (exit 6) with every host named; a host lost mid-run does not trip the percent budget;
a runner whose lock was stolen writes nothing more.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import LAB_RELEASES, lab_release
from tests.integration.test_rollout import (
    HALL,
    LAB_POLICY,
    SLOW,
    _when_state,
    converge,
    fleet,
    lb_states,
    releases_on_hosts,
)

ROOT = Path(__file__).resolve().parents[2]
FLEET = str(Path(sys.executable).parent / "fleet")
OUTPOST = "r1-outpost-0"  # a pool of its own (min_serving 0): patching it never takes a pool below its floor


@pytest.fixture(scope="module")
def converged(lab):
    """Every lab host on one bundle and serving."""
    releases = releases_on_hosts(lab)
    if len(set(releases.values())) != 1 or None in releases.values():
        converge(lab, "2026-10")
    return lab


def other_release(lab, host: str) -> str:
    return "2026-10" if releases_on_hosts(lab)[host] == "2026-11" else "2026-11"


def policy_with(tmp_path: Path, **changes) -> Path:
    policy = yaml.safe_load(LAB_POLICY.read_text())
    for dotted, value in changes.items():
        where = policy
        *parents, leaf = dotted.split("__")
        for key in parents:
            where = where.setdefault(key, {})
        where[leaf] = value
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def test_relative_inventory_from_another_directory_and_the_approved_plan(converged, tmp_path):
    lab = converged
    target = other_release(lab, OUTPOST)
    before = releases_on_hosts(lab)[OUTPOST]
    where, relative = lab.inventory.parent, lab.inventory.name  # e.g. /tmp/fleet-lab-tests, "inventory"
    plan_file, journal = tmp_path / "plan.json", tmp_path / "journal.db"
    common = ["--release", lab_release(target), "-i", relative, "--policy", LAB_POLICY,
              "--limit", OUTPOST, "--journal", journal]
    planned = subprocess.run([FLEET, "plan", *map(str, common), "-o", str(plan_file)], capture_output=True,
                             text=True, cwd=where, timeout=600)
    assert planned.returncode == 0, planned.stdout[-3000:] + planned.stderr[-3000:]
    plan = json.loads(plan_file.read_text())
    # read from the host through ansible-runner, though its working directory is not ours
    assert plan["seen"][OUTPOST]["reachable"] and plan["seen"][OUTPOST]["release"] == before, plan["seen"]
    assert plan["hosts"][OUTPOST]["current"] == before and f"{before}" in planned.stdout

    run = subprocess.run([FLEET, "patch", "run", *map(str, common), "--plan", str(plan_file), "--ignore-window",
                          "--report-dir", str(tmp_path / "reports")], capture_output=True, text=True, cwd=where,
                         timeout=1500)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    with contextlib.closing(sqlite3.connect(journal)) as db:
        [(stored,)] = db.execute("SELECT plan_json FROM runs").fetchall()
    assert json.loads(stored) == plan, "the run executed the approved plan, not a new one"
    assert releases_on_hosts(lab)[OUTPOST] == target

    # the fleet changed since the plan (the host now runs `target`): the same plan is refused, nothing touched
    again = subprocess.run([FLEET, "patch", "run", *map(str, common), "--plan", str(plan_file),
                            "--ignore-window"], capture_output=True, text=True, cwd=where, timeout=600)
    assert again.returncode == 2, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{OUTPOST} ran {before} when planned and runs {target} now" in again.stderr


def test_every_host_unreachable_is_nothing_done(converged, tmp_path, clean_faults):
    lab = converged
    target = other_release(lab, OUTPOST)
    lab.fault(OUTPOST, "host-down")
    run = fleet("patch", "run", "--release", lab_release(target), "-i", lab.inventory, "--policy", LAB_POLICY,
                "--limit", OUTPOST, "--journal", tmp_path / "journal.db", "--ignore-window",
                "--report-dir", tmp_path / "reports")
    out = run.stdout + run.stderr
    assert run.returncode == 6, out[-4000:]
    assert "0 of 1 selected host(s)" in out and f"{OUTPOST}: skipped unreachable: unreachable at preflight" in out
    assert "exit 6: nothing done" in out
    summary = (tmp_path / "reports/summary.md").read_text()
    assert "## Not on the bundle (1 of 1)" in summary and OUTPOST in summary


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_load_balancer_api_down_is_nothing_done_and_names_every_host(converged, tmp_path):
    lab = converged
    target = other_release(lab, "dgx-a1")
    inventory = tmp_path / "inventory"
    shutil.copytree(lab.inventory, inventory)
    hosts = inventory / "hosts.yml"
    data = yaml.safe_load(hosts.read_text())
    down = f"127.0.0.1:{_closed_port()}"  # HAProxy's runtime API answering nothing
    for var in data["all"]["hosts"].values():
        if var.get("fleet_lb", {}).get("kind") == "haproxy":
            var["fleet_lb"]["api"] = down
    hosts.write_text(yaml.safe_dump(data))
    before = releases_on_hosts(lab)
    run = fleet("patch", "run", "--release", lab_release(target), "-i", inventory, "--policy", LAB_POLICY,
                "--limit", HALL, "--journal", tmp_path / "journal.db", "--ignore-window",
                "--report-dir", tmp_path / "reports")
    out = run.stdout + run.stderr
    assert run.returncode == 6, out[-4000:]
    report = json.loads((tmp_path / "reports/report.json").read_text())
    assert {n: h["outcome"] for n, h in report["hosts"].items()} == {
        "dgx-a1": "skipped_other", "dgx-a2": "skipped_other"}
    assert "has no room" in report["hosts"]["dgx-a1"]["detail"]
    assert "dgx-a1: skipped other" in out and "dgx-a2: skipped other" in out
    assert releases_on_hosts(lab) == before and set(lb_states(lab).values()) == {"serving"}


def test_a_host_lost_mid_run_does_not_trip_the_percent_budget(converged, tmp_path, clean_faults):
    # two planned hosts, global 50%: one failure allowed. The canary fails (the slow serving release) and
    # is rolled back; then the other host is lost before its wave. Were the base the hosts still counted
    # (1), 50% would allow none and the run would halt on a budget with no new failure.
    lab = converged
    policy = policy_with(tmp_path, budgets__canary=1, budgets__global="50%", gates__soak__duration="0s")
    journal, reports = tmp_path / "journal.db", tmp_path / "reports"
    watcher = _when_state(journal, "dgx-a1", "rolling_back", lambda: lab.fault(OUTPOST, "host-down"))
    run = fleet("patch", "run", "--release", SLOW, "-i", lab.inventory, "--policy", policy,
                "--limit", f"dgx-a1,{OUTPOST}", "--journal", journal, "--ignore-window", "--report-dir", reports,
                "--releases-dir", LAB_RELEASES)  # where 2026-10, the rollback target, is
    watcher.join(timeout=60)
    out = run.stdout + run.stderr
    assert (reports / "report.json").exists(), out[-4000:]
    report = json.loads((reports / "report.json").read_text())
    assert report["hosts"]["dgx-a1"]["state"] == "rolled_back", out[-4000:]
    assert report["hosts"][OUTPOST]["outcome"] == "skipped_unreachable", report["hosts"][OUTPOST]
    assert "failure budget exceeded" not in out and report["run"]["stop_reason"] is None
    with contextlib.closing(sqlite3.connect(journal)) as db:
        budgets = [json.loads(d) for (d,) in db.execute("SELECT data FROM events WHERE kind = 'budget'")]
    assert budgets and {b["run_allowed"] for b in budgets} == {1} and not any(b["exceeded"] for b in budgets)
    assert run.returncode == 1  # a host was rolled back: failed, not a budget halt


def test_a_runner_whose_lock_was_stolen_writes_nothing_more(converged, tmp_path):
    lab = converged
    target = other_release(lab, "dgx-a1")
    policy = policy_with(tmp_path, timeouts__lock_stale="5s", gates__soak__duration="20s",
                         gates__soak__probe_interval="2s")
    journal = tmp_path / "journal.db"
    first = subprocess.Popen([FLEET, "patch", "run", "--release", lab_release(target), "-i", str(lab.inventory),
                              "--policy", str(policy), "--limit", HALL, "--journal", str(journal),
                              "--ignore-window"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT, start_new_session=True)
    stopped = _when_state(journal, "dgx-a1", "soaking", lambda: os.killpg(first.pid, signal.SIGSTOP))
    stopped.join(timeout=900)
    try:
        time.sleep(8)  # no heartbeat for longer than lock_stale: stale
        second = fleet("patch", "resume", "--journal", journal, "--steal-lock", "--ignore-window")
        assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-3000:]
        assert "took the stale journal lock" in second.stderr
        with contextlib.closing(sqlite3.connect(journal)) as db:
            rows_after_takeover = db.execute("SELECT (SELECT COUNT(*) FROM host_states) + "
                                             "(SELECT COUNT(*) FROM events)").fetchone()[0]
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 3, out[-3000:] + err[-3000:]
    assert "lock" in err.lower()
    with contextlib.closing(sqlite3.connect(journal)) as db:
        rows_now = db.execute("SELECT (SELECT COUNT(*) FROM host_states) + (SELECT COUNT(*) FROM events)").fetchone()[0]
        status = db.execute("SELECT status FROM runs").fetchone()[0]
    assert rows_now == rows_after_takeover, "the fenced runner wrote after its lock was taken"
    assert status == "done" and releases_on_hosts(lab)["dgx-a1"] == releases_on_hosts(lab)["dgx-a2"] == target
