"""The input of `fleet converge`, `fleet verify` and `fleet drift`: a bundle and the inventory's hosts.

Everything is checked before any host is touched: the bundle (schema and compatibility rules), the
inventory and `--limit` (through Ansible's parser, patching/fleetinv.py), and for each selected host
the vars the pins and checks need (its model and GPU in the bundle, its hardware flags). All problems
are reported at once as one InputError (exit 2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.errors import InputError, Problem
from patching.bundle import Bundle, load_bundle
from patching.compat import rule_problems
from patching.fleetinv import FleetInventory, load_inventory

ROOT = Path(__file__).resolve().parents[1]
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
    hostvars: Mapping[str, Mapping[str, Any]]

    @property
    def hosts(self) -> tuple[str, ...]:
        return self.inventory.selected


def load_target(release: Path, inventory: Path, limit: str | None = None) -> Target:
    """Validate the bundle, the inventory and the limit; InputError (all problems at once) when any is wrong."""
    problems: list[Problem] = []
    bundle = fleet = None
    try:
        bundle = load_bundle(release)
        problems += rule_problems(bundle, release)
    except InputError as exc:
        problems += exc.problems
    try:
        fleet = load_inventory([inventory], limit)
    except InputError as exc:
        problems += exc.problems
    hostvars: dict[str, Mapping[str, Any]] = {}
    if fleet is not None:
        hostvars = {name: fleet.vars[name] for name in fleet.selected}
        if bundle is not None:
            for name in fleet.selected:
                problems += _host_problems(str(inventory), name, hostvars[name], bundle)
    if problems:
        raise InputError(problems)
    assert bundle is not None and fleet is not None
    return Target(bundle, Path(release).absolute(), Path(inventory).absolute(), fleet, hostvars)


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
