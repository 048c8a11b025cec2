"""The rollout policy: defaults, the documented example, amounts, errors that name file and field."""

import datetime as dt

import pytest

from infra.model.amount import resolve
from infra.model.errors import InputError
from patching.rollout.policy import Policy, load_policy, schema
from tests.conftest import write_yaml


def test_no_policy_is_the_conservative_default():
    policy, calendar = load_policy(None)
    assert policy.canary.per_site == 1 and policy.waves.size == "25%"
    assert policy.budgets.canary == policy.budgets.per_wave == policy.budgets.global_ == 0
    assert policy.gates.testinfra and policy.gates.slo.p99_ms == 200
    assert policy.rollback == "failed-hosts" and not policy.windows
    assert calendar.open_window(dt.datetime.now(dt.UTC)) is not None  # no window: always open


def test_documented_example_loads(root):
    policy, calendar = load_policy(root / "docs/policy.example.yaml")
    assert policy.waves.pools == {"v3-hall": 1} and policy.budgets.global_ == 2
    assert policy.budgets.per_wave == "10%" and policy.rollback == "wave"
    assert policy.windows[0].cutoff == dt.timedelta(minutes=45)
    christmas = dt.datetime(2026, 12, 24, 12, tzinfo=dt.UTC)
    assert calendar.freeze_at(christmas) is not None


def test_every_schema_field_is_documented(root):
    doc = (root / "docs/policy.md").read_text()
    s = schema()
    for section in s["properties"]:
        assert f"## {section}" in doc, section
    for model, spec in s["$defs"].items():
        for field in spec["properties"]:
            # a table row `field`, or `slo.field` for the nested gates
            assert f"`{field}`" in doc or f".{field}`" in doc or f"`{field}." in doc, (model, field)


def test_schema_uses_the_file_names_of_fields():
    s = schema()
    assert "global" in s["$defs"]["Budgets"]["properties"]
    assert s["$defs"]["Waves"]["properties"]["size"]["anyOf"][1]["pattern"]
    assert s["additionalProperties"] is False


@pytest.mark.parametrize(("data", "field", "words"), [
    ({"rolback": "wave"}, "", "did you mean 'rollback'"),
    ({"rollback": "everything"}, "rollback", "'failed-hosts', 'wave' or 'all'"),
    ({"waves": {"size": "150%"}}, "waves.size", "percentage"),
    ({"waves": {"size": -1}}, "waves.size", "negative"),
    ({"waves": {"pools": {"v3": "lots"}}}, "waves.pools.v3", "percentage"),
    ({"budgets": {"global": True}}, "budgets.global", "count"),
    ({"gates": {"slo": {"p99_ms": 0}}}, "gates.slo.p99_ms", "greater than 0"),
    ({"gates": {"soak": {"duration": "ten minutes"}}}, "gates.soak.duration", "duration like"),
    ({"freeze": {"ranges": [{"start": "2026-12-24", "end": "2026-12-20"}]}}, "freeze.ranges[0]", "before start"),
    ({"freeze": {"timezone": "Mars/Olympus"}}, "freeze.timezone", "IANA"),
    ({"timeouts": {"apply": "forever"}}, "timeouts.apply", "duration like"),
])
def test_bad_policy_names_file_field_and_value(tmp_path, data, field, words):
    path = write_yaml(tmp_path / "policy.yaml", data)
    with pytest.raises(InputError) as err:
        load_policy(path)
    text = str(err.value)
    assert f"{path}: {field}" in text and words in text, text


def test_policy_must_be_a_mapping_and_valid_yaml(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(InputError, match="expected a mapping"):
        load_policy(path)
    path.write_text("waves: {size: 1\n")
    with pytest.raises(InputError, match="malformed YAML"):
        load_policy(path)


def test_relative_ical_path_is_anchored_next_to_the_policy(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg/freeze.ics").write_text(
        "BEGIN:VCALENDAR\nBEGIN:VEVENT\nUID:1\nDTSTART;VALUE=DATE:20261224\nEND:VEVENT\nEND:VCALENDAR\n")
    path = write_yaml(tmp_path / "cfg/policy.yaml", {"freeze": {"ical": "freeze.ics"}})
    policy, calendar = load_policy(path)
    assert policy.freeze.ical == tmp_path / "cfg/freeze.ics"
    assert calendar.freeze_at(dt.datetime(2026, 12, 24, 8, tzinfo=dt.UTC)) is not None
    # the stored policy (journal) reads back the same
    assert Policy.model_validate(policy.model_dump(mode="json", by_alias=True)) == policy


@pytest.mark.parametrize(("amount", "total", "at_least_one", "expected"), [
    ("25%", 4, False, 1), ("25%", 7, False, 1), ("25%", 3, False, 0), ("25%", 3, True, 1),
    ("10%", 5, False, 0), ("50%", 5, False, 2), ("100%", 9, False, 9), (3, 2, False, 2),
    (0, 10, True, 1), ("0%", 0, True, 0), (2, 10, True, 2),
])
def test_percentages_round_down(amount, total, at_least_one, expected):
    assert resolve(amount, total, at_least_one=at_least_one) == expected
