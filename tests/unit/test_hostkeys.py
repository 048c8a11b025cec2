"""Host keys and secrets on every connection (issue 11): inventories that turn checking off are refused,
every Ansible run checks keys and gets no secret from our environment, and OpenSSH's and paramiko's
words for a changed key are named as such."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from patching.hosts.ansible_env import controlled_environment, describe_ssh_failure, host_key_problem, run_ansible
from patching.inventory.hostkeys import host_key_problems, ssh_options, unverified, unverified_warning

# OpenSSH 9.2 (Debian 12) when the host answers with another key than the one in known_hosts, as Ansible's
# ssh connection plugin reports it (msg of runner_on_unreachable): the client's own words.
CHANGED_KEY = """Failed to connect to the host via ssh: @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Someone could be eavesdropping on you right now (man-in-the-middle attack)!
It is also possible that a host key has just been changed.
The fingerprint for the ED25519 key sent by the remote host is
SHA256:3gqQ5Cw3l6t8Hk3bB4m1m8l1cXb6bJxkz3x8Z0f1l0c.
Please contact your system administrator.
Add correct host key in /tmp/fleet-lab-tests/ssh/known_hosts to get rid of this message.
Offending ED25519 key in /tmp/fleet-lab-tests/ssh/known_hosts:1
Host key for [127.0.0.1]:23001 has changed and you have requested strict checking.
Host key verification failed."""
UNKNOWN_KEY = ("Failed to connect to the host via ssh: No ED25519 host key is known for [127.0.0.1]:23001 and "
               "you have requested strict checking.\r\nHost key verification failed.")
# paramiko (fleet drift): BadHostKeyException and RejectPolicy's SSHException
PARAMIKO_CHANGED = ("BadHostKeyException: Host key for server '[127.0.0.1]:23001' does not match: got "
                    "'AAAAC3NzaC1lZDI1NTE5AAAAIG', expected 'AAAAC3NzaC1lZDI1NTE5AAAAIH'")
PARAMIKO_UNKNOWN = "SSHException: Server '[127.0.0.1]:23001' not found in known_hosts"


def test_openssh_and_paramiko_words_for_a_changed_key_are_named():
    changed = host_key_problem(CHANGED_KEY)
    assert changed and changed.startswith("host key changed") and "known_hosts line 1" in changed
    assert host_key_problem(PARAMIKO_CHANGED).startswith("host key changed")
    assert host_key_problem(UNKNOWN_KEY).startswith("host key not verified")
    assert host_key_problem(PARAMIKO_UNKNOWN).startswith("host key not verified")
    assert host_key_problem("Failed to connect to the host via ssh: Connection refused") is None
    assert describe_ssh_failure("ssh: connect to host 10.0.0.1 port 22: Connection timed out").endswith("timed out")


@pytest.mark.parametrize("hostvars, what", [
    ({"ansible_ssh_common_args": "-o StrictHostKeyChecking=no"}, "StrictHostKeyChecking=no"),
    ({"ansible_ssh_common_args": "-oStrictHostKeyChecking=accept-new"}, "StrictHostKeyChecking=accept-new"),
    ({"ansible_ssh_extra_args": "-o 'StrictHostKeyChecking off'"}, "StrictHostKeyChecking=off"),
    ({"ansible_ssh_common_args": "-o UserKnownHostsFile=/dev/null"}, "UserKnownHostsFile=/dev/null"),
    ({"ansible_host_key_checking": False}, "False"),
    ({"ansible_ssh_host_key_checking": "no"}, "no"),
])
def test_an_inventory_that_turns_checking_off_is_bad_input(hostvars, what):
    assert [w for _, w in unverified(hostvars)] == [what]
    problems = host_key_problems("inv.yml", {"h1": hostvars}, allow=False)
    assert len(problems) == 1 and problems[0].file == "inv.yml" and problems[0].field.startswith("h1.")
    assert "--allow-unverified-host-keys" in problems[0].message
    assert host_key_problems("inv.yml", {"h1": hostvars}, allow=True) == []
    assert "NOT verified for 1 host(s): h1" in unverified_warning({"h1": hostvars, "h2": {}})


def test_strict_settings_pass():
    strict = {"ansible_ssh_common_args": "-o UserKnownHostsFile=/lab/known_hosts -o StrictHostKeyChecking=yes",
              "ansible_host_key_checking": True}
    assert unverified(strict) == [] and unverified({}) == [] and unverified_warning({"h": strict}) is None
    # OpenSSH takes an option's first value: a later =no does not loosen an earlier =yes
    assert ssh_options("-o StrictHostKeyChecking=yes -o StrictHostKeyChecking=no")["stricthostkeychecking"] == "yes"


def test_the_environment_handed_to_hosts_checks_keys_and_carries_no_secret():
    inherited = {"PATH": "/usr/bin", "HOME": "/root", "SSH_AUTH_SOCK": "/run/agent", "AWS_PROFILE": "fleet",
                 "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
                 "AWS_SESSION_TOKEN": "FQoGZXIvYXdzE", "GITHUB_TOKEN": "ghp_x", "ANSIBLE_BECOME_PASS": "hunter2",
                 "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_FORKS": "10", "DATABASE_URL": "postgres://u:p@db/x"}
    env = controlled_environment({"ANSIBLE_CONFIG": "/repo/ansible.cfg"}, inherited=inherited)
    assert env["ANSIBLE_HOST_KEY_CHECKING"] == "True"
    assert {"PATH", "HOME", "SSH_AUTH_SOCK", "AWS_PROFILE", "ANSIBLE_FORKS", "ANSIBLE_CONFIG"} <= set(env)
    for secret in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "GITHUB_TOKEN",
                   "ANSIBLE_BECOME_PASS", "DATABASE_URL"):
        assert secret not in env


def test_ansible_runner_artifacts_hold_no_secret_and_say_check_keys(tmp_path, monkeypatch):
    """A real ansible-runner run (localhost, no SSH): what it writes to disk."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-not-on-disk")
    monkeypatch.setenv("FLEET_TEST_API_TOKEN", "tok-not-on-disk")
    monkeypatch.setenv("ANSIBLE_HOST_KEY_CHECKING", "False")
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")
    config = tmp_path / "ansible.cfg"
    config.write_text("[defaults]\n")
    runner = run_ansible(tmp_path / "private", envvars={"ANSIBLE_CONFIG": str(config)}, inventory=str(inventory),
                         host_pattern="localhost", module="ansible.builtin.ping", quiet=True, timeout=120)
    assert runner.status == "successful", runner.stdout.read()
    written = [p for p in (tmp_path / "private").rglob("*") if p.is_file()]
    assert written
    for path in written:
        text = path.read_text(errors="replace")
        assert "not-on-disk" not in text, path
    command = next(p for p in written if p.name == "command")
    env = json.loads(command.read_text())["env"]
    assert env["ANSIBLE_HOST_KEY_CHECKING"] == "True" and "AWS_SECRET_ACCESS_KEY" not in env
    assert not (tmp_path / "private/env/envvars").exists()


def test_every_ansible_run_goes_through_run_ansible():
    """No module starts ansible-runner another way (its default turns host-key checking off)."""
    root = Path(__file__).resolve().parents[2]
    offenders = [str(p.relative_to(root)) for p in (root / "patching").rglob("*.py")
                 if "ansible_runner.run(" in p.read_text() or "ansible_runner.run_async(" in p.read_text()]
    assert offenders == []


@pytest.mark.parametrize(("args", "what"), [
    ('-o StrictHostKeyChecking=yes -o ProxyCommand="ssh -o StrictHostKeyChecking=no -W %h:%p jump@bastion"',
     ["ProxyCommand: StrictHostKeyChecking=no"]),
    ("-o 'ProxyCommand=ssh -o UserKnownHostsFile=/dev/null -W %h:%p bastion'",
     ["ProxyCommand: UserKnownHostsFile=/dev/null"]),
    ('-oProxyCommand="ssh -oStrictHostKeyChecking=accept-new -o UserKnownHostsFile=/dev/null -W %h:%p b"',
     ["ProxyCommand: StrictHostKeyChecking=accept-new", "ProxyCommand: UserKnownHostsFile=/dev/null"]),
    # a ProxyCommand whose own ssh goes through another ProxyCommand
    ("""-o ProxyCommand="ssh -o 'ProxyCommand=ssh -o StrictHostKeyChecking=off -W %%h:%%p outer' -W %h:%p inner\"""",
     ["ProxyCommand: ProxyCommand: StrictHostKeyChecking=off"]),
])
def test_a_proxy_command_that_turns_checking_off_is_unverified_too(args, what):
    """The bastion's connection is the ProxyCommand's own ssh: the outer ssh's options do not reach it."""
    assert [w for _, w in unverified({"ansible_ssh_common_args": args})] == what
    (problem, *rest) = host_key_problems("inv.yml", {"v3-use1a-0": {"ansible_ssh_common_args": args}}, allow=False)
    assert problem.field == "v3-use1a-0.ansible_ssh_common_args" and len(rest) == len(what) - 1


def test_the_inventorys_own_bastion_args_are_verified():
    from infra.model.access import ssh_common_args

    bastion = {"host": "203.0.113.10", "port": 22, "user": "ubuntu"}
    for identity in (None, "/keys/id_ed25519"):
        assert unverified({"ansible_ssh_common_args": ssh_common_args("~/.ssh/known_hosts", bastion, identity)}) == []
    assert unverified({"ansible_ssh_common_args": "-o ProxyCommand=none"}) == []
    assert unverified({"ansible_ssh_common_args": '-o ProxyCommand="nc %h %p"'}) == []
