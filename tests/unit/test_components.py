"""Which components a bundle change touches (patching/release/components.py), held to the bundle's schema and
to the playbooks' platform table and knobs."""

from __future__ import annotations

import re

import pytest
import yaml

from patching.release.bundle import Bundle, load_bundle
from patching.release.compat import diff_bundles
from patching.release.components import COMPONENTS, FIELDS, NOT_PINS, changed_components, ordered
from tests.conftest import ROOT

PLAYBOOKS = ROOT / "playbooks"


def _bundle(**changes) -> Bundle:
    data = load_bundle(ROOT / "releases/2026-11.yaml").model_dump(mode="json")
    for path, value in changes.items():
        node = data
        *parents, last = path.split("__")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return Bundle.model_validate(data)


def test_every_bundle_field_is_mapped_and_every_component_is_the_platform_tables():
    assert set(FIELDS) | set(NOT_PINS) == set(Bundle.model_fields)
    table = yaml.safe_load((PLAYBOOKS / "group_vars/all/platform.yml").read_text())["fleet_platform_table"]
    assert tuple(row["component"] for row in table) == COMPONENTS
    assert {c for cs in FIELDS.values() for c in cs} <= set(COMPONENTS)


def test_each_field_maps_to_the_roles_whose_knobs_read_it():
    """bundle.yml maps fields to knobs; a knob's role prefix names the component that reads the field."""
    knobs = yaml.safe_load((PLAYBOOKS / "group_vars/all/bundle.yml").read_text())
    reads: dict[str, set[str]] = {}
    for knob, expression in knobs.items():
        role = next((c for c in COMPONENTS if knob.startswith(f"{c}_")), None)
        if role is None:
            continue
        fields = set(re.findall(r"fleet_bundle\.(\w+)", str(expression)))
        if "fleet_bundle_model" in str(expression):
            fields.add("models")
        for f in fields:
            reads.setdefault(f, set()).add(role)
    for field, roles in reads.items():
        assert roles <= set(FIELDS[field]), (field, roles, FIELDS[field])


def test_the_release_diff_touches_what_it_changes():
    old, new = (load_bundle(ROOT / f"releases/{r}.yaml") for r in ("2026-10", "2026-11"))
    assert changed_components(diff_bundles(old, new)) == {"gpu_driver", "fabric_manager", "cuda_toolkit",
                                                          "container_toolkit", "model_serving"}
    assert changed_components(diff_bundles(new, new)) == frozenset()


@pytest.mark.parametrize(("changes", "expected"), [
    ({"models__0__weights__sha256": "0" * 64}, {"model_serving"}),
    ({"serving__version": "0.11.2"}, {"model_serving"}),
    ({"nccl": "2.28.9-1"}, {"cuda_toolkit"}),
    ({"ofed": "24.10-3.2.5.0"}, {"ofed"}),
    ({"efa_installer_sha256": "1" * 64}, {"efa"}),
    ({"gpus": ["A100-SXM4-80GB"]}, set()),
])
def test_one_change_touches_its_components_only(changes, expected):
    new = load_bundle(ROOT / "releases/2026-11.yaml")
    assert changed_components(diff_bundles(new, _bundle(**changes))) == expected


def test_an_unknown_change_or_field_applies_everything():
    assert changed_components(None) is None
    assert changed_components([("driver.version", "1", "2"), ("kernel", "6.1", "6.8")]) is None


def test_ordered_is_converge_order():
    assert ordered({"model_serving", "gpu_driver", "cuda_toolkit"}) == ["gpu_driver", "cuda_toolkit", "model_serving"]
