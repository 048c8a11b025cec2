"""patching.hosts.actions where it needs no host: Ansible missing is an error of ours, not unreachable hosts."""

from __future__ import annotations

import os

import pytest

import patching.hosts.actions as hostactions
from patching.hosts.toolpath import BIN, path_with_our_bin
from patching.inventory.reader import load_inventory
from patching.rollout.actions import ActionsUnavailable
from tests.conftest import write_yaml


def test_our_bin_goes_first_once():
    assert path_with_our_bin(f"/usr/bin{os.pathsep}{BIN}{os.pathsep}/bin") == os.pathsep.join([BIN, "/usr/bin", "/bin"])
    assert path_with_our_bin("") == BIN


def test_ansible_missing_is_not_hosts_unreachable(tmp_path, monkeypatch):
    host = {"ansible_host": "127.0.0.1", "fleet_pool": "a", "fleet_site": "s1", "fleet_site_kind": "onprem",
            "fleet_patch_ring": 0, "fleet_serving_port": 8000, "fleet_max_unavailable": 1, "fleet_min_serving": 0,
            "fleet_lb": {"kind": "haproxy", "api": "127.0.0.1:1", "backend": "a", "server": "a1"}}
    inventory = load_inventory([str(write_yaml(tmp_path / "inventory.yml", {"all": {"hosts": {"a1": host}}}))], None)
    monkeypatch.setattr(hostactions, "put_our_bin_first", lambda: None)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no `ansible` here (it is in the venv only)
    actions = hostactions.FleetActions(inventory, tmp_path / "work")
    with pytest.raises(ActionsUnavailable, match=r"ansible could not run \(rc 127\).*not found"):
        actions.read_hosts([inventory.hosts["a1"]])
