"""Compatibility rules (patching/release/compat.yaml) applied to a bundle.

Each rule yields findings; an `error` finding refuses the bundle, a `warning` is printed. All rules
run, so `fleet release check` reports everything wrong at once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from infra.model.errors import Problem
from patching.release.bundle import CONTAINER_TOOLKIT_PACKAGES, Bundle
from patching.release.rules import RULES_FILE, fabric_manager_package, nscq_package, rules, version_key

__all__ = ["RULES_FILE", "Finding", "check_bundle", "diff_bundles", "fabric_manager_package", "nscq_package",
           "rule_problems", "rules", "version_key"]


@dataclass(frozen=True)
class Finding:
    """A compatibility rule's verdict on a bundle: severity, the field and value, why, and the rule's source."""

    rule: str
    severity: Literal["error", "warning"]
    field: str
    value: Any
    message: str
    source: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.field}: {self.message} (value: {self.value!r}) [{self.rule}; {self.source}]"


def check_bundle(bundle: Bundle, today: dt.date | None = None) -> list[Finding]:
    """Every compatibility rule applied to a bundle, as findings (errors refuse it, warnings are printed)."""
    today = today or dt.date.today()
    findings: list[Finding] = []
    for rule in (_cuda_family, _cuda_toolkit_driver, _fabric_manager, _nscq, _container_toolkit,
                 _branch_eol, _gpu_architecture):
        findings += rule(bundle, today)
    return findings


def rule_problems(bundle: Bundle, source: str | Path) -> list[Problem]:
    """Every broken (error) rule as an input problem of the bundle file, for commands that refuse it."""
    return [Problem(str(source), f.field, f.value, f"{f.message} [{f.rule}]")
            for f in check_bundle(bundle) if f.severity == "error"]


def _cuda_family(b: Bundle, _: dt.date) -> list[Finding]:
    family = b.cuda.split(".")[0]
    row = next((r for r in rules()["cuda_family_minimum_driver"] if r["cuda"] == family), None)
    if row is None:
        return [Finding("cuda-driver-minimum", "error", "cuda", b.cuda,
                        f"no minimum driver is known for CUDA {family}.x", RULES_FILE.name)]
    if version_key(b.driver.version) < version_key(row["driver"]):
        return [Finding("cuda-driver-minimum", "error", "driver.version", b.driver.version,
                        f"CUDA {b.cuda} needs driver >= {row['driver']} (CUDA {family}.x minor-version "
                        "compatibility)", row["source"])]
    return []


def _cuda_toolkit_driver(b: Bundle, _: dt.date) -> list[Finding]:
    rows = [r for r in rules()["cuda_toolkit_driver"] if version_key(r["cuda"]) <= version_key(b.cuda)
            and version_key(r["cuda"])[:2] == version_key(b.cuda)[:2]]
    if not rows:
        return []
    row = max(rows, key=lambda r: version_key(r["cuda"]))
    if version_key(b.driver.version) < version_key(row["driver"]):
        return [Finding("cuda-toolkit-driver", "warning", "driver.version", b.driver.version,
                        f"CUDA {row['cuda']} ships with driver {row['driver']}; an older driver runs it "
                        "under minor-version compatibility without newer-PTX JIT", row["source"])]
    return []


def _fabric_manager(b: Bundle, _: dt.date) -> list[Finding]:
    fm = rules()["fabric_manager"]
    if b.fabric_manager != b.driver.version:
        return [Finding("fabric-manager-equals-driver", "error", "fabric_manager", b.fabric_manager,
                        f"fabric manager must equal the driver exactly ({b.driver.version}); package "
                        f"{fabric_manager_package(b.driver.branch)}", fm["source"])]
    return []


def _nscq(b: Bundle, _: dt.date) -> list[Finding]:
    if b.nscq != b.driver.version:
        return [Finding("nscq-equals-driver", "error", "nscq", b.nscq,
                        f"libnvidia-nscq must equal the driver exactly ({b.driver.version}); package "
                        f"{nscq_package(b.driver.branch)}", rules()["fabric_manager"]["source"])]
    return []


def _container_toolkit(b: Bundle, _: dt.date) -> list[Finding]:
    versions = {b.container_toolkit[p] for p in CONTAINER_TOOLKIT_PACKAGES}
    if len(versions) > 1:
        listing = ", ".join(f"{p}={b.container_toolkit[p]}" for p in CONTAINER_TOOLKIT_PACKAGES)
        return [Finding("container-toolkit-one-version", "error", "container_toolkit", listing,
                        "the four container-toolkit packages must be at one version",
                        rules()["container_toolkit"]["source"])]
    return []


def _branch_eol(b: Bundle, today: dt.date) -> list[Finding]:
    row = next((r for r in rules()["driver_branches"] if r["branch"] == b.driver.branch), None)
    if row is None:
        return [Finding("driver-branch-eol", "warning", "driver.version", b.driver.version,
                        f"branch R{b.driver.branch} is not in the supported-branches table", RULES_FILE.name)]
    if row["eol"] < today:
        return [Finding("driver-branch-eol", "warning", "driver.version", b.driver.version,
                        f"branch R{b.driver.branch} ({row['kind']}) reached end of life on {row['eol']}",
                        row["source"])]
    return []


def _gpu_architecture(b: Bundle, _: dt.date) -> list[Finding]:
    out = []
    arch_of = {g: r for r in rules()["gpu_architectures"] for g in r["gpus"]}
    for i, gpu in enumerate(b.gpus):
        row = arch_of.get(gpu)
        if row is None:
            out.append(Finding("gpu-architecture", "error", f"gpus[{i}]", gpu,
                               "no architecture row for this GPU", RULES_FILE.name))
            continue
        last = row["last_branch"]
        if b.driver.branch < row["first_branch"] or (last is not None and b.driver.branch > last):
            span = f"R{row['first_branch']}" + (f"..R{last}" if last else " and later")
            out.append(Finding("gpu-architecture", "error", f"gpus[{i}]", gpu,
                               f"{row['arch']} GPUs need driver branch {span}; the bundle has "
                               f"R{b.driver.branch}", row["source"]))
    return out


def diff_bundles(old: Bundle, new: Bundle) -> list[tuple[str, Any, Any]]:
    """(field, old, new) for every pinned value that changes between two bundles."""
    def flat(prefix: str, value: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for k, v in value.items():
                out |= flat(f"{prefix}.{k}" if prefix else str(k), v)
            return out
        if isinstance(value, list) and value and isinstance(value[0], dict) and "name" in value[0]:
            return flat(prefix, {item["name"]: {k: v for k, v in item.items() if k != "name"} for item in value})
        return {prefix: value}

    skip = ("release", "published", "summary", "advisories")
    a = flat("", old.model_dump(mode="json", exclude=set(skip)))
    b = flat("", new.model_dump(mode="json", exclude=set(skip)))
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
