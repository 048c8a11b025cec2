"""Pulumi entry: read the fleet from the stack's config, export the Ansible inventory."""

import pulumi

from infra.fleet import parse_fleet
from infra.inventory import build_inventory

config = pulumi.Config("fleet")
stack = pulumi.get_stack()
raw = {key: config.get_object(key) for key in ("name", "sites", "pools", "hosts")}
fleet = parse_fleet({k: v for k, v in raw.items() if v is not None}, f"Pulumi.{stack}.yaml", "config.fleet:")

pulumi.export("ansible_inventory", build_inventory(fleet))
pulumi.export("hosts", sorted(fleet.hosts))
