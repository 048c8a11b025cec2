"""What the AWS GPU cluster and the Outpost site share: tags, the AMI, the SSM instance profile, user data."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import pulumi
import pulumi_aws as aws

from infra.hostkeys_provider import HostKeys
from infra.model.errors import InputError, Problem
from infra.model.fleet import AmiLookup, AwsSite, Fleet, Host, OutpostSite

USER_DATA_TEMPLATE = Path(__file__).with_name("userdata.j2")
# Containers on the host (the serving image) sit one network hop further from IMDS than the host.
IMDS_HOP_LIMIT = 2


def fleet_tags(fleet: Fleet, host: Host) -> dict[str, str]:
    """The `fleet:*` tags of one instance: who it is in the fleet, for humans, billing and the policy pack."""
    pool = fleet.pool_of(host)
    return {
        "Name": host.name,
        "fleet:name": fleet.name,
        "fleet:site": pool.site,
        "fleet:pool": pool.name,
        "fleet:host": host.name,
        "fleet:model": pool.model,
        "fleet:patch-ring": str(host.patch_ring),
    }


def site_tags(fleet: Fleet, site: AwsSite | OutpostSite) -> dict[str, str]:
    """Tags for the site's shared resources (VPC, subnets, security group, load balancers)."""
    return {"fleet:name": fleet.name, "fleet:site": site.name}


@cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, autoescape=False)
    return env.from_string(USER_DATA_TEMPLATE.read_text())


def render_user_data(fleet: Fleet, host: Host, ssh_authorized_keys: list[str]) -> str:
    """The host's cloud-init user data (infra/userdata.j2)."""
    pool = fleet.pool_of(host)
    identity = {"fleet": fleet.name, "site": pool.site, "pool": pool.name, "host": host.name,
                "model": pool.model, "serving_port": fleet.serving_port(host)}
    return _template().render(host=host.name, site=pool.site, pool=pool.name, identity=json.dumps(identity),
                              ssh_authorized_keys=ssh_authorized_keys)


def host_keys(host: Host, instance: aws.ec2.Instance, region: str, parent: pulumi.Resource) -> HostKeys:
    """The instance's SSH host keys, read from its console output once cloud-init has printed them
    (infra/hostkeys_provider.py): known before the first connection, never trusted on first use."""
    return HostKeys(host.name, instance.id, region, opts=pulumi.ResourceOptions(parent=parent))


def access_extra_vars(site: AwsSite | OutpostSite, instance_id: str, keys: list[str]) -> dict[str, Any]:
    """The host vars only the resources know: the host keys; for Session Manager, the instance id it connects to."""
    extra: dict[str, Any] = {"fleet_ssh_host_keys": list(keys)}
    if site.access.via == "ssm":
        extra["ansible_aws_ssm_instance_id"] = instance_id
    return extra


def lookup_ami(fleet: Fleet, site: AwsSite | OutpostSite, parent: pulumi.Resource) -> Any:
    """The site's AMI (infra/model/fleet.py `AmiLookup`): by id (deprecated or not), by exact name and owner,
    or the id its SSM public parameter holds now."""
    ami: AmiLookup = site.ami
    invoke = pulumi.InvokeOptions(parent=parent)
    if ami.id or (not ami.name and ami.ssm_parameter):
        image_id = ami.id or aws.ssm.get_parameter(name=ami.ssm_parameter, region=site.region, opts=invoke).value
        return aws.ec2.get_ami(filters=[aws.ec2.GetAmiFilterArgs(name="image-id", values=[image_id])],
                               include_deprecated=True, most_recent=True, region=site.region, opts=invoke)
    if ami.name:
        return aws.ec2.get_ami(owners=[ami.owner], filters=[aws.ec2.GetAmiFilterArgs(name="name", values=[ami.name])],
                               most_recent=True, region=site.region, opts=invoke)
    raise InputError([Problem(fleet.source, fleet.field("sites", site.name, "ami"), None,
                              "give the AMI's id, its exact name, or an SSM parameter that holds its id")])


def ssm_instance_profile(name: str, parent: pulumi.Resource) -> aws.iam.InstanceProfile:
    """An instance profile whose role may use SSM (Session Manager, Run Command): access without SSH keys."""
    opts = pulumi.ResourceOptions(parent=parent)
    role = aws.iam.Role(f"{name}-role", assume_role_policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
    }), opts=opts)
    aws.iam.RolePolicyAttachment(f"{name}-ssm", role=role.name,
                                 policy_arn=aws.iam.ManagedPolicy.AMAZON_SSM_MANAGED_INSTANCE_CORE, opts=opts)
    return aws.iam.InstanceProfile(f"{name}-profile", role=role.name, opts=opts)


DCGM_EXPORTER_PORT = 9400  # NVIDIA's dcgm-exporter default; the soak reads each GPU's memory there


def security_group_rules(self_all: bool, ssh_cidrs: list[str], serving: list[tuple[int, list[str]]],
                         gpu_metrics_cidrs: list[str] | None = None) -> tuple[list[Any], list[Any]]:
    """(ingress, egress) for a fleet security group.

    All traffic to and from the group itself when `self_all` (EFA's requirement: its SRD traffic is not
    TCP/UDP on known ports), SSH only from the configured CIDRs (none: no SSH rule at all), each
    serving port from the given CIDRs, the DCGM exporter's port from `gpu_metrics_cidrs` (the network's
    own and the controllers' that run the soak), and egress anywhere (package mirrors, SSM, S3).
    """
    ingress: list[dict[str, Any]] = []
    egress: list[dict[str, Any]] = [{"description": "package mirrors, SSM, S3", "protocol": "-1", "from_port": 0,
                                     "to_port": 0, "cidr_blocks": ["0.0.0.0/0"]}]
    if self_all:
        ingress.append({"description": "EFA: all traffic between members", "protocol": "-1", "from_port": 0,
                        "to_port": 0, "self": True})
        egress.append({"description": "EFA: all traffic between members", "protocol": "-1", "from_port": 0,
                       "to_port": 0, "self": True})
    if ssh_cidrs:
        ingress.append({"description": "SSH from configured CIDRs", "protocol": "tcp", "from_port": 22, "to_port": 22,
                        "cidr_blocks": list(ssh_cidrs)})
    for port, cidrs in serving:
        ingress.append({"description": f"serving port {port}", "protocol": "tcp", "from_port": port, "to_port": port,
                        "cidr_blocks": cidrs})
    if gpu_metrics_cidrs:
        ingress.append({"description": f"DCGM exporter {DCGM_EXPORTER_PORT}", "protocol": "tcp",
                        "from_port": DCGM_EXPORTER_PORT, "to_port": DCGM_EXPORTER_PORT,
                        "cidr_blocks": list(dict.fromkeys(gpu_metrics_cidrs))})
    return ingress, egress
