"""The `fleet` command: exit codes and messages (DESIGN.md section 6)."""

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
