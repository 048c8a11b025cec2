"""The hardware gate: DCGM's diagnostic and the NCCL all-reduce bus bandwidth after a driver, NCCL or fabric
change, judged against the host's own figure from before the patch and its pool's (gates._judge_hardware),
and when the runner runs it (runner._hardware_due, _record_own_hardware, _hardware_gate)."""

from __future__ import annotations

from collections import Counter

from patching.release.bundle import Bundle
from patching.rollout import gates
from patching.rollout.actions import Outcome
from patching.rollout.policy import Policy
from patching.states import Gate, HostOutcome, Verdict
from tests.unit.fakefleet import NEW, OLD
from tests.unit.test_runner import BUNDLES, Harness

A100 = ["NVIDIA A100-SXM4-80GB"]


def figures(busbw: float = 232.0, *, failures: tuple[dict, ...] = (), wrong: int = 0, own: float | None = None,
            pool: dict[str, float] | None = None, nccl: bool = True, dcgm: bool = True) -> dict:
    m: dict = {"baseline": {"own": own, "pool": pool or {}}}
    if dcgm:
        m["dcgm"] = {"level": 1, "version": "4.2.3", "exit": 226 if failures else 0, "tests": 10,
                     "failures": list(failures), "warnings": []}
    else:
        m["dcgm_error"] = "`dcgmi diag -r 1 -j` exit 255, no diagnostic: Error: unable to connect to host engine"
    if nccl:
        m["nccl"] = {"gpus": 8, "devices": A100, "busbw_gbps": busbw, "avg_busbw_gbps": busbw * 0.45,
                     "wrong": wrong, "out_of_bounds": 0, "sizes": 31}
    else:
        m["nccl_error"] = "`all_reduce_perf -b 8 -e 8G -f 2 -g 8` exit 1, no result"
    return m


def judge(m: dict, policy: Policy | None = None) -> gates.Decision:
    return gates.judge(Gate.HARDWARE, Outcome(True, measurements=m), policy or Policy())


def test_same_bandwidth_as_before_the_patch_and_the_pool_passes():
    d = judge(figures(229.0, own=233.0, pool={"b": 231.0, "c": 236.0}))
    assert d.verdict == Verdict.PASSED
    assert "229.0 GB/s against its own 233.0 GB/s before the patch and its pool's median 233.5 GB/s" in d.detail
    assert d.thresholds == {"dcgm_level": 1, "nccl": True, "busbw_tolerance": 0.1}


def test_bandwidth_down_against_its_own_figure_fails_naming_both():
    d = judge(figures(140.0, own=233.0))
    assert d.verdict == Verdict.FAILED
    assert "140.0 GB/s is 40% below its own 233.0 GB/s before the patch (tolerated 10%)" in d.detail


def test_bandwidth_down_against_the_pool_fails_even_when_its_own_was_as_low():
    """A host that was already slow before the patch is not excused: its pool says what the GPUs do."""
    d = judge(figures(150.0, own=152.0, pool={"b": 232.0, "c": 230.0, "d": 60.0}))
    assert d.verdict == Verdict.FAILED and "below its pool's median 230.0 GB/s (b, c, d" in d.detail
    assert "its own" not in d.detail


def test_the_tolerance_is_the_policys():
    m = figures(200.0, own=233.0)
    assert judge(m).verdict == Verdict.FAILED
    assert judge(m, Policy.model_validate({"gates": {"hardware": {"busbw_tolerance": 0.2}}})).verdict == Verdict.PASSED


def test_a_failed_dcgm_test_fails_the_host_naming_test_and_gpu():
    failure = {"test": "Memory", "category": "Hardware", "gpu": "3", "status": "Fail",
               "info": "Pending row remap on GPU 3"}
    d = judge(figures(own=232.0, failures=(failure,)))
    assert d.verdict == Verdict.FAILED
    assert d.detail.startswith("DCGM diag -r 1: Memory on GPU 3 failed: Pending row remap on GPU 3")


def test_wrong_values_fail_whatever_the_bandwidth():
    d = judge(figures(own=232.0, wrong=4))
    assert d.verdict == Verdict.FAILED and "4 wrong value(s)" in d.detail


def test_no_diagnostic_is_could_not_measure_unless_something_failed():
    assert judge(figures(own=232.0, dcgm=False)).verdict == Verdict.COULD_NOT_MEASURE
    assert judge(figures(own=232.0, nccl=False)).verdict == Verdict.COULD_NOT_MEASURE
    d = judge(figures(100.0, own=232.0, dcgm=False))
    assert d.verdict == Verdict.FAILED and "unable to connect to host engine" in d.detail


def test_nothing_to_compare_with_records_the_bandwidth_and_says_so():
    d = judge(figures(120.0))
    assert d.verdict == Verdict.PASSED and "120.0 GB/s recorded, not compared" in d.detail


def test_nccl_off_by_policy_judges_dcgm_alone():
    d = judge(figures(nccl=False), Policy.model_validate({"gates": {"hardware": {"nccl": False}}}))
    assert d.verdict == Verdict.PASSED and "NCCL" not in d.detail


# ---- the runner --------------------------------------------------------------------------------


def hardware_events(h: Harness) -> list:
    return [e for e in h.journal.of_run(1).events() if e.data.get("gate") == Gate.HARDWARE.value]


def test_figures_before_the_patch_while_drained_then_the_gate_on_every_patched_host(tmp_path):
    h = Harness(tmp_path)
    assert h.run().exit_code == 0
    events = hardware_events(h)
    assert Counter(e.kind for e in events) == {"baseline": 7, "gate": 7}
    for host in h.fleet.hosts:
        mine = [e for e in events if e.host == host]
        assert [e.kind for e in mine] == ["baseline", "gate"]
        assert mine[1].data["measurements"]["baseline"]["own"] == mine[0].data["measurements"]["nccl"]["busbw_gbps"]
    # the baseline was taken drained, before the host was patched
    calls = [(action, names) for action, names, _ in h.fleet.calls if action in ("drain", "hardware", "apply")]
    first = next(i for i, (a, names) in enumerate(calls) if a == "hardware")
    assert calls[first - 1][0] == "drain" and calls[first + 1][0] == "apply"
    # later hosts are compared with their pool too
    last = [e for e in events if e.kind == "gate"][-1]
    assert last.data["measurements"]["baseline"]["pool"] and "pool's median" in last.data["detail"]


def test_an_nccl_regression_is_caught_at_the_canary_and_rolled_back(tmp_path):
    h = Harness(tmp_path)
    h.fleet.busbw.update({(host, NEW): 140.0 for host in h.fleet.hosts})  # the new NCCL: 40 % slower everywhere
    result = h.run()
    assert result.exit_code == 1
    canary = [e for e in hardware_events(h) if e.kind == "gate"]
    assert canary and all(e.data["verdict"] == Verdict.FAILED.value for e in canary)
    assert "below its own" in canary[0].data["detail"]
    assert {o for o, _ in result.outcomes.values()} <= {HostOutcome.ROLLED_BACK, HostOutcome.NOT_REACHED}
    assert all(f["installed"] == OLD for f in h.fleet.hosts.values())
    # the SLO and behaviour gates never saw a host that failed the hardware checks
    failed = {e.host for e in canary}
    assert not [e for e in h.journal.of_run(1).events() if e.kind == "gate" and e.host in failed
                and e.data["gate"] in ("slo", "behaviour") and e.data["phase"] == "rollout"]


def test_a_bundle_that_changes_no_hardware_component_runs_no_hardware_check(tmp_path):
    old, new = BUNDLES[OLD], BUNDLES[NEW]
    serving_only = Bundle.model_validate({**old.model_dump(mode="json"), "release": "2026-10.1",
                                          "serving": new.serving.model_dump(mode="json")})
    h = Harness(tmp_path)
    runner = h.runner()
    runner.bundle = serving_only
    run_id = runner.start(owner="test", bundle_path="b.yaml", releases_dir="releases", policy_path=None)
    assert runner.execute(run_id).exit_code == 0
    assert not hardware_events(h) and not [c for c in h.fleet.calls if c[0] == "hardware"]


def test_when_changed_is_the_policys(tmp_path):
    h = Harness(tmp_path, {"gates": {"hardware": {"when_changed": ["ofed"]}}})  # 2026-11 keeps OFED
    assert h.run().exit_code == 0 and not hardware_events(h)


def test_the_summary_shows_what_the_canarys_gates_compared(tmp_path):
    from patching.journal.reports import build_report, summary_md

    h = Harness(tmp_path)
    h.run()
    summary = summary_md(build_report(h.journal.of_run(1)))
    section = summary.split("## The canary's gates")[1].split("\n## ")[0]
    rows = [line.split(" | ")[:3] for line in section.splitlines() if line.startswith(("| a1", "| b1"))]
    assert sorted((r[0].strip("| "), r[1]) for r in rows) == sorted(
        (host, gate) for host in ("a1", "b1") for gate in ("hardware", "slo", "behaviour", "soak"))
    assert "against its own" in section and "same interval" in section  # the baselines, in words
