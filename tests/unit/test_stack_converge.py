"""Day-0 converge (`fleet:converge: true`): one local command per host, re-run when the host or the bundle changes."""

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pulumi
import pytest
import yaml

from infra.converge import converge_script, single_host_inventory
from tests.stack_mocks import ROOT, hybrid_secrets, run_program, stack_config

COMMAND = "command:local:Command"


def converge_config(bundle: str = "releases/2026-11.yaml") -> dict:
    config = copy.deepcopy(stack_config())
    config["fleet:converge"] = True
    config["fleet:bundle"] = bundle
    return config


@pytest.fixture(scope="module")
def run():
    return run_program(converge_config(), hybrid_secrets())


def digest(path: str) -> str:
    return hashlib.sha256((ROOT / path).read_bytes()).hexdigest()


def test_one_command_per_host_running_the_site_playbook(run):
    commands = {c.name: c for c in run.of_type(COMMAND)}
    assert len(commands) == len(run.outputs["hosts"]) == 14
    for host in run.outputs["hosts"]:
        inputs = commands[f"{host}-converge"].inputs
        assert f"playbooks/site.yml --limit {host} -e bundle_file=releases/2026-11.yaml" in inputs["create"]
        assert inputs["dir"] == str(ROOT)
        inventory = json.loads(inputs["environment"]["FLEET_INVENTORY"])
        assert list(inventory["all"]["hosts"]) == [host]
        assert all(list(g["hosts"]) == [host] for g in inventory["all"]["children"].values())


def test_triggers_are_the_machine_and_the_bundle_hash(run):
    commands = {c.name: c for c in run.of_type(COMMAND)}
    sha = digest("releases/2026-11.yaml")
    instance = run.named("aws:ec2/instance:Instance", "v3-use1a-0")
    assert commands["v3-use1a-0-converge"].inputs["triggers"] == [instance.id, sha]
    bmh = run.named("pulumi-python:dynamic/fleet:BareMetalHost", "dgx-h02")
    assert commands["dgx-h02-converge"].inputs["triggers"] == [bmh.id, bmh.state["serial_number"], sha]


def test_another_bundle_changes_every_trigger(run):
    older = run_program(converge_config("releases/2026-10.yaml"), hybrid_secrets())
    before = {c.name: c.inputs["triggers"] for c in run.of_type(COMMAND)}
    after = {c.name: c.inputs["triggers"] for c in older.of_type(COMMAND)}
    assert before.keys() == after.keys() and len(before) == 14
    assert all(before[n][:-1] == after[n][:-1] and before[n][-1] != after[n][-1] for n in before)
    assert {t[-1] for t in after.values()} == {digest("releases/2026-10.yaml")}


def test_no_commands_without_converge():
    run = run_program(stack_config(), hybrid_secrets())
    assert run.of_type(COMMAND) == [] and len(run.resources) > 60


def test_converge_without_bundle_fails_naming_the_key():
    config = converge_config()
    del config["fleet:bundle"]
    with pytest.raises(pulumi.RunError, match=r"config\.fleet:bundle: required when fleet:converge is true"):
        run_program(config, hybrid_secrets())


def test_single_host_inventory_keeps_only_that_host():
    inventory = {"all": {"vars": {"fleet_name": "f"}, "hosts": {"a": {"x": 1}, "b": {"x": 2}},
                         "children": {"g1": {"hosts": {"a": None, "b": None}}, "g2": {"hosts": {"b": None}}}}}
    assert single_host_inventory(inventory, "a") == {
        "all": {"vars": {"fleet_name": "f"}, "hosts": {"a": {"x": 1}}, "children": {"g1": {"hosts": {"a": None}}}}}


def test_the_script_runs_ansible_on_the_one_host(tmp_path, run):
    # The script as the command provider runs it (/bin/sh -c in the project dir), with the real
    # ansible-playbook against a stand-in site.yml that only prints what it was given.
    (tmp_path / ".venv/bin").mkdir(parents=True)
    (tmp_path / ".venv/bin/ansible-playbook").symlink_to(Path(sys.executable).parent / "ansible-playbook")
    (tmp_path / "playbooks").mkdir()
    (tmp_path / "playbooks/site.yml").write_text(
        "- hosts: all\n  gather_facts: false\n  connection: local\n  tasks:\n"
        "    - debug: msg=\"converge {{ inventory_hostname }} {{ fleet_pool }} {{ bundle_file }}\"\n")
    command = next(c for c in run.of_type(COMMAND) if c.name == "dgx-h03-converge").inputs
    env = dict(os.environ, FLEET_INVENTORY=command["environment"]["FLEET_INVENTORY"], ANSIBLE_NOCOLOR="1")
    out = subprocess.run(["/bin/sh", "-c", command["create"]], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "converge dgx-h03 v3-hall-a releases/2026-11.yaml" in out.stdout
    assert "ok=1" in out.stdout and "dgx-h01" not in out.stdout


def test_script_quotes_its_arguments():
    assert "--limit 'h; rm -rf /'" in converge_script("h; rm -rf /", "releases/x.yaml")


def test_the_day0_converge_checks_host_keys_whatever_the_environment_says():
    script = converge_script("h", "releases/x.yaml")
    assert "export ANSIBLE_HOST_KEY_CHECKING=True\n" in script
    assert script.index("ANSIBLE_HOST_KEY_CHECKING") < script.index('"$pb" -i')


def test_a_bundle_that_breaks_a_compatibility_rule_is_refused_at_preview(tmp_path):
    """CUDA 13.0.2 with an R570 driver: `fleet release check`'s rules (compat.yaml) refuse it before any host
    exists, naming the config key, the file and the rule."""
    bad = yaml.safe_load((ROOT / "releases/2026-11.yaml").read_text())
    bad.update(release="2026-11.9", driver={"version": "570.172.08"}, fabric_manager="570.172.08",
               nscq="570.172.08")
    path = tmp_path / "2026-11.9.yaml"
    path.write_text(yaml.safe_dump(bad))
    config = converge_config()
    config["fleet:bundle"] = str(path)
    with pytest.raises(pulumi.RunError) as info:
        run_program(config, hybrid_secrets())
    text = str(info.value)
    assert "config.fleet:bundle: `fleet release check` refuses it: error: driver.version: CUDA 13.0.2 needs driver" \
           in text and "[cuda-driver-minimum;" in text and f"(value: '{path}')" in text


def test_a_cloud_hosts_console_keys_are_known_before_its_first_connection(tmp_path, run):
    """Day 0 on a new instance: its keys (read from the console by `pulumi up`) and its bastion's go into the
    known_hosts file its SSH arguments name, then the playbook runs; an SSM or on-prem host gets no such step."""
    scripts = {c.name.removesuffix("-converge"): c.inputs["create"] for c in run.of_type(COMMAND)}
    with_step = sorted(h for h, s in scripts.items() if "known-hosts" in s)
    assert with_step == [f"v3-use1{az}-{i}" for az in "ab" for i in range(4)]   # the bastion sites' hosts
    assert "known-hosts -i \"$d/inventory.json\" -o '~/.ssh/known_hosts'\n" in scripts["v3-use1a-0"]
    assert scripts["v3-use1a-0"].index("known-hosts") < scripts["v3-use1a-0"].index('"$pb" -i')

    (tmp_path / ".venv/bin").mkdir(parents=True)
    for tool in ("ansible-playbook", "fleet"):
        (tmp_path / ".venv/bin" / tool).symlink_to(Path(sys.executable).parent / tool)
    (tmp_path / "playbooks").mkdir()
    (tmp_path / "playbooks/site.yml").write_text(
        "- hosts: all\n  gather_facts: false\n  connection: local\n  tasks:\n"
        "    - debug: msg=\"converge {{ inventory_hostname }}\"\n")
    command = next(c for c in run.of_type(COMMAND) if c.name == "v3-use1a-0-converge").inputs
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, FLEET_INVENTORY=command["environment"]["FLEET_INVENTORY"], HOME=str(home),
               ANSIBLE_NOCOLOR="1")
    out = subprocess.run(["/bin/sh", "-c", command["create"]], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "converge v3-use1a-0" in out.stdout
    hostvars = json.loads(command["environment"]["FLEET_INVENTORY"])["all"]["hosts"]["v3-use1a-0"]
    lines = (home / ".ssh/known_hosts").read_text().splitlines()
    assert sorted(lines) == sorted([f"{hostvars['ansible_host']} {hostvars['fleet_ssh_host_keys'][0]}",
                                    f"203.0.113.10 {hostvars['fleet_ssh_bastion']['host_keys'][0]}"])
