"""The input of `fleet converge`, `fleet verify` and `fleet drift`: a bundle and the inventory's hosts.

Everything is checked before any host is touched: the bundle (schema and compatibility rules), the
inventory and `--limit` (through Ansible's parser, patching/inventory/reader.py), and for each selected host
the vars the pins and checks need (its model and GPU in the bundle, its hardware flags). All problems
are reported at once as one InputError (exit 2).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.model.errors import InputError, Problem, collect
from patching.inventory.hostkeys import host_key_problems, unverified_warning
from patching.inventory.reader import FleetInventory, load_inventory
from patching.release.bundle import Bundle, load_bundle
from patching.release.compat import rule_problems

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOKS = ROOT / "playbooks"
ANSIBLE_CFG = ROOT / "ansible.cfg"
HOST_CHECKS = ROOT / "tests" / "hosts"
FLAGS = ("fleet_nvswitch", "fleet_ib", "fleet_efa")


@dataclass(frozen=True)
class Target:
    """A validated bundle and the hosts to act on, with their inventory vars."""

    bundle: Bundle
    bundle_path: Path
    inventory_path: Path
    inventory: FleetInventory

    @property
    def hosts(self) -> tuple[str, ...]:
        """The hosts `--limit` selected (every fleet host without one)."""
        return self.inventory.selected

    @property
    def hostvars(self) -> dict[str, Mapping[str, Any]]:
        """Every inventory var of each selected host (SSH settings for drift, flags for the pins)."""
        return self.inventory.selected_vars()


def load_target(release: Path, inventory: Path, limit: str | None = None,
                allow_unverified_host_keys: bool = False) -> Target:
    """Validate the bundle, the inventory and the limit; InputError (all problems at once) when any is wrong.

    An inventory that turns SSH host-key checking off is bad input unless `allow_unverified_host_keys`;
    then the warning is printed to stderr here, once."""
    problems: list[Problem] = []
    bundle = collect(problems, load_bundle, release)
    if bundle is not None:
        problems += rule_problems(bundle, release)
    fleet = collect(problems, load_inventory, [inventory], limit)
    if fleet is not None and bundle is not None:
        for name in fleet.selected:
            problems += _host_problems(str(inventory), name, fleet.vars[name], bundle)
    if fleet is not None:
        problems += host_key_problems(str(inventory), fleet.selected_vars(), allow_unverified_host_keys)
    if problems:
        raise InputError(problems)
    assert bundle is not None and fleet is not None
    if warning := unverified_warning(fleet.selected_vars()):
        print(warning, file=sys.stderr, flush=True)
    return Target(bundle, Path(release).absolute(), Path(inventory).absolute(), fleet)


def _host_problems(source: str, name: str, hv: Mapping[str, Any], bundle: Bundle) -> list[Problem]:
    problems = []
    for flag in FLAGS:
        if not isinstance(hv.get(flag), bool):
            problems.append(Problem(source, f"{name}.{flag}", hv.get(flag), "expected true or false"))
    model = hv.get("fleet_model")
    if bundle.model(str(model)) is None:
        known = ", ".join(m.name for m in bundle.models)
        problems.append(Problem(source, f"{name}.fleet_model", model,
                                f"the bundle has no weights for it (it has {known})"))
    gpu = hv.get("fleet_gpu_model")
    if gpu not in bundle.gpus:
        problems.append(Problem(source, f"{name}.fleet_gpu_model", gpu,
                                f"the bundle is not qualified on it (it lists {', '.join(bundle.gpus)})"))
    return problems
