"""The exported `ansible_inventory`: built by infra.model.inventory from the addresses, read back by Ansible."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stack_mocks import hybrid_secrets, run_program, stack_config

ANSIBLE_INVENTORY = Path(sys.executable).parent / "ansible-inventory"


@pytest.fixture(scope="module")
def run():
    return run_program(stack_config(), hybrid_secrets())


@pytest.fixture(scope="module")
def listed(run, tmp_path_factory):
    # what `pulumi stack output ansible_inventory > inventory.yml` writes: the object as JSON (valid YAML)
    path = tmp_path_factory.mktemp("inv") / "inventory.yml"
    path.write_text(json.dumps(run.outputs["ansible_inventory"], indent=2))
    out = subprocess.run([ANSIBLE_INVENTORY, "-i", path, "--list"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_exports(run):
    assert set(run.outputs) == {"ansible_inventory", "hosts", "amis"}
    assert run.secret_outputs == set()      # nothing secret went in, so the inventory stays readable
    assert len(run.outputs["hosts"]) == 14 and run.outputs["hosts"] == sorted(run.outputs["hosts"])


def test_cloud_hosts_get_the_instances_private_ips(run, listed):
    hostvars = listed["_meta"]["hostvars"]
    instances = {r.name: r for r in run.of_type("aws:ec2/instance:Instance")}
    groups = {g.name: g.state["arn"] for g in run.of_type("aws:lb/targetGroup:TargetGroup")}
    assert len(instances) == 10
    for name, instance in instances.items():
        hv = hostvars[name]
        assert hv["ansible_host"] == instance.state["privateIp"]
        if hv["fleet_site_kind"] == "aws":
            assert hv["fleet_lb"] == {"kind": "nlb", "target_group": groups[f"{hv['fleet_pool']}-tg"],
                                      "target_id": instance.id, "region": "us-east-1"}
        else:
            assert hv["fleet_lb"]["kind"] == "haproxy" and hv["fleet_lb"]["api"] == "10.43.0.5:9999"
    assert len({hostvars[n]["ansible_host"] for n in instances}) == 10


def test_onprem_hosts_and_groups(listed):
    hostvars = listed["_meta"]["hostvars"]
    assert len(hostvars) == 14
    assert [hostvars[f"dgx-h0{i}"]["ansible_host"] for i in range(1, 5)] == [f"10.64.1.1{i}" for i in range(1, 5)]
    assert hostvars["dgx-h01"]["fleet_ups"] == [{"name": "ups-a", "host": "10.64.0.7", "port": 3493, "feed": "A"},
                                                {"name": "ups-b", "host": "10.64.0.8", "port": 3493, "feed": "B"}]
    assert set(listed["aws"]["hosts"]) == {f"v3-use1{az}-{i}" for az in "ab" for i in range(4)}
    assert set(listed["pool_v3_hall_a"]["hosts"]) == {"dgx-h01", "dgx-h02", "dgx-h03", "dgx-h04"}
    assert listed["ring_0"]["hosts"] == ["dgx-h01"]
    assert hostvars["dgx-h01"]["fleet_ib"] is True and len(hostvars["dgx-h01"]["fleet_ib_hcas"]) == 8


def test_preview_registers_the_same_resources(run):
    preview = run_program(stack_config(), hybrid_secrets(), preview=True)
    assert sorted((r.type, r.name) for r in preview.resources) == sorted((r.type, r.name) for r in run.resources)


def test_lab_stack_runs_too():
    lab = run_program(stack_config("lab"), hybrid_secrets(), stack="lab")
    assert lab.outputs["hosts"] == ["dgx-a1", "dgx-a2", "r1-outpost-0", "v3-aws-0", "v3-aws-1"]
    assert set(lab.outputs["ansible_inventory"]["all"]["hosts"]) == set(lab.outputs["hosts"])
    assert len(lab.of_type("pulumi-python:dynamic/fleet:BareMetalHost")) == 2
