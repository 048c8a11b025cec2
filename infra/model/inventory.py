"""Fleet -> Ansible inventory: the contract between provisioning and patching (DESIGN.md section 3).

`build_inventory` is a pure function. Every host var it writes is documented in docs/inventory.md;
`HOST_VARS` below is the list the documentation test checks against.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from infra.model.access import ssh_common_args
from infra.model.fleet import GPU_MEMORY_MIB, AwsSite, Fleet, Host, OnpremSite, OutpostSite

SSM_CONNECTION = "amazon.aws.aws_ssm"
HOST_VARS = (
    "ansible_host",
    "ansible_port",
    "ansible_user",
    "ansible_become",
    "ansible_connection",
    "ansible_ssh_common_args",
    "ansible_aws_ssm_instance_id",
    "ansible_aws_ssm_region",
    "ansible_aws_ssm_bucket_name",
    "fleet_ssh_bastion",
    "fleet_ssh_host_keys",
    "fleet_site",
    "fleet_site_kind",
    "fleet_pool",
    "fleet_model",
    "fleet_patch_ring",
    "fleet_instance_type",
    "fleet_gpu_model",
    "fleet_gpu_count",
    "fleet_gpu_memory_mib",
    "fleet_nvswitch",
    "fleet_ib",
    "fleet_efa",
    "fleet_serving_port",
    "fleet_max_unavailable",
    "fleet_min_serving",
    "fleet_lb",
    "fleet_artifacts_url",
    "fleet_bmc",
    "fleet_ups",
    "fleet_ups_monitor_user",
    "fleet_ib_hcas",
)


@dataclass(frozen=True)
class Endpoint:
    """Where a host is reached, as known after provisioning (Pulumi outputs, or the lab)."""

    address: str
    ssh_port: int | None = None
    serving_port: int | None = None
    extra_vars: Mapping[str, Any] = field(default_factory=dict)


def group_name(prefix: str, name: str) -> str:
    """Ansible group names must be identifiers: 'v3-hall' -> 'pool_v3_hall'."""
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_]', '_', name)}"


def host_vars(fleet: Fleet, host: Host, endpoint: Endpoint | None = None) -> dict[str, Any]:
    """One host's Ansible vars: how to connect, and the `fleet_*` vars the playbooks and the patch pipeline read."""
    pool = fleet.pool_of(host)
    site = fleet.site_of(host)
    address = endpoint.address if endpoint else host.address
    serving_port = (endpoint.serving_port if endpoint else None) or fleet.serving_port(host)
    hv: dict[str, Any] = {}
    if address:
        hv["ansible_host"] = address
    hv["ansible_port"] = (endpoint.ssh_port if endpoint else None) or host.ssh_port
    hv["ansible_user"] = fleet.ssh_user(host)
    if hv["ansible_user"] != "root":
        hv["ansible_become"] = True  # the roles configure the machine: sudo from the login user
    if isinstance(site, AwsSite | OutpostSite):
        hv |= access_vars(site)
    hv |= {
        "fleet_site": site.name,
        "fleet_site_kind": site.kind,
        "fleet_pool": pool.name,
        "fleet_model": pool.model,
        "fleet_patch_ring": host.patch_ring,
        "fleet_instance_type": pool.instance_type,
        "fleet_gpu_model": pool.gpu_model,
        "fleet_gpu_count": pool.gpu_count,
        "fleet_gpu_memory_mib": GPU_MEMORY_MIB[pool.gpu_model],
        "fleet_nvswitch": pool.nvswitch,
        "fleet_ib": bool(host.ib_hcas),
        "fleet_efa": site.kind == "aws",
        "fleet_serving_port": serving_port,
        "fleet_max_unavailable": pool.max_unavailable,
        "fleet_min_serving": pool.min_serving,
        "fleet_lb": _lb(site, pool.name, host.name),
        "fleet_artifacts_url": site.artifacts_url,
        "fleet_bmc": host.bmc.model_dump(exclude_none=True) if host.bmc else None,
        "fleet_ups": _ups(fleet, host),
        "fleet_ib_hcas": [h.model_dump() for h in host.ib_hcas],
    }
    if hv["fleet_ups"] and isinstance(site, OnpremSite) and site.ups_monitor_user:
        hv["fleet_ups_monitor_user"] = site.ups_monitor_user
    if endpoint:
        hv |= dict(endpoint.extra_vars)
    return hv


def access_vars(site: AwsSite | OutpostSite) -> dict[str, Any]:
    """How Ansible reaches a cloud site's hosts (the site's `access`): SSH checked strictly against the controller's
    known_hosts file, straight or through the site's bastion; or AWS Systems Manager (aws_ssm), which finds the
    instance by its id (`ansible_aws_ssm_instance_id`, from the Pulumi outputs) and moves files through an S3
    bucket. The host keys themselves (`fleet_ssh_host_keys`) come from the Pulumi outputs too."""
    access = site.access
    if access.via == "ssm":
        return {"ansible_connection": SSM_CONNECTION, "ansible_aws_ssm_region": site.region,
                "ansible_aws_ssm_bucket_name": access.ssm_bucket}
    bastion = access.bastion.model_dump() if access.via == "bastion" and access.bastion else None
    hv: dict[str, Any] = {"ansible_ssh_common_args": ssh_common_args(access.known_hosts_file, bastion)}
    if bastion:
        hv["fleet_ssh_bastion"] = bastion
    return hv


def _lb(site: Any, pool: str, host: str) -> dict[str, Any]:
    if site.kind == "aws":
        # the target group ARN is filled in from the Pulumi outputs (extra_vars)
        return {"kind": "nlb", "target_group": pool}
    return {"kind": "haproxy", "api": site.haproxy_api, "backend": pool, "server": host}


def _ups(fleet: Fleet, host: Host) -> list[dict[str, Any]]:
    site = fleet.site_of(host)
    if not isinstance(site, OnpremSite):
        return []
    units = {u.name: u for u in site.ups}
    out: list[dict[str, Any]] = []
    for psu in host.psus:
        unit = units[psu.ups]
        entry = {"name": unit.name, "host": unit.host, "port": unit.port, "feed": psu.feed}
        if entry not in out:
            out.append(entry)
    return out


def build_inventory(fleet: Fleet, endpoints: Mapping[str, Endpoint] | None = None) -> dict[str, Any]:
    """The fleet as an Ansible YAML inventory (a dict ready for yaml.safe_dump).

    Groups: one per site kind (`aws`, `outpost`, `onprem`), per site (`site_<name>`), per pool
    (`pool_<name>`) and per patch ring (`ring_<n>`). All host vars are set on the host itself,
    so the inventory reads the same whichever group a playbook targets.
    """
    endpoints = endpoints or {}
    hosts = {name: host_vars(fleet, h, endpoints.get(name)) for name, h in sorted(fleet.hosts.items())}
    groups: dict[str, dict[str, Any]] = {}

    def add(group: str, host: str) -> None:
        groups.setdefault(group, {"hosts": {}})["hosts"][host] = None

    for name, h in sorted(fleet.hosts.items()):
        site = fleet.site_of(h)
        add(site.kind, name)
        add(group_name("site", site.name), name)
        add(group_name("pool", h.pool), name)
        add(f"ring_{h.patch_ring}", name)
    return {
        "all": {
            "vars": {"fleet_name": fleet.name},
            "hosts": hosts,
            "children": dict(sorted(groups.items())),
        }
    }


def render_inventory(fleet: Fleet, endpoints: Mapping[str, Endpoint] | None = None) -> str:
    """The fleet's Ansible inventory under a do-not-edit header naming its source: YAML whose body is JSON.

    JSON is YAML too (Ansible's yaml plugin reads the file as YAML, comments and all), and the fleet commands
    read it with a JSON parser (patching/inventory/fast.py): 10,000 hosts in well under a second, where
    block-style YAML takes ten times as long. Values are ones YAML reads as JSON does (no float in exponent
    form, no NaN: ValueError).
    """
    data = build_inventory(fleet, endpoints)
    _check_yaml_reads_as_json(data, "all")
    header = (f"# Ansible inventory for fleet {fleet.name!r}, rendered from {fleet.source}. Do not edit.\n"
              "# YAML written as JSON (a subset of YAML): Ansible reads it as YAML, the fleet commands as JSON.\n")
    return header + json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _check_yaml_reads_as_json(value: Any, where: str) -> None:
    """A float JSON writes in exponent form (1e-05) or a non-finite one is a string to YAML 1.1 (Ansible)."""
    if isinstance(value, float) and ("e" in repr(value) or not math.isfinite(value)):
        raise ValueError(f"{where}: {value!r} would read back as a string; give it as a string or a plain decimal")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_yaml_reads_as_json(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_yaml_reads_as_json(v, f"{where}[{i}]")
