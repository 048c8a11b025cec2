"""`fleet drift`: what each host really has, against what the bundle pins, read in parallel over SSH.

One command per host through Fabric (no Ansible, no fact gathering): dpkg's view of the pinned
packages (version and hold) and of their families (a second driver branch left installed), the
host's manifest (/etc/fleet/bundle.json) and, on EFA hosts, the EFA installer's record
(/opt/amazon/efa_installed_packages: its release, and the packages it installed at their versions, held), and
on GPU hosts the serving container's image digest as podman reports it (`podman container inspect`).
SSH settings come from the inventory vars Ansible uses
(ansible_host/port/user, ansible_ssh_private_key_file, UserKnownHostsFile and ConnectTimeout from
ansible_ssh_common_args), with strict host-key checking: an unknown host key is an error, not a prompt.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patching.hosts.ansible_env import host_key_problem
from patching.hosts.facts import container_image_command, image_digest, parse_container_image, serving_container
from patching.inventory.hostkeys import ssh_options
from patching.release.bundle import Bundle
from patching.release.pins import (
    MANIFEST_PATH,
    PINNED_FAMILIES,
    all_pinned_packages,
    dpkg_query_command,
    efa_differences,
    efa_read_command,
    host_pins,
    parse_dpkg_query,
    parse_manifest,
    split_efa_answer,
    unpinned_family_members,
)

SEPARATOR = "----- fleet manifest -----"
EFA_SEPARATOR = "----- efa installer -----"
CONTAINER_SEPARATOR = "----- serving container -----"


@dataclass(frozen=True)
class Difference:
    """One way a host differs from the bundle."""

    host: str
    item: str
    expected: str
    found: str


def read_command(bundle: Bundle) -> str:
    """The one shell command drift runs on every host."""
    names = [*all_pinned_packages(bundle), *(glob for glob, _ in PINNED_FAMILIES)]
    return (f"{dpkg_query_command(names)}; echo {shlex.quote(SEPARATOR)}; cat {MANIFEST_PATH} 2>/dev/null; "
            f"echo {shlex.quote(EFA_SEPARATOR)}; {efa_read_command()}; echo {shlex.quote(CONTAINER_SEPARATOR)}; "
            f"{container_image_command(serving_container(bundle.serving.engine))}")


def differences(host: str, bundle: Bundle, hostvars: Mapping[str, Any], output: str) -> list[Difference]:
    """What differs between the bundle and the host's answer to `read_command`."""
    dpkg_text, _, rest = output.partition(SEPARATOR)
    manifest_text, _, rest = rest.partition(EFA_SEPARATOR)
    efa_text, _, container_text = rest.partition(CONTAINER_SEPARATOR)
    installed = parse_dpkg_query(dpkg_text)
    pins = host_pins(bundle, hostvars)
    out = []
    for name, version in pins.items():
        state = installed.get(name)
        if state is None:
            out.append(Difference(host, name, version, "not installed"))
            continue
        if state.version != version:
            out.append(Difference(host, name, version, state.version))
        if not state.held:
            out.append(Difference(host, f"{name} hold", "held", "not held"))
    for name in unpinned_family_members(installed, pins):
        out.append(Difference(host, name, "not installed (the bundle pins another)", installed[name].version))
    if hostvars.get("fleet_efa"):  # EFA: the installer's record against the bundle, its packages held
        record, efa_installed = split_efa_answer(efa_text)
        out += [Difference(host, item, expected, found) for item, expected, found in
                efa_differences(bundle, record, efa_installed)]
    if int(hostvars.get("fleet_gpu_count") or 0) > 0:  # the serving container: the image the runtime runs
        container = serving_container(bundle.serving.engine)
        running, want = parse_container_image(container_text), image_digest(bundle.serving.image)
        if not (running.running and running.digest == want):
            out.append(Difference(host, f"{container} container image", want, running.describe()))
    manifest = parse_manifest(manifest_text.strip()) if manifest_text.strip() else None
    release = "no manifest" if manifest is None else str(manifest.get("release", "no release in it"))
    if release != bundle.release:
        out.append(Difference(host, f"{MANIFEST_PATH} release", bundle.release, release))
    return out


SSH_CONNECTIONS = ("ssh", "smart", "paramiko", "paramiko_ssh")  # ansible_connection values drift can follow


@dataclass(frozen=True)
class SshSettings:
    """How to reach a host, from its inventory vars."""

    host: str
    port: int
    user: str | None
    key_file: str | None
    known_hosts: str | None
    strict: bool
    connect_timeout: int
    proxy_command: str | None = None  # through a bastion: the ProxyCommand of ansible_ssh_common_args
    become_user: str | None = None  # ansible_become: the commands run through `sudo -n -u` this user


def ssh_settings(name: str, hostvars: Mapping[str, Any]) -> SshSettings:
    """How to reach a host over SSH, read from its Ansible vars (host, port, user, key, ssh args)."""
    options = ssh_options(" ".join(str(hostvars.get(k) or "") for k in ("ansible_ssh_common_args",
                                                                           "ansible_ssh_extra_args")))
    key = hostvars.get("ansible_ssh_private_key_file") or hostvars.get("ansible_private_key_file")
    return SshSettings(
        host=str(hostvars.get("ansible_host") or name),
        port=int(hostvars.get("ansible_port") or 22),
        user=hostvars.get("ansible_user"),
        key_file=str(Path(key).expanduser()) if key else None,
        known_hosts=options.get("userknownhostsfile"),
        strict=options.get("stricthostkeychecking", "yes").lower() not in ("no", "off", "accept-new"),
        connect_timeout=int(options.get("connecttimeout", 10)),
        proxy_command=options.get("proxycommand") or None,
        become_user=str(hostvars.get("ansible_become_user") or "root") if _truthy(hostvars.get("ansible_become"))
        else None,
    )


def _expand_proxy_command(command: str, host: str, port: int) -> str:
    """ssh's ProxyCommand tokens: %h the host, %p the port, %% a percent sign."""
    out, i = [], 0
    while i < len(command):
        if command[i] == "%" and i + 1 < len(command) and command[i + 1] in "hp%":
            out.append({"h": host, "p": str(port), "%": "%%"}[command[i + 1]])
            i += 2
        else:
            out.append(command[i])
            i += 1
    return "".join(out)


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "yes", "on", "1")


def connection(name: str, hostvars: Mapping[str, Any]) -> Any:
    """A Fabric connection with the inventory's SSH settings and strict host-key checking."""
    from fabric import Connection
    from paramiko.client import RejectPolicy, WarningPolicy  # type: ignore[import-untyped]

    s = ssh_settings(name, hostvars)
    kwargs: dict[str, Any] = {"allow_agent": True}
    if s.key_file:
        kwargs |= {"key_filename": [s.key_file], "look_for_keys": False}
    # a ProxyCommand (a bastion) runs as ssh runs it, its inner ssh checking the bastion's key; %h and %p are filled
    # in here: Fabric's own lookup would put port 22 for %p whatever the host's port
    gateway = _expand_proxy_command(s.proxy_command, s.host, s.port) if s.proxy_command else None
    conn = Connection(s.host, user=s.user, port=s.port, connect_timeout=s.connect_timeout, connect_kwargs=kwargs,
                      gateway=gateway)
    conn.client.load_system_host_keys()
    if s.known_hosts:
        conn.client.load_host_keys(str(Path(s.known_hosts).expanduser()))
    # unknown keys are refused; an inventory that says otherwise got here only with --allow-unverified-host-keys
    conn.client.set_missing_host_key_policy(RejectPolicy() if s.strict else WarningPolicy())
    return conn


def read_hosts(hostvars: Mapping[str, Mapping[str, Any]], command: str) -> dict[str, str | Exception]:
    """Run `command` on every host at once (through `sudo -n` where the inventory says become); each host's
    stdout, or the exception that stopped it."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> str | Exception:
        s = ssh_settings(name, hostvars[name])
        run = command
        if s.become_user is not None:
            run = f"sudo -n -u {shlex.quote(s.become_user)} sh -c {shlex.quote(command)}"
        try:
            conn = connection(name, hostvars[name])
        except Exception as exc:
            return exc
        try:
            return str(conn.run(run, hide=True, warn=True, in_stream=False).stdout)
        except Exception as exc:
            return exc
        finally:
            conn.close()

    names = sorted(hostvars)
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(names)))) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def drift(bundle: Bundle, hostvars: Mapping[str, Mapping[str, Any]]) -> list[Difference]:
    """Every difference between the bundle and the hosts; an unreachable host is one difference."""
    not_ssh = {n: str(hv.get("ansible_connection")) for n, hv in hostvars.items()
               if str(hv.get("ansible_connection") or "ssh").rsplit(".", 1)[-1] not in SSH_CONNECTIONS}
    answers = read_hosts({n: hv for n, hv in hostvars.items() if n not in not_ssh}, read_command(bundle))
    out = []
    for name in sorted(hostvars):
        answer = answers.get(name)
        if name in not_ssh:  # an SSM host, say: drift reads over SSH only, so this host was not read
            out.append(Difference(name, "ssh", "reachable", f"not read: reached through {not_ssh[name]}, drift reads "
                                  "over SSH only (fleet verify reads it through Ansible)"))
        elif isinstance(answer, Exception) or answer is None:
            out.append(Difference(name, "ssh", "reachable", _reason(answer)))
        else:
            out += differences(name, bundle, hostvars[name], answer)
    return out


def _reason(exc: Exception | None) -> str:
    if exc is None:
        return "no answer"
    text = str(exc).strip() or type(exc).__name__
    reason = f"{type(exc).__name__}: {text.splitlines()[0]}"
    return host_key_problem(reason) or reason
