"""lab/scaled.py: the lab fleet grown for the scale benchmarks is a valid stack, power and fabric included."""

from __future__ import annotations

import pytest

from infra.model.fleet import load_stack
from infra.model.power import validate_hall
from lab.scaled import scaled_project


@pytest.mark.parametrize("hosts", [5, 20, 41])
def test_the_scaled_lab_has_the_hosts_asked_for_and_passes_the_power_and_fabric_checks(tmp_path, hosts):
    fleet = load_stack(f"lab{hosts}", scaled_project(tmp_path, hosts, max_unavailable=10))
    assert len(fleet.hosts) == hosts
    hall = [h for h in fleet.hosts.values() if h.pool == "v3-hall"]
    assert len(hall) == hosts - 3  # the cloud pool (2) and the outpost (1) as in the lab
    report = validate_hall(fleet, fleet.sites["hall-a"])  # raises on an overloaded UPS or a miscabled rail
    assert report is not None
    assert fleet.pools["v3-hall"].max_unavailable == 10
    # every host and HCA is told apart: names, addresses, GUIDs, switch ports
    assert len({h.address for h in hall}) == len(hall)
    guids = [hca.guid for h in hall for hca in h.ib_hcas]
    assert len(set(guids)) == len(guids) == 8 * len(hall)


def test_a_fleet_smaller_than_the_lab_s_other_pools_is_refused(tmp_path):
    with pytest.raises(ValueError, match="the on-prem pool needs 2 or more"):
        scaled_project(tmp_path, 4)
