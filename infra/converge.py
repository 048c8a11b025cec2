"""Day-0 converge (`fleet:converge: true`): Ansible brings each new host to the current bundle during `pulumi up`.

One `pulumi_command` local command per host runs

    ansible-playbook -i <this host's inventory> playbooks/site.yml --limit HOST -e bundle_file=<fleet:bundle>

from the project directory. It runs again when the host is another machine (new instance id, another
BMC system or serial) or when the bundle file's content changes (its sha256 is a trigger), and when
the host's inventory vars change. The inventory it gets holds only that host, so adding a host to the
fleet does not re-run every other host's converge.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
from pulumi_command import local

from infra.model.errors import InputError, Problem
from infra.model.fleet import Fleet

PLAYBOOK = "playbooks/site.yml"


@dataclass(frozen=True)
class BundleRef:
    """The release file day-0 converge applies, as configured and as hashed."""

    path: str
    sha256: str


def bundle_ref(fleet: Fleet, project_dir: Path) -> BundleRef:
    """Resolve `fleet:bundle` against the project directory; InputError when converge cannot know what to apply."""
    field = f"{fleet.prefix}bundle" if fleet.prefix else "bundle"
    path = fleet.config.bundle
    if not path:
        raise InputError([Problem(fleet.source, field, None, "required when fleet:converge is true: the release "
                                                             "file to converge new hosts to (releases/YYYY-MM.yaml)")])
    full = project_dir / path
    try:
        digest = hashlib.sha256(full.read_bytes()).hexdigest()
    except OSError as exc:
        raise InputError([Problem(fleet.source, field, path, f"cannot read the bundle: {exc.strerror}")]) from exc
    if problems := release_check_problems(full, project_dir):
        raise InputError([Problem(fleet.source, field, path, f"`fleet release check` refuses it: {problem}")
                          for problem in problems])
    return BundleRef(path, digest)


def release_check_problems(bundle: Path, project_dir: Path) -> list[str]:
    """What `fleet release check` refuses in the bundle: its schema and every compatibility rule of
    patching/release/compat.yaml (the one source; site.yml's first play applies the same). Run as the command
    users run, at preview, before any host exists: infra/ imports nothing of patching/."""
    proc = subprocess.run([sys.executable, "-c", "from patching.cli.app import main; main()", "release", "check",
                           str(bundle)], capture_output=True, text=True, cwd=project_dir, timeout=120)
    if proc.returncode == 0:
        return []
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    found = [line.removeprefix(f"{bundle}: ") for line in lines if "compatibility rule(s) broken" not in line]
    return found or [f"exit {proc.returncode}: {proc.stdout.strip()[-500:]}"]


def single_host_inventory(inventory: dict[str, Any], host: str) -> dict[str, Any]:
    """The fleet inventory cut down to one host: its vars, and the groups it is in with only itself."""
    root = inventory["all"]
    children = {group: {"hosts": {host: None}} for group, body in root.get("children", {}).items()
                if host in (body.get("hosts") or {})}
    return {"all": {"vars": root.get("vars", {}), "hosts": {host: root["hosts"][host]}, "children": children}}


def converge_script(host: str, bundle_path: str, known_hosts_file: str | None = None) -> str:
    """The shell script the command runs: write the inventory from $FLEET_INVENTORY, run the playbook, clean up.

    With `known_hosts_file` (a cloud host reached over SSH), the host's keys read from its console output and its
    bastion's keys are first merged into that file (`fleet known-hosts`), the one its SSH arguments check keys
    against strictly: the new host's first connection is verified, not trusted."""
    # Ansible's YAML inventory plugin wants a .json/.yml name, hence a file in a private temp dir.
    playbook = " ".join(shlex.quote(a) for a in [
        PLAYBOOK, "--limit", host, "-e", f"bundle_file={bundle_path}"])
    known_hosts = ""
    if known_hosts_file:
        known_hosts = ("fl=.venv/bin/fleet; [ -x \"$fl\" ] || fl=fleet\n"
                       f'"$fl" known-hosts -i "$d/inventory.json" -o {shlex.quote(known_hosts_file)}\n')
    return (
        "set -eu\n"
        'd=$(mktemp -d)\ntrap \'rm -rf "$d"\' EXIT\n'
        'printf \'%s\' "$FLEET_INVENTORY" > "$d/inventory.json"\n'
        f"{known_hosts}"
        "pb=.venv/bin/ansible-playbook; [ -x \"$pb\" ] || pb=ansible-playbook\n"
        # whatever the caller's environment says: a day-0 converge verifies host keys too
        "export ANSIBLE_HOST_KEY_CHECKING=True\n"
        f'"$pb" -i "$d/inventory.json" {playbook}\n'
    )


def converge_host(host: str, identity: list[pulumi.Input[Any]], inventory: pulumi.Output[dict[str, Any]],
                  bundle: BundleRef, project_dir: Path, parent: pulumi.Resource,
                  depends_on: Sequence[pulumi.Resource], known_hosts_file: str | None = None) -> local.Command:
    """The local command that converges one host; `identity` are the values that say which machine it is;
    `known_hosts_file` where a cloud host's console keys go before its first connection."""
    return local.Command(
        f"{host}-converge",
        create=converge_script(host, bundle.path, known_hosts_file),
        dir=str(project_dir),
        environment={"FLEET_INVENTORY": inventory.apply(lambda inv: json.dumps(single_host_inventory(inv, host),
                                                                               sort_keys=True))},
        triggers=[*identity, bundle.sha256],
        opts=pulumi.ResourceOptions(parent=parent, depends_on=depends_on),
    )
