"""Outpost site (`fleet:aws:OutpostSite`): GPU instances on an AWS Outposts rack on the customer's premises.

A VPC in the Outpost's parent region, a subnet on the Outpost (`outpost_arn`, in the Outpost's
availability zone), the VPC associated with the Outpost's local gateway route table so the hosts are
reachable from the on-prem network, and instances of each pool's type.

An Outposts rack runs only the instance types it was ordered with, and those list no P-family GPU
instances (g4dn is what racks offer). Each pool's type is checked against
`aws.outposts.get_outpost_instance_types` before anything is created, and a type the Outpost does not
offer fails the preview with the list of what it does offer.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.aws_common import (
    IMDS_HOP_LIMIT,
    access_extra_vars,
    fleet_tags,
    host_keys,
    lookup_ami,
    render_user_data,
    security_group_rules,
    site_tags,
    ssm_instance_profile,
)
from infra.hostkeys_provider import HostKeys
from infra.model.errors import InputError, Problem
from infra.model.fleet import Fleet, OutpostSite, Pool


def check_instance_types(fleet: Fleet, site: OutpostSite, pools: list[Pool], offered: list[str]) -> None:
    """Raise InputError for every pool whose instance type the Outpost does not offer, listing what it offers."""
    offer = sorted(set(offered))
    problems = [
        Problem(fleet.source, fleet.field("pools", pool.name, "instance_type"), pool.instance_type,
                f"Outpost {site.outpost_arn.rsplit('/', 1)[-1]} (site {site.name!r}) does not offer this instance "
                f"type; it offers: {', '.join(offer) if offer else 'nothing'}")
        for pool in pools if pool.instance_type not in offer
    ]
    if problems:
        raise InputError(problems)


@dataclass
class OutpostSiteArgs:
    """One Outpost site of a fleet: its pools are the fleet's pools at this site."""

    fleet: Fleet
    site: OutpostSite


class OutpostSiteComponent(pulumi.ComponentResource):
    """`fleet:aws:OutpostSite`: a subnet on the Outpost, its local gateway association, and the pools' instances."""

    instances: dict[str, aws.ec2.Instance]
    host_keys: dict[str, HostKeys]
    endpoints: dict[str, pulumi.Output[dict[str, Any]]]

    def __init__(self, name: str, args: OutpostSiteArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("fleet:aws:OutpostSite", name, None, opts)
        fleet, site = args.fleet, args.site
        pools = [p for p in fleet.pools.values() if p.site == site.name]
        invoke = pulumi.InvokeOptions(parent=self)
        offered = aws.outposts.get_outpost_instance_types(arn=site.outpost_arn, region=site.region, opts=invoke)
        check_instance_types(fleet, site, pools, list(offered.instance_types or []))

        child = pulumi.ResourceOptions(parent=self)
        region = site.region
        tags = site_tags(fleet, site)
        net = ipaddress.ip_network(site.vpc_cidr, strict=False)
        vpc = aws.ec2.Vpc(f"{site.name}-vpc", cidr_block=str(net), enable_dns_hostnames=True, enable_dns_support=True,
                          tags=tags, region=region, opts=child)
        self.subnet = aws.ec2.Subnet(
            f"{site.name}-subnet", vpc_id=vpc.id, outpost_arn=site.outpost_arn,
            availability_zone=site.availability_zone,
            cidr_block=str(next(net.subnets(new_prefix=min(net.prefixlen + 8, 28)))),
            tags=tags, region=region, opts=child)
        if site.local_gateway_route_table_id:
            # On-prem traffic (Ansible, the HAProxy in front of the pool) reaches the subnet through the
            # Outpost's local gateway: associate the VPC with its route table and route through it.
            assoc = aws.ec2.LocalGatewayRouteTableVpcAssociation(
                f"{site.name}-lgw", local_gateway_route_table_id=site.local_gateway_route_table_id, vpc_id=vpc.id,
                tags=tags, region=region, opts=child)
            lgw = aws.ec2.get_local_gateway_route_table(
                local_gateway_route_table_id=site.local_gateway_route_table_id, region=region, opts=invoke)
            table = aws.ec2.RouteTable(
                f"{site.name}-lgw", vpc_id=vpc.id,
                routes=[{"cidr_block": "0.0.0.0/0", "local_gateway_id": lgw.local_gateway_id}],
                tags=tags, region=region, opts=pulumi.ResourceOptions(parent=self, depends_on=[assoc]))
            aws.ec2.RouteTableAssociation(f"{site.name}-lgw", subnet_id=self.subnet.id, route_table_id=table.id,
                                          region=region, opts=child)

        ingress, egress = security_group_rules(
            self_all=False, ssh_cidrs=site.ssh_cidrs,
            serving=[(port, [str(net)]) for port in sorted({p.serving_port for p in pools})],
            gpu_metrics_cidrs=[str(net), *site.ssh_cidrs])
        self.security_group = aws.ec2.SecurityGroup(
            f"{site.name}-sg", vpc_id=vpc.id, description=f"fleet {fleet.name} Outpost {site.name}",
            ingress=ingress, egress=egress, tags=tags, region=region, opts=child)
        profile = ssm_instance_profile(site.name, self)
        ami = lookup_ami(fleet, site, self)
        self.ami_id: str = ami.id

        self.instances = {}
        self.host_keys = {}
        self.endpoints = {}
        for pool in pools:
            for host in fleet.hosts_in(pool.name):
                instance = aws.ec2.Instance(
                    host.name, ami=ami.id, instance_type=pool.instance_type, subnet_id=self.subnet.id,
                    vpc_security_group_ids=[self.security_group.id], iam_instance_profile=profile.name,
                    metadata_options={"http_endpoint": "enabled", "http_tokens": "required",
                                      "http_put_response_hop_limit": IMDS_HOP_LIMIT},
                    root_block_device={"volume_type": site.root_volume_type, "volume_size": site.root_volume_gb,
                                       "encrypted": True, "delete_on_termination": True},
                    user_data=render_user_data(fleet, host, site.ssh_authorized_keys),
                    tags=fleet_tags(fleet, host), volume_tags=fleet_tags(fleet, host),
                    # a newer image (the SSM parameter moved) is for instances launched from now on: replacing a
                    # running GPU host is the patch pipeline's decision, not a side effect of `pulumi up`
                    region=region, opts=pulumi.ResourceOptions(parent=self, ignore_changes=["ami"]))
                self.instances[host.name] = instance
                keys = self.host_keys[host.name] = host_keys(host, instance, region, self)
                self.endpoints[host.name] = pulumi.Output.all(instance.private_ip, instance.id, keys.host_keys).apply(
                    lambda values: {"address": values[0], "extra_vars": access_extra_vars(site, values[1], values[2])})

        self.register_outputs({
            "subnet": self.subnet.id,
            "instances": {name: i.id for name, i in self.instances.items()},
        })
