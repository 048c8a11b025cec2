"""Day 0: both shipped stacks' inventories carry every var the roles need, for every kind of site.

Each stack's inventory is rendered as its users get it (example-hybrid as `fleet inventory` writes it, plus
the one secret an operator gives from a vault; the lab as `fleet lab up` writes it), then
- the bundle check (`tasks/check-bundle.yml`, the first play of site.yml) runs on every host through
  ansible-playbook, and must pass;
- every required option of every role a host gets (its `fleet_components`, playbooks/group_vars/all/platform.yml)
  that platform.yml maps to inventory vars (`fleet_*`) must find them set on the host.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from infra.model.fleet import load_stack
from infra.model.inventory import build_inventory
from lab.inventory import write_inventory
from lab.layout import Layout, Ports
from patching.inventory.reader import load_inventory
from tests.conftest import ROOT
from tests.unit.test_playbooks import _ansible_json

PLAYBOOKS = ROOT / "playbooks"
PLATFORM = yaml.safe_load((PLAYBOOKS / "group_vars/all/platform.yml").read_text())
# what an operator gives Ansible from a vault for example-hybrid (docs/inventory.md, fleet_ups_monitor_password)
VAULT = {"fleet_ups_monitor_password": "from-the-vault"}


def _example_hybrid(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "inventory.yml"
    path.write_text(yaml.safe_dump(build_inventory(load_stack("example-hybrid", ROOT))))
    return path, VAULT


def _lab(tmp_path: Path) -> tuple[Path, dict]:
    fleet = load_stack("lab", ROOT)
    layout = Layout.for_stack("lab", tmp_path / "lab")
    return write_inventory(fleet, layout, Ports.plan(fleet), {"ups_monitor": "lab-secret"}), {}


STACKS = {"example-hybrid": _example_hybrid, "lab": _lab}


def _components(hostvars: dict) -> list[str]:
    flags = {
        "gpu": int(hostvars.get("fleet_gpu_count") or 0) > 0,
        "nvswitch": bool(hostvars.get("fleet_nvswitch")),
        "ib": bool(hostvars.get("fleet_ib")),
        "efa": bool(hostvars.get("fleet_efa")),
        "ups": bool(hostvars.get("fleet_ups")),
    }
    assert set(flags) == set(PLATFORM["fleet_platform"]), "platform.yml's flags changed: update this test"
    return [row["component"] for row in PLATFORM["fleet_platform_table"] if flags[row["needs"]]]


def _required_inventory_vars(role: str) -> dict[str, list[str]]:
    """A role's required options that platform.yml maps to inventory vars: option -> the fleet_* vars it reads."""
    specs = yaml.safe_load((PLAYBOOKS / "roles" / role / "meta/argument_specs.yml").read_text())["argument_specs"]
    out: dict[str, list[str]] = {}
    for spec in specs.values():
        for option, rules in (spec.get("options") or {}).items():
            expression = PLATFORM.get(option)
            if rules.get("required") and isinstance(expression, str):
                names = re.findall(r"\bfleet_\w+", expression)
                if names:
                    out[option] = names
    return out


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_every_role_finds_the_inventory_vars_it_requires(tmp_path, stack):
    inventory, extra = STACKS[stack](tmp_path)
    fleet = load_inventory([str(inventory)])
    checked, missing = 0, []
    for name in fleet.selected:
        hostvars = {**fleet.vars[name], **extra}
        for role in _components(hostvars):
            for option, names in _required_inventory_vars(role).items():
                for var in names:
                    checked += 1
                    if hostvars.get(var) in (None, "", []):
                        missing.append(f"{name}: {role} needs {option} from {var}")
    assert not missing, "\n".join(missing)
    assert checked >= len(fleet.selected) * 2  # every host: its model and weights store at least


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_the_bundle_check_passes_on_every_host(tmp_path, stack):
    inventory, extra = STACKS[stack](tmp_path)
    playbook = tmp_path / "check.yml"
    playbook.write_text(yaml.safe_dump([{"name": "Check", "hosts": "all", "gather_facts": False, "tasks": [
        {"name": "Check", "ansible.builtin.import_tasks": str(PLAYBOOKS / "tasks/check-bundle.yml")}]}]))
    proc = _ansible_json("ansible-playbook", "-i", str(inventory), str(playbook),
                         "-e", f"@{PLAYBOOKS}/group_vars/all/bundle.yml",
                         "-e", f"bundle_file={ROOT / 'releases/2026-11.yaml'}", "-e", json.dumps(extra))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    stats = json.loads(proc.stdout)["stats"]
    hosts = set(load_inventory([str(inventory)]).selected)
    assert set(stats) == hosts and all(s["failures"] == 0 and s["ok"] > 0 for s in stats.values())
