"""A release is known by its content: a bundle that reuses the release name hosts run, with other content.

The runner skips a host "already on" the bundle's release. A bundle file whose `release:` names what the
hosts run but whose pins differ would then touch nothing and end "done" (issue 12 item 7). Before a run
starts (and in the plan), `same_name_other_content` finds such hosts and names what differs, as bad input.

Where the hosts' content comes from, best first:

1. a known bundle (the journal's recorded bundles, `Journal.recorded_bundles().values()`) whose
   `Bundle.digest` equals the digest the host stamped: the exact bundle the host runs, every field;
2. the host's manifest (`HostSnapshot.installed_manifest`, /etc/fleet/bundle.json): each component's
   installed package versions (patching/release/pins.py names) and the serving facts (engine, image,
   weights) the model_serving role recorded;
3. only the digests: "its content digest differs (sha256 X here, Y on the hosts)".

Pure: no host is read here; the caller passes what `Actions.read_hosts` answered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from infra.model.errors import Problem, field_path
from patching.release.bundle import CONTAINER_TOOLKIT_PACKAGES, Bundle
from patching.rollout.actions import HostSnapshot

MAX_HOSTS_NAMED = 8  # hosts named in one problem; more are counted


def _upstream(version: str) -> str:
    """A Debian version without its revision: '580.95.05-1' -> '580.95.05'."""
    return version.rpartition("-")[0] or version


def _nccl(version: str) -> str:
    """libnccl2's Debian version as the bundle's `nccl`: '2.28.3-1+cuda13.0' -> '2.28.3-1'."""
    return version.partition("+cuda")[0]


def _same(version: str) -> str:
    return version


# bundle field -> (the shape of its Debian package's name on a host, host version -> the field's value);
# the names are Bundle.packages / pins.host_pins ones (a driver branch in the name, the fabric manager's
# and nscq's names before and from branch 580)
_PACKAGE_FIELDS: tuple[tuple[str, re.Pattern[str], Callable[[str], str]], ...] = (
    ("driver.version", re.compile(r"cuda-drivers-\d+"), _upstream),
    ("fabric_manager", re.compile(r"nvidia-fabricmanager(-\d+)?"), _upstream),
    ("nscq", re.compile(r"libnvidia-nscq(-\d+)?"), _upstream),
    ("cuda", re.compile(r"cuda-toolkit-\d+-\d+"), _upstream),
    ("nccl", re.compile(r"libnccl2"), _nccl),
    ("ofed", re.compile(r"mlnx-ofed-basic"), _same),
    *((f"container_toolkit.{p}", re.compile(re.escape(p)), _same) for p in CONTAINER_TOOLKIT_PACKAGES),
)

# component record fact -> bundle field, for what the packages do not say (and as a second source)
_DATA_FIELDS = (
    ("gpu_driver", "version", "driver.version"),
    ("fabric_manager", "version", "fabric_manager"),
    ("cuda_toolkit", "version", "cuda"),
    ("cuda_toolkit", "nccl", "nccl"),
    ("ofed", "version", "ofed"),
    ("efa", "version", "efa_installer"),  # the EFA installer's recorded release (it is no package of its own)
    ("model_serving", "engine", "serving.engine"),
    ("model_serving", "version", "serving.version"),
    ("model_serving", "image", "serving.image"),
)

Difference = tuple[str, Any, Any]  # (bundle field, value in the given bundle, value on the host)


def same_name_other_content(
    bundle: Bundle,
    source: str,
    snapshots: Mapping[str, HostSnapshot],
    known_bundles: Iterable[Bundle | Mapping[str, Any]] = (),
) -> list[Problem]:
    """Hosts whose installed release is `bundle.release` but whose content is not `bundle`: InputError problems.

    `source` is the bundle's file (each problem's file); `snapshots` host -> what `Actions.read_hosts`
    answered (unreachable hosts and hosts on another release are not looked at); `known_bundles` the
    bundles an earlier run rolled out (`journal.recorded_bundles().values()`: dicts or Bundles; one that
    no longer validates is ignored). One problem per differing field and value the hosts run, e.g.
    `releases/2026-11.yaml: driver.version: 570.172.08 here, the hosts run 570.133.20 (dgx-a1, dgx-a2)`.

    A host that recorded a digest: equal to `bundle.digest`, it runs this bundle; otherwise it runs
    other content, always a problem: its fields are named from the known bundle with its digest, else from
    its manifest, else the problem says only that the digests differ (a change the manifest does not
    record, like a summary or an advisory, is still other content under the same name).

    A host that recorded no digest (converged before digests were stamped): it is judged by what it
    recorded, not refused for lacking a digest (such a fleet would otherwise never run its release again).
    With a manifest, the package versions and serving facts it recorded are compared with what this
    bundle pins for them; a difference is a problem, none means the host counts as on this bundle
    (what the manifest does not record cannot be told apart). Without a manifest (a snapshot from the
    journal alone, as in `fleet plan`), the known bundles of the same release are taken as what it runs:
    a problem if one differs from this bundle and none is this bundle's content; nothing if none is known.
    """
    target = bundle.digest
    candidates = _by_digest(known_bundles)
    same_name = [b for d, b in candidates.items() if b.release == bundle.release and d != target]
    ambiguous = target in candidates  # a host without a digest may run this very bundle
    found: dict[tuple[str, str, str], list[str]] = {}
    for name in sorted(snapshots):
        snap = snapshots[name]
        if not snap.reachable or snap.installed_release != bundle.release or snap.installed_digest == target:
            continue
        manifest = snap.installed_manifest
        differences: list[Difference] = []
        if snap.installed_digest is not None:
            ran = candidates.get(snap.installed_digest)
            if ran is not None:
                differences = bundle_differences(bundle, ran)
            elif manifest is not None:
                differences = manifest_differences(bundle, manifest)
            if not differences:
                key = ("release", target, snap.installed_digest)
                found.setdefault(key, []).append(name)
                continue
        elif manifest is not None and isinstance(manifest.get("components"), Mapping):
            differences = manifest_differences(bundle, manifest)
        elif not ambiguous:
            differences = [d for other in same_name for d in bundle_differences(bundle, other)]
        for field, here, there in differences:
            found.setdefault((field, _show(here), _show(there)), []).append(name)
    problems = []
    for (field, here, there), hosts in found.items():
        if field == "release":
            message = (f"{bundle.release} is the hosts' release with other content: its content digest differs "
                       f"(sha256 {here} here, {there} on the hosts) ({_hosts(hosts)})")
        else:
            message = f"{here} here, the hosts run {there} ({_hosts(hosts)})"
        problems.append(Problem(source, field, None, message))
    return problems


def bundle_differences(here: Bundle, there: Bundle) -> list[Difference]:
    """Every field whose value differs between two bundles, in the schema's order, as (field, here, there)."""
    out: list[Difference] = []
    _diff(here.model_dump(mode="json"), there.model_dump(mode="json"), [], out)
    return out


def _diff(a: Any, b: Any, path: list[Any], out: list[Difference]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            _diff(a.get(key), b.get(key), [*path, key], out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, [*path, i], out)
    elif a != b:
        out.append((field_path(path), a, b))


def manifest_differences(bundle: Bundle, manifest: Mapping[str, Any]) -> list[Difference]:
    """The bundle fields whose value differs from what a host manifest recorded, as (field, here, there).

    Installed package versions first (mapped back to the bundle's fields: cuda-drivers-570 at 570.133.20-1
    is driver.version 570.133.20), then the components' recorded facts for the fields no package gave
    (serving engine and image, each model's weights revision and sha256). A field the manifest does not
    record (a component the host does not have) is not compared.
    """
    components = manifest.get("components")
    if not isinstance(components, Mapping):
        return []
    dump = bundle.model_dump(mode="json")
    installed: dict[str, str] = {}
    for record in components.values():
        packages = record.get("packages") if isinstance(record, Mapping) else None
        for package, state in (packages.items() if isinstance(packages, Mapping) else ()):
            if isinstance(state, Mapping) and isinstance(state.get("version"), str):
                installed[str(package)] = state["version"]
    out: list[Difference] = []
    compared: set[str] = set()
    for field, shape, to_field in _PACKAGE_FIELDS:
        versions = sorted({to_field(v) for p, v in installed.items() if shape.fullmatch(p)})
        if not versions:
            continue
        compared.add(field)
        here = _at(dump, field)
        if versions != [here]:
            out.append((field, here, ", ".join(versions)))
    facts = [(f"{component}.{key}", field) for component, key, field in _DATA_FIELDS]
    serving = components.get("model_serving")
    if isinstance(serving, Mapping) and (model := bundle.model(str(serving.get("model")))) is not None:
        index = bundle.models.index(model)
        facts += [(f"model_serving.weights.{key}", f"models[{index}].weights.{key}") for key in ("revision", "sha256")]
    for recorded, field in facts:
        there = _at(components, recorded)
        if field in compared or there is None:
            continue
        compared.add(field)
        here = _at(dump, field)
        if str(there) != str(here):
            out.append((field, here, there))
    return out


def _at(data: Any, path: str) -> Any:
    """The value at a dotted path ('serving.image', 'models[1].weights.sha256'), None when there is none."""
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            index = int(part[1:-1])
            data = data[index] if isinstance(data, list) and index < len(data) else None
        else:
            data = data.get(part) if isinstance(data, Mapping) else None
    return data


def _by_digest(known: Iterable[Bundle | Mapping[str, Any]]) -> dict[str, Bundle]:
    out: dict[str, Bundle] = {}
    for item in known:
        try:
            b = item if isinstance(item, Bundle) else Bundle.model_validate(dict(item))
        except (ValidationError, TypeError, ValueError):
            continue  # a bundle of an older schema: it cannot say what a host runs
        out.setdefault(b.digest, b)
    return out


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(", ", ": "))
    return text if len(text) <= 100 else text[:97] + "..."


def _hosts(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_HOSTS_NAMED])
    return shown + (f" and {len(names) - MAX_HOSTS_NAMED} more" if len(names) > MAX_HOSTS_NAMED else "")
