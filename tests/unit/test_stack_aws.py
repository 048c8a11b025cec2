"""The program for Pulumi.example-hybrid.yaml, run under mocks: the AWS GPU clusters it registers.

Every test counts what it checked against what the stack must contain, so an assertion inside an
empty loop cannot pass silently.
"""

import copy

import pytest

from infra.aws_cluster import efa_network_interfaces
from infra.model.fleet import CANONICAL_UBUNTU_2204, AmiLookup
from tests.stack_mocks import AMI_ID, AMI_NAME, hybrid_secrets, run_program, stack_config

INSTANCE = "aws:ec2/instance:Instance"
TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
P4D_HOSTS = [f"v3-use1{az}-{i}" for az in "ab" for i in range(4)]


@pytest.fixture(scope="module")
def run():
    return run_program(stack_config(), hybrid_secrets())


def test_components_per_site(run):
    components = {(r.type, r.name) for r in run.resources if r.type.startswith("fleet:")}
    assert components == {("fleet:aws:GpuCluster", "use1-az-a"), ("fleet:aws:GpuCluster", "use1-az-b"),
                          ("fleet:aws:OutpostSite", "outpost-fra1"), ("fleet:onprem:Hall", "hall-a")}


def test_efa_layout_per_card_from_get_instance_type(run):
    templates = run.of_type(TEMPLATE)
    assert sorted(t.name for t in templates) == ["v3-use1a-lt", "v3-use1b-lt"]
    for template in templates:
        layout = [(int(n["networkCardIndex"]), int(n["deviceIndex"]), n["interfaceType"])
                  for n in template.inputs["networkInterfaces"]]
        # p4d.24xlarge: 4 network cards (the mock answers getInstanceType as AWS does)
        assert layout == [(0, 0, "interface"), (0, 1, "efa-only"), (1, 0, "efa-only"), (2, 0, "efa-only"),
                          (3, 0, "efa-only")]
        site = template.name.removesuffix("-lt").replace("v3-use1", "use1-az-")
        sg = run.named("aws:ec2/securityGroup:SecurityGroup", f"{site}-sg")
        subnet = run.named("aws:ec2/subnet:Subnet", f"{site}-private")
        assert all(n["securityGroups"] == [sg.id] and n["subnetId"] == subnet.id
                   for n in template.inputs["networkInterfaces"])
    asked = [args["instanceType"] for token, args in run.calls if token == "aws:ec2/getInstanceType:getInstanceType"]
    assert asked == ["p4d.24xlarge", "p4d.24xlarge"]


def test_efa_layout_follows_the_card_count():
    assert [(n["network_card_index"], n["device_index"], n["interface_type"])
            for n in efa_network_interfaces(2, None, "sg", "subnet")] == [
        (0, 0, "interface"), (0, 1, "efa-only"), (1, 0, "efa-only")]
    assert len(efa_network_interfaces(32, 32, "sg", "subnet")) == 33   # p5.48xlarge: ENA + 32 EFA
    assert len(efa_network_interfaces(4, 2, "sg", "subnet")) == 3      # capped at the type's EFA maximum


def test_cluster_placement_group_used_by_the_templates(run):
    groups = run.of_type("aws:ec2/placementGroup:PlacementGroup")
    assert {(g.name, g.inputs["strategy"]) for g in groups} == {("use1-az-a-cluster", "cluster"),
                                                               ("use1-az-b-cluster", "cluster")}
    names = {g.state["name"] for g in groups}
    placements = [t.inputs["placement"] for t in run.of_type(TEMPLATE)]
    assert len(placements) == 2 and all(p["groupName"] in names for p in placements)
    assert {p["availabilityZone"] for p in placements} == {"us-east-1a", "us-east-1b"}


def test_imdsv2_required_and_encrypted_gp3_root(run):
    checked = []
    for template in run.of_type(TEMPLATE):
        assert template.inputs["metadataOptions"]["httpTokens"] == "required"
        (root,) = template.inputs["blockDeviceMappings"]
        assert root["deviceName"] == "/dev/sda1"    # from the AMI lookup
        assert root["ebs"]["volumeType"] == "gp3" and root["ebs"]["encrypted"] == "true"
        assert template.inputs["imageId"] == AMI_ID
        checked.append(template.name)
    assert len(checked) == 2


def test_the_ami_is_the_one_canonicals_ssm_parameter_names_now(run):
    params = [args for token, args in run.calls if token == "aws:ssm/getParameter:getParameter"]
    assert [(a["name"], a["region"]) for a in params] == [(CANONICAL_UBUNTU_2204, "us-east-1")] * 2 + [
        (CANONICAL_UBUNTU_2204, "eu-central-1")]  # two AWS sites, one Outpost
    lookups = [args for token, args in run.calls if token == "aws:ec2/getAmi:getAmi"]
    assert len(lookups) == 3
    for args in lookups:  # by the id the parameter holds, found even after AWS deprecates the image
        assert args["filters"] == [{"name": "image-id", "values": [AMI_ID]}] and args["includeDeprecated"] is True
    assert {t.inputs["imageId"] for t in run.of_type(TEMPLATE)} == {AMI_ID}
    assert {i.inputs["ami"] for i in run.of_type(INSTANCE) if "ami" in i.inputs} == {AMI_ID}  # the Outpost's
    assert run.outputs["amis"] == {"outpost-fra1": AMI_ID, "use1-az-a": AMI_ID, "use1-az-b": AMI_ID}


@pytest.mark.parametrize(("ami", "token", "flt"), [
    ({"id": AMI_ID}, None, {"name": "image-id", "values": [AMI_ID]}),
    ({"name": AMI_NAME}, None, {"name": "name", "values": [AMI_NAME]}),
    ({"ssm_parameter": "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"},
     "aws:ssm/getParameter:getParameter", {"name": "image-id", "values": [AMI_ID]}),
], ids=["id", "exact-name", "dlami-parameter"])
def test_an_explicit_ami_id_name_or_parameter(ami, token, flt):
    config = copy.deepcopy(stack_config())
    for site in config["fleet:sites"]:
        if site["kind"] in ("aws", "outpost"):
            site["ami"] = ami
    run = run_program(config, hybrid_secrets())
    asked = [t for t, _ in run.calls if t == "aws:ssm/getParameter:getParameter"]
    assert len(asked) == (3 if token else 0)
    lookups = [args for t, args in run.calls if t == "aws:ec2/getAmi:getAmi"]
    assert len(lookups) == 3 and all(a["filters"] == [flt] for a in lookups)
    assert all(a.get("owners") == (["099720109477"] if "name" in ami else None) for a in lookups)


def test_a_dated_ami_name_search_is_no_longer_the_default():
    """Canonical's dated names go out of a name search once AWS deprecates them (two years by default)."""
    assert AmiLookup().name is None and AmiLookup().ssm_parameter == CANONICAL_UBUNTU_2204
    with pytest.raises(ValueError, match="no wildcards"):
        AmiLookup(name="ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-*")


def test_instance_profile_has_ssm(run):
    attachments = run.of_type("aws:iam/rolePolicyAttachment:RolePolicyAttachment")
    assert len(attachments) == 3
    assert {a.inputs["policyArn"] for a in attachments} == {"arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"}
    profiles = {p.state["arn"] for p in run.of_type("aws:iam/instanceProfile:InstanceProfile")}
    assert {t.inputs["iamInstanceProfile"]["arn"] for t in run.of_type(TEMPLATE)} <= profiles


def test_security_group_self_traffic_and_ssh_only_from_configured_cidrs(run):
    checked = []
    for sg in run.of_type("aws:ec2/securityGroup:SecurityGroup"):
        ingress, egress = sg.inputs["ingress"], sg.inputs["egress"]
        ssh = [r for r in ingress if r["protocol"] == "tcp" and r["fromPort"] <= 22 <= r["toPort"]]
        assert ssh == [{"description": "SSH from configured CIDRs", "protocol": "tcp", "fromPort": 22, "toPort": 22,
                        "cidrBlocks": ["10.0.0.0/8"]}]
        assert not any("0.0.0.0/0" in r.get("cidrBlocks", []) for r in ingress)
        if sg.name.startswith("use1-"):   # EFA: all traffic to and from the group itself
            assert {"description": "EFA: all traffic between members", "protocol": "-1", "fromPort": 0,
                    "toPort": 0, "self": True} in ingress
            assert any(r.get("self") and r["protocol"] == "-1" for r in egress)
            serving = [r for r in ingress if r["fromPort"] == 8000]
            assert serving and serving[0]["cidrBlocks"][0] in ("10.42.0.0/16", "10.44.0.0/16")
        # the soak reads GPU memory from the DCGM exporter: its port from the network and the controllers only
        exporter = [r for r in ingress if r["fromPort"] == 9400]
        assert len(exporter) == 1 and exporter[0]["toPort"] == 9400 and "10.0.0.0/8" in exporter[0]["cidrBlocks"]
        checked.append(sg.name)
    assert sorted(checked) == ["outpost-fra1-sg", "use1-az-a-sg", "use1-az-b-sg"]


def test_instances_tagged_and_launched_from_their_pool_template(run):
    templates = {t.name: t.id for t in run.of_type(TEMPLATE)}
    checked = []
    for name in P4D_HOSTS:
        instance = run.named(INSTANCE, name)
        pool = name.rsplit("-", 1)[0]
        assert instance.inputs["launchTemplate"] == {"id": templates[f"{pool}-lt"], "version": "$Default"}
        tags = instance.inputs["tags"]
        assert tags == {"Name": name, "fleet:name": "example-hybrid", "fleet:site": f"use1-az-{pool[-1]}",
                        "fleet:pool": pool, "fleet:host": name, "fleet:model": "deepseek-ai/DeepSeek-V3",
                        "fleet:patch-ring": "1"}
        assert instance.inputs["userData"].startswith("#cloud-config\n") and f"hostname: {name}\n" in \
            instance.inputs["userData"]
        checked.append(name)
    assert len(checked) == 8 and len(run.of_type(INSTANCE)) == 10   # + the two Outpost hosts


def test_target_group_per_pool_health_checked_on_serving_port(run):
    groups = {g.name: g for g in run.of_type("aws:lb/targetGroup:TargetGroup")}
    assert sorted(groups) == ["v3-use1a-tg", "v3-use1b-tg"]
    for group in groups.values():
        assert group.inputs["port"] == 8000 and group.inputs["protocol"] == "TCP"
        assert group.inputs["healthCheck"]["port"] == "8000" and group.inputs["healthCheck"]["path"] == "/health"
    attachments = run.of_type("aws:lb/targetGroupAttachment:TargetGroupAttachment")
    instance_ids = {run.named(INSTANCE, h).id: h for h in P4D_HOSTS}
    by_group = {}
    for a in attachments:
        by_group.setdefault(a.inputs["targetGroupArn"], set()).add(instance_ids[a.inputs["targetId"]])
    assert by_group == {groups["v3-use1a-tg"].state["arn"]: set(P4D_HOSTS[:4]),
                        groups["v3-use1b-tg"].state["arn"]: set(P4D_HOSTS[4:])}
    listeners = run.of_type("aws:lb/listener:Listener")
    assert len(listeners) == 2 and all(listener.inputs["port"] == 8000 for listener in listeners)
    lbs = run.of_type("aws:lb/loadBalancer:LoadBalancer")
    assert len(lbs) == 2 and all(lb.inputs["internal"] and lb.inputs["loadBalancerType"] == "network" for lb in lbs)


def test_capacity_block_targeted_only_where_configured(run):
    a = run.named(TEMPLATE, "v3-use1a-lt").inputs
    b = run.named(TEMPLATE, "v3-use1b-lt").inputs
    assert "capacityReservationSpecification" not in a and "instanceMarketOptions" not in a
    assert b["capacityReservationSpecification"] == {
        "capacityReservationTarget": {"capacityReservationId": "cr-0123456789abcdef0"}}
    assert b["instanceMarketOptions"] == {"marketType": "capacity-block"}


def test_capacity_block_without_reservation_id_fails_naming_the_field():
    config = copy.deepcopy(stack_config())
    del config["fleet:sites"][1]["capacity_reservation_id"]
    with pytest.raises(Exception, match=r"config\.fleet:sites\[1\]\.capacity_reservation_id.*reservation id"):
        run_program(config, hybrid_secrets())


def test_vpc_with_private_subnet_behind_nat(run):
    vpcs = {v.name: v.inputs["cidrBlock"] for v in run.of_type("aws:ec2/vpc:Vpc")}
    assert vpcs == {"use1-az-a-vpc": "10.42.0.0/16", "use1-az-b-vpc": "10.44.0.0/16",
                    "outpost-fra1-vpc": "10.43.0.0/16"}
    private = run.named("aws:ec2/subnet:Subnet", "use1-az-a-private").inputs
    assert private["cidrBlock"] == "10.42.0.0/20" and private["mapPublicIpOnLaunch"] is False
    table = run.named("aws:ec2/routeTable:RouteTable", "use1-az-a-private").inputs
    nat = run.named("aws:ec2/natGateway:NatGateway", "use1-az-a-nat")
    assert table["routes"] == [{"cidrBlock": "0.0.0.0/0", "natGatewayId": nat.id}]
    regions = {r.inputs.get("region") for r in run.resources if r.type.startswith("aws:ec2/")}
    assert regions == {"us-east-1", "eu-central-1"}


def test_existing_subnet_is_used_instead_of_a_new_vpc():
    config = copy.deepcopy(stack_config())
    config["fleet:sites"][0]["subnet_ids"] = ["subnet-0abc"]
    run = run_program(config, hybrid_secrets())
    assert "use1-az-a-vpc" not in {v.name for v in run.of_type("aws:ec2/vpc:Vpc")}
    template = run.named(TEMPLATE, "v3-use1a-lt").inputs
    assert {n["subnetId"] for n in template["networkInterfaces"]} == {"subnet-0abc"}
    assert run.named("aws:ec2/securityGroup:SecurityGroup", "use1-az-a-sg").inputs["vpcId"] == "vpc-0abc"


def test_each_host_exports_the_efa_devices_its_instance_type_gets(run):
    hosts = run.outputs["ansible_inventory"]["all"]["hosts"]
    efa = {name: v["fleet_efa_devices"] for name, v in hosts.items() if "fleet_efa_devices" in v}
    assert efa == dict.fromkeys(P4D_HOSTS, 4)  # p4d.24xlarge: 4 network cards, one EFA each
    assert all(hosts[n]["fleet_efa"] for n in efa)


def test_an_instance_type_without_efa_is_refused_in_an_efa_cluster_site():
    import pulumi

    config = copy.deepcopy(stack_config())
    pool = next(p for p in config["fleet:pools"] if p["name"] == "v3-use1a")
    pool.update(instance_type="g5.xlarge", gpu_model="A10G", gpu_count=1)
    with pytest.raises(pulumi.RunError) as info:
        run_program(config, hybrid_secrets())
    text = str(info.value)
    assert "config.fleet:pools[0].instance_type" in text and "(value: 'g5.xlarge')" in text
    assert "has no EFA (efaSupported false in us-east-1); site use1-az-a is an EFA cluster" in text
