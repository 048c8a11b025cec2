"""patching/rollout/identity.py: a bundle reusing the release name hosts run, with other content, is bad input."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytest
import yaml

from patching.release.bundle import Bundle, parse_bundle
from patching.release.pins import host_pins
from patching.rollout.actions import HostSnapshot
from patching.rollout.identity import bundle_differences, manifest_differences, same_name_other_content
from tests.conftest import ROOT

SOURCE = "releases/2026-11.yaml"
NOV = yaml.safe_load((ROOT / "releases/2026-11.yaml").read_text())


def _bundle(**changes: Any) -> Bundle:
    data = copy.deepcopy(NOV)
    for key, value in changes.items():
        if key == "driver":
            data["driver"]["version"] = value
        else:
            data[key] = value
    return parse_bundle(data, "test")


GIVEN = _bundle(driver="580.95.05", fabric_manager="580.95.05", nscq="580.95.05")  # the file handed in
RUNNING = _bundle(driver="580.82.07", fabric_manager="580.82.07", nscq="580.82.07")  # what the hosts got as 2026-11
DRIVER_FIELDS = [
    "releases/2026-11.yaml: driver.version: 580.95.05 here, the hosts run 580.82.07 (dgx-a1, dgx-a2)",
    "releases/2026-11.yaml: fabric_manager: 580.95.05 here, the hosts run 580.82.07 (dgx-a1, dgx-a2)",
    "releases/2026-11.yaml: nscq: 580.95.05 here, the hosts run 580.82.07 (dgx-a1, dgx-a2)",
]

COMPONENT = {"cuda-drivers-": "gpu_driver", "nvidia-fabricmanager": "fabric_manager",
             "libnvidia-nscq": "fabric_manager", "cuda-toolkit-": "cuda_toolkit", "libnccl2": "cuda_toolkit",
             "mlnx-ofed-basic": "ofed", "nvidia-container": "container_toolkit",
             "libnvidia-container": "container_toolkit"}


def manifest(bundle: Bundle, *, digest: bool = True, model: str = "deepseek-ai/DeepSeek-V3") -> dict[str, Any]:
    """The /etc/fleet/bundle.json fleet_manifest writes on an NVSwitch host converged to `bundle`."""
    components: dict[str, Any] = {}
    for package, version in host_pins(bundle, {"fleet_nvswitch": True}).items():
        name = next(c for prefix, c in COMPONENT.items() if package.startswith(prefix))
        components.setdefault(name, {"packages": {}})["packages"][package] = {"version": version, "held": True}
    components["gpu_driver"]["version"] = bundle.driver.version
    components["fabric_manager"]["version"] = bundle.fabric_manager
    components["cuda_toolkit"].update(version=bundle.cuda, nccl=bundle.nccl)
    weights = bundle.model(model).weights  # type: ignore[union-attr]
    components.setdefault("model_serving", {"packages": {}}).update(
        engine=bundle.serving.engine, version=bundle.serving.version, image=bundle.serving.image, model=model,
        weights={"path": "/srv/x", "revision": weights.revision, "sha256": weights.sha256})
    out = {"format": 1, "release": bundle.release, "components": components}
    if digest:
        out["digest"] = bundle.digest
    return out


def snap(bundle: Bundle | None, *, release: str | None = None, digest: bool = True, with_manifest: bool = True,
         reachable: bool = True) -> HostSnapshot:
    """A host as read_hosts answers it, converged to `bundle` (with or without a stamped digest)."""
    if bundle is None:
        return HostSnapshot(reachable, release, "serving")
    m = manifest(bundle, digest=digest) if with_manifest else None
    return HostSnapshot(reachable, release or bundle.release, "serving",
                        installed_digest=bundle.digest if digest else None, installed_manifest=m)


def problems(snapshots: dict[str, HostSnapshot], known: Sequence[Any] = ()) -> list[str]:
    return [str(p) for p in same_name_other_content(GIVEN, SOURCE, snapshots, known)]


def test_the_given_digests_differ():
    assert GIVEN.release == RUNNING.release == "2026-11" and GIVEN.digest != RUNNING.digest


def test_hosts_on_this_content_or_another_release_are_fine():
    october = parse_bundle(yaml.safe_load((ROOT / "releases/2026-10.yaml").read_text()), "oct")
    assert problems({"dgx-a1": snap(GIVEN), "dgx-a2": snap(GIVEN, digest=False), "dgx-b1": snap(october),
                     "dgx-b2": snap(RUNNING, reachable=False), "dgx-b3": snap(None)}, [RUNNING]) == []


def test_the_journal_bundle_with_the_hosts_digest_names_every_field():
    """The reproduced defect: 2026-11 with other driver, fabric manager and nscq pins than the hosts' 2026-11."""
    running = {"dgx-a1": snap(RUNNING, with_manifest=False), "dgx-a2": snap(RUNNING)}
    found = same_name_other_content(GIVEN, SOURCE, running, [RUNNING.model_dump(mode="json"), GIVEN])
    assert [str(p) for p in found] == DRIVER_FIELDS
    assert all(p.file == SOURCE and p.value is None for p in found)
    assert [p.field for p in found] == ["driver.version", "fabric_manager", "nscq"]


def test_the_manifest_names_the_fields_when_no_bundle_has_the_hosts_digest():
    assert problems({"dgx-a1": snap(RUNNING), "dgx-a2": snap(RUNNING)}) == DRIVER_FIELDS


def test_the_manifest_names_serving_image_and_weights():
    other_weights = copy.deepcopy(NOV["models"])
    other_weights[0]["weights"]["sha256"] = "0" * 64
    image = "docker.io/vllm/vllm-openai@sha256:" + "1" * 64
    hosts = _bundle(models=other_weights, serving={**NOV["serving"], "image": image})
    assert problems({"dgx-a1": snap(hosts)}) == [
        f"{SOURCE}: serving.image: {GIVEN.serving.image} here, the hosts run {image} (dgx-a1)",
        f"{SOURCE}: models[0].weights.sha256: {GIVEN.models[0].weights.sha256} here, the hosts run {'0' * 64} (dgx-a1)",
    ]


def test_a_branch_change_is_read_from_the_package_names():
    """cuda-drivers-570 at 570.133.20-1 and the branch-named fabric manager say driver 570.133.20."""
    branch_570 = _bundle(driver="570.133.20", fabric_manager="570.133.20", nscq="570.133.20")
    found = manifest_differences(GIVEN, manifest(branch_570))
    assert found == [("driver.version", "580.95.05", "570.133.20"), ("fabric_manager", "580.95.05", "570.133.20"),
                     ("nscq", "580.95.05", "570.133.20")]


def test_the_digest_alone_when_nothing_names_a_field():
    reissued = _bundle(summary="the same pins, reworded")  # nothing a manifest records differs
    expected = (f"{SOURCE}: release: 2026-11 is the hosts' release with other content: its content digest differs "
                f"(sha256 {GIVEN.digest} here, {reissued.digest} on the hosts) (dgx-a1, dgx-a2)")
    assert problems({"dgx-a1": snap(reissued), "dgx-a2": snap(reissued, with_manifest=False)}) == [expected]
    # with the journal's copy, the field is named (a long value shortened)
    [named] = problems({"dgx-a1": snap(reissued)}, [reissued])
    assert named == f"{SOURCE}: summary: {GIVEN.summary[:97]}... here, the hosts run the same pins, reworded (dgx-a1)"


def test_a_host_without_a_digest_is_judged_by_its_manifest():
    assert problems({"dgx-a1": snap(RUNNING, digest=False), "dgx-a2": snap(RUNNING, digest=False)}) == DRIVER_FIELDS
    reissued = _bundle(summary="the same pins, reworded")
    assert problems({"dgx-a1": snap(reissued, digest=False)}, [reissued]) == []  # its packages are this bundle's


def test_a_host_known_only_by_name_is_judged_by_the_journal():
    """`fleet plan` knows hosts from the journal alone: its bundle of that release is what they run."""
    by_name = {"dgx-a1": snap(None, release="2026-11"), "dgx-a2": snap(None, release="2026-11")}
    assert problems(by_name, [RUNNING.model_dump(mode="json")]) == DRIVER_FIELDS
    assert problems(by_name, []) == []  # nothing to compare with
    assert problems(by_name, [RUNNING, GIVEN]) == []  # they may run this very bundle


def test_hosts_are_grouped_by_what_they_run_and_counted_past_eight():
    hosts = {f"dgx-{i:02d}": snap(RUNNING) for i in range(10)}
    found = problems(hosts)
    assert len(found) == 3
    assert found[0].endswith("(dgx-00, dgx-01, dgx-02, dgx-03, dgx-04, dgx-05, dgx-06, dgx-07 and 2 more)")


def test_a_known_bundle_that_no_longer_validates_is_ignored():
    stale = {**RUNNING.model_dump(mode="json"), "retired_field": 1}
    assert problems({"dgx-a1": snap(RUNNING)}, [stale, {"release": "2026-11"}]) == [
        p.replace(" (dgx-a1, dgx-a2)", " (dgx-a1)") for p in DRIVER_FIELDS]


def test_bundle_differences_walks_lists_and_mappings():
    models = copy.deepcopy(NOV["models"])
    models[1]["weights"]["revision"] = "abcdef0"
    toolkit = {**NOV["container_toolkit"], "libnvidia-container1": "1.17.8-1"}
    other = _bundle(models=models, container_toolkit=toolkit, advisories=[])
    assert bundle_differences(GIVEN, other) == [
        ("container_toolkit.libnvidia-container1", "1.18.0-1", "1.17.8-1"),
        ("models[1].weights.revision", GIVEN.models[1].weights.revision, "abcdef0"),
        ("advisories", GIVEN.model_dump(mode="json")["advisories"], []),
    ]


@pytest.mark.parametrize("bad", [{"components": "x"}, {"components": {"gpu_driver": {"packages": ["x"]}}},
                                 {"components": {"gpu_driver": 3, "model_serving": {"model": None}}}, {}])
def test_a_damaged_manifest_names_nothing(bad):
    assert manifest_differences(GIVEN, bad) == []
