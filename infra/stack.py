"""The Pulumi program's wiring: fleet config -> one component per site -> the inventory, built from the resources.

`__main__.py` calls these two functions and exports what they return; they hold the logic so the mock
tests and the benchmark run exactly what `pulumi up` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi

from infra.aws_cluster import GpuCluster, GpuClusterArgs
from infra.converge import bundle_ref, converge_host
from infra.model.fleet import FLEET_KEYS, AwsSite, Fleet, OnpremSite, OutpostSite, parse_fleet
from infra.model.inventory import Endpoint, build_inventory
from infra.onprem import Hall, HallArgs
from infra.outpost import OutpostSiteArgs, OutpostSiteComponent

SiteComponent = GpuCluster | OutpostSiteComponent | Hall


@dataclass
class FleetStack:
    """What the program built: one component per site, and the inventory as an Output."""

    components: dict[str, SiteComponent]
    inventory: pulumi.Output[dict[str, Any]]

    @property
    def amis(self) -> dict[str, str]:
        """The AMI id each cloud site launches from, as resolved by this `pulumi up`."""
        return {name: c.ami_id for name, c in sorted(self.components.items()) if not isinstance(c, Hall)}


def fleet_from_config(config: pulumi.Config, stack: str) -> Fleet:
    """The fleet from the stack's `fleet:*` config, validated (InputError names Pulumi.<stack>.yaml and the field)."""
    # Pulumi hands config to the program as strings; structured values are JSON, plain strings are not.
    raw = {key: config.get(key) if key in ("name", "bundle") else config.get_object(key) for key in FLEET_KEYS}
    return parse_fleet({k: v for k, v in raw.items() if v is not None}, f"Pulumi.{stack}.yaml", "config.fleet:")


def build_stack(fleet: Fleet, project_dir: Path) -> FleetStack:
    """Create every site's component; the inventory gets each host's address from its resource once known."""
    components: dict[str, SiteComponent] = {}
    for site in fleet.sites.values():
        if isinstance(site, AwsSite):
            components[site.name] = GpuCluster(site.name, GpuClusterArgs(fleet, site))
        elif isinstance(site, OutpostSite):
            components[site.name] = OutpostSiteComponent(site.name, OutpostSiteArgs(fleet, site))
        elif isinstance(site, OnpremSite):
            components[site.name] = Hall(site.name, HallArgs(fleet, site))

    endpoints: dict[str, pulumi.Output[dict[str, Any]]] = {}
    for component in components.values():
        endpoints |= component.endpoints
    inventory = pulumi.Output.all(**endpoints).apply(
        lambda eps: build_inventory(fleet, {name: Endpoint(**e) for name, e in eps.items()}))

    if fleet.config.converge:
        _converge(fleet, project_dir, components, inventory)
    return FleetStack(components, inventory)


def _converge(fleet: Fleet, project_dir: Path, components: dict[str, SiteComponent],
              inventory: pulumi.Output[dict[str, Any]]) -> None:
    bundle = bundle_ref(fleet, project_dir)
    for name, host in sorted(fleet.hosts.items()):
        component = components[fleet.site_of(host).name]
        identity: list[Any]
        depends: list[pulumi.Resource]
        known_hosts: str | None = None
        if isinstance(component, Hall):
            bmh = component.hosts.get(name)
            identity = [bmh.id, bmh.serial_number] if bmh else [host.address]
            depends = [bmh] if bmh else []
        else:
            instance = component.instances[name]
            identity, depends = [instance.id], [instance]
            site = fleet.site_of(host)
            if isinstance(site, AwsSite | OutpostSite) and site.access.via != "ssm":
                known_hosts = site.access.known_hosts_file  # SSH: the first connection checks the console's keys
        converge_host(name, identity, inventory, bundle, project_dir, component, depends, known_hosts)
