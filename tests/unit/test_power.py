"""Power and fabric validation of an on-prem hall: the example hall passes, every kind of miswiring is named."""

import copy

import pytest

from infra.model.errors import InputError
from infra.model.fleet import Fleet, fleet_config_from_stack, parse_fleet
from infra.model.power import validate_hall
from tests.stack_mocks import stack_config

BASE = stack_config("example-hybrid")


def fleet_with(mutate=None) -> Fleet:
    config = copy.deepcopy(BASE)
    if mutate:
        mutate(config)
    return parse_fleet(fleet_config_from_stack(config), "Pulumi.t.yaml", "config.fleet:")


def hall(config: dict) -> dict:
    return next(s for s in config["fleet:sites"] if s["name"] == "hall-a")


def host(config: dict, name: str) -> dict:
    return next(h for h in config["fleet:hosts"] if h["name"] == name)


def violations(mutate) -> str:
    fleet = fleet_with(mutate)
    with pytest.raises(InputError) as info:
        validate_hall(fleet, fleet.sites["hall-a"])
    text = str(info.value)
    assert "Pulumi.t.yaml" in text
    return text


def test_example_hall_passes_with_its_loads_reported():
    fleet = fleet_with()
    report = validate_hall(fleet, fleet.sites["hall-a"])
    loads = {u.ups: u for u in report.loads}
    # 4 DGX at 6.5 kW, PSUs split 2+2: each UPS carries half normally, all of it when the other fails
    assert loads["ups-a"].normal_w == pytest.approx(13000)
    assert loads["ups-a"].derated_w == pytest.approx(32000)
    assert loads["ups-b"].failover_w == {"ups-a": pytest.approx(26000)}
    assert report.n_plus_one
    assert any("ups-a failed -> UPS ups-b carries 26000 W of 32000 W derated (ok)" in line for line in report.lines)


def test_feeds_on_one_ups_named():
    def same_ups(c):
        for psu in host(c, "dgx-h02")["psus"]:
            psu["ups"] = "ups-a"
    text = violations(same_ups)
    assert "config.fleet:hosts[1].psus" in text
    assert "host 'dgx-h02': feeds A and B both come from UPS ups-a" in text


def test_missing_feed_named():
    def only_a(c):
        host(c, "dgx-h03")["psus"] = [{"feed": "A", "ups": "ups-a"}, {"feed": "A", "ups": "ups-b"}]
    text = violations(only_a)
    assert "host 'dgx-h03' has no PSU on feed B" in text and "config.fleet:hosts[2].psus" in text


def test_derated_capacity_exceeded_names_the_ups():
    def small_ups(c):
        hall(c)["ups"][0]["capacity_w"] = 15000   # 13 kW normal load > 12 kW derated
        hall(c)["require_n_plus_one"] = False
    text = violations(small_ups)
    assert "UPS 'ups-a' carries 13000 W" in text and "derated capacity 12000 W (15000 W x 0.8)" in text
    assert "config.fleet:sites[3].ups" in text


def test_derating_is_configurable():
    def no_derating(c):
        hall(c)["ups"][0]["capacity_w"] = 15000
        hall(c)["ups_derating"] = 1.0
        hall(c)["require_n_plus_one"] = False
    fleet = fleet_with(no_derating)
    report = validate_hall(fleet, fleet.sites["hall-a"])
    assert not report.n_plus_one                       # 26 kW on a 15 kW unit if ups-b fails: reported ...
    assert any("(OVER)" in line and "UPS ups-b failed -> UPS ups-a" in line for line in report.lines)


def test_n_plus_one_fails_only_when_required():
    def tight(c):
        for unit in hall(c)["ups"]:
            unit["capacity_w"] = 30000              # 24 kW derated: 13 kW fine, 26 kW on failover is not
    text = violations(tight)
    assert "N+1: with UPS 'ups-a' failed, UPS 'ups-b' would carry 26000 W" in text
    assert "N+1: with UPS 'ups-b' failed, UPS 'ups-a' would carry 26000 W" in text

    def tight_report_only(c):
        tight(c)
        hall(c)["require_n_plus_one"] = False
    fleet = fleet_with(tight_report_only)
    report = validate_hall(fleet, fleet.sites["hall-a"])
    assert not report.n_plus_one and "does NOT hold" in report.lines[-1]


def test_port_cabled_twice_names_both_hosts_and_the_port():
    def clash(c):
        host(c, "dgx-h02")["ib_hcas"][3]["port"] = 2   # dgx-h01 mlx5_3 is on leaf-rail3 port 2
    text = violations(clash)
    assert "switch port leaf-rail3 port 2 is cabled to both dgx-h01 mlx5_3 and dgx-h02 mlx5_3" in text
    assert "config.fleet:hosts[1].ib_hcas[3].port" in text


def test_not_rail_aligned_names_host_hca_and_port():
    def swapped(c):
        h = host(c, "dgx-h03")
        h["ib_hcas"][2]["switch"], h["ib_hcas"][5]["switch"] = "leaf-rail5", "leaf-rail2"
    text = violations(swapped)
    assert "not rail-aligned: dgx-h03 mlx5_2 is cabled to leaf-rail5 port 4, the rail of mlx5_5 (ib_rails of site " \
           "hall-a)" in text
    assert "not rail-aligned: dgx-h03 mlx5_5 is cabled to leaf-rail2 port 4, the rail of mlx5_2" in text

    def swapped_not_required(c):
        swapped(c)
        hall(c)["ib_rail_aligned"] = False
    fleet = fleet_with(swapped_not_required)
    assert validate_hall(fleet, fleet.sites["hall-a"]).n_plus_one


def test_two_hcas_on_one_leaf_is_not_rail_aligned():
    def doubled(c):
        hcas = host(c, "dgx-h04")["ib_hcas"]
        hcas.append({"name": "mlx5_8", "guid": "0x1070a10300040008", "switch": "leaf-rail0", "port": 40, "rate": 200})
        hcas.append(dict(hcas[1], guid="0x1070a10300040009", port=41))
    # leaf-rail0 carries mlx5_0 on every host, so dgx-h04's mlx5_8 there is the misfit
    text = violations(doubled)
    assert "dgx-h04 mlx5_8 is cabled to leaf-rail0 port 40, the rail of mlx5_0" in text
    assert "host 'dgx-h04' declares HCA mlx5_1 twice" in text


def test_rates_differ_within_pool_named():
    def slow(c):
        host(c, "dgx-h04")["ib_hcas"][6]["rate"] = 100
    text = violations(slow)
    assert "dgx-h04 mlx5_6 (leaf-rail6 port 5) runs at 100 Gb/s; pool 'v3-hall-a' runs at 200 Gb/s" in text
    assert "config.fleet:hosts[3].ib_hcas[6].rate" in text


def test_every_violation_is_reported_at_once():
    def many(c):
        host(c, "dgx-h02")["psus"] = [{"feed": "A", "ups": "ups-a"}]
        host(c, "dgx-h04")["ib_hcas"][6]["rate"] = 400
        host(c, "dgx-h03")["ib_hcas"][0]["port"] = 2
    fleet = fleet_with(many)
    with pytest.raises(InputError) as info:
        validate_hall(fleet, fleet.sites["hall-a"])
    fields = [p.field for p in info.value.problems]
    assert fields == ["config.fleet:hosts[1].psus", "config.fleet:hosts[2].ib_hcas[0].port",
                      "config.fleet:hosts[3].ib_hcas[6].rate"]


def test_rails_are_declared_so_a_majority_miscabled_does_not_blame_the_one_right_host():
    """Three of four hosts swap mlx5_2 and mlx5_5: the three are named, dgx-h01 (cabled right) is not."""
    def mostly_swapped(c):
        for name in ("dgx-h02", "dgx-h03", "dgx-h04"):
            h = host(c, name)
            h["ib_hcas"][2]["switch"], h["ib_hcas"][5]["switch"] = "leaf-rail5", "leaf-rail2"
    text = violations(mostly_swapped)
    for name in ("dgx-h02", "dgx-h03", "dgx-h04"):
        assert f"not rail-aligned: {name} mlx5_2 is cabled to leaf-rail5" in text
        assert f"not rail-aligned: {name} mlx5_5 is cabled to leaf-rail2" in text
    assert "dgx-h01" not in text


def test_a_leaf_the_hall_does_not_declare_is_named():
    def extra_leaf(c):
        host(c, "dgx-h02")["ib_hcas"][7]["switch"] = "leaf-rail9"
    text = violations(extra_leaf)
    assert "dgx-h02 mlx5_7 is cabled to leaf-rail9 port 3, a leaf site hall-a's ib_rails does not declare" in text
    assert "config.fleet:hosts[1].ib_hcas[7].switch" in text


def test_rail_alignment_without_declared_rails_is_refused():
    config = copy.deepcopy(stack_config())
    hall(config).pop("ib_rails")
    with pytest.raises(InputError) as info:
        parse_fleet(fleet_config_from_stack(config), "Pulumi.example-hybrid.yaml", "config.fleet:")
    assert "ib_rail_aligned needs ib_rails" in str(info.value)
