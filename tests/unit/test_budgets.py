"""The failure-budget counting rules of docs/policy.md ("budgets"), one test each."""

from __future__ import annotations

import pytest

from infra.model.errors import InputError
from patching.rollout.budgets import check_budgets
from patching.rollout.policy import Policy, parse_policy, required_hosts
from patching.states import ExitCode, HostState, RunStatus, StopReason
from tests.unit.fakefleet import NEW
from tests.unit.test_runner import Harness, applied, assert_consistent


def _policy(**budgets) -> Policy:
    return Policy.model_validate({"budgets": budgets})


# ---- rule 1: the bases are the planned counts; percentages round down -----------------------------------


def test_percent_budgets_are_of_the_planned_counts_rounded_down():
    check = check_budgets(_policy(per_wave="25%", **{"global": "20%"}), canary=False, wave_hosts=5,
                          wave_failed=["a"], run_hosts=10, run_failed=1)
    assert (check.wave_allowed, check.run_allowed) == (1, 2) and not check.exceeded
    check = check_budgets(_policy(per_wave="10%"), canary=False, wave_hosts=5, wave_failed=["a"],
                          run_hosts=10, run_failed=1)
    assert check.wave_allowed == 0 and check.exceeded  # 10% of 5 tolerates no failure


def test_the_canary_wave_has_its_own_budget():
    policy = _policy(canary=0, per_wave=3, **{"global": 5})
    assert check_budgets(policy, canary=True, wave_hosts=2, wave_failed=["a"], run_hosts=10, run_failed=1).exceeded
    assert not check_budgets(policy, canary=False, wave_hosts=2, wave_failed=["a"], run_hosts=10,
                             run_failed=1).exceeded


def test_a_healthy_host_lost_later_does_not_shrink_the_global_base(tmp_path):
    # 7 planned hosts, 30% -> 2 failures allowed over the run. a2 and a3 fail in their waves; a4, healthy,
    # is unreachable at its wave's preflight. With the base taken from the hosts still counted (6),
    # 30% would allow 1 and the run would halt with no new failure.
    h = Harness(tmp_path, {"waves": {"size": 1}, "budgets": {"per_wave": 1, "global": "30%"}})
    h.fleet.faults[("a2", "apply", NEW)] = "E: Unable to locate package cuda-drivers-580"
    h.fleet.faults[("a3", "apply", NEW)] = "E: Sub-process /usr/bin/dpkg returned an error code (1)"

    def lose_a4(action: str, names: list[str]) -> None:
        if action == "apply" and names == ["a3"]:
            h.fleet.hosts["a4"]["reachable"] = False

    h.fleet.on_call = lose_a4
    result = h.run()
    final = assert_consistent(tmp_path / "journal.db", h.fleet)
    assert final["a4"] == "skipped" and final["a2"] == final["a3"] == "rolled_back"
    budgets = [e.data for e in h.journal.of_run(1).events() if e.kind == "budget"]
    assert {b["run_allowed"] for b in budgets} == {2} and not any(b["exceeded"] for b in budgets)
    assert h.journal.run(1).stop_reason is None and result.status == RunStatus.DONE
    assert final["b2"] == final["b3"] == "done"  # the waves after the loss ran
    assert result.exit_code == ExitCode.FAILED  # two hosts were rolled back


# ---- rule 2: what counts --------------------------------------------------------------------------------


def test_skipped_hosts_are_never_counted(tmp_path):
    h = Harness(tmp_path)  # every budget 0
    h.fleet.hosts["a3"]["reachable"] = False
    result = h.run()
    assert result.status == RunStatus.DONE and h.journal.run(1).stop_reason is None
    assert all(b.data["run_failed"] == 0 for b in h.journal.of_run(1).events() if b.kind == "budget")


def test_a_gate_that_could_not_measure_counts_as_a_failure(tmp_path):
    h = Harness(tmp_path)
    h.fleet.faults[("a1", "slo", NEW)] = "connection refused: no figures"
    result = h.run()
    assert result.status == RunStatus.FAILED and h.journal.run(1).stop_reason == StopReason.BUDGET


# ---- rule 3: counted as they happen ---------------------------------------------------------------------


def test_the_halt_is_recorded_at_the_failing_step_not_at_the_end_of_the_wave(tmp_path):
    h = Harness(tmp_path)  # canary budget 0; the canary wave is a1 and b1
    h.fleet.faults[("a1", "apply", NEW)] = "E: Unable to locate package cuda-drivers-580"
    seen = []

    def snoop(action: str, names: list[str]) -> None:
        if action == "reboot":  # the step after applying, same wave
            seen.append(h.journal.run(1).stop_reason)

    h.fleet.on_call = snoop
    result = h.run()
    assert seen[0] == StopReason.BUDGET, "the budget halt is on disk before the wave's next step"
    budget = next(e.data for e in h.journal.of_run(1).events() if e.kind == "budget")
    assert budget["after_step"] == "applying" and budget["exceeded"]
    assert result.status == RunStatus.FAILED and not applied(h.fleet) - {"a1", "b1"}


def test_a_resumed_wave_starts_none_of_its_pending_hosts_after_a_halt(tmp_path):
    h = Harness(tmp_path, {"waves": {"size": 2}, "budgets": {"per_wave": 0, "global": 0}})
    runner = h.runner()
    run_id = runner.start(owner="test", bundle_path="b.yaml", releases_dir="releases", policy_path=None)
    run = h.journal.of_run(run_id)
    plan = runner.plan
    wave = next(w for w in plan.waves if w.kind != "canary" and len(w.hosts) == 2)
    first, second = wave.hosts
    # as a crash would leave it: the halt recorded, one host of the wave under way, the other still pending
    for w in plan.waves[: wave.index]:
        for n in w.hosts:
            for state in (HostState.DRAINING, HostState.APPLYING, HostState.REBOOTING, HostState.VERIFYING,
                          HostState.UNDRAINING, HostState.SOAKING, HostState.DONE):
                run.record_state(n, w.index, state)
            h.fleet.hosts[n]["installed"] = h.fleet.hosts[n]["loaded_driver"] = NEW
        run.wave_started(w.index)
        run.wave_finished(w.index, 0)
    run.wave_started(wave.index)
    run.record_state(first, wave.index, HostState.DRAINING)
    run.set_stop(StopReason.BUDGET, wave.index)
    result = h.resume(run_id)
    final = h.states(run_id)
    assert final[second] == "pending" and second not in applied(h.fleet)
    assert result.status == RunStatus.FAILED


# ---- require: how many selected hosts must end on the bundle for exit 0 ----------------------------------


@pytest.mark.parametrize(("require", "code"), [("all", ExitCode.PARTLY_DONE), (7, ExitCode.PARTLY_DONE),
                                               (6, ExitCode.OK), ("80%", ExitCode.OK), ("90%", ExitCode.PARTLY_DONE)])
def test_require_says_how_many_hosts_must_end_on_the_bundle(tmp_path, require, code):
    h = Harness(tmp_path, {"require": require})
    h.fleet.hosts["a3"]["reachable"] = False  # 6 of 7 end on the bundle
    result = h.run()
    assert result.exit_code == code and len(result.on_bundle) == 6
    assert set(result.not_on_bundle) == {"a3"}  # named whatever `require` says


def test_require_never_hides_a_failure(tmp_path):
    h = Harness(tmp_path, {"require": 1, "budgets": {"per_wave": 1, "global": 1}})
    h.fleet.faults[("a2", "apply", NEW)] = "E: Unable to locate package cuda-drivers-580"
    assert h.run().exit_code == ExitCode.FAILED


def test_require_is_all_a_count_or_a_percentage():
    with pytest.raises(InputError, match="require"):
        parse_policy({"require": "most"}, "p.yaml")
    assert required_hosts("80%", 7) == 6 and required_hosts(10, 7) == 7 and required_hosts("all", 7) == 7
