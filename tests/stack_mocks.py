"""Run the Pulumi program (`__main__.py`) against `pulumi.runtime.set_mocks`, as the tests and bench/stack.py do.

The mocks answer like AWS would for the few lookups the program makes (p4d.24xlarge has 4 network
cards and 4 EFA interfaces; an Outpost offers g4dn types) and give every resource the computed
outputs the program reads (instance private IPs, ARNs, auto-names). Every registered resource is kept,
with the inputs the engine would have sent to the provider (camelCase, as `pulumi preview` shows them).
"""

from __future__ import annotations

import base64
import hashlib
import json
import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from pulumi.runtime import settings
from pulumi.runtime.stack import run_pulumi_func
from pulumi.runtime.sync_await import _sync_await

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "gpu-fleet"

# aws ec2 describe-instance-types, trimmed to what the program reads
INSTANCE_TYPES: dict[str, dict[str, Any]] = {
    "p4d.24xlarge": {"cards": 4, "efa": True, "efa_max": 4},
    "p5.48xlarge": {"cards": 32, "efa": True, "efa_max": 32},
    "g4dn.12xlarge": {"cards": 1, "efa": True, "efa_max": 1},
    "g4dn.metal": {"cards": 1, "efa": True, "efa_max": 1},
    "g5.xlarge": {"cards": 1, "efa": False, "efa_max": None},
}
OUTPOST_OFFERS = ("c5.2xlarge", "g4dn.12xlarge", "g4dn.metal", "m5.2xlarge", "r5.2xlarge")
AMI_ID = "ami-0a1b2c3d4e5f60718"
AMI_NAME = "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-20261120"
HOST_KEYS = "pulumi-python:dynamic/fleet:HostKeys"


def mock_host_key(seed: str) -> str:
    """A well-formed ssh-ed25519 public key derived from `seed`: what the HostKeys provider would have read off an
    instance's console (the 32 key bytes are a hash, not a real curve point: nothing here verifies signatures)."""
    def string(data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + data

    blob = string(b"ssh-ed25519") + string(hashlib.sha256(seed.encode()).digest())
    return "ssh-ed25519 " + base64.b64encode(blob).decode()


@dataclass
class Registered:
    """One resource the program registered: its type token, name, inputs and the state the mock returned."""

    type: str
    name: str
    id: str
    inputs: dict[str, Any]
    state: dict[str, Any]


@dataclass
class StackRun:
    """The outcome of one mock run: every resource, and the stack outputs resolved."""

    resources: list[Registered]
    outputs: dict[str, Any]
    secret_outputs: set[str]
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def of_type(self, type_: str) -> list[Registered]:
        return [r for r in self.resources if r.type == type_]

    def named(self, type_: str, name: str) -> Registered:
        (match,) = [r for r in self.resources if r.type == type_ and r.name == name]
        return match


class FleetMocks(pulumi.runtime.Mocks):
    """AWS-shaped answers for the program's invokes and resources, deterministic run to run."""

    def __init__(self, outpost_offers: tuple[str, ...] = OUTPOST_OFFERS):
        self.outpost_offers = outpost_offers
        self.resources: list[Registered] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._ips = 0

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        short = hashlib.sha256(f"{args.typ}/{args.name}".encode()).hexdigest()[:17]
        state = dict(args.inputs)
        state.setdefault("name", args.name)  # what the provider's auto-naming would add
        state.setdefault("arn", f"arn:aws:mock:us-east-1:123456789012:{args.typ.split(':')[-1].lower()}/{args.name}")
        rid = f"{args.name}-{short[:8]}"
        if args.typ == "aws:ec2/instance:Instance":
            rid = f"i-{short}"
            self._ips += 1
            state["privateIp"] = f"10.{100 + self._ips // 65536}.{self._ips // 256 % 256}.{self._ips % 256}"
            state["instanceState"] = "running"
        elif args.typ == "aws:ec2/launchTemplate:LaunchTemplate":
            rid = f"lt-{short}"
            state["latestVersion"] = 1
        elif args.typ == "aws:lb/targetGroup:TargetGroup":
            state["arn"] = f"arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/{args.name}/{short[:16]}"
        elif args.typ == HOST_KEYS:  # the console output's keys, as the provider's create returns them
            rid = args.inputs["instance_id"]
            state["host_keys"] = [mock_host_key(rid)]
        elif args.typ == "pulumi-python:dynamic/fleet:BareMetalHost":
            rid = f"{args.inputs['endpoint']}/redfish/v1/Systems/{args.inputs.get('system_id') or '1'}"
            state |= {"serial_number": f"SN{short[:10].upper()}", "model": "DGXA100", "manufacturer": "NVIDIA",
                      "power_state": "On", "system_path": rid.split(args.inputs["endpoint"])[1]}
        self.resources.append(Registered(args.typ, args.name, rid, dict(args.inputs), state))
        return rid, state

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list]:
        self.calls.append((args.token, dict(args.args)))
        token = args.token
        if token == "aws:ec2/getInstanceType:getInstanceType":
            spec = INSTANCE_TYPES[args.args["instanceType"]]
            cards = [{"index": i, "maximumInterfaces": 15, "baselineBandwidth": 100.0, "peakBandwidth": 100.0,
                      "performance": "100 Gigabit"} for i in range(spec["cards"])]
            return {"instanceType": args.args["instanceType"], "maximumNetworkCards": spec["cards"],
                    "networkCards": cards, "efaSupported": spec["efa"],
                    "efaMaximumInterfaces": spec["efa_max"]}, []
        if token == "aws:outposts/getOutpostInstanceTypes:getOutpostInstanceTypes":
            return {"arn": args.args["arn"], "id": args.args["arn"], "instanceTypes": list(self.outpost_offers)}, []
        if token == "aws:ssm/getParameter:getParameter":
            return {"name": args.args["name"], "value": AMI_ID, "type": "String", "id": args.args["name"]}, []
        if token == "aws:ec2/getAmi:getAmi":  # one image: found by its id or its name, as DescribeImages does
            (flt,) = args.args["filters"]
            (value,) = flt["values"]
            if flt["name"] == "image-id" and value != AMI_ID:
                raise ValueError(f"Your query returned no results (image-id {value})")
            name = value if flt["name"] == "name" else AMI_NAME
            return {"id": AMI_ID, "rootDeviceName": "/dev/sda1", "name": name}, []
        if token == "aws:ec2/getLocalGatewayRouteTable:getLocalGatewayRouteTable":
            return {"localGatewayId": "lgw-0a1b2c3d4e5f60718",
                    "localGatewayRouteTableId": args.args["localGatewayRouteTableId"]}, []
        if token == "aws:ec2/getSubnet:getSubnet":
            return {"id": args.args["id"], "vpcId": "vpc-0abc", "availabilityZone": "us-east-1a",
                    "cidrBlock": "10.50.0.0/20"}, []
        if token == "aws:ec2/getVpc:getVpc":
            return {"id": args.args["id"], "cidrBlock": "10.50.0.0/16"}, []
        raise NotImplementedError(f"no mock for invoke {token}")


def stack_config(stack: str = "example-hybrid") -> dict[str, Any]:
    """The `config:` mapping of a shipped stack file."""
    return yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]


def run_program(config: dict[str, Any], secrets: dict[str, str] | None = None, mocks: FleetMocks | None = None,
                stack: str = "example-hybrid", preview: bool = False) -> StackRun:
    """Run `__main__.py` once under mocks with this stack config; raise what the program raises."""
    mocks = mocks or FleetMocks()
    raw = {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
    raw |= secrets or {}
    # Config as the language host hands it to a program: strings, JSON for objects; secrets by key.
    pulumi.runtime.set_all_config(raw, list(secrets or {}))
    settings.reset_options(project=PROJECT, stack=stack, preview=preview)
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=preview)

    def program() -> None:
        runpy.run_path(str(ROOT / "__main__.py"), run_name="__main__")

    _sync_await(run_pulumi_func(program))
    root = settings.get_root_resource()
    outputs: dict[str, Any] = {}
    secret: set[str] = set()
    for name, value in root.outputs.items():  # type: ignore[union-attr]
        out = pulumi.Output.from_input(value)
        outputs[name] = _sync_await(out.future())
        if _sync_await(out.is_secret()):
            secret.add(name)
    return StackRun(mocks.resources, outputs, secret, mocks.calls)


def hybrid_secrets(password: str = "bmc-pass-7Kq2") -> dict[str, str]:
    """The secret config the example stack needs (set with `pulumi config set --secret`)."""
    return {"fleet:bmcPassword": password}
