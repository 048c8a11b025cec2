"""The lab's cloud-like hosts (lab/cloud.py): what goes into their disk before first boot, and the base check.

Booting them (real cloud-init, the bastion, the firewall) is tested on the lab: tests/integration/
test_pin_verify.py test_cloud_like_hosts_are_reached_through_the_bastion_as_their_default_user_only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from infra.model.fleet import load_stack
from lab import base, cloud
from lab.inventory import lab_endpoints
from lab.layout import HostDirs, Layout, Ports

ROOT = Path(__file__).resolve().parents[2]


def test_the_lab_stack_has_cloud_like_hosts_at_its_aws_site_only():
    fleet = load_stack("lab", ROOT)
    assert cloud.cloud_hosts(fleet) == ["v3-aws-0", "v3-aws-1"]
    assert {fleet.site_of(fleet.hosts[h]).kind for h in fleet.hosts if h not in cloud.cloud_hosts(fleet)} == {
        "onprem", "outpost"}


def test_a_cloud_like_host_gets_the_programs_user_data_and_no_key_of_ours(tmp_path):
    dirs = HostDirs(tmp_path / "v3-aws-0")
    root = dirs.merged
    for d in ("etc/ssh/sshd_config.d", "etc/cloud"):
        (root / d).mkdir(parents=True)
    (root / "etc/cloud/cloud-init.disabled").write_text("")
    cloud.write_cloud_host_files(dirs, "v3-aws-0", 22004, "#cloud-config\nhostname: v3-aws-0\n")
    seed = root / "var/lib/cloud/seed/nocloud"
    assert (seed / "user-data").read_text() == "#cloud-config\nhostname: v3-aws-0\n"
    assert (seed / "user-data").stat().st_mode & 0o077 == 0
    meta = yaml.safe_load((seed / "meta-data").read_text())
    assert meta == {"instance-id": cloud.instance_id("v3-aws-0"), "local-hostname": "v3-aws-0"}
    assert meta["instance-id"].startswith("i-") and len(meta["instance-id"]) == 19
    assert not (root / "etc/cloud/cloud-init.disabled").exists()
    cfg = yaml.safe_load((root / "etc/cloud/cloud.cfg.d/90-fleet-lab-ami.cfg").read_text())
    assert cfg["system_info"]["default_user"]["name"] == "ubuntu" and cfg["disable_root"] is True
    assert cfg["datasource_list"] == ["NoCloud"] and cfg["network"] == {"config": "disabled"}
    assert not list((root / "etc/ssh").glob("ssh_host_*")) and not (root / "root/.ssh").exists()


def test_the_lab_reaches_its_cloud_like_hosts_as_the_program_does(tmp_path):
    fleet = load_stack("lab", ROOT)
    layout = Layout(tmp_path, tmp_path / "cache")
    ports = Ports.plan(fleet, 22000)
    keys = {"v3-aws-0": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEauq1NH5slb41+UY4IUwGcVjz+0QjzbJUA6v4P/uXab"]}
    eps = lab_endpoints(fleet, layout, ports, keys)
    aws = eps["v3-aws-0"].extra_vars
    assert aws["ansible_user"] == "ubuntu" and aws["ansible_become"] is True
    assert aws["fleet_ssh_host_keys"] == keys["v3-aws-0"]
    assert f"-p {ports.bastion} fleetjump@127.0.0.1" in aws["ansible_ssh_common_args"]
    for other in ("dgx-a1", "r1-outpost-0"):
        assert eps[other].extra_vars["ansible_user"] == "root"
        assert "ProxyCommand" not in eps[other].extra_vars["ansible_ssh_common_args"]


def test_the_firewall_names_only_the_cloud_hosts_ports(monkeypatch):
    ran = []
    monkeypatch.setattr(cloud.subprocess, "run", lambda argv, **kw: ran.append((argv, kw.get("input"))))
    cloud.firewall_up(22000, [22005, 22004])
    rules = ran[-1][1]
    assert ran[-1][0] == ["nft", "-f", "-"]
    assert "table inet fleet_lab_22000" in rules
    assert f"tcp dport {{ 22004, 22005 }} meta skuid != {cloud.JUMP_UID} reject with tcp reset" in rules


def test_a_base_image_with_an_unconfigured_package_is_refused(tmp_path):
    status = tmp_path / "var/lib/dpkg"
    status.mkdir(parents=True)
    (status / "status").write_text(
        "Package: python3\nStatus: install ok installed\nVersion: 3.11\nArchitecture: amd64\n\n"
        "Package: cloud-init\nStatus: install ok unpacked\nVersion: 22.4.2\nArchitecture: all\n\n")
    with pytest.raises(RuntimeError, match="unconfigured: cloud-init"):
        base._require_configured(tmp_path)


def test_drift_reaches_a_bastion_host_as_the_inventory_says():
    """patching/hosts/drift.py (Fabric): the ProxyCommand of ansible_ssh_common_args with %h/%p filled in (Fabric
    alone would put port 22), and become as `sudo -n -u root`."""
    from infra.model.access import ssh_common_args
    from patching.hosts.drift import _expand_proxy_command, ssh_settings

    bastion = {"host": "203.0.113.10", "port": 2222, "user": "jump", "host_keys": []}
    hv = {"ansible_host": "10.42.0.7", "ansible_port": 22, "ansible_user": "ubuntu", "ansible_become": True,
          "ansible_ssh_common_args": ssh_common_args("/etc/fleet/known_hosts", bastion)}
    s = ssh_settings("v3-aws-0", hv)
    assert s.user == "ubuntu" and s.become_user == "root" and s.known_hosts == "/etc/fleet/known_hosts"
    assert s.proxy_command is not None and "-W %h:%p -p 2222 jump@203.0.113.10" in s.proxy_command
    assert _expand_proxy_command(s.proxy_command, s.host, 2200).endswith("-W 10.42.0.7:2200 -p 2222 jump@203.0.113.10")
    assert _expand_proxy_command("a %% b %h", "h", 1) == "a %% b h"  # Fabric's ssh_config parse turns %% into %
    plain = ssh_settings("dgx-a1", {"ansible_host": "10.0.0.1", "ansible_user": "root"})
    assert plain.proxy_command is None and plain.become_user is None


def test_drift_names_a_host_it_cannot_read_over_ssh_and_reads_the_others(monkeypatch):
    from patching.hosts import drift as drift_mod

    asked = []
    monkeypatch.setattr(drift_mod, "read_hosts", lambda hv, cmd: asked.append(sorted(hv)) or {})
    hostvars = {"r1-outpost-0": {"ansible_connection": "amazon.aws.aws_ssm"},
                "dgx-a1": {"ansible_connection": "ansible.builtin.ssh"}, "dgx-a2": {}}
    from patching.release.bundle import load_bundle

    found = drift_mod.drift(load_bundle(ROOT / "releases/2026-10.yaml"), hostvars)
    assert asked == [["dgx-a1", "dgx-a2"]]
    ssm = [d for d in found if d.host == "r1-outpost-0"]
    assert len(ssm) == 1 and "amazon.aws.aws_ssm" in ssm[0].found and "not read" in ssm[0].found
