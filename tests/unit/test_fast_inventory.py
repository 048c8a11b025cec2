"""The direct reader of rendered inventories (patching/inventory/fast.py) gives what Ansible's parser gives, and
leaves everything else to Ansible."""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.model.errors import InputError
from infra.model.fleet import load_stack
from infra.model.inventory import build_inventory, render_inventory
from patching.inventory import fast, reader

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv(fast.PARSER_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # no ansible.cfg, group_vars/ or host_vars/ of the working directory


@pytest.fixture
def calls(monkeypatch):
    """How many times Ansible's parser ran."""
    counted = {"n": 0}
    real = reader._parse

    def counting(sources):
        counted["n"] += 1
        return real(sources)

    monkeypatch.setattr(reader, "_parse", counting)
    return counted


def _load(path: Path | str, limit: str | None, ansible: bool) -> Any:
    old = os.environ.get(fast.PARSER_ENV)
    os.environ[fast.PARSER_ENV] = "ansible" if ansible else "fast"
    try:
        return reader.load_inventory([str(path)], limit)
    except InputError as exc:
        return ("error", [(p.file, p.field, p.value, p.message) for p in exc.problems])
    finally:
        if old is None:
            del os.environ[fast.PARSER_ENV]
        else:
            os.environ[fast.PARSER_ENV] = old


def _same(path: Path | str, calls: dict[str, int], limit: str | None = None, *, fast_path: bool = True) -> Any:
    """Both paths' answers are identical; the default one takes the fast path (or not) as expected."""
    before = calls["n"]
    quick = _load(path, limit, ansible=False)
    assert calls["n"] - before == (0 if fast_path else 1)
    slow = _load(path, limit, ansible=True)
    assert calls["n"] - before == (1 if fast_path else 2)
    if isinstance(slow, tuple):
        assert quick == slow
        return slow
    assert not isinstance(quick, tuple), quick
    assert list(quick.hosts) == list(slow.hosts)  # same order: pool members and first-host messages follow it
    assert quick.hosts == slow.hosts
    assert quick.vars == slow.vars
    assert quick.selected == slow.selected
    assert (quick.sources, quick.limit) == (slow.sources, slow.limit)
    return slow


def _write(tmp_path: Path, inventory: dict[str, Any] | str, name: str = "inventory.yml") -> Path:
    path = tmp_path / "inv" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(inventory if isinstance(inventory, str) else yaml.safe_dump(inventory, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def hybrid() -> dict[str, Any]:
    return build_inventory(load_stack("example-hybrid", ROOT))


@pytest.mark.parametrize("stack", ["example-hybrid", "lab"])
def test_the_shipped_stacks_rendered_read_the_same(tmp_path, calls, stack):
    path = _write(tmp_path, render_inventory(load_stack(stack, ROOT)))
    inv = _same(path, calls)
    assert inv.hosts


def test_limits_select_the_same(tmp_path, calls, hybrid):
    path = _write(tmp_path, hybrid)
    hosts = list(hybrid["all"]["hosts"])
    groups = list(hybrid["all"]["children"])
    pool = next(g for g in groups if g.startswith("pool_"))
    limits = ["all", hosts[0], f"{hosts[0]},{hosts[-1]}", pool, f"{pool},!{hosts[0]}", f"all,&{groups[0]}",
              f"!{hosts[1]}", f"&{pool}", f" {hosts[0]} , {pool} ", "ungrouped", "no_such_group",
              f"{hosts[0]}x", f"{pool},!{pool}"]
    for limit in limits:
        _same(path, calls, limit)


def test_complex_limits_go_through_ansible(tmp_path, calls, hybrid):
    path = _write(tmp_path, hybrid)
    for limit in ["pool_*", "~gpu", f"{next(iter(hybrid['all']['hosts']))}:all", "localhost", "@missing"]:
        _same(path, calls, limit, fast_path=False)


def test_a_lab_shaped_folder_reads_the_same(tmp_path, calls):
    inv = build_inventory(load_stack("lab", ROOT))
    inv["all"]["vars"]["fleet_container_cgroups"] = "disabled"
    inv["all"]["hosts"]["bastion"] = {"ansible_host": "127.0.0.1", "ansible_port": 2222}
    folder = tmp_path / "lab"
    (folder / "group_vars/all").mkdir(parents=True)
    (folder / "hosts.yml").write_text("# The lab's inventory\n" + yaml.safe_dump(inv, sort_keys=False))
    (folder / "group_vars/all/secrets.yml").write_text(yaml.safe_dump(
        {"fleet_ups_monitor_user": "monitor", "fleet_ups_monitor_password": "s3cret",
         "fleet_container_cgroups": "enabled"}))  # over all.vars
    got = _same(folder, calls)
    assert all(v["fleet_ups_monitor_password"] == "s3cret" for v in got.vars.values())
    assert all(v["fleet_container_cgroups"] == "enabled" for v in got.vars.values())
    assert "bastion" not in got.hosts
    _same(folder, calls, "bastion")  # not a fleet host: the same message
    # group_vars/all.yml instead of the folder (a new folder: Ansible's vars plugin caches what it found)
    folder = tmp_path / "lab2"
    (folder / "group_vars").mkdir(parents=True)
    del inv["all"]["hosts"]["bastion"]  # fleet_patch_ring below would make it a (broken) fleet host
    (folder / "hosts.yml").write_text(yaml.safe_dump(inv, sort_keys=False))
    first = next(iter(got.hosts))
    over = {"fleet_patch_ring": 7, "fleet_x": [1, {"a": None}], "fleet_name": "over"}
    (folder / "group_vars/all.yml").write_text(yaml.safe_dump(over))
    got = _same(folder, calls)
    assert got.hosts[first].ring != 7 and got.vars[first]["fleet_x"] == [1, {"a": None}]
    assert got.vars[first]["fleet_name"] == "over"


def _generated(hosts: int, pools: int) -> dict[str, Any]:
    inv: dict[str, Any] = {"all": {"vars": {"fleet_name": "big"}, "hosts": {}, "children": {}}}
    children = inv["all"]["children"]
    for i in range(hosts):
        pool, name = f"p{i % pools}", f"gpu-{i:05d}"
        inv["all"]["hosts"][name] = {
            "ansible_host": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", "ansible_user": "ubuntu",
            "fleet_pool": pool, "fleet_site": "use1", "fleet_site_kind": "aws", "fleet_patch_ring": i % 3,
            "fleet_serving_port": 8000, "fleet_max_unavailable": "10%", "fleet_min_serving": 1,
            "fleet_lb": {"kind": "nlb", "target_group_arn": f"arn:{pool}"}, "fleet_gpu_count": 8,
            "fleet_ib_hcas": [{"name": f"mlx5_{r}", "rail": r} for r in range(4)], "fleet_model": "m/x",
        }
        for group in (f"pool_{pool}", f"ring_{i % 3}", "aws"):
            children.setdefault(group, {"hosts": {}})["hosts"][name] = None
    return inv


def test_a_generated_large_inventory_reads_the_same(tmp_path, calls):
    path = _write(tmp_path, _generated(2000, 200))
    _same(path, calls)
    _same(path, calls, "pool_p7,pool_p8,!gpu-00007")


def test_json_reads_the_same(tmp_path, calls, hybrid):
    import json

    _same(_write(tmp_path, json.dumps(hybrid), "inventory.json"), calls)


@pytest.mark.parametrize("case", [
    "jinja", "vault", "unsafe", "host_vars", "top_key", "child_vars", "group_ansible_var", "host_range",
    "nested_children", "other_group_vars", "anchor_merge", "timestamp", "int_key", "executable",
])
def test_what_it_does_not_understand_goes_through_ansible(tmp_path, calls, hybrid, case):
    inv = copy.deepcopy(hybrid)
    first = next(iter(inv["all"]["hosts"]))
    group = next(iter(inv["all"]["children"]))
    text = None
    if case == "jinja":
        inv["all"]["hosts"][first]["fleet_model"] = "{{ 'x' }}"
    elif case == "top_key":
        inv["extra"] = {"hosts": {"other": None}}
    elif case == "child_vars":
        inv["all"]["children"][group]["vars"] = {"fleet_x": 1}
    elif case == "group_ansible_var":
        inv["all"]["vars"]["ansible_user"] = "admin"
    elif case == "host_range":
        inv["all"]["hosts"]["extra[1:2]"] = {"fleet_x": 1}
    elif case == "nested_children":
        inv["all"]["children"][group]["children"] = {"sub": {"hosts": {first: None}}}
    text = yaml.safe_dump(inv, sort_keys=False)
    if case == "vault":
        text = text.replace("fleet_name:", "fleet_secret: !vault |\n      $ANSIBLE_VAULT;1.1;AES256\n      3131\n"
                            "    fleet_name:", 1)
    elif case == "unsafe":
        text = text.replace("fleet_name:", "fleet_raw: !unsafe '{x}'\n    fleet_name:", 1)
    elif case == "anchor_merge":
        text = text.replace("  vars:\n", "  vars:\n    base: &b {k: 1}\n    more: {<<: *b, j: 2}\n", 1)
    elif case == "int_key":
        text = text.replace("fleet_name:", "fleet_map: {1: one}\n    fleet_name:", 1)
    elif case == "timestamp":
        text = text.replace("fleet_name:", "fleet_when: 2026-01-01\n    fleet_name:", 1)
    path = _write(tmp_path, text)
    if case == "host_vars":
        (path.parent / "host_vars").mkdir()
        (path.parent / "host_vars" / f"{first}.yml").write_text("fleet_model: other\n")
    elif case == "executable":  # Ansible's script plugin would run it
        path.chmod(0o755)
        before = calls["n"]
        with contextlib.suppress(Exception):
            reader.load_inventory([str(path)])
        assert calls["n"] == before + 1
        return
    elif case == "other_group_vars":
        (path.parent / "group_vars").mkdir()
        (path.parent / "group_vars" / f"{group}.yml").write_text("fleet_model: other\n")
    if case == "vault":  # Ansible cannot decrypt it without a vault secret: what matters is the path taken
        before = calls["n"]
        with contextlib.suppress(Exception):  # whatever Ansible makes of it
            reader.load_inventory([str(path)])
        assert calls["n"] == before + 1
        return
    _same(path, calls, fast_path=False)


def test_an_ini_file_goes_through_ansible(tmp_path, calls):
    path = _write(tmp_path, "[pool_a]\ngpu-1 fleet_pool=a fleet_site=s fleet_site_kind=aws fleet_patch_ring=0 "
                  "fleet_serving_port=8000 fleet_max_unavailable=1 fleet_min_serving=0 "
                  "fleet_lb='{\"kind\": \"nlb\"}'\n", "hosts.ini")
    _same(path, calls, fast_path=False)


def test_a_duplicate_key_goes_through_ansible(tmp_path, calls, hybrid):
    text = yaml.safe_dump(hybrid, sort_keys=False).replace("fleet_name:", "fleet_name: one\n    fleet_name:", 1)
    _same(_write(tmp_path, text), calls, fast_path=False)


def test_bad_host_vars_are_the_same_error(tmp_path, calls, hybrid):
    inv = copy.deepcopy(hybrid)
    names = list(inv["all"]["hosts"])
    inv["all"]["hosts"][names[0]]["fleet_patch_ring"] = "soon"
    inv["all"]["hosts"][names[1]]["fleet_lb"] = {"kind": "f5"}
    del inv["all"]["hosts"][names[2]]["fleet_site"]
    got = _same(_write(tmp_path, inv), calls)
    assert got[0] == "error" and any("fleet_patch_ring" in p[1] and p[2] == "soon" for p in got[1])
    # pools that disagree on a budget: the message names the first host, so the order must be Ansible's
    inv = copy.deepcopy(hybrid)
    pool = inv["all"]["hosts"][names[0]]["fleet_pool"]
    other = [n for n in names if inv["all"]["hosts"][n]["fleet_pool"] == pool][-1]
    inv["all"]["hosts"][other]["fleet_min_serving"] = 99
    got = _same(_write(tmp_path, inv), calls)
    assert got[0] == "error"


def test_a_host_with_non_mapping_vars_goes_through_ansible(tmp_path, calls, hybrid):
    inv = copy.deepcopy(hybrid)
    inv["all"]["hosts"][next(iter(inv["all"]["hosts"]))] = ["not", "vars"]
    _same(_write(tmp_path, inv), calls, fast_path=False)


def test_the_environment_forces_ansible(tmp_path, calls, hybrid, monkeypatch):
    path = _write(tmp_path, hybrid)
    monkeypatch.setenv(fast.PARSER_ENV, "ansible")
    reader.load_inventory([str(path)])
    assert calls["n"] == 1
    monkeypatch.setenv("ANSIBLE_HASH_BEHAVIOUR", "merge")
    monkeypatch.delenv(fast.PARSER_ENV)
    reader.load_inventory([str(path)])
    assert calls["n"] == 2


def test_shared_objects_are_copies_as_with_ansible(tmp_path, calls, hybrid):
    inv = copy.deepcopy(hybrid)
    inv["all"]["vars"]["fleet_mirrors"] = [{"prefix": "docker.io/x", "insecure": True}]
    names = list(inv["all"]["hosts"])
    shared = {"kind": "nlb", "target_group_arn": "arn:x"}
    for name in names[:2]:
        inv["all"]["hosts"][name]["fleet_extra"] = shared  # safe_dump writes an anchor and an alias
    path = _write(tmp_path, inv)
    assert "*id" in path.read_text()
    got = _load(path, None, ansible=False)
    _same(path, calls)
    a, b = (got.vars[n] for n in names[:2])
    assert a["fleet_extra"] == b["fleet_extra"] and a["fleet_extra"] is not b["fleet_extra"]
    assert a["fleet_mirrors"] == b["fleet_mirrors"] and a["fleet_mirrors"] is not b["fleet_mirrors"]


def test_the_rendered_file_is_read_as_json_and_ansible_reads_it_as_yaml(tmp_path, calls, monkeypatch):
    """`fleet inventory` writes JSON under a comment header: the fast path reads it with json (no YAML parse at
    all), Ansible as YAML, and both give the same."""
    path = _write(tmp_path, render_inventory(load_stack("example-hybrid", ROOT)))
    with monkeypatch.context() as m:
        m.setattr(fast.yaml, "load", lambda *a, **k: pytest.fail("the rendered file went through YAML"))
        assert fast.read([str(path)]) is not None
    inv = _same(path, calls)
    assert len(inv.hosts) == 14


@pytest.mark.parametrize(("value", "yaml_reads"), [
    ("1e-05", "1e-05"),  # YAML 1.1 has no exponent-only float: a string
    ("NaN", "NaN"),
    ('"a\\/b"', "a/b"),  # YAML 1.2's escape, which PyYAML reads too
    ("0.5", 0.5),
    ('"caf\\u00e9"', "café"),
])
def test_json_that_yaml_reads_otherwise_is_left_to_the_yaml_reading(tmp_path, calls, value, yaml_reads):
    text = ("# rendered\n{\"all\": {\"hosts\": {\"h1\": {\"ansible_host\": \"10.0.0.1\", \"fleet_x\": "
            + value + "}}}}\n")
    expected = yaml.safe_load(text)
    assert expected["all"]["hosts"]["h1"]["fleet_x"] == yaml_reads
    data, _ = fast._load(_write(tmp_path, text))
    assert data == expected


def test_render_refuses_a_value_yaml_would_read_back_otherwise(root=ROOT):
    from infra.model.inventory import _check_yaml_reads_as_json

    _check_yaml_reads_as_json({"a": [1, 0.25, "1e-05"]}, "all")
    with pytest.raises(ValueError, match=r"all\.a\[1\]: 1e-05"):
        _check_yaml_reads_as_json({"a": [1, 1e-05]}, "all")
