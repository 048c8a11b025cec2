"""The `fleet` command: exit codes and messages (DESIGN.md section 6)."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import write_yaml

FLEET = str(Path(sys.executable).parent / "fleet")


def fleet(*args, cwd=None):
    return subprocess.run([FLEET, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_release_check_passes_and_shows_the_diff(root):
    r = fleet("release", "check", root / "releases/2026-11.yaml", "--against", root / "releases/2026-10.yaml")
    assert r.returncode == 0, r.stderr
    assert "580.82.07" in r.stdout and "580.95.05" in r.stdout and "CVE-2025-62164" in r.stdout


def test_release_check_reports_every_broken_rule_with_exit_2(tmp_path, bundle_data):
    bundle_data["fabric_manager"] = "580.82.07"
    bundle_data["container_toolkit"]["libnvidia-container1"] = "1.17.8-1"
    path = write_yaml(tmp_path / "b.yaml", bundle_data)
    r = fleet("release", "check", path)
    assert r.returncode == 2
    assert "fabric_manager" in r.stderr and "container_toolkit" in r.stderr and "2 compatibility rule(s)" in r.stderr


def test_release_check_bad_input_exit_2(tmp_path, bundle_data):
    bundle_data["serving"]["image"] = "vllm/vllm-openai:latest"
    path = write_yaml(tmp_path / "b.yaml", bundle_data)
    r = fleet("release", "check", path)
    assert r.returncode == 2 and f"{path}: serving.image" in r.stderr and "vllm-openai:latest" in r.stderr
    assert fleet("release", "check", tmp_path / "missing.yaml").returncode == 2


def test_inventory_writes_the_file(tmp_path, root):
    out = tmp_path / "inv.yml"
    r = fleet("inventory", "--stack", "lab", "-o", out, cwd=root)
    assert r.returncode == 0, r.stderr
    assert set(yaml.safe_load(out.read_text())["all"]["hosts"]) >= {"dgx-a1", "v3-aws-0", "r1-outpost-0"}


def test_inventory_bad_stack_exit_2_and_writes_nothing(tmp_path, lab_stack):
    lab_stack["config"]["fleet:hosts"][0]["pool"] = "ghost"
    write_yaml(tmp_path / "Pulumi.t.yaml", lab_stack)
    out = tmp_path / "inv.yml"
    r = fleet("inventory", "--stack", "t", "--project-dir", tmp_path, "-o", out)
    assert r.returncode == 2 and "hosts[0].pool" in r.stderr and "'ghost'" in r.stderr
    assert not out.exists()


def test_usage_error_is_exit_2():
    assert fleet("release", "check").returncode == 2
    assert fleet("--help").returncode == 0


def _cloud_inventory(tmp_path, **overrides):
    """example-hybrid's inventory as `pulumi up` exports it, for two cloud hosts with their console keys."""
    from infra.model.fleet import load_stack
    from infra.model.inventory import Endpoint, build_inventory
    from tests.stack_mocks import mock_host_key

    fleet = load_stack("example-hybrid", Path(__file__).resolve().parents[2])
    endpoints = {
        "v3-use1a-0": Endpoint("10.42.3.17", extra_vars={"fleet_ssh_host_keys": [mock_host_key("a")]}),
        "r1-outpost-0": Endpoint("10.43.0.12", extra_vars={"fleet_ssh_host_keys": [mock_host_key("b")],
                                                           "ansible_aws_ssm_instance_id": "i-0123456789abcdef0"}),
    }
    inventory = build_inventory(fleet, endpoints)
    inventory["all"]["hosts"]["v3-use1a-0"].update(overrides)
    return write_yaml(tmp_path / "inventory.yml", inventory), mock_host_key("a"), mock_host_key("b")


def test_known_hosts_prints_and_merges_the_inventorys_keys(tmp_path):
    inventory, a, b = _cloud_inventory(tmp_path)
    r = fleet("known-hosts", "-i", inventory)
    assert r.returncode == 0, r.stderr
    printed = r.stdout.splitlines()
    bastions = [line for line in printed if line.startswith("203.0.113.")]
    assert f"10.42.3.17 {a}" in r.stdout and f"10.43.0.12 {b}" in r.stdout and len(bastions) == 2
    home = tmp_path / "home"
    home.mkdir()
    (home / ".ssh").mkdir(mode=0o700)
    (home / ".ssh/known_hosts").write_text("10.42.3.17 ssh-ed25519 AAAAstale\nother.example.com ssh-ed25519 AAAAkeep\n")
    r = subprocess.run([FLEET, "known-hosts", "-i", str(inventory), "-o", "~/.ssh/known_hosts"], capture_output=True,
                       text=True, env=dict(os.environ, HOME=str(home)))
    assert r.returncode == 0, r.stderr
    written = (home / ".ssh/known_hosts").read_text().splitlines()
    assert written[0] == "other.example.com ssh-ed25519 AAAAkeep" and "AAAAstale" not in "\n".join(written)
    assert written[1:] == printed and "wrote 4 host key line(s)" in r.stderr


def test_known_hosts_names_the_host_of_a_malformed_var_exit_2(tmp_path):
    inventory, _, _ = _cloud_inventory(tmp_path, fleet_ssh_host_keys=["ssh-ed25519 not-base64!"])
    out = tmp_path / "known_hosts"
    r = fleet("known-hosts", "-i", inventory, "-o", out)
    assert r.returncode == 2 and not out.exists()
    assert f"{inventory}: v3-use1a-0.fleet_ssh_host_keys[0]" in r.stderr and "not valid base64" in r.stderr
