"""Pulumi entry: the fleet from the stack's `fleet:*` config, one component per site, the Ansible inventory out."""

from pathlib import Path

import pulumi

from infra.model.errors import InputError
from infra.stack import build_stack, fleet_from_config

try:
    fleet = fleet_from_config(pulumi.Config("fleet"), pulumi.get_stack())
    stack = build_stack(fleet, Path(__file__).resolve().parent)
except InputError as exc:
    # the CLI prints a RunError's message without a Python traceback: file, field, value, what is wrong
    raise pulumi.RunError(str(exc)) from exc

pulumi.export("ansible_inventory", stack.inventory)
pulumi.export("hosts", sorted(fleet.hosts))
pulumi.export("amis", stack.amis)
