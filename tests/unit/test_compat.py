"""Compatibility rules, table-driven: one passing and one failing case per rule."""

import datetime as dt

import pytest

from patching.release.bundle import Bundle
from patching.release.compat import check_bundle, fabric_manager_package, nscq_package, rules

TODAY = dt.date(2026, 11, 28)


def with_driver(b, version):
    b["driver"]["version"] = b["fabric_manager"] = b["nscq"] = version


CASES = [
    # rule, severity, mutate (None = the shipped bundle passes), the field it names
    ("cuda-driver-minimum", "error", lambda b: with_driver(b, "575.57.08"), "driver.version"),
    ("cuda-driver-minimum", None, lambda b: (with_driver(b, "580.65.06"), b.update(cuda="13.0.0")), None),
    ("cuda-toolkit-driver", "warning", lambda b: with_driver(b, "580.82.07"), "driver.version"),
    ("cuda-toolkit-driver", None, lambda b: with_driver(b, "580.95.05"), None),
    ("fabric-manager-equals-driver", "error", lambda b: b.update(fabric_manager="580.82.07"), "fabric_manager"),
    ("fabric-manager-equals-driver", None, lambda b: None, None),
    ("nscq-equals-driver", "error", lambda b: b.update(nscq="580.82.07"), "nscq"),
    ("nscq-equals-driver", None, lambda b: None, None),
    ("container-toolkit-one-version", "error",
     lambda b: b["container_toolkit"].update({"libnvidia-container1": "1.17.8-1"}), "container_toolkit"),
    ("container-toolkit-one-version", None, lambda b: None, None),
    ("driver-branch-eol", "warning",
     lambda b: (with_driver(b, "570.195.03"), b.update(cuda="12.8.1")), "driver.version"),
    ("driver-branch-eol", None, lambda b: None, None),
    ("gpu-architecture", "error",
     lambda b: (with_driver(b, "450.80.02"), b.update(cuda="11.0.3"), b.update(gpus=["H100-SXM5-80GB"])), "gpus[0]"),
    ("gpu-architecture", None, lambda b: b.update(gpus=["H100-SXM5-80GB", "T4"]), None),
]


@pytest.mark.parametrize("rule,severity,mutate,field", CASES,
                         ids=[f"{c[0]}-{c[1] or 'passes'}" for c in CASES])
def test_rule(bundle_data, rule, severity, mutate, field):
    mutate(bundle_data)
    findings = [f for f in check_bundle(Bundle.model_validate(bundle_data), TODAY) if f.rule == rule]
    if severity is None:
        assert findings == []
    else:
        assert [(f.severity, f.field) for f in findings] == [(severity, field)]
        assert findings[0].source.startswith("https://")


def test_every_rule_row_has_a_source():
    data = rules()
    for table in ("cuda_family_minimum_driver", "cuda_toolkit_driver", "driver_branches", "gpu_architectures"):
        assert all(row["source"].startswith("https://") for row in data[table]), table
    assert data["fabric_manager"]["source"].startswith("https://")


def test_all_broken_rules_are_reported_at_once(bundle_data):
    bundle_data["fabric_manager"] = "580.82.07"
    bundle_data["nscq"] = "580.82.07"
    bundle_data["container_toolkit"]["libnvidia-container1"] = "1.17.8-1"
    errors = [f for f in check_bundle(Bundle.model_validate(bundle_data), TODAY) if f.severity == "error"]
    assert len(errors) == 3


@pytest.mark.parametrize("branch,fm,nscq", [(550, "nvidia-fabricmanager-550", "libnvidia-nscq-550"),
                                            (570, "nvidia-fabricmanager-570", "libnvidia-nscq-570"),
                                            (580, "nvidia-fabricmanager", "libnvidia-nscq")])
def test_fabric_manager_package_name_by_branch(branch, fm, nscq):
    assert (fabric_manager_package(branch), nscq_package(branch)) == (fm, nscq)
