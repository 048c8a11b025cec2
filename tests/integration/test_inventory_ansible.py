"""The rendered inventory read back by Ansible's own parser (ansible-inventory --list)."""

import json
import subprocess
import sys
from pathlib import Path

from infra.model.inventory import HOST_VARS

BIN = Path(sys.executable).parent


def test_ansible_reads_the_rendered_inventory(tmp_path, root):
    path = tmp_path / "inventory.yml"
    subprocess.run([BIN / "fleet", "inventory", "--stack", "example-hybrid", "-o", path],
                   check=True, cwd=root)
    listed = json.loads(subprocess.run([BIN / "ansible-inventory", "-i", path, "--list"], check=True,
                                       capture_output=True, text=True).stdout)
    hostvars = listed["_meta"]["hostvars"]
    assert len(hostvars) == 14
    dgx, bastioned, ssm = hostvars["dgx-h01"], hostvars["v3-use1a-0"], hostvars["r1-outpost-0"]
    # every documented var is on some host; those the instances give at `pulumi up` are not there offline
    after_up = {"fleet_ssh_host_keys", "ansible_aws_ssm_instance_id"}
    documented = set(HOST_VARS) - after_up
    seen = set(dgx) | set(bastioned) | set(ssm)
    assert documented <= seen, documented - seen
    assert dgx["ansible_user"] == "root" and "ansible_become" not in dgx
    assert bastioned["ansible_user"] == "ubuntu" and bastioned["ansible_become"] is True
    assert 'ProxyCommand="ssh ' in bastioned["ansible_ssh_common_args"]
    assert bastioned["fleet_ssh_bastion"]["host"] == "203.0.113.10"
    assert ssm["ansible_connection"] == "amazon.aws.aws_ssm" and ssm["ansible_aws_ssm_bucket_name"]
    assert dgx["ansible_host"] == "10.64.1.11" and dgx["fleet_gpu_count"] == 8
    assert set(listed["pool_v3_use1a"]["hosts"]) == {f"v3-use1a-{i}" for i in range(4)}
    assert "dgx-h01" in listed["ring_0"]["hosts"]
