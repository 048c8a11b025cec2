"""Fleet model: the shipped stacks load, and every kind of bad input names file, field and value."""

from pathlib import Path

import pytest

from infra.model.errors import InputError
from infra.model.fleet import load_stack
from tests.conftest import write_yaml


def test_shipped_stacks_load(root):
    lab = load_stack("lab", root)
    assert {s.kind for s in lab.sites.values()} == {"aws", "outpost", "onprem"}
    assert {lab.site_of(h).kind for h in lab.hosts.values()} == {"aws", "outpost", "onprem"}
    ex = load_stack("example-hybrid", root)
    p4d = [p for p in ex.pools.values() if p.instance_type == "p4d.24xlarge"]
    assert len(p4d) == 2 and len({ex.sites[p.site].availability_zone for p in p4d}) == 2
    hall = [h for h in ex.hosts.values() if ex.site_of(h).kind == "onprem"]
    assert hall and all(len(h.ib_hcas) == 8 and {hc.rate for hc in h.ib_hcas} == {200} for h in hall)
    assert all({p.feed for p in h.psus} == {"A", "B"} for h in hall)
    assert len(ex.sites["hall-a"].ups) == 2
    assert ex.pools["v3-hall-a"].nvswitch and not ex.pools["r1-outpost"].nvswitch


def test_cloud_pool_count_expands_to_named_hosts(root):
    fleet = load_stack("lab", root)
    assert [h.name for h in fleet.hosts_in("v3-aws")] == ["v3-aws-0", "v3-aws-1"]


def _problem(tmp_path: Path, stack: dict) -> str:
    write_yaml(tmp_path / "Pulumi.t.yaml", stack)
    with pytest.raises(InputError) as info:
        load_stack("t", tmp_path)
    text = str(info.value)
    assert "Pulumi.t.yaml" in text
    return text


def hosts(s):
    return s["config"]["fleet:hosts"]


def pools(s):
    return s["config"]["fleet:pools"]


BAD = [
    ("unknown host key", lambda s: hosts(s)[0].update(serving_prot=9000),
     ["config.fleet:hosts[0]", "unknown key 'serving_prot'", "did you mean 'serving_port'"]),
    ("unknown pool key", lambda s: pools(s)[0].update(gpu_modle="T4"),
     ["config.fleet:pools[0]", "'gpu_modle'", "did you mean 'gpu_model'"]),
    ("unknown fleet key", lambda s: s["config"].update({"fleet:pool": []}),
     ["config.fleet:pool", "did you mean 'fleet:pools'"]),
    ("duplicate host", lambda s: hosts(s).append(dict(hosts(s)[0], address="10.20.1.99")),
     ["config.fleet:hosts[2].name", "duplicate host name", "'dgx-a1'"]),
    ("no such pool", lambda s: hosts(s)[0].update(pool="v3-hal"),
     ["config.fleet:hosts[0].pool", "no such pool", "'v3-hal'", "did you mean 'v3-hall'"]),
    ("no such site", lambda s: pools(s)[0].update(site="aws-use2"),
     ["config.fleet:pools[0].site", "no such site", "'aws-use2'"]),
    ("serving port clash", lambda s: hosts(s)[1].update(address=hosts(s)[0]["address"]),
     ["config.fleet:hosts[1].serving_port", "10.20.1.11:8000", "already used by host 'dgx-a1'"]),
    ("bad port", lambda s: pools(s)[0].update(serving_port=70000),
     ["config.fleet:pools[0].serving_port", "70000"]),
    ("unknown gpu", lambda s: pools(s)[0].update(gpu_model="A100-SXM4-40G"),
     ["config.fleet:pools[0].gpu_model", "did you mean 'A100-SXM4-40GB'"]),
    ("bad budget", lambda s: pools(s)[0].update(max_unavailable="half"),
     ["config.fleet:pools[0].max_unavailable", "'half'"]),
    ("ups missing", lambda s: hosts(s)[0]["psus"][0].update(ups="ups-c"),
     ["config.fleet:hosts[0].psus[0].ups", "no such UPS", "'ups-c'"]),
    ("bad site kind", lambda s: s["config"]["fleet:sites"][0].update(kind="gcp"),
     ["config.fleet:sites[0]", "'gcp'"]),
    ("bad hca guid", lambda s: hosts(s)[0]["ib_hcas"][0].update(guid="0xZZ"),
     ["config.fleet:hosts[0].ib_hcas[0].guid", "'0xZZ'"]),
    ("onprem without address", lambda s: hosts(s)[0].pop("address"),
     ["config.fleet:hosts[0].address", "required for an on-prem host"]),
    ("cloud pool without instance type", lambda s: pools(s)[0].pop("instance_type"),
     ["config.fleet:pools[0].instance_type", "required for a pool on a aws site"]),
]


@pytest.mark.parametrize("mutate,expected", [(m, e) for _, m, e in BAD], ids=[b[0] for b in BAD])
def test_bad_stack_is_refused_with_file_field_and_value(tmp_path, lab_stack, mutate, expected):
    mutate(lab_stack)
    text = _problem(tmp_path, lab_stack)
    for part in expected:
        assert part in text, f"{part!r} not in:\n{text}"


def test_malformed_yaml_names_the_line(tmp_path):
    (tmp_path / "Pulumi.t.yaml").write_text("config:\n  fleet:name: lab\n  fleet:sites: [\n")
    with pytest.raises(InputError, match=r"Pulumi.t.yaml: line \d+, column \d+: malformed YAML"):
        load_stack("t", tmp_path)


def test_duplicate_yaml_key_is_refused(tmp_path):
    (tmp_path / "Pulumi.t.yaml").write_text("config:\n  fleet:name: a\n  fleet:name: b\n")
    with pytest.raises(InputError, match="duplicate key 'fleet:name'"):
        load_stack("t", tmp_path)


def test_all_problems_are_reported_at_once(tmp_path, lab_stack):
    hosts(lab_stack)[0].update(pool="nope")
    pools(lab_stack)[0].update(site="nowhere")
    write_yaml(tmp_path / "Pulumi.t.yaml", lab_stack)
    with pytest.raises(InputError) as info:
        load_stack("t", tmp_path)
    assert len(info.value.problems) == 2


def test_missing_stack_file(tmp_path):
    with pytest.raises(InputError, match=r"Pulumi\.nope\.yaml: no such stack file"):
        load_stack("nope", tmp_path)
