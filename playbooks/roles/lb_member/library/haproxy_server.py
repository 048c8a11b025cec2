#!/usr/bin/python3
"""Ansible module: a server's admin state through HAProxy's runtime API (TCP or UNIX socket)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: haproxy_server
short_description: Drain, disable or enable a server through HAProxy's runtime API
description:
  - Sets a server's administrative state with C(set server BACKEND/SERVER state ready|drain|maint)
    and reports a change only when the state was different.
  - Speaks to the runtime API over TCP (C(stats socket ipv4@HOST:PORT level admin)) or a UNIX
    socket, so it runs where that API is reachable, usually the controller (C(delegate_to)).
  - With I(wait_drained) it waits until the server has no session or queued request left; with
    I(wait_up) until its health check reports it UP.
options:
  api:
    description: The runtime API, C(HOST:PORT) or a UNIX socket (C(/path) or C(unix:/path)).
    type: str
    required: true
  backend:
    description: The backend the server is in.
    type: str
    required: true
  server:
    description: The server's name in that backend.
    type: str
    required: true
  state:
    description: C(ready) takes traffic, C(drain) takes no new traffic, C(maint) is out entirely.
    type: str
    choices: [ready, drain, maint]
    required: true
  wait_drained:
    description: Wait until the server has no current session and no queued request.
    type: bool
    default: false
  wait_up:
    description: Wait until the server's health check reports it UP.
    type: bool
    default: false
  timeout:
    description: Seconds to wait for I(wait_drained) or I(wait_up).
    type: int
    default: 300
author:
  - GPU fleet platform team
"""

EXAMPLES = r"""
- name: Drain the host and wait for its requests to finish
  haproxy_server:
    api: 10.20.0.5:9999
    backend: v3-hall
    server: dgx-a1
    state: drain
    wait_drained: true
  delegate_to: localhost
"""

RETURN = r"""
previous:
  description: The state before (ready, drain or maint).
  returned: always
  type: str
status:
  description: The server's status as C(show stat) reports it at the end (UP, DOWN, DRAIN, MAINT, ...).
  returned: always
  type: str
sessions:
  description: Current sessions of the server at the end.
  returned: always
  type: int
"""

import csv  # noqa: E402 - Ansible modules start with their documentation
import io  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

FORCED_MAINT, FORCED_DRAIN = 0x01, 0x08


class RuntimeApiError(Exception):
    """HAProxy answered with an error, or could not be reached."""


def command(api: str, line: str, timeout: float = 10) -> str:
    """Send one command to the runtime API and return its whole answer."""
    try:
        if api.startswith(("/", "unix:")):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(api.removeprefix("unix:"))
        else:
            host, _, port = api.rpartition(":")
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except (OSError, ValueError) as exc:
        raise RuntimeApiError(f"cannot reach HAProxy's runtime API at {api}: {exc}") from exc
    with sock:
        sock.sendall(line.encode() + b"\n")
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def admin_state(api: str, backend: str, server: str) -> str:
    """ready, drain or maint, from `show servers state BACKEND`."""
    answer = command(api, f"show servers state {backend}")
    header = None
    for line in answer.splitlines():
        if line.startswith("# "):
            header = line[2:].split()
        elif header and line.strip() and not line.strip().isdigit():
            row = dict(zip(header, line.split(), strict=False))  # newer HAProxy versions add columns
            if row.get("be_name") == backend and row.get("srv_name") == server:
                bits = int(row["srv_admin_state"])
                return "maint" if bits & FORCED_MAINT else "drain" if bits & FORCED_DRAIN else "ready"
    if header is None:
        raise RuntimeApiError(f"no backend {backend!r} at {api}: {answer.strip() or 'empty answer'}")
    raise RuntimeApiError(f"no server {server!r} in backend {backend!r} at {api}")


def server_stats(api: str, backend: str, server: str) -> dict[str, str]:
    """The server's row of `show stat` (pxname, svname, scur, qcur, status, ...)."""
    text = command(api, "show stat").lstrip("# ")
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("pxname") == backend and row.get("svname") == server:
            return row
    raise RuntimeApiError(f"no server {server!r} in backend {backend!r} in `show stat` at {api}")


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "api": {"type": "str", "required": True},
            "backend": {"type": "str", "required": True},
            "server": {"type": "str", "required": True},
            "state": {"type": "str", "required": True, "choices": ["ready", "drain", "maint"]},
            "wait_drained": {"type": "bool", "default": False},
            "wait_up": {"type": "bool", "default": False},
            "timeout": {"type": "int", "default": 300},
        },
        supports_check_mode=True,
    )
    p = module.params
    api, backend, server, state = p["api"], p["backend"], p["server"], p["state"]
    where = f"{backend}/{server}"
    try:
        previous = admin_state(api, backend, server)
        changed = previous != state
        if changed and not module.check_mode:
            answer = command(api, f"set server {where} state {state}").strip()
            if answer:
                raise RuntimeApiError(f"set server {where} state {state}: {answer}")
        stats = server_stats(api, backend, server)
        deadline = time.monotonic() + p["timeout"]
        if not module.check_mode and (p["wait_drained"] or p["wait_up"]):
            while True:
                busy = int(stats.get("scur") or 0) + int(stats.get("qcur") or 0)
                status = stats.get("status", "")
                down = not (status.startswith("UP") or status == "no check")
                if not ((p["wait_drained"] and busy) or (p["wait_up"] and down)):
                    break
                if time.monotonic() > deadline:
                    what = (f"{busy} session(s) still open" if p["wait_drained"] and busy
                            else f"status {stats.get('status')!r}, not UP")
                    module.fail_json(msg=f"{where}: {what} after {p['timeout']}s", changed=changed, previous=previous,
                                     status=stats.get("status"), sessions=int(stats.get("scur") or 0))
                time.sleep(1)
                stats = server_stats(api, backend, server)
    except RuntimeApiError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=changed, previous=previous, status=stats.get("status", ""),
                     sessions=int(stats.get("scur") or 0))


if __name__ == "__main__":
    main()
