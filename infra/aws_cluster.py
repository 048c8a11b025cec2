"""AWS GPU cluster (`fleet:aws:GpuCluster`): p4d-class instances in a cluster placement group with EFA.

Per site: a VPC with a private subnet behind a NAT gateway (or the existing subnets the site names),
one security group, one `cluster` placement group and one SSM instance profile. Per pool: a launch
template (pinned AMI, IMDSv2 required, encrypted gp3 root, the EFA layout below, optional capacity
reservation or Capacity Block), an internal NLB with a target group health-checked on the serving
port. Per host: an instance from the pool's template, tagged `fleet:*`, registered in the target group.

EFA layout (AWS, "Maximize network bandwidth on instances with multiple network cards"): the primary
interface on network card 0 / device 0 is ENA (an EFA-only interface cannot be primary); card 0 /
device 1 is `efa-only`; every other card gets one `efa-only` interface at device 0. The number of
cards comes from `aws.ec2.get_instance_type` (p4d.24xlarge: 4), never from a constant.

A Capacity Block cannot be deleted or cancelled once bought: `pulumi destroy` terminates the instances
and drops the reservation from state, and the block is paid for until its end date.
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
from infra.model.fleet import AwsSite, Fleet, Pool

HEALTH_CHECK_PATH = "/health"  # vLLM's and SGLang's liveness endpoint, on the serving port


def efa_network_interfaces(network_cards: int, efa_max: int | None, security_group: Any, subnet: Any
                           ) -> list[Any]:
    """The launch template's network interfaces: ENA primary, then one `efa-only` interface per card.

    `efa_max` caps the EFA interfaces at what the instance type allows (None: no cap).
    """
    common = {"security_groups": [security_group], "subnet_id": subnet, "delete_on_termination": "true"}
    interfaces = [{"network_card_index": 0, "device_index": 0, "interface_type": "interface", **common}]
    efa = [(0, 1)] + [(card, 0) for card in range(1, network_cards)]
    if efa_max is not None:
        efa = efa[:efa_max]
    interfaces += [{"network_card_index": card, "device_index": device, "interface_type": "efa-only", **common}
                   for card, device in efa]
    return interfaces


def _nlb_endpoint(site: AwsSite, efa_devices: int):
    def endpoint(values: list[Any]) -> dict[str, Any]:
        address, instance_id, target_group, keys = values
        return {"address": address, "extra_vars": {
            "fleet_lb": {"kind": "nlb", "target_group": target_group, "target_id": instance_id,
                         "region": site.region},
            "fleet_efa_devices": efa_devices, **access_extra_vars(site, instance_id, keys)}}

    return endpoint


@dataclass
class GpuClusterArgs:
    """One AWS site of a fleet: its pools are the fleet's pools at this site."""

    fleet: Fleet
    site: AwsSite


class GpuCluster(pulumi.ComponentResource):
    """`fleet:aws:GpuCluster`: the instances of every pool at one AWS site, and their network."""

    instances: dict[str, aws.ec2.Instance]
    host_keys: dict[str, HostKeys]
    target_groups: dict[str, aws.lb.TargetGroup]
    endpoints: dict[str, pulumi.Output[dict[str, Any]]]

    def __init__(self, name: str, args: GpuClusterArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("fleet:aws:GpuCluster", name, None, opts)
        fleet, site = args.fleet, args.site
        self._fleet, self._site = fleet, site
        pools = [p for p in fleet.pools.values() if p.site == site.name]
        self._check_capacity()
        child = pulumi.ResourceOptions(parent=self)
        tags = site_tags(fleet, site)
        region = site.region

        vpc_id, subnet_id, vpc_cidr = self._network(tags)
        ingress, egress = security_group_rules(
            self_all=True, ssh_cidrs=site.ssh_cidrs,
            serving=[(port, [vpc_cidr, *site.serving_cidrs]) for port in sorted({p.serving_port for p in pools})],
            gpu_metrics_cidrs=[vpc_cidr, *site.ssh_cidrs])
        self.security_group = aws.ec2.SecurityGroup(
            f"{site.name}-sg", vpc_id=vpc_id, description=f"fleet {fleet.name} GPU cluster {site.name}",
            ingress=ingress, egress=egress, tags=tags, region=region, opts=child)
        self.placement_group = aws.ec2.PlacementGroup(
            f"{site.name}-cluster", strategy="cluster", tags=tags, region=region, opts=child)
        profile = ssm_instance_profile(site.name, self)
        ami = lookup_ami(fleet, site, self)
        self.ami_id: str = ami.id
        if site.capacity_block:
            pulumi.log.warn(f"{site.name}: instances launch into Capacity Block {site.capacity_reservation_id}; "
                            "a Capacity Block cannot be deleted: destroy only drops it from state", resource=self)

        self.instances = {}
        self.host_keys = {}
        self.target_groups = {}
        self.endpoints = {}
        for pool in pools:
            template, efa_devices = self._launch_template(pool, ami, profile, subnet_id)
            lb = aws.lb.LoadBalancer(
                f"{pool.name}-nlb", internal=True, load_balancer_type="network", subnets=[subnet_id],
                tags=tags | {"fleet:pool": pool.name}, region=region, opts=child)
            tg = aws.lb.TargetGroup(
                f"{pool.name}-tg", port=pool.serving_port, protocol="TCP", target_type="instance", vpc_id=vpc_id,
                health_check={"protocol": "HTTP", "path": HEALTH_CHECK_PATH, "port": str(pool.serving_port),
                              "healthy_threshold": 3, "unhealthy_threshold": 3, "interval": 10},
                tags=tags | {"fleet:pool": pool.name}, region=region, opts=child)
            aws.lb.Listener(
                f"{pool.name}-listener", load_balancer_arn=lb.arn, port=pool.serving_port, protocol="TCP",
                default_actions=[{"type": "forward", "target_group_arn": tg.arn}], region=region, opts=child)
            self.target_groups[pool.name] = tg
            for host in fleet.hosts_in(pool.name):
                instance = aws.ec2.Instance(
                    host.name,
                    # "$Default": editing the template changes what the next launch gets; replacing a running
                    # GPU host is the patch pipeline's decision, not a side effect of a template edit.
                    launch_template={"id": template.id, "version": "$Default"},
                    user_data=render_user_data(fleet, host, site.ssh_authorized_keys),
                    tags=fleet_tags(fleet, host), volume_tags=fleet_tags(fleet, host),
                    region=region, opts=child)
                aws.lb.TargetGroupAttachment(
                    f"{host.name}-tg", target_group_arn=tg.arn, target_id=instance.id,
                    port=fleet.serving_port(host), region=region, opts=child)
                self.instances[host.name] = instance
                keys = self.host_keys[host.name] = host_keys(host, instance, region, self)
                self.endpoints[host.name] = pulumi.Output.all(
                    instance.private_ip, instance.id, tg.arn, keys.host_keys).apply(_nlb_endpoint(site, efa_devices))

        self.register_outputs({
            "placement_group": self.placement_group.name,
            "security_group": self.security_group.id,
            "instances": {name: i.id for name, i in self.instances.items()},
            "target_groups": {name: tg.arn for name, tg in self.target_groups.items()},
        })

    def _check_capacity(self) -> None:
        site, fleet = self._site, self._fleet
        if site.capacity_block and not site.capacity_reservation_id:
            raise InputError([Problem(fleet.source, fleet.field("sites", site.name, "capacity_reservation_id"), None,
                                      "a Capacity Block is targeted by its reservation id (cr-...): set it")])

    def _network(self, tags: dict[str, str]) -> tuple[Any, Any, str]:
        """(vpc id, subnet id, VPC CIDR): the site's existing subnet, or a new VPC with a private subnet."""
        site, fleet = self._site, self._fleet
        child = pulumi.ResourceOptions(parent=self)
        invoke = pulumi.InvokeOptions(parent=self)
        if site.subnet_ids:
            if len(site.subnet_ids) > 1:
                # a cluster placement group lives in one AZ: more subnets would not spread anything
                pulumi.log.warn(f"{site.name}: instances go into {site.subnet_ids[0]}; further subnet_ids are unused",
                                resource=self)
            subnet = aws.ec2.get_subnet(id=site.subnet_ids[0], region=site.region, opts=invoke)
            if subnet.availability_zone != site.availability_zone:
                raise InputError([Problem(fleet.source, fleet.field("sites", site.name, "subnet_ids", 0),
                                          site.subnet_ids[0], f"subnet is in {subnet.availability_zone}, the site "
                                                              f"in {site.availability_zone}")])
            existing = aws.ec2.get_vpc(id=subnet.vpc_id, region=site.region, opts=invoke)
            return subnet.vpc_id, subnet.id, existing.cidr_block

        net = ipaddress.ip_network(site.vpc_cidr, strict=False)
        private_cidr, public_cidr = (str(s) for s in list(net.subnets(new_prefix=min(net.prefixlen + 4, 28)))[:2])
        region = site.region
        vpc = aws.ec2.Vpc(f"{site.name}-vpc", cidr_block=str(net), enable_dns_hostnames=True, enable_dns_support=True,
                          tags=tags, region=region, opts=child)
        private = aws.ec2.Subnet(f"{site.name}-private", vpc_id=vpc.id, cidr_block=private_cidr,
                                 availability_zone=site.availability_zone, map_public_ip_on_launch=False,
                                 tags=tags | {"fleet:tier": "private"}, region=region, opts=child)
        # The hosts have no public address; a NAT gateway in a public subnet lets them reach package
        # mirrors, SSM and S3.
        public = aws.ec2.Subnet(f"{site.name}-public", vpc_id=vpc.id, cidr_block=public_cidr,
                                availability_zone=site.availability_zone, tags=tags | {"fleet:tier": "public"},
                                region=region, opts=child)
        igw = aws.ec2.InternetGateway(f"{site.name}-igw", vpc_id=vpc.id, tags=tags, region=region, opts=child)
        eip = aws.ec2.Eip(f"{site.name}-nat", domain="vpc", tags=tags, region=region, opts=child)
        nat = aws.ec2.NatGateway(f"{site.name}-nat", subnet_id=public.id, allocation_id=eip.id, tags=tags,
                                 region=region, opts=pulumi.ResourceOptions(parent=self, depends_on=[igw]))
        public_rt = aws.ec2.RouteTable(f"{site.name}-public", vpc_id=vpc.id,
                                       routes=[{"cidr_block": "0.0.0.0/0", "gateway_id": igw.id}],
                                       tags=tags, region=region, opts=child)
        aws.ec2.RouteTableAssociation(f"{site.name}-public", subnet_id=public.id, route_table_id=public_rt.id,
                                      region=region, opts=child)
        private_rt = aws.ec2.RouteTable(f"{site.name}-private", vpc_id=vpc.id,
                                        routes=[{"cidr_block": "0.0.0.0/0", "nat_gateway_id": nat.id}],
                                        tags=tags, region=region, opts=child)
        aws.ec2.RouteTableAssociation(f"{site.name}-private", subnet_id=private.id, route_table_id=private_rt.id,
                                      region=region, opts=child)
        return vpc.id, private.id, str(net)

    def _launch_template(self, pool: Pool, ami: Any, profile: aws.iam.InstanceProfile, subnet_id: Any
                         ) -> tuple[aws.ec2.LaunchTemplate, int]:
        """The pool's launch template, and the EFA devices each of its instances gets."""
        site, fleet = self._site, self._fleet
        assert pool.instance_type, "the fleet model requires an instance type for cloud pools"
        info = aws.ec2.get_instance_type(instance_type=pool.instance_type, region=site.region,
                                         opts=pulumi.InvokeOptions(parent=self))
        if not info.efa_supported:  # an AWS site is an EFA cluster (fleet_efa): every host's fabric is EFA
            raise InputError([Problem(fleet.source, fleet.field("pools", pool.name, "instance_type"),
                                      pool.instance_type, f"has no EFA (efaSupported false in {site.region}); site "
                                      f"{site.name} is an EFA cluster: use an instance type with EFA "
                                      "(p4d.24xlarge, p5.48xlarge, ...)")])
        cards = info.maximum_network_cards or len(info.network_cards or []) or 1
        interfaces = efa_network_interfaces(cards, info.efa_maximum_interfaces, self.security_group.id, subnet_id)
        efa_devices = sum(1 for i in interfaces if i["interface_type"] == "efa-only")
        reservation: Any = None
        if site.capacity_reservation_id:
            reservation = {"capacity_reservation_target": {"capacity_reservation_id": site.capacity_reservation_id}}
        market: Any = {"market_type": "capacity-block"} if site.capacity_block else None
        pool_tags = {"fleet:name": self._fleet.name, "fleet:site": site.name, "fleet:pool": pool.name}
        # plain dicts for the nested inputs (the SDK's TypedDicts are too strict for mypy to follow)
        metadata: Any = {"http_endpoint": "enabled", "http_tokens": "required",
                         "http_put_response_hop_limit": IMDS_HOP_LIMIT}
        root: Any = {"device_name": ami.root_device_name, "ebs": {
            "volume_type": "gp3", "volume_size": site.root_volume_gb, "encrypted": "true",
            "delete_on_termination": "true"}}
        placement: Any = {"group_name": self.placement_group.name, "availability_zone": site.availability_zone}
        tag_specs: Any = [{"resource_type": kind, "tags": pool_tags} for kind in ("volume", "network-interface")]
        return aws.ec2.LaunchTemplate(
            f"{pool.name}-lt",
            image_id=ami.id,
            instance_type=pool.instance_type,
            iam_instance_profile=aws.ec2.LaunchTemplateIamInstanceProfileArgs(arn=profile.arn),
            metadata_options=metadata,
            block_device_mappings=[root],
            network_interfaces=interfaces,
            capacity_reservation_specification=reservation,
            instance_market_options=market,
            placement=placement,
            tag_specifications=tag_specs,
            update_default_version=True,
            tags=pool_tags,
            region=site.region,
            opts=pulumi.ResourceOptions(parent=self),
        ), efa_devices
