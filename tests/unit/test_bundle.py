"""Bundles: the shipped manifests load; bad manifests are refused naming file, field and value."""

import hashlib
import json

import pytest
import yaml

from infra.model.errors import InputError
from patching.release.bundle import Bundle, is_digest, load_bundle, parse_bundle
from tests.conftest import write_yaml


def test_shipped_bundles_load(root):
    oct_, nov = load_bundle(root / "releases/2026-10.yaml"), load_bundle(root / "releases/2026-11.yaml")
    assert oct_.driver.branch == nov.driver.branch == 580
    assert oct_.serving.image != nov.serving.image
    assert {m.weights.sha256 for m in oct_.models}.isdisjoint({m.weights.sha256 for m in nov.models})
    assert any(a.component == "serving" for a in nov.advisories)


def test_package_pins_follow_the_branch_naming(root):
    nov = load_bundle(root / "releases/2026-11.yaml")
    pkgs = nov.packages(nvswitch=True, ib=True)
    assert pkgs["nvidia-fabricmanager"] == "580.95.05-1" and pkgs["libnvidia-nscq"] == "580.95.05-1"
    assert pkgs["libnccl2"] == "2.28.3-1+cuda13.0" and pkgs["cuda-toolkit-13-0"] == "13.0.2-1"
    assert "nvidia-fabricmanager" not in nov.packages(nvswitch=False)


BAD = [
    ("tag instead of digest", lambda b: b["serving"].update(image="docker.io/vllm/vllm-openai:v0.11.1"),
     ["serving.image", "found a tag", "vllm-openai:v0.11.1"]),
    ("short digest", lambda b: b["serving"].update(image="vllm/vllm-openai@sha256:abc"),
     ["serving.image", "64 lowercase hex"]),
    ("bad weights sha", lambda b: b["models"][0]["weights"].update(sha256="XYZ"),
     ["models[0].weights.sha256", "'XYZ'"]),
    ("unknown key", lambda b: b.update(cudaa="13.0.2"), ["unknown key 'cudaa'", "did you mean 'cuda'"]),
    ("nested unknown key", lambda b: b["driver"].update(verison="1"), ["driver", "'verison'", "'version'"]),
    ("toolkit package missing", lambda b: b["container_toolkit"].pop("libnvidia-container1"),
     ["container_toolkit", "missing ['libnvidia-container1']"]),
    ("bad advisory id", lambda b: b["advisories"][0].update(id="CVE-25"), ["advisories[0].id", "'CVE-25'"]),
    ("missing field", lambda b: b.pop("cuda"), ["cuda", "Field required"]),
    ("unknown gpu", lambda b: b["gpus"].append("V100"), ["gpus", "unknown GPU model"]),
]


@pytest.mark.parametrize("mutate,expected", [(m, e) for _, m, e in BAD], ids=[b[0] for b in BAD])
def test_bad_bundle_is_refused(tmp_path, bundle_data, mutate, expected):
    mutate(bundle_data)
    path = write_yaml(tmp_path / "bad.yaml", bundle_data)
    with pytest.raises(InputError) as info:
        load_bundle(path)
    text = str(info.value)
    assert str(path) in text
    for part in expected:
        assert part in text, f"{part!r} not in:\n{text}"


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("release: '2026-12'\ndriver: {version: 580.95.05\n")
    with pytest.raises(InputError, match=r"bad.yaml: line \d+, column \d+: malformed YAML"):
        load_bundle(path)


def _reformatted(data: dict) -> str:
    """The same bundle written differently: keys reversed at every level, flow style, a comment."""
    def reverse(value):
        if isinstance(value, dict):
            return {k: reverse(value[k]) for k in reversed(list(value))}
        return [reverse(v) for v in value] if isinstance(value, list) else value
    return "# the same bundle, written another way\n" + yaml.safe_dump(reverse(data), sort_keys=False,
                                                                        default_flow_style=True, width=60)


def test_digest_is_the_content_not_the_formatting(tmp_path, root, bundle_data):
    original = load_bundle(root / "releases/2026-11.yaml")
    assert is_digest(original.digest) and not is_digest(original.digest.upper())
    assert original.digest == hashlib.sha256(json.dumps(
        original.model_dump(mode="json", exclude_defaults=True), sort_keys=True, separators=(",", ":"),
        ensure_ascii=False).encode()).hexdigest()
    reformatted = tmp_path / "reformatted.yaml"
    reformatted.write_text(_reformatted(bundle_data))
    assert reformatted.read_text() != (root / "releases/2026-11.yaml").read_text()
    assert load_bundle(reformatted).digest == original.digest
    # the copies the pipeline keeps: the file handed to the playbooks (-e bundle_file) and the journal's JSON
    written = yaml.safe_dump(original.model_dump(mode="json", by_alias=True), sort_keys=False)
    assert parse_bundle(yaml.safe_load(written), "written").digest == original.digest
    journaled = json.loads(json.dumps(original.model_dump(mode="json")))
    assert Bundle.model_validate(journaled).digest == original.digest
    # a default spelled out is the same content
    without = {k: v for k, v in bundle_data.items() if k != "advisories"}
    assert parse_bundle(without, "a").digest == parse_bundle({**without, "advisories": []}, "b").digest


@pytest.mark.parametrize("change", [
    lambda b: b["driver"].update(version="580.82.07"),
    lambda b: b.update(nscq="580.82.07"),
    lambda b: b["container_toolkit"].update({"libnvidia-container1": "1.17.8-1"}),
    lambda b: b["models"][1]["weights"].update(sha256="0" * 64),
    lambda b: b.update(summary=b["summary"] + " (reissued)"),
    lambda b: b.update(release="2026-11.1"),
], ids=["driver", "nscq", "toolkit-package", "weights", "summary", "release"])
def test_digest_changes_with_any_value(bundle_data, change):
    before = parse_bundle(bundle_data, "before").digest
    change(bundle_data)
    assert parse_bundle(bundle_data, "after").digest != before
