"""The fleet's guardrails as plain functions: a resource in, the violations (messages) out.

Each rule looks at one resource together with the resources it depends on (`related`), because an
instance launched from a launch template gets its IMDS settings, volumes, network interfaces and
placement from that template, and the placement group's strategy is on the group. Properties are
Pulumi's engine names (camelCase), as a policy pack and `pulumi preview --json` see them.

Mandatory: IMDSv2, encrypted volumes, no SSH from anywhere, GPU-cluster instances in a `cluster`
placement group with EFA, the `fleet:*` tags. Advisory: a Capacity Block (cannot be deleted), an
instance type outside the allowed list.

At `pulumi preview` the properties that come from resources not created yet are unknown. The rules read only
what the program sets itself (known at preview) and, of references, only whether they are set (`_set`); a rule
that still meets an unknown fails closed (pack.py reports it on that resource, at the rule's level) instead of
the SDK's default, which turns the whole policy into an advisory note for every resource.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pulumi_policy.proxy import UnknownValueError

INSTANCE = "aws:ec2/instance:Instance"
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
PLACEMENT_GROUP = "aws:ec2/placementGroup:PlacementGroup"
VOLUME = "aws:ebs/volume:Volume"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
SG_RULE = "aws:ec2/securityGroupRule:SecurityGroupRule"
SG_INGRESS_RULE = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
CAPACITY_BLOCK = "aws:ec2/capacityBlockReservation:CapacityBlockReservation"
NETWORK_INTERFACE = "aws:ec2/networkInterface:NetworkInterface"
EFA_TYPES = ("efa", "efa-only")

DEFAULTS: dict[str, Any] = {
    # instance types that only make sense as a tightly coupled cluster: NCCL over EFA
    "cluster_instance_types": ["p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge", "p5e.48xlarge", "p5en.48xlarge"],
    "allowed_instance_types": ["p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge", "g4dn.12xlarge", "g4dn.metal"],
    "required_tags": ["fleet:site", "fleet:pool", "fleet:host"],
}
ANYWHERE = ("0.0.0.0/0", "::/0")


@dataclass(frozen=True)
class Subject:
    """A resource under test, with the resources it depends on (directly or through its launch template)."""

    type: str
    name: str
    props: Mapping[str, Any]
    related: tuple[Subject, ...] = ()

    def related_of(self, type_: str) -> list[Subject]:
        """The related resources of one type."""
        return [r for r in self.related if r.type == type_]

    @property
    def template(self) -> Mapping[str, Any] | None:
        """The launch template's properties when this instance is launched from one in the stack."""
        found = self.related_of(LAUNCH_TEMPLATE)
        return found[0].props if found else None


Rule = Callable[[Subject, Mapping[str, Any]], list[str]]


def _set(props: Mapping[str, Any], key: str) -> bool:
    """Whether a property has a value. At preview a reference to a resource not created yet (a placement
    group's generated name) is unknown: it is set, only its value is not known yet."""
    try:
        return bool(props.get(key))
    except UnknownValueError:
        return True


def _truthy(value: Any) -> bool:
    # launch templates carry EBS flags as the strings "true"/"false"
    return value is True or (isinstance(value, str) and value.lower() == "true")


def instance_type_of(s: Subject) -> str | None:
    """The instance's type, its own or its launch template's."""
    own = s.props.get("instanceType")
    if own:
        return own
    template = s.template
    return template.get("instanceType") if template else None


def imdsv2_required(s: Subject, _config: Mapping[str, Any]) -> list[str]:
    """Instances and launch templates must require IMDSv2 session tokens (`httpTokens: required`)."""
    if s.type == LAUNCH_TEMPLATE:
        tokens = (s.props.get("metadataOptions") or {}).get("httpTokens")
    elif s.type == INSTANCE:
        tokens = (s.props.get("metadataOptions") or {}).get("httpTokens")
        if tokens is None and s.template is not None:
            tokens = (s.template.get("metadataOptions") or {}).get("httpTokens")
    else:
        return []
    if tokens != "required":
        return [f"{s.name}: IMDSv2 is not required (metadataOptions.httpTokens is {tokens!r}, must be 'required')"]
    return []


def volumes_encrypted(s: Subject, _config: Mapping[str, Any]) -> list[str]:
    """Every EBS volume encrypted: EBS volumes, an instance's root and data volumes, a template's mappings."""
    out: list[str] = []
    if s.type == VOLUME:
        if not _truthy(s.props.get("encrypted")):
            out.append(f"{s.name}: EBS volume is not encrypted")
    elif s.type == LAUNCH_TEMPLATE:
        out += _mappings_encrypted(s.name, s.props.get("blockDeviceMappings") or [])
    elif s.type == INSTANCE:
        root = s.props.get("rootBlockDevice")
        template = s.template
        if root is not None:
            if not _truthy(root.get("encrypted")):
                out.append(f"{s.name}: root volume is not encrypted")
        elif template is None or not template.get("blockDeviceMappings"):
            out.append(f"{s.name}: root volume encryption is not set (rootBlockDevice.encrypted, or the launch "
                       "template's blockDeviceMappings)")
        for device in s.props.get("ebsBlockDevices") or []:
            if not _truthy(device.get("encrypted")):
                out.append(f"{s.name}: volume {device.get('deviceName')} is not encrypted")
    return out


def _mappings_encrypted(name: str, mappings: Iterable[Mapping[str, Any]]) -> list[str]:
    return [f"{name}: volume {m.get('deviceName')} is not encrypted"
            for m in mappings if m.get("ebs") is not None and not _truthy(m["ebs"].get("encrypted"))]


def no_ssh_from_anywhere(s: Subject, _config: Mapping[str, Any]) -> list[str]:
    """No ingress rule may open port 22 to 0.0.0.0/0 or ::/0."""
    if s.type == SECURITY_GROUP:
        rules = [(r.get("protocol"), r.get("fromPort"), r.get("toPort"),
                  [*(r.get("cidrBlocks") or []), *(r.get("ipv6CidrBlocks") or [])])
                 for r in s.props.get("ingress") or []]
    elif s.type == SG_RULE and s.props.get("type") == "ingress":
        rules = [(s.props.get("protocol"), s.props.get("fromPort"), s.props.get("toPort"),
                  [*(s.props.get("cidrBlocks") or []), *(s.props.get("ipv6CidrBlocks") or [])])]
    elif s.type == SG_INGRESS_RULE:
        rules = [(s.props.get("ipProtocol"), s.props.get("fromPort"), s.props.get("toPort"),
                  [c for c in (s.props.get("cidrIpv4"), s.props.get("cidrIpv6")) if c])]
    else:
        return []
    return [f"{s.name}: SSH (port 22) is open to {cidr}"
            for protocol, low, high, cidrs in rules if _covers_ssh(protocol, low, high)
            for cidr in cidrs if cidr in ANYWHERE]


def _covers_ssh(protocol: Any, low: Any, high: Any) -> bool:
    proto = str(protocol).lower()
    if proto in ("-1", "all"):
        return True  # all protocols means all ports, whatever the port fields say
    if proto not in ("tcp", "6"):
        return False
    return low is not None and high is not None and float(low) <= 22 <= float(high)


def gpu_cluster_placement_and_efa(s: Subject, config: Mapping[str, Any]) -> list[str]:
    """Instances of a cluster GPU type: in a `cluster` placement group, with at least one EFA interface."""
    if s.type != INSTANCE:
        return []
    itype = instance_type_of(s)
    if itype not in config.get("cluster_instance_types", DEFAULTS["cluster_instance_types"]):
        return []
    out = []
    template = s.template or {}
    groups = s.related_of(PLACEMENT_GROUP)
    placement = template.get("placement") or {}
    group_named = (_set(s.props, "placementGroup") or _set(s.props, "placementGroupId")
                   or _set(placement, "groupName") or _set(placement, "groupId"))
    if not groups and not group_named:
        out.append(f"{s.name}: {itype} is not in a placement group (needs strategy 'cluster')")
    for group in groups:
        if group.props.get("strategy") != "cluster":
            out.append(f"{s.name}: {itype} is in placement group {group.name} with strategy "
                       f"{group.props.get('strategy')!r}, not 'cluster'")
    # a template's interfaces carry interfaceType; an instance's only attach ENIs (networkInterfaceId), so an
    # instance without a template gets EFA from the NetworkInterface resources it depends on
    interfaces = [*(template.get("networkInterfaces") or []), *(e.props for e in s.related_of(NETWORK_INTERFACE))]
    if not any(i.get("interfaceType") in EFA_TYPES for i in interfaces):
        out.append(f"{s.name}: {itype} has no EFA interface (interfaceType 'efa' or 'efa-only')")
    return out


def fleet_tags_present(s: Subject, config: Mapping[str, Any]) -> list[str]:
    """Instances carry the fleet's tags (site, pool, host by default)."""
    if s.type != INSTANCE:
        return []
    tags = s.props.get("tags") or {}
    missing = [t for t in config.get("required_tags", DEFAULTS["required_tags"]) if not tags.get(t)]
    return [f"{s.name}: missing tag(s) {', '.join(missing)}"] if missing else []


def capacity_block_present(s: Subject, _config: Mapping[str, Any]) -> list[str]:
    """Advisory: a Capacity Block is bought for its whole term; it cannot be deleted, destroy only forgets it."""
    market = None
    if s.type == CAPACITY_BLOCK:
        market = "capacity-block"
    elif s.type in (INSTANCE, LAUNCH_TEMPLATE):
        market = (s.props.get("instanceMarketOptions") or {}).get("marketType")
    if market != "capacity-block":
        return []
    return [f"{s.name}: uses a Capacity Block; it cannot be deleted or cancelled, `pulumi destroy` only drops it "
            "from state and it is paid for until its end date"]


def instance_type_allowed(s: Subject, config: Mapping[str, Any]) -> list[str]:
    """Advisory: instance types outside the allowed list (a typo, or capacity nobody planned for)."""
    if s.type != INSTANCE:
        return []
    itype = instance_type_of(s)
    allowed = config.get("allowed_instance_types", DEFAULTS["allowed_instance_types"])
    if itype is not None and itype not in allowed:
        return [f"{s.name}: instance type {itype} is not in the allowed list ({', '.join(allowed)})"]
    return []


@dataclass(frozen=True)
class RuleSpec:
    """A rule with its policy name, description and whether a violation blocks the deployment."""

    name: str
    description: str
    check: Rule
    mandatory: bool


RULES: tuple[RuleSpec, ...] = (
    RuleSpec("imdsv2-required", "EC2 instances and launch templates require IMDSv2", imdsv2_required, True),
    RuleSpec("ebs-encrypted", "EBS volumes are encrypted", volumes_encrypted, True),
    RuleSpec("no-ssh-from-anywhere", "No security group opens SSH to 0.0.0.0/0 or ::/0", no_ssh_from_anywhere, True),
    RuleSpec("gpu-cluster-placement-efa", "GPU cluster instances run in a cluster placement group with EFA",
             gpu_cluster_placement_and_efa, True),
    RuleSpec("fleet-tags", "Instances carry the fleet:* tags", fleet_tags_present, True),
    RuleSpec("capacity-block-present", "A Capacity Block cannot be deleted", capacity_block_present, False),
    RuleSpec("instance-type-allowed", "Instance types come from the allowed list", instance_type_allowed, False),
)


def violations(subjects: Iterable[Subject], config: Mapping[str, Any] | None = None,
               mandatory_only: bool = False) -> list[tuple[str, str]]:
    """(rule name, message) for every rule broken by any subject: what the pack would report."""
    config = {**DEFAULTS, **(config or {})}
    return [(rule.name, message) for s in subjects for rule in RULES if rule.mandatory or not mandatory_only
            for message in rule.check(s, config)]
