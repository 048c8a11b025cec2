import re

import yaml

from infra.model.fleet import load_stack
from infra.model.inventory import HOST_VARS, Endpoint, build_inventory, render_inventory


def test_groups_by_site_kind_site_pool_and_ring(root):
    inv = build_inventory(load_stack("lab", root))["all"]
    groups = inv["children"]
    assert set(groups["onprem"]["hosts"]) == {"dgx-a1", "dgx-a2"}
    assert set(groups["aws"]["hosts"]) == {"v3-aws-0", "v3-aws-1"}
    assert set(groups["outpost"]["hosts"]) == {"r1-outpost-0"}
    assert set(groups["site_hall_a"]["hosts"]) == {"dgx-a1", "dgx-a2"}
    assert set(groups["pool_v3_hall"]["hosts"]) == {"dgx-a1", "dgx-a2"}
    assert set(groups["ring_0"]["hosts"]) == {"dgx-a1"}
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", g) for g in groups)


def test_host_vars_carry_the_hardware(root):
    hv = build_inventory(load_stack("lab", root))["all"]["hosts"]
    a1 = hv["dgx-a1"]
    assert a1["fleet_nvswitch"] is True and a1["fleet_ib"] is True and a1["fleet_efa"] is False
    assert len(a1["fleet_ib_hcas"]) == 8 and a1["fleet_ib_hcas"][0]["rate"] == 200
    assert [u["feed"] for u in a1["fleet_ups"]] == ["A", "B"]
    assert a1["fleet_lb"] == {"kind": "haproxy", "api": "10.20.0.5:9999", "backend": "v3-hall", "server": "dgx-a1"}
    aws = hv["v3-aws-0"]
    assert aws["fleet_efa"] is True and aws["fleet_lb"]["kind"] == "nlb" and "ansible_host" not in aws
    assert hv["r1-outpost-0"]["fleet_gpu_model"] == "T4" and hv["r1-outpost-0"]["fleet_nvswitch"] is False


def test_endpoints_override_addresses_and_ports(root):
    fleet = load_stack("lab", root)
    inv = build_inventory(fleet, {"v3-aws-0": Endpoint("127.0.0.1", 2201, 18001, {"x": 1})})
    hv = inv["all"]["hosts"]["v3-aws-0"]
    assert (hv["ansible_host"], hv["ansible_port"], hv["fleet_serving_port"], hv["x"]) == ("127.0.0.1", 2201, 18001, 1)


def test_every_host_var_is_documented(root):
    doc = (root / "docs/inventory.md").read_text()
    rendered = set()
    for stack in ("lab", "example-hybrid"):
        for hv in build_inventory(load_stack(stack, root))["all"]["hosts"].values():
            rendered |= set(hv)
    assert rendered <= set(HOST_VARS)
    missing = [v for v in HOST_VARS if f"`{v}`" not in doc]
    assert not missing, f"undocumented host vars: {missing}"


def test_render_is_yaml_with_header(root):
    text = render_inventory(load_stack("example-hybrid", root))
    assert text.startswith("# Ansible inventory for fleet 'example-hybrid'")
    assert len(yaml.safe_load(text)["all"]["hosts"]) == 14


def test_inventory_builder_is_pure(root):
    fleet = load_stack("lab", root)
    assert build_inventory(fleet) == build_inventory(fleet)


def test_the_lab_exports_the_efa_devices_its_simulated_instances_have(tmp_path):
    """As `pulumi up` exports fleet_efa_devices from DescribeInstanceTypes, the lab writes the count its simulated
    hardware has, so the EFA host check (tests/hosts/test_fabric.py) holds the lab to the same number."""
    from infra.model.fleet import fleet_config_from_stack, parse_fleet
    from lab.hardware import hardware_from_hostvars
    from lab.inventory import lab_endpoints
    from lab.layout import Layout, Ports
    from tests.stack_mocks import stack_config

    fleet = parse_fleet(fleet_config_from_stack(stack_config("lab")), "Pulumi.lab.yaml", "config.fleet:")
    endpoints = lab_endpoints(fleet, Layout.for_stack("lab", tmp_path), Ports.plan(fleet))
    inventory = build_inventory(fleet, endpoints)["all"]["hosts"]
    efa = {n: v["fleet_efa_devices"] for n, v in inventory.items() if "fleet_efa_devices" in v}
    assert efa == {"v3-aws-0": 4, "v3-aws-1": 4}
    assert all(hardware_from_hostvars(n, inventory[n])["efa_devices"] == 4 for n in efa)
