"""Any Ansible inventory, read through Ansible's own parser, into typed host records."""

import pytest
import yaml

from infra.model.errors import InputError
from patching.inventory.reader import load_inventory
from tests.conftest import write_yaml


def host(pool: str, site: str, ring: int = 1, **extra) -> dict:
    return {"ansible_host": "10.0.0.1", "fleet_pool": pool, "fleet_site": site, "fleet_site_kind": "onprem",
            "fleet_patch_ring": ring, "fleet_serving_port": 8000, "fleet_max_unavailable": 1,
            "fleet_min_serving": 0, "fleet_lb": {"kind": "haproxy", "api": "10.0.0.5:9999", "backend": pool,
                                                 "server": "x"}} | extra


@pytest.fixture
def inventory(tmp_path):
    data = {"all": {"hosts": {"bastion": {"ansible_host": "10.0.0.254"},
                              "dgx-a1": host("v3", "hall-a", 0), "dgx-a2": host("v3", "hall-a"),
                              "g4-0": host("r1", "outpost")},
                    "children": {"pool_v3": {"hosts": {"dgx-a1": None, "dgx-a2": None}},
                                 "ring_1": {"hosts": {"dgx-a2": None, "g4-0": None}}}}}
    return write_yaml(tmp_path / "inventory.yml", data)


def test_reads_fleet_hosts_and_ignores_the_others(inventory):
    inv = load_inventory([inventory])
    assert inv.selected == ("dgx-a1", "dgx-a2", "g4-0") and "bastion" not in inv.hosts
    a1 = inv.hosts["dgx-a1"]
    assert (a1.pool, a1.site, a1.ring, a1.serving_address) == ("v3", "hall-a", 0, "10.0.0.1:8000")
    assert a1.lb["kind"] == "haproxy" and type(a1.pool) is str  # no Ansible-tagged strings leak out
    assert [h.name for h in inv.pool_members("v3")] == ["dgx-a1", "dgx-a2"]


def test_a_relative_inventory_path_is_anchored_to_the_callers_directory(inventory, monkeypatch):
    # ansible-runner and the host checks run in directories of their own: they get the absolute path
    monkeypatch.chdir(inventory.parent)
    inv = load_inventory(["inventory.yml"])
    assert inv.sources == (str(inventory),) and inv.selected == ("dgx-a1", "dgx-a2", "g4-0")


def test_group_vars_directory_is_merged(tmp_path):
    inventory = tmp_path / "inv" / "hosts.yml"
    inventory.parent.mkdir()
    h = host("v3", "hall-a")
    del h["fleet_max_unavailable"], h["fleet_min_serving"]
    write_yaml(inventory, {"all": {"children": {"pool_v3": {"hosts": {"dgx-a1": h}}}}})
    (tmp_path / "inv/group_vars").mkdir()
    write_yaml(tmp_path / "inv/group_vars/pool_v3.yml", {"fleet_max_unavailable": "50%", "fleet_min_serving": 1})
    inv = load_inventory([inventory])
    assert inv.hosts["dgx-a1"].max_unavailable == "50%" and inv.hosts["dgx-a1"].min_serving == 1


def test_every_inventory_var_of_a_fleet_host_is_kept_and_never_printed(tmp_path):
    inventory = tmp_path / "inv" / "hosts.yml"
    inventory.parent.mkdir()
    write_yaml(inventory, {"all": {"hosts": {"dgx-a1": host("v3", "hall-a", ansible_port=2222),
                                             "bastion": {"ansible_host": "10.0.0.254"}}}})
    (tmp_path / "inv/group_vars/all").mkdir(parents=True)
    write_yaml(tmp_path / "inv/group_vars/all/secrets.yml", {"fleet_ups_monitor_password": "s3cret-value"})
    inv = load_inventory([inventory])
    hv = inv.vars["dgx-a1"]
    assert (hv["ansible_port"], hv["fleet_pool"], hv["fleet_ups_monitor_password"]) == (2222, "v3", "s3cret-value")
    assert "groups" not in hv and "inventory_hostname" not in hv and "bastion" not in inv.vars
    assert "s3cret-value" not in repr(inv)


@pytest.mark.parametrize(("limit", "selected"), [
    (["dgx-*"], ("dgx-a1", "dgx-a2")),
    (["pool_v3:&ring_1"], ("dgx-a2",)),
    (["all:!g4-0"], ("dgx-a1", "dgx-a2")),
    (["dgx-a1", "g4-0"], ("dgx-a1", "g4-0")),
    (["~dgx-a[12]"], ("dgx-a1", "dgx-a2")),
])
def test_limit_uses_ansible_patterns(inventory, limit, selected):
    inv = load_inventory([inventory], limit)
    assert inv.selected == selected and inv.limit == ",".join(limit)
    assert len(inv.hosts) == 3  # budgets still see every host


def test_unknown_limit_names_the_pattern(inventory):
    with pytest.raises(InputError) as err:
        load_inventory([inventory], ["dgx-a9", "pool_v4"])
    text = str(err.value)
    assert "--limit: matches no host or group" in text and "'dgx-a9'" in text and "did you mean" in text
    assert "'pool_v4'" in text
    with pytest.raises(InputError, match="not a fleet host"):
        load_inventory([inventory], ["bastion"])


def test_missing_and_wrong_host_vars_name_host_and_var(tmp_path):
    bad = host("v3", "hall-a", fleet_serving_port="http", fleet_site_kind="moon")
    del bad["fleet_pool"]
    path = write_yaml(tmp_path / "inv.yml", {"all": {"hosts": {"dgx-a1": bad}}})
    with pytest.raises(InputError) as err:
        load_inventory([path])
    text = str(err.value)
    assert f"{path}: dgx-a1.fleet_pool: Field required" in text
    assert "dgx-a1.fleet_serving_port" in text and "'http'" in text
    assert "dgx-a1.fleet_site_kind" in text and "'moon'" in text


def test_hosts_of_a_pool_must_agree_on_the_budget(tmp_path):
    path = write_yaml(tmp_path / "inv.yml", {"all": {"hosts": {
        "a": host("v3", "s"), "b": host("v3", "s", fleet_max_unavailable=2)}}})
    with pytest.raises(InputError, match="one pool, one budget"):
        load_inventory([path])


def test_unparsable_and_missing_inventories(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("all:\n  hosts:\n    a: {x: 1\n")
    with pytest.raises(InputError) as err:
        load_inventory([broken])
    assert "Unable to parse" in str(err.value) and "YAML" in str(err.value)
    with pytest.raises(InputError, match="no such inventory"):
        load_inventory([tmp_path / "nope.yml"])


def test_the_rendered_lab_inventory_is_understood(tmp_path, root, lab_stack):
    from infra.model.fleet import load_stack
    from infra.model.inventory import render_inventory

    path = tmp_path / "lab.yml"
    path.write_text(render_inventory(load_stack("lab", root)))
    inv = load_inventory([path])
    assert {"dgx-a1", "v3-aws-0", "r1-outpost-0"} <= set(inv.hosts)
    assert inv.hosts["dgx-a1"].ups and inv.hosts["dgx-a1"].ib_hcas
    assert yaml.safe_load(path.read_text())["all"]["hosts"]["dgx-a1"]["fleet_pool"] == inv.hosts["dgx-a1"].pool
