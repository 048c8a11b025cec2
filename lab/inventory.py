"""The inventory the lab writes: `fleet inventory`'s, with the lab's addresses, ports and SSH settings.

It is a directory (hosts.yml + group_vars/all/), so `ansible -i "$(fleet lab inventory)" all -m ping`
works as is. The NUT monitor password (upsmon on the hosts uses it) lives in group_vars/all/secrets.yml
(created 0600), never in hosts.yml, logs or reports. The BMC password is not in the inventory at all: the
controller's lab services read it from the lab's secrets.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from infra.model.access import known_hosts_lines, merge_known_hosts, ssh_common_args
from infra.model.fleet import Fleet
from infra.model.inventory import Endpoint, build_inventory, host_vars
from lab.cloud import BASTION, DEFAULT_USER, JUMP_USER, cloud_hosts
from lab.hardware import EFA_DEVICES
from lab.layout import Layout, Ports
from lab.services import write_private

SSH_SESSION_ARGS = "-o ControlMaster=auto -o ControlPersist=60s -o ConnectTimeout=10"


def lab_bastion(ports: Ports, bastion_keys: list[str]) -> dict[str, Any]:
    """The lab's bastion as a stack declares one (infra/model/fleet.py Access.bastion)."""
    return {"host": "127.0.0.1", "port": ports.bastion, "user": JUMP_USER, "host_keys": bastion_keys}


def lab_endpoints(fleet: Fleet, layout: Layout, ports: Ports,
                  host_keys: Mapping[str, list[str]] | None = None) -> dict[str, Endpoint]:
    """How Ansible reaches each lab host: loopback ports and SSH key, the lab's HAProxy, upsd and Redfish.

    The cloud-like hosts (lab/cloud.py) are reached as the program's inventory reaches an EC2 instance
    behind a bastion: the AMI's default user with become, a ProxyCommand through the bastion, and the
    host keys learnt from their console output (`host_keys`)."""
    ssh_args = f"-o UserKnownHostsFile={layout.known_hosts} -o StrictHostKeyChecking=yes {SSH_SESSION_ARGS}"
    host_keys = host_keys or {}
    cloud = set(cloud_hosts(fleet))
    bastion = lab_bastion(ports, bastion_host_keys(layout)) if cloud else None
    endpoints = {}
    for name, host in fleet.hosts.items():
        hp = ports.hosts[name]
        ups = host_vars(fleet, host)["fleet_ups"]
        extra: dict[str, Any] = {
            "ansible_ssh_private_key_file": str(layout.ssh_key),
            "ansible_ssh_common_args": ssh_args,
            "ansible_python_interpreter": "/usr/bin/python3",
            # every lab pool, AWS ones included, sits behind the lab's HAProxy
            "fleet_lb": {"kind": "haproxy", "api": f"127.0.0.1:{ports.haproxy_api}", "backend": host.pool,
                         "server": name},
            "fleet_artifacts_url": f"http://127.0.0.1:{ports.http}/artifacts",
            "fleet_ups": [dict(u, host="127.0.0.1", port=ports.upsd) for u in ups],
            # hosts share one network namespace: each DCGM exporter needs its own port (9400 on a real host)
            "fleet_gpu_metrics_port": hp.gpu_metrics,
        }
        if (efa := EFA_DEVICES.get(fleet.pool_of(host).instance_type or "")) and fleet.site_of(host).kind == "aws":
            extra["fleet_efa_devices"] = efa  # what `pulumi up` exports from DescribeInstanceTypes
        if name not in cloud:  # the lab's other containers let root in with the lab's key (an Outpost
            extra["ansible_user"] = "root"  # instance would have its AMI's user: only the AWS site is cloud-like)
        else:
            extra |= {
                "ansible_user": DEFAULT_USER,
                "ansible_become": True,
                "ansible_ssh_common_args": ssh_common_args(str(layout.known_hosts), bastion, str(layout.ssh_key))
                + " " + SSH_SESSION_ARGS,
                "fleet_ssh_bastion": bastion,
                "fleet_ssh_host_keys": list(host_keys.get(name, [])),
            }
        if host.bmc:
            extra["fleet_bmc"] = {"endpoint": f"http://127.0.0.1:{ports.redfish}", "system_id": name,
                                  "username": host.bmc.username, "verify_tls": False}
        endpoints[name] = Endpoint("127.0.0.1", hp.ssh, hp.serving, extra)
    return endpoints


def bastion_host_keys(layout: Layout) -> list[str]:
    """The lab bastion's public host key(s), as its operator declares them in a stack."""
    pub = layout.host(BASTION).merged / "etc/ssh/ssh_host_ed25519_key.pub"
    return [" ".join(pub.read_text().split()[:2])] if pub.exists() else []


def write_inventory(fleet: Fleet, layout: Layout, ports: Ports, secrets: dict[str, str],
                    host_keys: Mapping[str, list[str]] | None = None) -> Path:
    """Write the lab's inventory (hosts.yml, secrets in group_vars/all) and return its folder; the cloud-like
    hosts' keys (learnt from their consoles) go into the lab's known_hosts the way `fleet known-hosts` puts them."""
    inv = build_inventory(fleet, lab_endpoints(fleet, layout, ports, host_keys))
    cloud_vars = {n: hv for n, hv in inv["all"]["hosts"].items() if hv.get("fleet_ssh_host_keys")}
    if cloud_vars:
        merge_known_hosts(layout.known_hosts, known_hosts_lines(cloud_vars))
    inv["all"]["vars"].update({
        "fleet_apt_repo_url": f"http://127.0.0.1:{ports.http}/apt/repo/",
        "fleet_apt_repo_keyring_url": f"http://127.0.0.1:{ports.http}/apt/fleet-lab-archive-keyring.gpg",
        # the serving images come from the lab's registry, as a site's pull-through mirror of docker.io (plain
        # HTTP on loopback); the hosts pull by digest only, which a mirror serves
        "fleet_image_mirrors": [{"prefix": "docker.io/vllm", "location": f"127.0.0.1:{ports.registry}/vllm",
                                 "insecure": True}],
        # nspawn mounts the cgroup controllers read-only: podman runs the server without cgroups
        "fleet_container_cgroups": "disabled",
    })
    target = layout.inventory_dir
    (target / "group_vars/all").mkdir(parents=True, exist_ok=True)
    header = f"# The lab's inventory for fleet {fleet.name!r} (written by `fleet lab up`).\n"
    (target / "hosts.yml").write_text(header + yaml.safe_dump(inv, sort_keys=False, width=120))
    # only what the hosts use: upsmon on each host logs in to upsd. The BMC password is the controller's
    # (the lab's secrets.json; Pulumi's secret config on a real fleet), never a host var.
    write_private(target / "group_vars/all/secrets.yml",
                  yaml.safe_dump({"fleet_ups_monitor_user": "monitor",
                                  "fleet_ups_monitor_password": secrets["ups_monitor"]}))
    return target
