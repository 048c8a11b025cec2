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
    dgx = hostvars["dgx-h01"]
    documented = {v for v in HOST_VARS if v != "ansible_host"}
    assert documented <= set(dgx), documented - set(dgx)
    assert dgx["ansible_host"] == "10.64.1.11" and dgx["fleet_gpu_count"] == 8
    assert set(listed["pool_v3_use1a"]["hosts"]) == {f"v3-use1a-{i}" for i in range(4)}
    assert "dgx-h01" in listed["ring_0"]["hosts"]
