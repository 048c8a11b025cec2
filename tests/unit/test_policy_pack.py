"""The Pulumi policy pack (`infra/policy/`): every rule with passing and violating resources, the pack as the CLI
loads it, and the example-hybrid stack (run under mocks) through the pack's analyzer.

Resources are written with the property names a policy pack sees (Pulumi's camelCase engine names). Every test
compares the whole list of violations (or counts what it checked), so an assertion in an empty loop cannot pass.
"""

from __future__ import annotations

import copy
import runpy
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pulumi_policy.policy as policy_sdk
import pytest
from google.protobuf import empty_pb2, json_format, struct_pb2
from pulumi.runtime import proto
from pulumi_policy import EnforcementLevel, PolicyResource, StackValidationPolicy
from pulumi_policy.proxy import UNKNOWN_STRING_VALUE

from infra.policy.pack import CONFIG_SCHEMA, DEPTH, NAME, policies, subject
from infra.policy.rules import (
    CAPACITY_BLOCK,
    DEFAULTS,
    INSTANCE,
    LAUNCH_TEMPLATE,
    NETWORK_INTERFACE,
    PLACEMENT_GROUP,
    RULES,
    SECURITY_GROUP,
    SG_INGRESS_RULE,
    SG_RULE,
    VOLUME,
    Rule,
    Subject,
    capacity_block_present,
    fleet_tags_present,
    gpu_cluster_placement_and_efa,
    imdsv2_required,
    instance_type_allowed,
    no_ssh_from_anywhere,
    violations,
    volumes_encrypted,
)
from tests.stack_mocks import ROOT, Registered, hybrid_secrets, run_program, stack_config

AMI = "ami-0a1b2c3d4e5f60718"
IMDS_REQUIRED = {"httpEndpoint": "enabled", "httpTokens": "required", "httpPutResponseHopLimit": 2}
GROUP = Subject(PLACEMENT_GROUP, "use1-az-a-cluster", {"strategy": "cluster", "name": "use1-az-a-cluster-3f9a2c1"})
MANDATORY = ["imdsv2-required", "ebs-encrypted", "no-ssh-from-anywhere", "gpu-cluster-placement-efa", "fleet-tags"]
ADVISORY = ["capacity-block-present", "instance-type-allowed"]
CAPACITY_BLOCK_WARNING = ("uses a Capacity Block; it cannot be deleted or cancelled, `pulumi destroy` only drops it "
                          "from state and it is paid for until its end date")


def check(rule: Rule, s: Subject, **config: Any) -> list[str]:
    """The rule's messages for one subject, with the pack's defaults under `config`."""
    return rule(s, {**DEFAULTS, **config})


def changed(props: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of props with changes applied; a change to None removes the property."""
    out = copy.deepcopy(props)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def fleet_tags(host: str, pool: str = "v3-use1a", site: str = "use1-az-a") -> dict[str, str]:
    return {"Name": host, "fleet:name": "example-hybrid", "fleet:site": site, "fleet:pool": pool, "fleet:host": host}


def efa_interfaces(cards: int = 4) -> list[dict[str, Any]]:
    """AWS's recommended p4d layout: ENA on card 0 device 0, efa-only on card 0 device 1 and every other card."""
    nic = {"subnetId": "subnet-0a1b2c3d", "securityGroups": ["sg-0a1b2c3d"], "deleteOnTermination": "true"}
    layout = [(0, 0, "interface"), (0, 1, "efa-only"), *((card, 0, "efa-only") for card in range(1, cards))]
    return [{**nic, "networkCardIndex": card, "deviceIndex": dev, "interfaceType": kind} for card, dev, kind in layout]


def template(name: str = "v3-use1a-lt", related: tuple[Subject, ...] = (GROUP,), **changes: Any) -> Subject:
    """A p4d launch template as the GPU cluster component registers it."""
    props = {
        "instanceType": "p4d.24xlarge",
        "imageId": AMI,
        "metadataOptions": IMDS_REQUIRED,
        "blockDeviceMappings": [{"deviceName": "/dev/sda1", "ebs": {
            "volumeType": "gp3", "volumeSize": 500, "encrypted": "true", "deleteOnTermination": "true"}}],
        "networkInterfaces": efa_interfaces(),
        "placement": {"availabilityZone": "us-east-1a", "groupName": GROUP.props["name"]},
        "tags": {"fleet:name": "example-hybrid", "fleet:site": "use1-az-a", "fleet:pool": "v3-use1a"},
    }
    return Subject(LAUNCH_TEMPLATE, name, changed(props, changes), related)


def launched(name: str = "v3-use1a-0", lt: Subject | None = None, **changes: Any) -> Subject:
    """An instance launched from a launch template, with the template and what it depends on as `related`
    (flattened, as `pack.subject` builds it)."""
    lt = lt or template()
    props = {"launchTemplate": {"id": "lt-0a1b2c3d4e5f60718", "version": "$Default"}, "tags": fleet_tags(name),
             "volumeTags": fleet_tags(name), "userData": "#cloud-config\nhostname: " + name + "\n"}
    return Subject(INSTANCE, name, changed(props, changes), (Subject(lt.type, lt.name, lt.props), *lt.related))


def standalone(name: str = "r1-outpost-0", related: tuple[Subject, ...] = (), **changes: Any) -> Subject:
    """An instance without a launch template, as the Outpost component registers it."""
    props = {
        "ami": AMI,
        "instanceType": "g4dn.12xlarge",
        "subnetId": "subnet-0f1e2d3c",
        "vpcSecurityGroupIds": ["sg-0f1e2d3c"],
        "metadataOptions": IMDS_REQUIRED,
        "rootBlockDevice": {"volumeType": "gp2", "volumeSize": 200, "encrypted": True, "deleteOnTermination": True},
        "tags": fleet_tags(name, pool="r1-outpost", site="outpost-fra1"),
    }
    return Subject(INSTANCE, name, changed(props, changes), related)


# --- IMDSv2 required -------------------------------------------------------------------------------------------


def test_imdsv2_required_passes():
    assert check(imdsv2_required, standalone()) == []
    assert check(imdsv2_required, template()) == []
    assert check(imdsv2_required, launched()) == []    # inherited from its launch template
    assert check(imdsv2_required, launched(metadataOptions={"httpEndpoint": "enabled"})) == []   # tokens unset here
    assert check(imdsv2_required, Subject(SECURITY_GROUP, "sg", {"ingress": []})) == []   # not an instance


@pytest.mark.parametrize(("s", "tokens"), [
    (standalone(metadataOptions={"httpEndpoint": "enabled", "httpTokens": "optional"}), "'optional'"),
    (standalone(metadataOptions=None), "None"),
    (launched(lt=template(metadataOptions={"httpTokens": "optional"})), "'optional'"),
    (launched(lt=template(metadataOptions=None)), "None"),
    (launched(metadataOptions={"httpTokens": "optional"}), "'optional'"),   # the instance overrides its template
])
def test_imdsv2_not_required_on_an_instance(s, tokens):
    assert check(imdsv2_required, s) == [
        f"{s.name}: IMDSv2 is not required (metadataOptions.httpTokens is {tokens}, must be 'required')"]


def test_imdsv2_not_required_on_a_launch_template():
    lt = template(metadataOptions={"httpEndpoint": "enabled", "httpTokens": "optional"})
    assert check(imdsv2_required, lt) == [
        "v3-use1a-lt: IMDSv2 is not required (metadataOptions.httpTokens is 'optional', must be 'required')"]


# --- encrypted volumes -----------------------------------------------------------------------------------------


def test_encrypted_volumes_pass():
    assert check(volumes_encrypted, Subject(VOLUME, "scratch-0", {"availabilityZone": "us-east-1a", "size": 1000,
                                                                  "type": "gp3", "encrypted": True})) == []
    assert check(volumes_encrypted, template()) == []                   # "true": templates carry strings
    assert check(volumes_encrypted, launched()) == []                   # root from the template's mappings
    assert check(volumes_encrypted, standalone()) == []
    data = [{"deviceName": "/dev/sdf", "volumeSize": 1000, "volumeType": "gp3", "encrypted": True}]
    assert check(volumes_encrypted, standalone(ebsBlockDevices=data)) == []
    ephemeral = [{"deviceName": "/dev/sdb", "virtualName": "ephemeral0"}]          # instance store: no EBS
    assert check(volumes_encrypted, template(blockDeviceMappings=[*template().props["blockDeviceMappings"],
                                                                 *ephemeral])) == []


@pytest.mark.parametrize("encrypted", [False, "false", None])
def test_unencrypted_ebs_volume(encrypted):
    props = {"availabilityZone": "us-east-1a", "size": 1000, "type": "gp3"}
    assert check(volumes_encrypted, Subject(VOLUME, "scratch-0", changed(props, {"encrypted": encrypted}))) == [
        "scratch-0: EBS volume is not encrypted"]


def test_unencrypted_launch_template_mapping():
    mappings = [{"deviceName": "/dev/sda1", "ebs": {"volumeType": "gp3", "volumeSize": 500, "encrypted": "false"}},
                {"deviceName": "/dev/sdf", "ebs": {"volumeType": "gp3", "volumeSize": 2000}}]
    assert check(volumes_encrypted, template(blockDeviceMappings=mappings)) == [
        "v3-use1a-lt: volume /dev/sda1 is not encrypted", "v3-use1a-lt: volume /dev/sdf is not encrypted"]


def test_unencrypted_instance_volumes():
    root = {"volumeType": "gp2", "volumeSize": 200, "encrypted": False}
    data = [{"deviceName": "/dev/sdf", "volumeSize": 1000, "encrypted": True},
            {"deviceName": "/dev/sdg", "volumeSize": 1000}]
    assert check(volumes_encrypted, standalone(rootBlockDevice=root, ebsBlockDevices=data)) == [
        "r1-outpost-0: root volume is not encrypted", "r1-outpost-0: volume /dev/sdg is not encrypted"]
    # the instance's own root device wins over its template's mappings
    assert check(volumes_encrypted, launched(rootBlockDevice=root)) == ["v3-use1a-0: root volume is not encrypted"]


@pytest.mark.parametrize("s", [standalone(rootBlockDevice=None), launched(lt=template(blockDeviceMappings=None))],
                         ids=["no-template", "template-without-mappings"])
def test_root_volume_encryption_unset(s):
    assert check(volumes_encrypted, s) == [
        f"{s.name}: root volume encryption is not set (rootBlockDevice.encrypted, or the launch template's "
        "blockDeviceMappings)"]


# --- no SSH from anywhere --------------------------------------------------------------------------------------


def sg(*ingress: dict[str, Any], name: str = "use1-az-a-sg") -> Subject:
    egress = [{"protocol": "-1", "fromPort": 0, "toPort": 0, "cidrBlocks": ["0.0.0.0/0"]}]
    return Subject(SECURITY_GROUP, name, {"vpcId": "vpc-0abc", "ingress": list(ingress), "egress": egress})


def tcp(low: int, high: int, cidrs: Sequence[str] = (), ipv6: Sequence[str] = (),
        protocol: str = "tcp") -> dict[str, Any]:
    return {"protocol": protocol, "fromPort": low, "toPort": high, "cidrBlocks": list(cidrs),
            "ipv6CidrBlocks": list(ipv6)}


def test_ssh_from_configured_cidrs_passes():
    s = sg({"protocol": "-1", "fromPort": 0, "toPort": 0, "self": True},   # EFA: all traffic between members
           tcp(22, 22, ["10.0.0.0/8"], ["fd00:10::/32"]),
           tcp(8000, 8000, ["0.0.0.0/0"], ["::/0"]),                          # another port open to anywhere
           tcp(22, 22, ["0.0.0.0/0"], protocol="udp"))                        # not TCP
    assert check(no_ssh_from_anywhere, s) == []
    assert check(no_ssh_from_anywhere, sg()) == []   # egress to 0.0.0.0/0 is not ingress
    assert check(no_ssh_from_anywhere, standalone()) == []


@pytest.mark.parametrize(("rule", "expected"), [
    (tcp(22, 22, ["0.0.0.0/0"]), ["0.0.0.0/0"]),
    (tcp(22, 22, ipv6=["::/0"]), ["::/0"]),
    (tcp(22, 22, ["10.0.0.0/8", "0.0.0.0/0"], ["::/0"]), ["0.0.0.0/0", "::/0"]),
    (tcp(0, 65535, ["0.0.0.0/0"]), ["0.0.0.0/0"]),                    # a range that covers 22
    (tcp(22, 22, ["0.0.0.0/0"], protocol="6"), ["0.0.0.0/0"]),        # TCP by number
    (tcp(0, 0, ["0.0.0.0/0"], protocol="-1"), ["0.0.0.0/0"]),         # all traffic: ports are ignored
    (tcp(0, 0, ipv6=["::/0"], protocol="all"), ["::/0"]),
], ids=["ipv4", "ipv6", "both", "port-range", "proto-6", "all-traffic", "all-ipv6"])
def test_ssh_from_anywhere_in_a_security_group(rule, expected):
    s = sg(tcp(8000, 8000, ["10.42.0.0/16"]), rule)
    assert check(no_ssh_from_anywhere, s) == [f"use1-az-a-sg: SSH (port 22) is open to {cidr}" for cidr in expected]


def test_ssh_range_that_misses_22_passes():
    assert check(no_ssh_from_anywhere, sg(tcp(23, 1024, ["0.0.0.0/0"]), tcp(1, 21, ipv6=["::/0"]))) == []


def sg_rule(kind: str = "ingress", **props: Any) -> Subject:
    base = {"type": kind, "securityGroupId": "sg-0a1b2c3d", "protocol": "tcp", "fromPort": 22, "toPort": 22}
    return Subject(SG_RULE, "ssh-in", {**base, **props})


def test_ssh_as_a_security_group_rule_resource():
    assert check(no_ssh_from_anywhere, sg_rule(cidrBlocks=["10.0.0.0/8"])) == []
    assert check(no_ssh_from_anywhere, sg_rule(sourceSecurityGroupId="sg-0bastion")) == []
    assert check(no_ssh_from_anywhere, sg_rule("egress", cidrBlocks=["0.0.0.0/0"])) == []
    assert check(no_ssh_from_anywhere, sg_rule(cidrBlocks=["0.0.0.0/0"])) == [
        "ssh-in: SSH (port 22) is open to 0.0.0.0/0"]
    assert check(no_ssh_from_anywhere, sg_rule(ipv6CidrBlocks=["::/0"])) == ["ssh-in: SSH (port 22) is open to ::/0"]
    assert check(no_ssh_from_anywhere, sg_rule(protocol="-1", fromPort=0, toPort=0, cidrBlocks=["0.0.0.0/0"])) == [
        "ssh-in: SSH (port 22) is open to 0.0.0.0/0"]


def ingress_rule(**props: Any) -> Subject:
    """An aws.vpc.SecurityGroupIngressRule: one CIDR per rule, `ipProtocol`, `cidrIpv4`/`cidrIpv6`."""
    return Subject(SG_INGRESS_RULE, "ssh-in-v2", {"securityGroupId": "sg-0a1b2c3d", **props})


def test_ssh_as_a_vpc_ingress_rule_resource():
    assert check(no_ssh_from_anywhere, ingress_rule(ipProtocol="tcp", fromPort=22, toPort=22,
                                                    cidrIpv4="10.0.0.0/8")) == []
    assert check(no_ssh_from_anywhere, ingress_rule(ipProtocol="tcp", fromPort=22, toPort=22,
                                                    referencedSecurityGroupId="sg-0bastion")) == []
    assert check(no_ssh_from_anywhere, ingress_rule(ipProtocol="tcp", fromPort=443, toPort=443,
                                                    cidrIpv4="0.0.0.0/0")) == []
    assert check(no_ssh_from_anywhere, ingress_rule(ipProtocol="tcp", fromPort=22, toPort=22,
                                                    cidrIpv4="0.0.0.0/0")) == [
        "ssh-in-v2: SSH (port 22) is open to 0.0.0.0/0"]
    assert check(no_ssh_from_anywhere, ingress_rule(ipProtocol="tcp", fromPort=22, toPort=22, cidrIpv6="::/0")) == [
        "ssh-in-v2: SSH (port 22) is open to ::/0"]
    # all protocols: the provider leaves the ports unset
    assert check(no_ssh_from_anywhere, ingress_rule(ipProtocol="-1", cidrIpv6="::/0")) == [
        "ssh-in-v2: SSH (port 22) is open to ::/0"]


# --- GPU cluster instances: cluster placement group and EFA ----------------------------------------------------


def test_gpu_cluster_instance_passes():
    assert check(gpu_cluster_placement_and_efa, launched()) == []
    efa = [{**n, "interfaceType": "efa"} if n["interfaceType"] == "efa-only" else n for n in efa_interfaces()]
    assert check(gpu_cluster_placement_and_efa, launched(lt=template(networkInterfaces=efa))) == []
    # the group named by the template is not a resource of this stack: its strategy cannot be seen
    assert check(gpu_cluster_placement_and_efa, launched(lt=template(related=()))) == []
    # not a cluster type: no placement group, no EFA needed
    assert check(gpu_cluster_placement_and_efa, standalone()) == []
    assert check(gpu_cluster_placement_and_efa, template(placement=None, networkInterfaces=None)) == []


def test_gpu_cluster_instance_without_a_template():
    """An instance cannot declare EFA itself: it attaches NetworkInterface resources (interfaceType 'efa')."""
    eni = Subject(NETWORK_INTERFACE, "p5-0-efa0", {"subnetId": "subnet-0a1b", "interfaceType": "efa"})
    attach = {"networkInterfaces": [{"networkInterfaceId": "eni-0a1b2c3d", "deviceIndex": 0, "networkCardIndex": 0}]}
    s = standalone("p5-0", related=(GROUP, eni), instanceType="p5.48xlarge", placementGroup=GROUP.props["name"],
                   **attach)
    assert check(gpu_cluster_placement_and_efa, s) == []
    plain = Subject(NETWORK_INTERFACE, "p5-0-eth0", {"subnetId": "subnet-0a1b", "interfaceType": "interface"})
    s = standalone("p5-0", related=(plain,), instanceType="p5.48xlarge", placementGroupId="pg-0a1b2c3d4e5f",
                   **attach)
    assert check(gpu_cluster_placement_and_efa, s) == ["p5-0: p5.48xlarge has no EFA interface (interfaceType 'efa' "
                                                       "or 'efa-only')"]


def test_gpu_cluster_instance_outside_a_placement_group():
    s = launched(lt=template(placement={"availabilityZone": "us-east-1a"}, related=()))
    assert check(gpu_cluster_placement_and_efa, s) == [
        "v3-use1a-0: p4d.24xlarge is not in a placement group (needs strategy 'cluster')"]


@pytest.mark.parametrize("strategy", ["spread", "partition", None])
def test_gpu_cluster_instance_in_a_non_cluster_group(strategy):
    group = Subject(PLACEMENT_GROUP, "use1-az-a-spread", {"strategy": strategy} if strategy else {})
    assert check(gpu_cluster_placement_and_efa, launched(lt=template(related=(group,)))) == [
        f"v3-use1a-0: p4d.24xlarge is in placement group use1-az-a-spread with strategy {strategy!r}, not 'cluster'"]


def test_gpu_cluster_instance_without_efa():
    ena_only = [{**n, "interfaceType": "interface"} for n in efa_interfaces()]
    for lt in (template(networkInterfaces=ena_only), template(networkInterfaces=None)):
        assert check(gpu_cluster_placement_and_efa, launched(lt=lt)) == [
            "v3-use1a-0: p4d.24xlarge has no EFA interface (interfaceType 'efa' or 'efa-only')"]
    # both at once, with the type from the instance rather than the template (which says g4dn)
    s = standalone("p4d-x", instanceType="p4d.24xlarge")
    assert check(gpu_cluster_placement_and_efa, s) == [
        "p4d-x: p4d.24xlarge is not in a placement group (needs strategy 'cluster')",
        "p4d-x: p4d.24xlarge has no EFA interface (interfaceType 'efa' or 'efa-only')"]


def test_gpu_cluster_types_come_from_the_config():
    assert check(gpu_cluster_placement_and_efa, standalone(), cluster_instance_types=["g4dn.12xlarge"]) == [
        "r1-outpost-0: g4dn.12xlarge is not in a placement group (needs strategy 'cluster')",
        "r1-outpost-0: g4dn.12xlarge has no EFA interface (interfaceType 'efa' or 'efa-only')"]
    assert check(gpu_cluster_placement_and_efa, launched(lt=template(networkInterfaces=None)),
                 cluster_instance_types=["p5.48xlarge"]) == []


# --- fleet:* tags ----------------------------------------------------------------------------------------------


def test_fleet_tags_present_passes():
    assert check(fleet_tags_present, launched()) == []
    assert check(fleet_tags_present, standalone()) == []
    assert check(fleet_tags_present, template()) == []   # only instances are checked
    assert check(fleet_tags_present, standalone(tags={"fleet:owner": "ml"}), required_tags=["fleet:owner"]) == []


def test_fleet_tags_missing():
    tags = fleet_tags("v3-use1a-0")
    del tags["fleet:host"]
    assert check(fleet_tags_present, launched(tags=tags)) == ["v3-use1a-0: missing tag(s) fleet:host"]
    tags["fleet:pool"] = ""   # an empty value is as good as none
    assert check(fleet_tags_present, launched(tags=tags)) == ["v3-use1a-0: missing tag(s) fleet:pool, fleet:host"]
    assert check(fleet_tags_present, standalone(tags=None)) == [
        "r1-outpost-0: missing tag(s) fleet:site, fleet:pool, fleet:host"]
    assert check(fleet_tags_present, standalone(), required_tags=["fleet:owner"]) == [
        "r1-outpost-0: missing tag(s) fleet:owner"]


# --- advisory: Capacity Block present --------------------------------------------------------------------------


def test_capacity_block_absent():
    assert check(capacity_block_present, launched()) == []
    assert check(capacity_block_present, template()) == []
    spot = {"marketType": "spot", "spotOptions": {"maxPrice": "30.0"}}
    assert check(capacity_block_present, standalone(instanceMarketOptions=spot)) == []
    reservation = {"capacityReservationSpecification": {"capacityReservationTarget": {
        "capacityReservationId": "cr-0123456789abcdef0"}}}      # an ordinary capacity reservation
    assert check(capacity_block_present, template(**reservation)) == []


def test_capacity_block_present():
    cb = Subject(CAPACITY_BLOCK, "use1b-block", {"capacityBlockOfferingId": "cb-0123456789abcdef0",
                                                "instancePlatform": "Linux/UNIX"})
    assert check(capacity_block_present, cb) == [f"use1b-block: {CAPACITY_BLOCK_WARNING}"]
    market = {"marketType": "capacity-block"}
    assert check(capacity_block_present, template("v3-use1b-lt", instanceMarketOptions=market)) == [
        f"v3-use1b-lt: {CAPACITY_BLOCK_WARNING}"]
    assert check(capacity_block_present, standalone("p5-0", instanceMarketOptions=market)) == [
        f"p5-0: {CAPACITY_BLOCK_WARNING}"]


# --- advisory: instance type outside the allowed list ----------------------------------------------------------


def test_instance_type_allowed():
    assert check(instance_type_allowed, launched()) == []             # p4d.24xlarge from the template
    assert check(instance_type_allowed, standalone()) == []           # g4dn.12xlarge
    assert check(instance_type_allowed, standalone(instanceType=None)) == []   # no type known: nothing to say
    assert check(instance_type_allowed, template(instanceType="t3.micro")) == []   # templates are not checked
    assert check(instance_type_allowed, standalone(instanceType="g5.xlarge"),
                 allowed_instance_types=["g5.xlarge"]) == []


def test_instance_type_outside_the_allowed_list():
    allowed = ", ".join(DEFAULTS["allowed_instance_types"])
    assert check(instance_type_allowed, standalone(instanceType="p4d.24xlarg")) == [
        f"r1-outpost-0: instance type p4d.24xlarg is not in the allowed list ({allowed})"]
    assert check(instance_type_allowed, launched(lt=template(instanceType="p5en.48xlarge"))) == [
        f"v3-use1a-0: instance type p5en.48xlarge is not in the allowed list ({allowed})"]
    assert check(instance_type_allowed, launched(), allowed_instance_types=["p5.48xlarge"]) == [
        "v3-use1a-0: instance type p4d.24xlarge is not in the allowed list (p5.48xlarge)"]


# --- the rule table and its helper -----------------------------------------------------------------------------


def test_rule_table():
    assert [(r.name, r.mandatory) for r in RULES] == [(n, True) for n in MANDATORY] + [(n, False) for n in ADVISORY]
    assert [r.check for r in RULES] == [imdsv2_required, volumes_encrypted, no_ssh_from_anywhere,
                                        gpu_cluster_placement_and_efa, fleet_tags_present, capacity_block_present,
                                        instance_type_allowed]


def test_violations_names_the_rule():
    bad = standalone("p5-0", instanceType="p5en.48xlarge", metadataOptions=None,
                     instanceMarketOptions={"marketType": "capacity-block"})
    found = violations([bad, launched()])
    assert [rule for rule, _ in found] == ["imdsv2-required", "gpu-cluster-placement-efa", "gpu-cluster-placement-efa",
                                           "capacity-block-present", "instance-type-allowed"]
    assert [rule for rule, _ in violations([bad], mandatory_only=True)] == [
        "imdsv2-required", "gpu-cluster-placement-efa", "gpu-cluster-placement-efa"]
    assert violations([bad], {"allowed_instance_types": ["p5en.48xlarge"], "cluster_instance_types": []}) == [
        ("imdsv2-required", "p5-0: IMDSv2 is not required (metadataOptions.httpTokens is None, must be 'required')"),
        ("capacity-block-present", f"p5-0: {CAPACITY_BLOCK_WARNING}")]


# --- the pack --------------------------------------------------------------------------------------------------


def test_policies_one_stack_validation_per_rule():
    pack = policies()
    assert [(p.name, p.enforcement_level) for p in pack] == (
        [(n, EnforcementLevel.MANDATORY) for n in MANDATORY] + [(n, EnforcementLevel.ADVISORY) for n in ADVISORY])
    assert all(isinstance(p, StackValidationPolicy) and p.config_schema is CONFIG_SCHEMA for p in pack)
    assert [p.description for p in pack] == [r.description for r in RULES]
    assert {k: v["default"] for k, v in CONFIG_SCHEMA.properties.items()} == DEFAULTS


@pytest.fixture
def analyzer() -> Iterator[Any]:
    """The analyzer the Pulumi CLI talks to: `infra/policy/__main__.py` run as `--policy-pack` runs it.

    PolicyPack serves gRPC until interrupted: keep the servicer it registers, interrupt its wait at once.
    """
    servicers = []
    register = policy_sdk.analyzer_pb2_grpc.add_AnalyzerServicer_to_server

    def keep(servicer, server):
        servicers.append(servicer)
        register(servicer, server)

    def interrupt(_seconds):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(policy_sdk.analyzer_pb2_grpc, "add_AnalyzerServicer_to_server", keep)
        mp.setattr(policy_sdk, "time", SimpleNamespace(sleep=interrupt))
        runpy.run_path(str(ROOT / "infra/policy/__main__.py"), run_name="__main__")
    (servicer,) = servicers
    yield servicer


def test_pack_registers_every_rule_with_its_enforcement_level(analyzer):
    info = analyzer.GetAnalyzerInfo(empty_pb2.Empty(), None)
    assert info.name == NAME == "gpu-fleet-guardrails"
    assert [(p.name, p.enforcementLevel, p.policy_type) for p in info.policies] == (
        [(n, proto.MANDATORY, proto.PolicyType.POLICY_TYPE_STACK) for n in MANDATORY]
        + [(n, proto.ADVISORY, proto.PolicyType.POLICY_TYPE_STACK) for n in ADVISORY])
    schema = json_format.MessageToDict(info.policies[0].configSchema.properties)
    assert {k: v["default"] for k, v in schema.items()} == DEFAULTS


def policy_resource(type_: str, name: str, props: dict[str, Any], *deps: PolicyResource) -> PolicyResource:
    return PolicyResource(type_, props, f"urn:pulumi:example-hybrid::gpu-fleet::{type_}::{name}", name, None, None,
                          None, list(deps), {})


def test_subject_follows_dependencies_to_the_pack_depth():
    vpc = policy_resource("aws:ec2/vpc:Vpc", "vpc", {"cidrBlock": "10.42.0.0/16"})
    sg_ = policy_resource(SECURITY_GROUP, "sg", {"vpcId": "vpc-0abc"}, vpc)
    group = policy_resource(PLACEMENT_GROUP, "pg", {"strategy": "cluster"})
    lt = policy_resource(LAUNCH_TEMPLATE, "lt", template().props, group, sg_)
    instance = policy_resource(INSTANCE, "i", launched().props, lt, sg_)
    lt.dependencies.append(instance)   # a cycle must not loop nor list the instance as its own dependency
    s = subject(instance)
    assert DEPTH == 2
    assert (s.type, s.name) == (INSTANCE, "i")
    assert [(r.type, r.name) for r in s.related] == [(LAUNCH_TEMPLATE, "lt"), (SECURITY_GROUP, "sg"),
                                                     (PLACEMENT_GROUP, "pg"), ("aws:ec2/vpc:Vpc", "vpc")]
    assert s.template == lt.props
    assert [r.name for r in subject(instance, depth=1).related] == ["lt", "sg"]


def test_pack_reports_each_violation_on_its_resource(analyzer):
    group = policy_resource(PLACEMENT_GROUP, "pg", {"strategy": "spread"})
    lt = policy_resource(LAUNCH_TEMPLATE, "lt", template().props, group)
    instance = policy_resource(INSTANCE, "i", launched().props, lt)
    request = proto.AnalyzeStackRequest(resources=[analyzer_resource(r, [d.urn for d in r.dependencies])
                                                   for r in (group, lt, instance)])
    diagnostics = analyzer.AnalyzeStack(request, None).diagnostics
    assert [(d.policyName, d.enforcementLevel, d.urn, d.message) for d in diagnostics] == [
        ("gpu-cluster-placement-efa", proto.MANDATORY, instance.urn,
         "GPU cluster instances run in a cluster placement group with EFA\n"
         "i: p4d.24xlarge is in placement group pg with strategy 'spread', not 'cluster'")]


def test_pack_config_reaches_the_rules(analyzer):
    """`pulumi preview --policy-pack-config`: the engine sends each policy's level and properties."""
    properties = struct_pb2.Struct()
    properties.update({"allowed_instance_types": ["p5.48xlarge"]})
    analyzer.Configure(proto.ConfigureAnalyzerRequest(policyConfig={
        "instance-type-allowed": proto.PolicyConfig(enforcementLevel=proto.MANDATORY, properties=properties)}), None)
    instance = policy_resource(INSTANCE, "i", standalone().props)
    request = proto.AnalyzeStackRequest(resources=[analyzer_resource(instance, [])])
    diagnostics = analyzer.AnalyzeStack(request, None).diagnostics
    assert [(d.policyName, d.enforcementLevel, d.message) for d in diagnostics] == [
        ("instance-type-allowed", proto.MANDATORY, "Instance types come from the allowed list\n"
         "i: instance type g4dn.12xlarge is not in the allowed list (p5.48xlarge)")]


# --- the example-hybrid stack, under mocks, through the pack ---------------------------------------------------


def analyzer_resource(r: PolicyResource, dependencies: list[str]) -> proto.AnalyzerResource:
    properties = json_format.ParseDict(r.props, struct_pb2.Struct())
    return proto.AnalyzerResource(type=r.resource_type, name=r.name, urn=r.urn, properties=properties,
                                  dependencies=dependencies)


def urn(type_: str, name: str) -> str:
    return f"urn:pulumi:example-hybrid::gpu-fleet::{type_}::{name}"


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def stack_request(resources: list[Registered]) -> proto.AnalyzeStackRequest:
    """What the engine sends the pack at `pulumi preview`: each resource's inputs and its dependencies.

    The mocks do not record dependencies, so they are read back from the inputs: a reference to another
    resource's id or ARN, or to a placement group's name (the template names its group), is a dependency.
    """
    refs: dict[str, Registered] = {}
    for r in resources:
        refs[r.id] = refs[r.state["arn"]] = r
        if r.type == PLACEMENT_GROUP:
            refs[r.state["name"]] = r
    return proto.AnalyzeStackRequest(resources=[
        proto.AnalyzerResource(
            type=r.type, name=r.name, urn=urn(r.type, r.name),
            properties=json_format.ParseDict(r.inputs, struct_pb2.Struct()),
            dependencies=sorted({urn(d.type, d.name) for d in map(refs.get, strings(r.inputs)) if d and d is not r}))
        for r in resources])


@pytest.fixture(scope="module")
def hybrid() -> list[Registered]:
    return run_program(stack_config(), hybrid_secrets()).resources


def test_example_hybrid_has_no_mandatory_violation_and_warns_of_its_capacity_block(analyzer, hybrid):
    request = stack_request(hybrid)
    # what the rules have to look at, and that the dependencies they need were found
    kinds = [r.type for r in request.resources]
    assert (kinds.count(INSTANCE), kinds.count(LAUNCH_TEMPLATE), kinds.count(PLACEMENT_GROUP),
            kinds.count(SECURITY_GROUP)) == (10, 2, 2, 3)
    launched_from = {r.name: [d for d in r.dependencies if f"::{LAUNCH_TEMPLATE}::" in d]
                     for r in request.resources if r.type == INSTANCE}
    assert launched_from == {
        **{f"v3-use1{az}-{i}": [urn(LAUNCH_TEMPLATE, f"v3-use1{az}-lt")] for az in "ab" for i in range(4)},
        "r1-outpost-0": [], "r1-outpost-1": []}
    assert {r.name: [d for d in r.dependencies if f"::{PLACEMENT_GROUP}::" in d]
            for r in request.resources if r.type == LAUNCH_TEMPLATE} == {
        "v3-use1a-lt": [urn(PLACEMENT_GROUP, "use1-az-a-cluster")],
        "v3-use1b-lt": [urn(PLACEMENT_GROUP, "use1-az-b-cluster")]}

    response = analyzer.AnalyzeStack(request, None)
    found = [(d.policyName, d.enforcementLevel, d.urn, d.message) for d in response.diagnostics]
    assert [f for f in found if f[1] == proto.MANDATORY] == []
    assert found == [("capacity-block-present", proto.ADVISORY, urn(LAUNCH_TEMPLATE, "v3-use1b-lt"),
                      f"A Capacity Block cannot be deleted\nv3-use1b-lt: {CAPACITY_BLOCK_WARNING}")]
    assert list(response.not_applicable) == []


def test_example_hybrid_with_a_spread_group_fails(analyzer, hybrid):
    """The same run with one group's strategy changed: the rules do see the groups through the templates."""
    resources = copy.deepcopy(hybrid)
    (group,) = [r for r in resources if r.type == PLACEMENT_GROUP and r.name == "use1-az-a-cluster"]
    group.inputs["strategy"] = "spread"
    response = analyzer.AnalyzeStack(stack_request(resources), None)
    # the mocks register resources concurrently: the diagnostics come in no fixed order
    mandatory = sorted((d.policyName, d.urn) for d in response.diagnostics if d.enforcementLevel == proto.MANDATORY)
    assert mandatory == [("gpu-cluster-placement-efa", urn(INSTANCE, f"v3-use1a-{i}")) for i in range(4)]
    assert all("with strategy 'spread', not 'cluster'" in d.message for d in response.diagnostics
               if d.enforcementLevel == proto.MANDATORY)


# --- at preview: what is not created yet is unknown ------------------------------------------------------------


def preview_request(resources: list[Registered]) -> proto.AnalyzeStackRequest:
    """`stack_request` as a real `pulumi preview` sends it: every input that refers to another resource (its id,
    ARN, or a placement group's generated name) is unknown, since nothing is created yet."""
    refs = {v for r in resources for v in (r.id, r.state["arn"], r.state.get("name") if r.type == PLACEMENT_GROUP
                                           else None) if v}
    request = stack_request(resources)
    for resource, r in zip(request.resources, resources, strict=True):
        resource.properties.Clear()
        resource.properties.update(_unknown_refs(r.inputs, refs))
    return request


def _unknown_refs(value: Any, refs: set[str]) -> Any:
    if isinstance(value, str):
        return UNKNOWN_STRING_VALUE if value in refs else value
    if isinstance(value, dict):
        return {k: _unknown_refs(v, refs) for k, v in value.items()}
    if isinstance(value, list):
        return [_unknown_refs(v, refs) for v in value]
    return value


def test_at_preview_unknown_references_neither_block_nor_silence_the_pack(analyzer, hybrid):
    request = preview_request(hybrid)
    unknown = [r.name for r in request.resources if UNKNOWN_STRING_VALUE in strings(json_format.MessageToDict(
        r.properties))]
    assert {"v3-use1a-lt", "v3-use1b-lt", "v3-use1a-0", "r1-outpost-0"} <= set(unknown)  # as a real preview
    template = next(r for r in request.resources if r.name == "v3-use1a-lt")
    assert json_format.MessageToDict(template.properties)["placement"]["groupName"] == UNKNOWN_STRING_VALUE
    response = analyzer.AnalyzeStack(request, None)
    found = [(d.policyName, d.enforcementLevel, d.urn, d.message) for d in response.diagnostics]
    # no policy turned into a "can't run during preview" note, and the advisory one still ran
    assert found == [("capacity-block-present", proto.ADVISORY, urn(LAUNCH_TEMPLATE, "v3-use1b-lt"),
                      f"A Capacity Block cannot be deleted\nv3-use1b-lt: {CAPACITY_BLOCK_WARNING}")]


@pytest.mark.parametrize(("change", "rule", "where"), [
    (("placement", "use1-az-a-cluster", "strategy", "spread"), "gpu-cluster-placement-efa", "v3-use1a-0"),
    (("template", "v3-use1a-lt", "metadataOptions", {"httpTokens": "optional"}), "imdsv2-required", "v3-use1a-lt"),
    (("template", "v3-use1a-lt", "placement", {"availabilityZone": "us-east-1a"}), "gpu-cluster-placement-efa",
     "v3-use1a-0"),
], ids=["spread-group", "imds-optional", "no-placement-group"])
def test_at_preview_the_mandatory_policies_still_block(analyzer, hybrid, change, rule, where):
    resources = copy.deepcopy(hybrid)
    _kind, name, key, value = change
    (target,) = [r for r in resources if r.name == name]
    target.inputs[key] = value
    response = analyzer.AnalyzeStack(preview_request(resources), None)
    mandatory = {(d.policyName, d.urn.rsplit("::", 1)[1]) for d in response.diagnostics
                 if d.enforcementLevel == proto.MANDATORY}
    assert (rule, where) in mandatory, [d.message for d in response.diagnostics]
    assert not [d for d in response.diagnostics if "during preview" in d.message]


def test_a_rule_that_needs_an_unknown_value_fails_closed_on_that_resource_only(analyzer):
    """An IMDS setting only known after create would be a program bug: the resource is blocked, saying why; the
    rule still judges every other resource."""
    unknown_tokens = policy_resource(INSTANCE, "i-unknown", changed(standalone().props, {
        "metadataOptions": {"httpTokens": UNKNOWN_STRING_VALUE}}))
    bad = policy_resource(INSTANCE, "i-bad", changed(standalone().props,
                                                      {"metadataOptions": {"httpTokens": "optional"}}))
    request = proto.AnalyzeStackRequest(resources=[analyzer_resource(r, []) for r in (unknown_tokens, bad)])
    diagnostics = [(d.policyName, d.enforcementLevel, d.message.splitlines()[-1]) for d in
                   analyzer.AnalyzeStack(request, None).diagnostics if d.policyName == "imdsv2-required"]
    assert diagnostics == [
        ("imdsv2-required", proto.MANDATORY, "i-unknown: cannot be checked at preview: string value at "
                                             ".metadataOptions.httpTokens can't be known during preview"),
        ("imdsv2-required", proto.MANDATORY, "i-bad: IMDSv2 is not required (metadataOptions.httpTokens is "
                                             "'optional', must be 'required')")]
