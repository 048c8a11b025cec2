"""Inventories that turn SSH host-key checking off are refused, unless the user says so on the command line.

Every connection the tool makes verifies the host's key against known_hosts (patching/hosts/
ansible_env.py forces Ansible's checking on; drift's paramiko rejects unknown keys). An inventory can
still ask SSH itself not to check: `StrictHostKeyChecking=no|off|accept-new` or
`UserKnownHostsFile=/dev/null` in its SSH arguments (or in the ssh its ProxyCommand runs to reach a bastion),
or `ansible_host_key_checking: false`. Such a
host is bad input (exit 2, nothing touched) unless `--allow-unverified-host-keys` is given, and then
every run says which hosts go unverified.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

from infra.model.errors import Problem

ALLOW_FLAG = "--allow-unverified-host-keys"
SSH_ARG_VARS = ("ansible_ssh_common_args", "ansible_ssh_extra_args", "ansible_ssh_args")
CHECKING_VARS = ("ansible_host_key_checking", "ansible_ssh_host_key_checking")
_LAX = ("no", "off", "accept-new", "false")


def ssh_options(args: str) -> dict[str, str]:
    """`-o Key=Value` / `-oKey=Value` / `-o Key Value` pairs of an ssh argument string, keys lowercased;
    the first value of a key wins, as in OpenSSH."""
    try:
        words = shlex.split(args)
    except ValueError:
        words = args.split()
    options: dict[str, str] = {}
    for i, word in enumerate(words):
        text = word[2:] if word.startswith("-o") and len(word) > 2 else (words[i + 1] if word == "-o" and
                                                                           i + 1 < len(words) else None)
        if text:
            key, sep, value = text.partition("=")
            if not sep:
                key, _, value = text.partition(" ")
            options.setdefault(key.strip().lower(), value.strip())
    return options


def _lax_options(args: str, depth: int = 0) -> list[str]:
    """What an ssh argument string says that turns checking off, its ProxyCommand's own ssh included: the
    connection to a bastion goes unverified as much as the one to the host (OpenSSH runs the ProxyCommand as
    given; the outer ssh's options do not reach it)."""
    options = ssh_options(args)
    found = []
    strict = options.get("stricthostkeychecking", "").lower()
    if strict in _LAX:
        found.append(f"StrictHostKeyChecking={strict}")
    if options.get("userknownhostsfile", "").strip() == "/dev/null":
        found.append("UserKnownHostsFile=/dev/null")
    proxy = options.get("proxycommand", "")
    if proxy and proxy.lower() != "none" and depth < 3:
        found += [f"ProxyCommand: {what}" for what in _lax_options(proxy, depth + 1)]
    return found


def unverified(hostvars: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(var, what it says) for each way a host's vars turn host-key checking off."""
    found = []
    for var in SSH_ARG_VARS:
        found += [(var, what) for what in _lax_options(str(hostvars.get(var) or ""))]
    for var in CHECKING_VARS:
        value = hostvars.get(var)
        if value is not None and str(value).strip().lower() in ("false", "no", "off", "0"):
            found.append((var, str(value)))
    return found


def host_key_problems(source: str, hostvars: Mapping[str, Mapping[str, Any]], allow: bool) -> list[Problem]:
    """Bad input for each selected host whose vars turn checking off (none when `allow`)."""
    if allow:
        return []
    return [Problem(source, f"{host}.{var}", said,
                    f"turns SSH host-key checking off: every connection must verify the host's key "
                    f"({ALLOW_FLAG} accepts this, loudly)")
            for host, hv in sorted(hostvars.items()) for var, said in unverified(hv)]


def unverified_warning(hostvars: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The loud line a run prints when it was allowed to go on with hosts whose keys are not verified."""
    hosts = sorted(h for h, hv in hostvars.items() if unverified(hv))
    if not hosts:
        return None
    return (f"WARNING: SSH host keys are NOT verified for {len(hosts)} host(s): {', '.join(hosts)} "
            f"(the inventory turns checking off; {ALLOW_FLAG} was given). Anyone in the middle can "
            "impersonate them.")
