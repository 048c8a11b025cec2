"""How every Ansible run of ours starts: host keys verified, and only the environment Ansible needs.

ansible-runner turns Ansible's host-key checking off for every run unless told otherwise, and Ansible
then puts an SSH option that skips the check ahead of the inventory's own (OpenSSH takes the first
value): a changed host key would go unnoticed. It also writes the whole environment of
the run into its artifacts (`artifacts/<id>/command`). So every run here forces checking on and is
given an environment cut to what Ansible and its SSH need: no exported AWS key, token or password
reaches Ansible or its artifacts (use an AWS profile or role: the pointers to them pass).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ansible_runner.interface import init_runner

HOST_KEY_CHECKING = {"ANSIBLE_HOST_KEY_CHECKING": "True"}

# inherited variables Ansible, SSH and the AWS SDK need; none of them holds a secret
PASS_THROUGH = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM", "SHELL",
    "SSH_AUTH_SOCK", "VIRTUAL_ENV", "PYTHONPATH", "PYENV_ROOT", "PYENV_VERSION",  # tasks delegated to localhost
    "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CA_BUNDLE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_EC2_METADATA_DISABLED",
})
PASS_THROUGH_PREFIXES = ("ANSIBLE_", "FLEET_", "LC_")
# a name that says it holds a secret is dropped even under a passing prefix (ANSIBLE_BECOME_PASS)
_SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|PRIVATE|CREDENTIAL|ACCESS_KEY|API_KEY|COOKIE", re.IGNORECASE)


def passes(name: str) -> bool:
    """Whether an inherited environment variable is handed to Ansible."""
    if name in PASS_THROUGH:
        return True
    return name.startswith(PASS_THROUGH_PREFIXES) and not _SECRET_NAME.search(name)


def controlled_environment(extra: Mapping[str, str] | None = None,
                           inherited: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a subprocess that reaches hosts: the passing inherited variables, `extra`, and
    host-key checking forced on (whatever the caller's environment says)."""
    source = os.environ if inherited is None else inherited
    env = {k: v for k, v in source.items() if passes(k)}
    return env | dict(extra or {}) | HOST_KEY_CHECKING


def run_ansible(private_data_dir: Path, *, envvars: Mapping[str, str], **kwargs: Any) -> Any:
    """`ansible_runner.run` with host-key checking forced on, the environment cut (`passes`), and no
    environment files written into the private data dir. Returns the finished ansible-runner Runner."""
    private_data_dir.mkdir(parents=True, exist_ok=True)
    runner = init_runner(private_data_dir=str(private_data_dir), envvars=dict(envvars) | HOST_KEY_CHECKING,
                         suppress_env_files=True, **kwargs)
    # ansible-runner seeds the run with the whole os.environ and writes it to artifacts/<id>/command
    inherited = {k for k in os.environ if k not in envvars}
    runner.config.env = {k: v for k, v in runner.config.env.items()
                         if k not in inherited or passes(k) or v != os.environ.get(k)}
    runner.config.env |= HOST_KEY_CHECKING
    runner.run()
    return runner


# OpenSSH's words, then paramiko's (BadHostKeyException; RejectPolicy's SSHException)
_CHANGED = re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for \S+ has changed"
                      r"|Host key for server .* does not match")
_UNKNOWN = re.compile(r"No \S+ host key is known for|Host key verification failed|not found in known_hosts")
_KNOWN_HOSTS_LINE = re.compile(r"Offending \S+ key in (\S+?):(\d+)")


def host_key_problem(ssh_output: str) -> str | None:
    """What OpenSSH's output says about the host's key, in one line; None when it says nothing of it."""
    if _CHANGED.search(ssh_output):
        where = _KNOWN_HOSTS_LINE.search(ssh_output)
        known = f" (known_hosts: {where.group(1)} line {where.group(2)})" if where else ""
        return ("host key changed: the host offered a key other than the one on record" + known +
                "; not connecting (a reinstalled host, or someone in the middle: check, then update known_hosts)")
    if _UNKNOWN.search(ssh_output):
        return "host key not verified: the host's key is not in known_hosts; not connecting"
    return None


def describe_ssh_failure(message: str) -> str:
    """An unreachable host's message, with a host-key problem named first when there is one."""
    problem = host_key_problem(message)
    return problem if problem else message
