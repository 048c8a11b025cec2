"""The planner: canary, waves per pool in site order, disruption budgets, version diff, durations, windows."""

import datetime as dt
import json
import time
from collections import Counter

import pytest
from rich.console import Console

from infra.model.errors import InputError
from patching.release.bundle import load_bundle
from patching.rollout.plan import Plan, build_plan, predict_wave_seconds, render_plan
from patching.rollout.policy import Policy
from patching.rollout.windows import MaintenanceCalendar, Window
from tests.conftest import ROOT
from tests.unit.fakefleet import make_inventory, two_pools

NOW = dt.datetime(2026, 11, 28, 22, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(ROOT / "releases/2026-11.yaml")


@pytest.fixture(scope="module")
def old_bundle():
    return load_bundle(ROOT / "releases/2026-10.yaml")


def policy(**data) -> Policy:
    return Policy.model_validate(data)


def hosts_out(plan: Plan) -> list[dict[str, int]]:
    return [plan.pool_counts(w) for w in plan.waves]


def test_canary_one_per_site_then_waves_per_pool(bundle):
    plan = build_plan(two_pools(), policy(), bundle, now=NOW)
    kinds = [w.kind for w in plan.waves]
    assert kinds[0] == "canary" and "canary" not in kinds[1:]
    # lowest patch ring first (a1 and b1 are ring 0)
    assert plan.waves[0].hosts == ("a1", "b1")
    # 25% of 4 = 1, 25% of 3 rounds down to 0 -> at least 1
    assert [w.hosts for w in plan.waves[1:]] == [("a2",), ("a3",), ("a4",), ("b2",), ("b3",)]
    assert set(plan.hosts) == {"a1", "a2", "a3", "a4", "b1", "b2", "b3"} and not plan.skipped


def test_site_order_and_sizes_per_pool(bundle):
    pol = policy(waves={"size": "50%", "site_order": ["s2"], "pools": {"b": 1}})
    plan = build_plan(two_pools(), pol, bundle, now=NOW)
    sites = [{plan.hosts[h].site for h in w.hosts} for w in plan.waves[1:]]
    assert plan.waves[0].hosts == ("b1", "a1")  # the canary follows the site order too
    assert sites == [{"s2"}, {"s2"}, {"s1"}, {"s1"}]
    assert plan.waves[1].hosts == ("b2",) and plan.waves[3].hosts == ("a2", "a3")


def test_never_more_out_than_max_unavailable_and_unhealthy_hosts_count(bundle):
    pol = policy(waves={"size": "100%"}, canary={"per_site": 0})
    plan = build_plan(two_pools(), pol, bundle, now=NOW)
    assert all(c.get("a", 0) <= 2 and c.get("b", 0) <= 1 for c in hosts_out(plan))
    assert plan.pools["a"].room == 2
    # one host of pool a is already down: only one more may go out at a time
    plan = build_plan(two_pools(), pol, bundle, unhealthy={"a4": "unreachable"}, skip={"a4": "unreachable"},
                      now=NOW)
    assert plan.pools["a"].unhealthy == 1 and plan.pools["a"].room == 1
    assert all(c.get("a", 0) <= 1 for c in hosts_out(plan))
    assert "a4" not in plan.hosts and plan.skipped["a4"] == "unreachable"


def test_pool_without_room_is_not_planned_and_says_why(bundle):
    plan = build_plan(two_pools(), policy(), bundle, unhealthy={"b3": "load balancer: drained"}, now=NOW)
    assert not any(h.startswith("b") for h in plan.hosts)
    assert "no room" in plan.skipped["b1"] and "1 of 3 already unhealthy" in plan.skipped["b1"]


def test_min_serving_caps_the_wave(bundle):
    inv = make_inventory({"p": {"site": "s", "hosts": [f"p{i}" for i in range(4)], "max_unavailable": "100%",
                                "min_serving": 3}})
    plan = build_plan(inv, policy(waves={"size": "100%"}), bundle, now=NOW)
    assert plan.pools["p"].room == 1 and all(len(w.hosts) == 1 for w in plan.waves)


def test_percent_max_unavailable_rounds_down_but_never_to_zero(bundle):
    inv = make_inventory({"p": {"site": "s", "hosts": [f"p{i}" for i in range(9)], "max_unavailable": "25%"}})
    plan = build_plan(inv, policy(waves={"size": "100%"}), bundle, now=NOW)
    assert plan.pools["p"].max_unavailable == 2  # floor(2.25)
    inv = make_inventory({"p": {"site": "s", "hosts": ["p0", "p1"], "max_unavailable": "25%"}})
    assert build_plan(inv, policy(), bundle, now=NOW).pools["p"].max_unavailable == 1


def test_named_canary_and_limit(bundle):
    plan = build_plan(two_pools(), policy(canary={"hosts": ["a3", "b2"]}), bundle, now=NOW)
    assert plan.waves[0].hosts == ("a3", "b2")
    inv = make_inventory({"a": {"site": "s1", "hosts": ["a1", "a2", "a3", "a4"], "max_unavailable": 2}},
                         limit=["a1", "a2"])
    plan = build_plan(inv, policy(canary={"hosts": ["a3"]}), bundle, now=NOW)
    assert set(plan.hosts) == {"a1", "a2"} and any("a3" in n for n in plan.notes)
    # budgets are of the whole pool even when --limit selects part of it
    assert plan.pools["a"].size == 4


def test_two_canaries_of_one_pool_split_when_the_pool_allows_one(bundle):
    plan = build_plan(two_pools(), policy(canary={"hosts": ["b1", "b2", "a1"]}), bundle, now=NOW)
    assert [w.hosts for w in plan.waves if w.kind == "canary"] == [("b1", "a1"), ("b2",)]


def test_policy_names_must_exist(bundle):
    pol = policy(canary={"hosts": ["a9"]}, waves={"site_order": ["s3"], "pools": {"c": 1}})
    with pytest.raises(InputError) as err:
        build_plan(two_pools(), pol, bundle, policy_source="p.yaml")
    text = str(err.value)
    assert "p.yaml: canary.hosts[0]: no such host" in text and "did you mean 'a4'" in text
    assert "waves.site_order[0]" in text and "waves.pools.c" in text


def test_version_diff_per_host_and_hosts_already_on_target(bundle, old_bundle):
    current = {"a1": "2026-10", "a2": "2026-11", "b1": "2026-09"}
    plan = build_plan(two_pools(), policy(), bundle, current=current, known_bundles={"2026-10": old_bundle},
                      now=NOW)
    assert plan.skipped["a2"] == "already on 2026-11" and "a2" not in plan.hosts
    assert plan.hosts["a1"].current == "2026-10" and plan.hosts["a3"].current is None
    changes = {field: (old, new) for field, old, new in plan.diffs["2026-10"]}
    assert changes["driver.version"] == ("580.82.07", "580.95.05")
    assert plan.diffs["2026-09"] is None  # manifest unknown
    text = _render(plan)
    assert "driver.version 580.82.07 -> 580.95.05" in text and "manifest unknown" in text
    # what a patch applies: the components the change touches; every one where the change is unknown
    assert plan.components_from("2026-10") == {"gpu_driver", "fabric_manager", "cuda_toolkit", "container_toolkit",
                                               "model_serving"}
    assert plan.components_from("2026-09") is None and plan.components_from(None) is None
    assert "gpu_driver, fabric_manager, cuda_toolkit, container_toolkit, model_serving" in text.replace("\n", " ")
    assert "every component" in text


def test_predicted_duration_from_history():
    history = [(2, 600.0), (2, 900.0), (2, 700.0), (5, 3000.0)]
    assert predict_wave_seconds(2, history, 1800) == 700.0
    assert predict_wave_seconds(3, history, 1800) == 800.0  # all past waves
    assert predict_wave_seconds(3, [], 1800) == 1800


def test_waves_are_fitted_into_windows(bundle):
    window = Window(cron="0 22 * * SAT", duration="2h", cutoff="15m")
    pol = policy(waves={"estimate": "40m"}, windows=[window.model_dump()])
    plan = build_plan(two_pools(), pol, bundle, calendar=MaintenanceCalendar([window]), now=NOW)
    starts = [dt.datetime.fromisoformat(w.window_start) for w in plan.waves]
    # 22:00, 22:40 fit before the 23:45 cutoff; 23:20 would end at 00:00: next Saturday
    assert starts[:3] == [NOW, NOW + dt.timedelta(minutes=40), NOW + dt.timedelta(days=7)]
    too_long = build_plan(two_pools(), policy(waves={"estimate": "3h"}), bundle,
                          calendar=MaintenanceCalendar([window]), now=NOW)
    assert all(w.window_start is None for w in too_long.waves) and too_long.notes


def test_plan_json_round_trip(bundle, old_bundle):
    plan = build_plan(two_pools(), policy(), bundle, current={"a1": "2026-10"},
                      known_bundles={"2026-10": old_bundle}, now=NOW)
    data = json.loads(json.dumps(plan.to_dict()))
    assert Plan.from_dict(data) == plan
    assert data["format"] == 1 and data["waves"][0]["hosts"] == ["a1", "b1"]


def test_ten_thousand_hosts_plan_fast_and_within_budgets(bundle):
    pools = {f"pool{p}": {"site": f"site{p % 7}", "hosts": [f"h{p:03d}-{i:03d}" for i in range(200)],
                          "max_unavailable": "10%", "min_serving": 150} for p in range(50)}
    inv = make_inventory(pools)
    unhealthy = {f"h{p:03d}-000": "unreachable" for p in range(0, 50, 5)}
    started = time.perf_counter()
    plan = build_plan(inv, policy(waves={"size": "25%"}), bundle, unhealthy=unhealthy, skip=unhealthy,
                      history=[(10, 1200.0)] * 50, now=NOW)
    elapsed = time.perf_counter() - started
    assert elapsed < 3.0, elapsed
    assert len(plan.hosts) + len(plan.skipped) == 10_000
    for counts in hosts_out(plan):
        for pool, n in counts.items():
            assert n <= plan.pools[pool].room
    assert plan.pools["pool0"].room == 19 and plan.pools["pool1"].room == 20  # 10% of 200, one down
    placed = Counter(h.wave for h in plan.hosts.values())
    assert sum(placed.values()) == len(plan.hosts)
    started = time.perf_counter()
    text = json.dumps(plan.to_dict())
    assert time.perf_counter() - started < 2.0 and len(text) < 3_000_000


def _render(plan: Plan) -> str:
    console = Console(width=300, record=True)
    console.print(render_plan(plan))
    return console.export_text()


class CountingHosts(dict):
    """The inventory's hosts, counting whole scans of them (values() and items())."""

    scans = 0

    def values(self):
        CountingHosts.scans += 1
        return super().values()

    def items(self):
        CountingHosts.scans += 1
        return super().items()


def test_the_plan_scans_the_hosts_a_fixed_number_of_times_whatever_the_pools(bundle):
    """Linear in hosts and pools: 2,000 pools do not mean 2,000 scans of every host (issue 16)."""
    from dataclasses import replace

    pools = {f"pool{p}": {"site": f"site{p % 7}", "hosts": [f"h{p:04d}-{i}" for i in range(2)]} for p in range(2000)}
    inv = make_inventory(pools)
    counted = replace(inv, hosts=CountingHosts(inv.hosts))
    CountingHosts.scans = 0
    plan = build_plan(counted, policy(), bundle, now=NOW)
    assert len(plan.hosts) == 4000 and len(plan.pools) == 2000
    assert CountingHosts.scans < 10, CountingHosts.scans
    assert counted.pool_members("pool7") == inv.pool_members("pool7") == [inv.hosts["h0007-0"], inv.hosts["h0007-1"]]
    assert counted.pool_members("no-such-pool") == []
