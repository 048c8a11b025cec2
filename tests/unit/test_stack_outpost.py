"""The Outpost site of Pulumi.example-hybrid.yaml under mocks, and an Outpost asked for a type it does not offer."""

import copy

import pulumi
import pytest

from infra.model.errors import InputError
from infra.model.fleet import fleet_config_from_stack, parse_fleet
from infra.outpost import check_instance_types
from tests.stack_mocks import OUTPOST_OFFERS, hybrid_secrets, run_program, stack_config

ARN = "arn:aws:outposts:eu-central-1:123456789012:outpost/op-0a1b2c3d4e5f60718"


@pytest.fixture(scope="module")
def run():
    return run_program(stack_config(), hybrid_secrets())


def test_subnet_on_the_outpost_in_its_az(run):
    subnets = [s for s in run.of_type("aws:ec2/subnet:Subnet") if "outpostArn" in s.inputs]
    assert [(s.name, s.inputs["outpostArn"], s.inputs["availabilityZone"], s.inputs["region"]) for s in subnets] == [
        ("outpost-fra1-subnet", ARN, "eu-central-1a", "eu-central-1")]
    assert subnets[0].inputs["cidrBlock"] == "10.43.0.0/24"


def test_local_gateway_route_table_associated_and_routed(run):
    (assoc,) = run.of_type("aws:ec2/localGatewayRouteTableVpcAssociation:LocalGatewayRouteTableVpcAssociation")
    vpc = run.named("aws:ec2/vpc:Vpc", "outpost-fra1-vpc")
    assert assoc.inputs["localGatewayRouteTableId"] == "lgw-rtb-0a1b2c3d4e5f60718"
    assert assoc.inputs["vpcId"] == vpc.id
    table = run.named("aws:ec2/routeTable:RouteTable", "outpost-fra1-lgw")
    assert table.inputs["routes"] == [{"cidrBlock": "0.0.0.0/0", "localGatewayId": "lgw-0a1b2c3d4e5f60718"}]
    subnet = run.named("aws:ec2/subnet:Subnet", "outpost-fra1-subnet")
    link = run.named("aws:ec2/routeTableAssociation:RouteTableAssociation", "outpost-fra1-lgw")
    assert link.inputs == {"subnetId": subnet.id, "routeTableId": table.id, "region": "eu-central-1"}


def test_outpost_instances_checked_type_imdsv2_encrypted_tagged(run):
    token = "aws:outposts/getOutpostInstanceTypes:getOutpostInstanceTypes"
    asked = [args for t, args in run.calls if t == token]
    assert asked == [{"arn": ARN, "region": "eu-central-1"}]
    subnet = run.named("aws:ec2/subnet:Subnet", "outpost-fra1-subnet")
    checked = []
    for name in ("r1-outpost-0", "r1-outpost-1"):
        inputs = run.named("aws:ec2/instance:Instance", name).inputs
        assert inputs["instanceType"] == "g4dn.12xlarge" and inputs["subnetId"] == subnet.id
        assert inputs["metadataOptions"]["httpTokens"] == "required"
        assert inputs["rootBlockDevice"]["encrypted"] is True and inputs["rootBlockDevice"]["volumeType"] == "gp2"
        assert inputs["tags"]["fleet:site"] == "outpost-fra1" and inputs["tags"]["fleet:host"] == name
        checked.append(name)
    assert len(checked) == 2


def test_outpost_asked_for_p4d_fails_listing_what_it_offers():
    config = copy.deepcopy(stack_config())
    outpost_pool = next(p for p in config["fleet:pools"] if p["name"] == "r1-outpost")
    outpost_pool["instance_type"] = "p4d.24xlarge"
    with pytest.raises(pulumi.RunError) as info:
        run_program(config, hybrid_secrets())
    text = str(info.value)
    assert "Pulumi.example-hybrid.yaml: config.fleet:pools[2].instance_type" in text
    assert "Outpost op-0a1b2c3d4e5f60718 (site 'outpost-fra1') does not offer this instance type" in text
    assert f"it offers: {', '.join(sorted(OUTPOST_OFFERS))}" in text
    assert "(value: 'p4d.24xlarge')" in text


def test_check_instance_types_lists_every_bad_pool():
    config = copy.deepcopy(stack_config())
    config["fleet:pools"].append({"name": "r1-outpost-b", "site": "outpost-fra1", "model": "m", "gpu_model": "A10G",
                                  "gpu_count": 1, "instance_type": "g5.xlarge", "count": 1})
    fleet = parse_fleet(fleet_config_from_stack(config), "Pulumi.t.yaml", "config.fleet:")
    site = fleet.sites["outpost-fra1"]
    pools = [p for p in fleet.pools.values() if p.site == site.name]
    check_instance_types(fleet, site, pools[:1], ["g4dn.12xlarge"])   # offered: passes
    with pytest.raises(InputError) as info:
        check_instance_types(fleet, site, pools, ["g4dn.metal", "g4dn.12xlarge"])
    assert [(p.field, p.value) for p in info.value.problems] == [("config.fleet:pools[4].instance_type", "g5.xlarge")]
    assert "it offers: g4dn.12xlarge, g4dn.metal" in str(info.value)
