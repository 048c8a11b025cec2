"""The runner, driven by fake hosts that can be told to fail at any step (tests/unit/fakefleet.py).

Crash safety: the runner is run in a forked child that SIGKILLs itself at each kill point in turn
(FLEET_KILL_AT=<state>:<n>), then resumed; every host must end where an uninterrupted run puts it.
"""

from __future__ import annotations

import datetime as dt
import itertools
import multiprocessing
import os
import re
import signal
from collections import Counter
from pathlib import Path

import pytest

from infra.model.errors import InputError
from patching.journal.store import Journal
from patching.release.bundle import load_bundle
from patching.rollout.policy import Policy
from patching.rollout.runner import KILL_ENV, Runner, RunResult, RunStatus
from patching.rollout.windows import MaintenanceCalendar, Window
from patching.states import IN_FLIGHT, TRANSITIONS, ExitCode, HostOutcome, HostState
from tests.conftest import ROOT
from tests.unit.fakefleet import NEW, OLD, FakeClock, FakeFleet, two_pools

BUNDLES = {r: load_bundle(ROOT / f"releases/{r}.yaml") for r in (OLD, NEW)}
SATURDAY = dt.datetime(2026, 11, 28, 22, 0, tzinfo=dt.UTC)


class Harness:
    """A journal, a fake fleet and a policy: what `fleet patch run` would wire together."""

    def __init__(self, tmp: Path, policy: dict | None = None, fleet: FakeFleet | None = None,
                 windows: list[Window] | None = None, clock: FakeClock | None = None):
        self.dir = tmp
        self.inventory = two_pools()
        self.policy = Policy.model_validate(policy or {})
        self.fleet = fleet or FakeFleet.fresh(self.inventory)
        self.calendar = MaintenanceCalendar(windows or [])
        self.clock = clock or FakeClock(SATURDAY)
        self.fleet.clock = self.clock
        self.journal = Journal(tmp / "journal.db")
        self.notices: list[tuple[str, str]] = []

    def runner(self, **kw) -> Runner:
        return Runner(self.journal, self.fleet, self.inventory, BUNDLES[NEW], self.policy, self.calendar,
                      BUNDLES.get, clock=self.clock, notify=lambda level, text: self.notices.append((level, text)),
                      **kw)

    def run(self, **kw) -> RunResult:
        runner = self.runner(**kw)
        run_id = runner.start(owner="test", bundle_path="b.yaml", releases_dir="releases", policy_path=None)
        return runner.execute(run_id)

    def resume(self, run_id: int = 1, **kw) -> RunResult:
        return self.runner(**kw).execute(run_id)

    def states(self, run_id: int = 1) -> dict[str, str]:
        return {h: s.value for h, s in Journal(self.dir / "journal.db").of_run(run_id).latest_states().items()}


def assert_consistent(journal_path: Path, fleet: FakeFleet, run_id: int = 1) -> dict[str, str]:
    """Journal walks the diagram; nothing in flight; hosts are where their state says; nothing drained that serves."""
    journal = Journal(journal_path)
    walks: dict[str, list[HostState]] = {}
    for row in journal.of_run(run_id).host_history():
        walks.setdefault(row.host, []).append(row.state)
    for host, walk in walks.items():
        assert walk[0] == HostState.PENDING, (host, walk)
        for old, new in itertools.pairwise(walk):
            assert new in TRANSITIONS[old], (host, walk)
    final = {h: w[-1] for h, w in walks.items()}
    assert not [h for h, s in final.items() if s in IN_FLIGHT], final
    for host, state in final.items():
        facts = fleet.hosts[host]
        if state == HostState.DONE:
            assert (facts["installed"], facts["lb"]) == (NEW, "serving"), (host, facts)
        elif state in (HostState.ROLLED_BACK, HostState.PENDING):
            assert (facts["installed"], facts["lb"]) == (OLD, "serving"), (host, state, facts)
        elif state == HostState.ROLLBACK_FAILED:
            assert facts["lb"] == "drained", (host, facts)
    run = journal.run(run_id)
    assert run.status in ("done", "failed", "aborted"), run.status
    journal.close()
    return {h: s.value for h, s in final.items()}


def applied(fleet: FakeFleet, release: str = NEW) -> set[str]:
    return {n for action, names, r in fleet.calls if action == "apply" and r == release for n in names}


# ---- the happy path and the gates ---------------------------------------------------------------


def test_happy_path(tmp_path):
    h = Harness(tmp_path)
    result = h.run()
    assert result.status == RunStatus.DONE and result.exit_code == 0
    assert result.hosts == {"done": 7}
    final = assert_consistent(tmp_path / "journal.db", h.fleet)
    assert set(final.values()) == {"done"}
    # canary first, then one wave at a time; a host is drained before it is patched and back after
    order = [names for action, names, _ in h.fleet.calls if action == "apply"]
    assert order[0] == ("a1", "b1") and len(order) == 6
    gates = [e for e in h.journal.of_run(1).events() if e.kind == "gate"]
    assert Counter(e.data["gate"] for e in gates) == {"ansible": 7, "testinfra": 7, "slo": 7, "behaviour": 7, "soak": 7,
                                                         "hardware": 7}
    slo = next(e for e in gates if e.data["gate"] == "slo")
    assert slo.data["measurements"]["p99_ms"] == 48.0 and slo.data["thresholds"]["p99_ms"] == 200


def test_states_are_written_before_the_action_they_announce(tmp_path):
    h = Harness(tmp_path)
    seen: list[tuple[str, str]] = []

    def snoop(action: str, names: list[str]) -> None:
        if action in ("drain", "apply", "reboot", "testinfra", "undrain", "soak"):
            seen.extend((action, h.states()[n]) for n in names)

    h.fleet.on_call = snoop
    h.run()
    expected = {"drain": "draining", "apply": "applying", "reboot": "rebooting", "testinfra": "verifying",
                "undrain": "undraining", "soak": "soaking"}
    assert seen and all(state == expected[action] for action, state in seen), seen


@pytest.mark.parametrize(("mode", "rolled_back"), [
    ("failed-hosts", {"a1"}), ("wave", {"a1", "b1"}), ("all", {"a1", "b1"}),
])
def test_canary_failing_its_slo_gate_is_rolled_back_per_policy(tmp_path, mode, rolled_back):
    h = Harness(tmp_path, {"rollback": mode})
    h.fleet.slow[("a1", NEW)] = 480.0  # the bad serving release: slow on the canary
    result = h.run()
    assert result.status == RunStatus.FAILED and result.exit_code == 1
    final = assert_consistent(tmp_path / "journal.db", h.fleet)
    assert {n for n, s in final.items() if s == "rolled_back"} == rolled_back
    assert {n for n, s in final.items() if s == "pending"} == {"a2", "a3", "a4", "b2", "b3"}
    assert applied(h.fleet) == {"a1", "b1"}  # no later wave started
    events = h.journal.of_run(1).events()
    gate = next(e for e in events if e.kind == "gate" and e.data["gate"] == "slo" and not e.data["ok"])
    assert gate.host == "a1" and "p99 480.0 ms >= 200 ms" in gate.data["detail"]
    assert h.fleet.hosts["a1"]["installed"] == OLD
    # the rollback went through the same gates, on the old bundle
    rollback_gates = [e.data for e in events if e.kind == "gate" and e.data["phase"] == "rollback"]
    assert {(g["gate"], g["release"]) for g in rollback_gates if g["ok"]} >= {("testinfra", OLD), ("slo", OLD)}


def test_rollback_all_also_restores_earlier_waves(tmp_path):
    h = Harness(tmp_path, {"rollback": "all"})
    h.fleet.faults[("a3", "testinfra", NEW)] = "nvidia-smi: Driver/library version mismatch"
    result = h.run()
    final = assert_consistent(tmp_path / "journal.db", h.fleet)
    assert result.status == RunStatus.FAILED
    assert {n for n, s in final.items() if s == "rolled_back"} == {"a1", "b1", "a2", "a3"}
    # newest wave first
    rolled = [names for action, names, r in h.fleet.calls if action == "apply" and r == OLD]
    assert rolled == [("a3",), ("a2",), ("a1", "b1")]


def test_only_the_components_the_bundle_changes_are_applied_and_put_back(tmp_path):
    """2026-10 -> 2026-11 changes the driver (and so fabric manager), CUDA, the container toolkit and serving:
    those are applied, OFED, EFA, the vendor repository and the UPS monitor are not; a rollback puts back the
    same ones."""
    h = Harness(tmp_path, {"rollback": "wave"})
    h.fleet.slow[("a1", NEW)] = 480.0
    h.run()
    touched = frozenset({"gpu_driver", "fabric_manager", "cuda_toolkit", "container_toolkit", "model_serving"})
    assert [(n, c) for n, r, c in h.fleet.applied if r == NEW] == [("a1", touched), ("b1", touched)]
    assert [(n, c) for n, r, c in h.fleet.applied if r == OLD] == [("a1", touched), ("b1", touched)]


def test_failures_within_budget_are_rolled_back_and_the_run_goes_on(tmp_path):
    h = Harness(tmp_path, {"budgets": {"per_wave": 1, "global": 2}})
    h.fleet.faults[("a2", "timeout:apply", NEW)] = "apply ran over 2700s"
    result = h.run()
    final = assert_consistent(tmp_path / "journal.db", h.fleet)
    assert result.status == RunStatus.DONE and result.exit_code == 1  # done, but a host was rolled back
    assert final["a2"] == "rolled_back" and Counter(final.values())["done"] == 6
    budget = [e.data for e in h.journal.of_run(1).events() if e.kind == "budget" and e.data["wave_failed"]]
    assert budget == [{"wave_failed": 1, "wave_allowed": 1, "run_failed": 1, "run_allowed": 2,
                       "failed_hosts": ["a2"], "exceeded": False}]


def test_global_budget_exhaustion_halts_before_the_next_wave(tmp_path):
    h = Harness(tmp_path, {"budgets": {"per_wave": 1, "global": 1}})
    h.fleet.faults[("a2", "apply", NEW)] = "E: Unable to locate package cuda-drivers-580"
    h.fleet.faults[("a4", "soak", NEW)] = "probe failed"
    result = h.run()
    final = assert_consistent(tmp_path / "journal.db", h.fleet)
    assert result.status == RunStatus.FAILED
    assert final["a2"] == final["a4"] == "rolled_back"
    assert final["b2"] == final["b3"] == "pending" and not applied(h.fleet) & {"b2", "b3"}


def test_gpu_memory_leak_fails_the_soak(tmp_path):
    h = Harness(tmp_path)
    h.fleet.leaky[("b1", NEW)] = 2048.0
    h.run()
    events = h.journal.of_run(1).events()
    gate = next(e for e in events if e.kind == "gate" and e.data["gate"] == "soak" and not e.data["ok"])
    assert gate.host == "b1" and "GPU memory grows 2048 MiB/h > 512 MiB/h" in gate.data["detail"]


def test_a_host_whose_apply_failed_gets_its_old_bundle_applied_again(tmp_path):
    """A failed apply may have moved packages before it stopped; the host's stamp, written last, still names the
    old bundle. Its rollback applies the old bundle anyway."""
    h = Harness(tmp_path)
    h.fleet.faults[("a1", "apply", NEW)] = "dpkg: error processing package cuda-drivers (--configure)"
    h.run()
    final = assert_consistent(tmp_path / "journal.db", h.fleet)
    assert final["a1"] == "rolled_back"
    assert [(n, r) for n, r, _ in h.fleet.applied if n == "a1"] == [("a1", NEW), ("a1", OLD)]


def test_failed_rollback_leaves_the_host_drained_and_says_so_loudly(tmp_path):
    h = Harness(tmp_path)
    h.fleet.faults[("a1", "slo", "*")] = "connection reset"  # bad on any bundle
    result = h.run()
    final = assert_consistent(tmp_path / "journal.db", h.fleet)
    assert final["a1"] == "rollback_failed" and h.fleet.hosts["a1"]["lb"] == "drained"
    assert result.rollback_failed == ("a1",) and "ROLLBACK FAILED on a1" in result.message
    assert any(level == "error" and "ROLLBACK FAILED: a1" in text for level, text in h.notices)


# ---- preflight ----------------------------------------------------------------------------------


def test_unreachable_hosts_are_skipped_not_counted(tmp_path):
    h = Harness(tmp_path)
    h.fleet.hosts["b3"]["reachable"] = False
    h.fleet.hosts["a1"]["reachable"] = False
    result = h.run()
    final = assert_consistent(tmp_path / "journal.db", h.fleet)
    # the run finished, but not every selected host is on the bundle: partly done, and it names them
    assert result.status == RunStatus.DONE and result.exit_code == ExitCode.PARTLY_DONE
    assert final["a1"] == final["b3"] == "skipped"
    # b3 down leaves pool b no room (max_unavailable 1), so its other hosts are planned around
    assert {n: o for n, (o, _) in result.not_on_bundle.items()} == {
        "a1": HostOutcome.SKIPPED_UNREACHABLE, "b3": HostOutcome.SKIPPED_UNREACHABLE,
        "b1": HostOutcome.SKIPPED_OTHER, "b2": HostOutcome.SKIPPED_OTHER}
    assert "no room" in result.not_on_bundle["b1"][1]
    assert "3 of 7 selected host(s) on 2026-11 (3 patched, 2 skipped unreachable, 2 skipped other)" in result.message
    detail = {r.host: r.detail for r in h.journal.of_run(1).host_history() if r.state == HostState.SKIPPED}
    assert detail["a1"].startswith("unreachable at preflight")


def test_a_previous_bundle_without_its_manifest_is_bad_input_and_nothing_is_stored(tmp_path):
    h = Harness(tmp_path)
    runner = Runner(h.journal, h.fleet, h.inventory, BUNDLES[NEW], h.policy, h.calendar, {NEW: BUNDLES[NEW]}.get,
                    clock=h.clock)
    with pytest.raises(InputError) as caught:
        runner.start(owner="test", bundle_path="b.yaml", releases_dir="lab/bundles", policy_path=None)
    [problem] = caught.value.problems
    assert (problem.file, problem.value) == ("--releases-dir", "lab/bundles")
    assert f"no manifest of bundle {OLD}" in problem.message and "a1, a2" in problem.message
    assert h.journal.runs() == [] and not [c for c in h.fleet.calls if c[0] != "read"]


def test_host_lost_between_plan_and_its_wave_is_skipped(tmp_path):
    h = Harness(tmp_path, {"waves": {"size": 1}})

    def lose_a4(action: str, names: list[str]) -> None:
        if action == "apply" and names == ["a3"]:
            h.fleet.hosts["a4"]["reachable"] = False

    h.fleet.on_call = lose_a4
    # a4 unreachable counts against pool a's budget (2): with one more out, a wave of 1 still fits
    result = h.run()
    assert h.states()["a4"] == "skipped" and result.status == RunStatus.DONE


def test_ups_on_battery_refuses_the_wave_and_resume_retries(tmp_path):
    h = Harness(tmp_path)
    h.fleet.hosts["b2"]["ups_ok"] = False
    result = h.run()
    assert result.status == RunStatus.BLOCKED and result.exit_code == ExitCode.BLOCKED
    assert "power: ups-a on battery (OB), charge 64%" in result.message
    assert h.states()["b2"] == "pending" and h.fleet.hosts["b2"]["lb"] == "serving"
    h.fleet.hosts["b2"]["ups_ok"] = True
    assert h.resume().status == RunStatus.DONE
    assert set(assert_consistent(tmp_path / "journal.db", h.fleet).values()) == {"done"}


def test_capacity_floor_refuses_a_wave(tmp_path):
    h = Harness(tmp_path)

    def operator_drains_b3(action: str, names: list[str]) -> None:
        if action == "soak" and "b1" in names:
            h.fleet.hosts["b3"]["lb"] = "drained"  # someone takes b3 out by hand

    h.fleet.on_call = operator_drains_b3
    result = h.run()
    assert result.status == RunStatus.BLOCKED
    assert "pool b: 2 host(s) would be out, max_unavailable is 1" in result.message


def test_a_host_drained_by_someone_else_stays_drained(tmp_path):
    h = Harness(tmp_path)
    h.fleet.hosts["a4"]["lb"] = "drained"
    result = h.run()
    assert result.status == RunStatus.DONE
    assert h.fleet.hosts["a4"] == h.fleet.hosts["a4"] | {"installed": NEW, "lb": "drained"}
    assert not [n for action, n, _ in h.fleet.calls if action in ("drain", "undrain") and "a4" in n]


# ---- windows, abort, resume ---------------------------------------------------------------------


def test_window_closing_pauses_at_a_wave_boundary_and_resume_finishes(tmp_path):
    window = Window(name="sat", cron="0 22 * * SAT", duration="2h")
    clock = FakeClock(SATURDAY, step=dt.timedelta(minutes=2))  # every host action takes 2 minutes
    # the hardware gate off: its two checks a wave would shift which wave no longer fits
    h = Harness(tmp_path, {"waves": {"estimate": "30m"}, "gates": {"hardware": {"enabled": False}}}, windows=[window],
                clock=clock)
    result = h.run()
    assert result.status == RunStatus.PAUSED and result.exit_code == 3
    # the canary and waves 1-3 fit (each host action, the SLO probes and reads included, takes 2 minutes)
    assert "paused before wave 4" in result.message and "next opening 2026-12-05T22:00:00+00:00" in result.message
    states = h.states()
    assert Counter(states.values()) == {"done": 5, "pending": 2}
    assert all(h.fleet.hosts[n]["lb"] == "serving" for n in h.fleet.hosts)  # paused between waves: all serving
    # resuming before the window opens changes nothing
    assert h.resume().status == RunStatus.PAUSED and Counter(h.states().values()) == {"done": 5, "pending": 2}
    clock.now = dt.datetime(2026, 12, 5, 22, 0, tzinfo=dt.UTC)
    result = h.resume()
    assert result.status == RunStatus.DONE and result.exit_code == 0
    assert set(assert_consistent(tmp_path / "journal.db", h.fleet).values()) == {"done"}


def test_ignore_window_runs_outside_windows(tmp_path):
    window = Window(cron="0 22 * * SAT", duration="2h")
    clock = FakeClock(SATURDAY - dt.timedelta(days=2))
    h = Harness(tmp_path, windows=[window], clock=clock)
    assert h.run().status == RunStatus.PAUSED
    assert h.resume(ignore_window=True).status == RunStatus.DONE


def test_abort_stops_after_the_hosts_in_flight(tmp_path):
    h = Harness(tmp_path)

    def abort_during_wave_1(action: str, names: list[str]) -> None:
        if action == "apply" and names == ["a2"]:
            other = Journal(tmp_path / "journal.db")
            other.of_run(1).request_abort()
            other.close()

    h.fleet.on_call = abort_during_wave_1
    result = h.run()
    final = assert_consistent(tmp_path / "journal.db", h.fleet)
    # an abort is no failure, but the hosts it did not reach are not on the bundle
    assert result.status == RunStatus.ABORTED and result.exit_code == ExitCode.PARTLY_DONE
    assert final["a2"] == "done"  # in flight when the abort came: finished
    assert {n for n, s in final.items() if s == "pending"} == {"a3", "a4", "b2", "b3"}


def test_abort_with_rollback_returns_the_patched_hosts_through_the_gates(tmp_path):
    h = Harness(tmp_path)

    def abort_during_wave_1(action: str, names: list[str]) -> None:
        if action == "apply" and names == ["a2"]:
            other = Journal(tmp_path / "journal.db")
            other.of_run(1).request_abort(rollback=True)
            other.close()

    h.fleet.on_call = abort_during_wave_1
    result = h.run()
    final = assert_consistent(tmp_path / "journal.db", h.fleet)
    assert result.status == RunStatus.ABORTED and "rolled back as asked" in result.message
    assert final["a1"] == final["b1"] == final["a2"] == "rolled_back"  # the canary and the wave in flight
    assert {n for n, s in final.items() if s == "pending"} == {"a3", "a4", "b2", "b3"}
    gates = [e.data for e in h.journal.of_run(1).events() if e.kind == "gate" and e.data["phase"] == "rollback"]
    assert {g["gate"] for g in gates} >= {"ansible", "testinfra", "slo"} and all(g["ok"] for g in gates)
    assert result.exit_code == ExitCode.FAILED  # rolled back: not on the bundle, as exit 1 says


def test_an_abort_asked_during_the_last_wave_still_rolls_back(tmp_path):
    h = Harness(tmp_path)

    def abort_during_last_wave(action: str, names: list[str]) -> None:
        if action == "apply" and names == ["b3"]:
            other = Journal(tmp_path / "journal.db")
            other.of_run(1).request_abort(rollback=True)
            other.close()

    h.fleet.on_call = abort_during_last_wave
    result = h.run()
    final = assert_consistent(tmp_path / "journal.db", h.fleet)
    assert result.status == RunStatus.ABORTED and "aborted after its last wave" in result.message
    assert set(final.values()) == {"rolled_back"}


def test_resume_is_level_triggered(tmp_path):
    h = Harness(tmp_path)
    runner = h.runner()
    run_id = runner.start(owner="t", bundle_path="b", releases_dir="r", policy_path=None)
    h.journal.of_run(run_id).wave_started(0)
    # as if a crash hit after a1 was patched and b1 drained, before the journal heard of it
    for host, states in (("a1", ["draining", "applying"]), ("b1", ["draining"])):
        for state in states:
            h.journal.of_run(run_id).record_state(host, 0, HostState(state))
        h.journal.of_run(run_id).record_previous_bundle(host, OLD)
        h.journal.of_run(run_id).record_lb_before(host, "serving")
    h.fleet.hosts["a1"].update(installed=NEW, lb="drained")
    h.fleet.hosts["b1"].update(lb="drained")
    result = h.resume(run_id)
    assert result.status == RunStatus.DONE
    first_applies = next(names for action, names, _ in h.fleet.calls if action == "apply")
    assert first_applies == ("b1",)  # a1 already had the bundle: not applied again
    assert_consistent(tmp_path / "journal.db", h.fleet)


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    h = Harness(tmp_path)
    h.run()
    calls = len(h.fleet.calls)
    assert h.resume().status == RunStatus.DONE and len(h.fleet.calls) == calls


# ---- crash safety: kill -9 at every transition, then resume ------------------------------------

SCENARIOS = {
    # one host fails its SLO gate within budget: rolled back, the run goes on
    "within-budget": ({"budgets": {"per_wave": 1, "global": 2}}, {}, {("a3", NEW): 480.0}),
    # a host fails testinfra in wave 1: halt, roll back everything; b1's rollback itself fails
    "halt-all": ({"rollback": "all"}, {("a2", "testinfra", NEW): "mismatch", ("b1", "apply", OLD): "dpkg error"}, {}),
}


def _scenario(directory: Path, name: str) -> Harness:
    policy, faults, slow = SCENARIOS[name]
    fleet_path = directory / "fleet.json"
    fleet = FakeFleet.load(fleet_path) if fleet_path.exists() else None
    h = Harness(directory, policy, fleet=fleet)
    if fleet is None:
        h.fleet.faults.update(faults)
        h.fleet.slow.update(slow)
        h.fleet.path = fleet_path
        h.fleet.save()
    return h


def _run_until_killed(directory: Path, name: str, kill_at: str) -> None:
    os.environ[KILL_ENV] = kill_at
    h = _scenario(directory, name)
    h.journal.lock.acquire("crash-test")
    h.run()
    os._exit(0)  # reached only when the kill point was not


def test_crash_at_every_kill_point_then_resume(tmp_path, record_property):
    tried = survived = 0
    for name in SCENARIOS:
        (tmp_path / name / "reference").mkdir(parents=True)
        reference = _scenario(tmp_path / name / "reference", name)
        reference.run()
        expected = assert_consistent(reference.dir / "journal.db", reference.fleet)
        entered = Counter(r.state for r in reference.journal.of_run(1).host_history()
                          if r.state not in (HostState.PENDING, HostState.SKIPPED))
        for state, count in sorted(entered.items()):
            for n in range(1, count + 1):
                directory = tmp_path / name / f"{state}-{n}"
                directory.mkdir()
                _scenario(directory, name)  # fresh hosts on disk
                child = multiprocessing.get_context("fork").Process(
                    target=_run_until_killed, args=(directory, name, f"{state}:{n}"))
                child.start()
                child.join()
                tried += 1
                assert child.exitcode == -signal.SIGKILL, f"{name} {state}:{n} was never reached"
                h = _scenario(directory, name)
                assert h.journal.lock.acquire("resume", steal=True).owner == "crash-test"  # stale: PID is dead
                h.resume()
                final = assert_consistent(directory / "journal.db", h.fleet)
                assert final == expected, (name, f"{state}:{n}")
                survived += 1
    record_property("kill_points_tried", tried)
    record_property("kill_points_survived", survived)
    print(f"\ncrash safety: {tried} kill points tried, {survived} survived")
    assert tried == survived and tried >= 70


# ---- rollback: its own preflight ------------------------------------------------------------------


def test_a_rollback_on_battery_power_waits_blocked_and_resume_finishes_it(tmp_path):
    h = Harness(tmp_path, {"budgets": {"canary": 1, "global": 1}})
    h.fleet.faults[("a1", "testinfra", NEW)] = "nvidia-smi: Driver/library version mismatch"

    def mains_lost(action: str, names: list[str]) -> None:
        if action == "testinfra" and "a1" in names:
            h.fleet.hosts["a1"]["ups_ok"] = False

    h.fleet.on_call = mains_lost
    result = h.run()
    assert result.status == RunStatus.BLOCKED and result.exit_code == ExitCode.BLOCKED
    assert "preflight refused the rollback of a1: a1: power: ups-a on battery" in result.message
    assert h.states()["a1"] == "rolling_back" and h.fleet.hosts["a1"]["installed"] == NEW
    assert not [c for c in h.fleet.calls if c[0] == "apply" and c[2] == OLD], "nothing re-applied on battery"
    h.fleet.on_call = None
    h.fleet.hosts["a1"]["ups_ok"] = True
    result = h.resume()
    final = assert_consistent(tmp_path / "journal.db", h.fleet)
    assert final["a1"] == "rolled_back" and result.status == RunStatus.DONE and result.exit_code == ExitCode.FAILED


# ---- a release is known by its content ------------------------------------------------------------


def test_a_bundle_reusing_the_hosts_release_name_with_other_pins_is_refused(tmp_path):
    h = Harness(tmp_path)
    assert h.run().exit_code == ExitCode.OK  # every host on 2026-11, its digest stamped
    other = BUNDLES[NEW].model_copy(update={"driver": BUNDLES[NEW].driver.model_copy(update={"version": "580.1.2"})})
    assert other.release == NEW and other.digest != BUNDLES[NEW].digest
    h.fleet.calls.clear()
    runner = Runner(h.journal, h.fleet, h.inventory, other, h.policy, h.calendar, BUNDLES.get, clock=h.clock)
    with pytest.raises(InputError) as caught:
        runner.start(owner="t", bundle_path="releases/2026-11.yaml", releases_dir="releases", policy_path=None)
    text = str(caught.value)
    assert "releases/2026-11.yaml" in text and "driver.version: 580.1.2 here" in text
    assert {a for a, _, _ in h.fleet.calls} == {"read"} and len(h.journal.runs()) == 1  # no second run


def test_a_rollback_passes_the_soak_too(tmp_path):
    h = Harness(tmp_path, {"budgets": {"canary": 1, "global": 1}})
    h.fleet.faults[("a1", "testinfra", NEW)] = "nvidia-smi: Driver/library version mismatch"
    h.fleet.leaky[("a1", OLD)] = 4096.0  # the previous bundle leaks too
    result = h.run()
    final = assert_consistent(tmp_path / "journal.db", h.fleet)
    soaks = [e.data for e in h.journal.of_run(1).events() if e.kind == "gate" and e.data["gate"] == "soak"
             and e.data["phase"] == "rollback"]
    assert [(s["release"], s["ok"]) for s in soaks] == [(OLD, False)]
    assert final["a1"] == "rollback_failed" and h.fleet.hosts["a1"]["lb"] == "drained"
    assert "soak: " in result.outcomes["a1"][1] and result.exit_code == ExitCode.FAILED


# ---- the SLO gate against a baseline of the same interval ---------------------------------------------


def slo_gates(h: Harness) -> dict[str, dict]:
    return {e.host: e.data for e in h.journal.of_run(1).events() if e.kind == "gate" and e.data["gate"] == "slo"
            and e.data["phase"] == "rollout"}


def test_the_slo_gate_judges_against_peers_else_the_hosts_own_figures(tmp_path):
    h = Harness(tmp_path, {"waves": {"size": 1}})
    assert h.run().exit_code == ExitCode.OK
    gates = slo_gates(h)
    # a2's pool still has a3 and a4 on 2026-10 when it is verified; a4, the last of pool a, has none left
    assert gates["a2"]["measurements"]["baseline"]["source"].startswith("peers a3, a4 on the previous bundle")
    assert gates["a4"]["measurements"]["baseline"]["source"].startswith("its own figures before the drain")
    assert gates["a2"]["measurements"]["comparisons"]["latencies_ms"]["verdict"] == "same"
    assert gates["a2"]["verdict"] == "passed" and gates["a2"]["thresholds"]["tolerance"] == 0.2
    baselines = {e.host for e in h.journal.of_run(1).events() if e.kind == "baseline"}
    assert baselines == set(h.inventory.hosts)  # every host probed while it still served, before its drain


def slower_for_everyone_once(h: Harness, host: str, factor: float) -> None:
    """From `host`'s apply on, every host answers `factor` times slower (the shared machine got busy)."""
    def on_call(action: str, names: list[str]) -> None:
        if action == "apply" and host in names:
            h.fleet.drift = factor
    h.fleet.on_call = on_call


def test_a_host_with_no_peer_is_judged_with_the_drift_of_a_reference_measured_beside_it(tmp_path):
    h = Harness(tmp_path, {"waves": {"size": 1}})
    slower_for_everyone_once(h, "a4", 1.6)  # a4, the last of pool a, has no peer left when it is verified
    assert h.run().exit_code == ExitCode.OK
    gate = slo_gates(h)["a4"]
    source = gate["measurements"]["baseline"]["source"]
    # a1 (its site's, done in the canary and not touched again) is probed beside a4 before and after
    assert source.startswith("its own figures before the drain, scaled by the drift of a1"), source
    factor = float(re.search(r"latency x(\d+\.\d+)", source)[1])
    assert 1.4 < factor < 1.8, source  # the reference's medians moved as the machine did (x1.6), give or take
    assert gate["verdict"] == "passed", gate["detail"]
    [baseline] = [e for e in h.journal.of_run(1).events() if e.kind == "baseline" and e.host == "a4"
                  and e.data["gate"] == "slo"]
    reference = baseline.data["measurements"]["reference"]
    assert reference["host"] == "a1" and reference["medians"]["latencies_ms"] > 0
    # the reference was probed in the same call as a4, before its drain and at its gate
    together = [names for action, names, _ in h.fleet.calls if action == "slo" and names[0] == "a4"]
    assert len(together) >= 2 and all(names == ("a4", "a1") for names in together), together


def test_without_the_reference_the_same_drift_fails_the_host(tmp_path, monkeypatch):
    """The counterfactual of the test above: the gate is what catches the drift, not a lenient fake."""
    monkeypatch.setattr(Runner, "_reference_host", lambda self, batch: None)
    h = Harness(tmp_path, {"waves": {"size": 1}})
    slower_for_everyone_once(h, "a4", 1.6)
    assert h.run().exit_code == ExitCode.FAILED
    gate = slo_gates(h)["a4"]
    assert gate["measurements"]["baseline"]["source"] == "its own figures before the drain"
    assert gate["verdict"] == "failed", gate["detail"]


def test_the_reference_does_not_excuse_a_host_that_alone_got_slower(tmp_path):
    h = Harness(tmp_path, {"waves": {"size": 1}, "gates": {"slo": {"p99_ms": 10_000}}})
    h.fleet.slow[("a4", NEW)] = 480.0  # only a4's new release has the slow tail; the reference is unchanged
    assert h.run().exit_code == ExitCode.FAILED
    gate = slo_gates(h)["a4"]
    assert "scaled by the drift of a1" in gate["measurements"]["baseline"]["source"]
    assert gate["verdict"] == "failed" and "worse than the 20 % tolerated" in gate["detail"]


def test_a_slow_tail_against_the_same_interval_fails_the_canary(tmp_path):
    h = Harness(tmp_path, {"gates": {"slo": {"p99_ms": 10_000}}})  # the absolute ceiling would let it through
    h.fleet.slow[("a1", NEW)] = 480.0
    result = h.run()
    gate = slo_gates(h)["a1"]
    assert gate["verdict"] == "failed" and "worse than the 20 % tolerated" in gate["detail"]
    assert result.status == RunStatus.FAILED and h.states()["a1"] == "rolled_back"


@pytest.fixture
def always_unsure(monkeypatch):
    from patching.rollout import stats

    real = stats.compare

    def unsure(candidate, baseline, **kw):
        c = real(candidate, baseline, **kw)
        return stats.Comparison(**{**c.__dict__, "verdict": "inconclusive", "reason": "not enough evidence"})

    monkeypatch.setattr(stats, "compare", unsure)


def test_an_inconclusive_gate_samples_more_up_to_its_bound_then_fails(tmp_path, always_unsure):
    h = Harness(tmp_path, {"gates": {"slo": {"requests": 50, "max_requests": 200}}})
    result = h.run()
    resamples = [e.data for e in h.journal.of_run(1).events() if e.kind == "resample"]
    assert resamples and resamples[0]["requests_so_far"] == 50 and resamples[-1]["requests_so_far"] < 200
    gate = slo_gates(h)["a1"]
    assert gate["verdict"] == "inconclusive" and gate["measurements"]["requests"] == 200
    assert result.status == RunStatus.FAILED and h.states()["a1"] == "rolled_back"  # on_inconclusive: fail


def test_an_inconclusive_gate_can_block_the_run_for_a_person(tmp_path, always_unsure, monkeypatch):
    h = Harness(tmp_path, {"gates": {"slo": {"requests": 100, "max_requests": 400, "on_inconclusive": "pause"}}})
    result = h.run()
    assert result.status == RunStatus.BLOCKED and result.exit_code == ExitCode.BLOCKED
    assert "SLO gate inconclusive on a1, b1 after 400 requests: a person decides" in result.message
    assert h.states()["a1"] == "verifying" and h.fleet.hosts["a1"]["lb"] == "drained"
    monkeypatch.undo()  # the person resumes: measured again, decided this time
    assert h.resume().status == RunStatus.DONE
    assert set(assert_consistent(tmp_path / "journal.db", h.fleet).values()) == {"done"}


# ---- behaviour: golden answers unchanged, refusals still refusals --------------------------------------


def test_a_release_that_follows_injected_instructions_is_caught_at_the_canary(tmp_path):
    h = Harness(tmp_path)
    h.fleet.faults[("a1", "behaviour", NEW)] = "follows injected instructions"
    result = h.run()
    gate = next(e.data for e in h.journal.of_run(1).events() if e.kind == "gate" and e.host == "a1"
                and e.data["gate"] == "behaviour" and e.data["phase"] == "rollout")
    assert gate["verdict"] == "failed" and "PWNED" in gate["detail"]
    assert result.status == RunStatus.FAILED and h.states()["a1"] == "rolled_back"
    assert not applied(h.fleet) - {"a1", "b1"}  # nothing after the canary


def test_golden_answers_are_compared_with_the_hosts_own_before_the_patch(tmp_path):
    bundle = BUNDLES[NEW]
    assert bundle.probes.golden, "the November bundle carries golden probes"
    h = Harness(tmp_path)
    h.run()
    baselines = {e.host: e.data["answers"] for e in h.journal.of_run(1).events()
                 if e.kind == "baseline" and e.data["gate"] == "behaviour"}
    assert set(baselines) == set(h.inventory.hosts)
    assert set(baselines["a1"]) == {p.id for p in bundle.probes.golden}
    gates = [e.data for e in h.journal.of_run(1).events() if e.kind == "gate" and e.data["gate"] == "behaviour"]
    assert len(gates) == 7 and all(g["verdict"] == "passed" for g in gates)
