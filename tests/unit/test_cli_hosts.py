"""`fleet converge|verify|drift`: every bad input exits 2 naming file, field and value, before any host is
touched; the converge recap is built from ansible-runner's events."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.model.fleet import load_stack
from infra.model.inventory import build_inventory
from patching.hosts.converge import PlayRecap

ROOT = Path(__file__).resolve().parents[2]
RELEASE = ROOT / "releases/2026-10.yaml"
FLEET = [sys.executable, "-c", "import sys; from patching.cli.app import main; sys.argv[0] = 'fleet'; main()"]


def fleet(*args):
    return subprocess.run([*FLEET, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture
def inventory(tmp_path):
    # the lab's fleet rendered without the lab: hosts that cannot be reached, which is the point
    path = tmp_path / "inventory.yml"
    data = build_inventory(load_stack("lab", ROOT))
    for hv in data["all"]["hosts"].values():
        hv["ansible_host"] = "192.0.2.1"  # TEST-NET-1: a connection attempt would hang, not fail fast
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("command", ["converge", "verify", "drift"])
def test_unknown_limit_host_exits_2(command, inventory):
    r = fleet(command, "--release", RELEASE, "--inventory", inventory, "--limit", "dgx-a9")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--limit: matches no host or group" in r.stderr and "'dgx-a9'" in r.stderr


@pytest.mark.parametrize("command", ["converge", "verify", "drift"])
def test_broken_bundle_exits_2_naming_every_problem(command, inventory, tmp_path):
    data = yaml.safe_load(RELEASE.read_text())
    data["nscq"] = "580.95.05"
    data["models"][0]["weights"]["sha256"] = "not-a-checksum"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    r = fleet(command, "--release", bad, "--inventory", inventory)
    assert r.returncode == 2
    assert f"{bad}: models[0].weights.sha256" in r.stderr and "'not-a-checksum'" in r.stderr


def test_compatibility_rules_refuse_the_bundle(inventory, tmp_path):
    data = yaml.safe_load(RELEASE.read_text())
    data["fabric_manager"] = "580.95.05"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    r = fleet("converge", "--release", bad, "--inventory", inventory)
    assert r.returncode == 2 and f"{bad}: fabric_manager" in r.stderr and "fabric-manager-equals-driver" in r.stderr


def test_a_host_the_bundle_does_not_cover_exits_2(inventory, tmp_path):
    data = yaml.safe_load(RELEASE.read_text())
    data["gpus"] = ["A100-SXM4-80GB"]
    data["models"] = data["models"][:1]
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text(yaml.safe_dump(data))
    r = fleet("drift", "--release", narrow, "--inventory", inventory)
    assert r.returncode == 2
    assert "r1-outpost-0.fleet_gpu_model: the bundle is not qualified on it" in r.stderr
    assert "r1-outpost-0.fleet_model: the bundle has no weights for it" in r.stderr
    assert "v3-aws-0.fleet_gpu_model" in r.stderr and "dgx-a1" not in r.stderr


def test_missing_inventory_and_release_are_reported_together(tmp_path):
    r = fleet("verify", "--release", tmp_path / "none.yaml", "--inventory", tmp_path / "none.yml")
    assert r.returncode == 2
    assert "none.yaml: cannot read file" in r.stderr and "none.yml: no such inventory" in r.stderr


def test_recap_counts_changes_and_names_the_first_failure():
    tasks = []
    recap = PlayRecap(on_task=tasks.append)
    events = [
        {"event": "playbook_on_task_start", "event_data": {"task": "Install the driver"}},
        {"event": "runner_on_ok", "event_data": {"host": "a", "task": "Install the driver", "res": {"changed": True}}},
        {"event": "runner_on_failed", "event_data": {"host": "b", "task": "Fetch the weights", "ignore_errors": None,
                                                     "res": {"msg": "The checksum did not match"}}},
        {"event": "runner_on_failed", "event_data": {"host": "b", "task": "Later", "res": {"msg": "second"}}},
        {"event": "runner_on_failed", "event_data": {"host": "a", "task": "Probe", "ignore_errors": True,
                                                     "res": {"msg": "ignored"}}},
        {"event": "runner_on_unreachable", "event_data": {"host": "c", "task": "Gathering Facts",
                                                          "res": {"msg": "ssh: connect to host: timed out"}}},
        {"event": "playbook_on_stats", "event_data": {"ok": {"a": 5, "b": 2}, "changed": {"a": 1},
                                                      "failures": {"b": 1}, "dark": {"c": 1}, "skipped": {"a": 2}}},
    ]
    for event in events:
        recap(event)
    a, b, c = (recap.hosts[n] for n in "abc")
    assert tasks == ["Install the driver"]
    assert (a.ok, a.changed, a.skipped, a.changed_tasks, a.first_failure) == (5, 1, 2, ["Install the driver"], None)
    assert b.failed == 1 and b.first_failure == "Fetch the weights: The checksum did not match" and not b.succeeded
    assert c.unreachable == 1 and c.first_failure == "Gathering Facts: ssh: connect to host: timed out"


@pytest.mark.parametrize("command", ["converge", "verify", "drift"])
def test_an_inventory_that_turns_host_key_checking_off_exits_2(command, tmp_path):
    data = build_inventory(load_stack("lab", ROOT))
    name = sorted(data["all"]["hosts"])[0]
    data["all"]["hosts"][name]["ansible_ssh_common_args"] = "-o StrictHostKeyChecking=accept-new"
    lax = tmp_path / "lax.yml"
    lax.write_text(yaml.safe_dump(data))
    r = fleet(command, "--release", RELEASE, "--inventory", lax, "--limit", name)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{name}.ansible_ssh_common_args" in r.stderr and "turns SSH host-key checking off" in r.stderr
    assert "Traceback" not in r.stderr
