"""Which host components (the roles of playbooks/group_vars/all/platform.yml) a bundle change touches.

A patch applies only the components whose pins change between the host's bundle and the new one; the
testinfra gate still checks every component afterwards. FIELDS maps each top-level field of a bundle to
the components that read it (playbooks/group_vars/all/bundle.yml maps the same fields to role knobs);
a unit test holds the two together, so a new bundle field cannot be left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# Every component of the platform table, in converge order.
COMPONENTS = ("vendor_repo", "gpu_driver", "fabric_manager", "cuda_toolkit", "ofed", "efa", "container_toolkit",
              "ups_monitor", "model_serving")

FIELDS: dict[str, tuple[str, ...]] = {
    # fabric manager is pinned to the driver's version and checks it (fabric_manager_driver_version)
    "driver": ("gpu_driver", "fabric_manager"),
    "fabric_manager": ("fabric_manager",),
    "nscq": ("fabric_manager",),
    "cuda": ("cuda_toolkit",),
    "nccl": ("cuda_toolkit",),
    "ofed": ("ofed",),
    "efa_installer": ("efa",),
    "efa_installer_sha256": ("efa",),
    "container_toolkit": ("container_toolkit",),
    "serving": ("model_serving",),
    "models": ("model_serving",),
    # read by the checks and the gates, installed by no role
    "gpus": (),
    "probes": (),
}
# not pins: diff_bundles leaves them out
NOT_PINS = ("release", "published", "summary", "advisories")


def changed_components(diff: Iterable[tuple[str, Any, Any]] | None) -> frozenset[str] | None:
    """The components a bundle diff (patching.release.compat.diff_bundles: (field, old, new)) touches.

    None (apply every component) when the diff is unknown or names a field FIELDS does not know: a field
    nobody mapped must not be skipped.
    """
    if diff is None:
        return None
    out: set[str] = set()
    for field, _, _ in diff:
        top = field.split(".")[0]
        if top not in FIELDS:
            return None
        out.update(FIELDS[top])
    return frozenset(out)


def ordered(components: Iterable[str]) -> list[str]:
    """`components` in converge order."""
    chosen = set(components)
    return [c for c in COMPONENTS if c in chosen]
