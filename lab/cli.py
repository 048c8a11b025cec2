"""`fleet lab ...`: the embedded lab's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lab.control import FAULTS, Lab, LabError

app = typer.Typer(help="The embedded lab: a simulated hybrid GPU fleet on this machine (root).",
                  no_args_is_help=True)
console = Console()

StackOpt = Annotated[str, typer.Option(help="the stack whose fleet the lab runs (Pulumi.<stack>.yaml)")]
DirOpt = Annotated[Path | None, typer.Option("--state-dir", help="lab state directory (default ./.lab/<stack>)")]


def _open(stack: str, state_dir: Path | None, port_base: int | None = None) -> Lab:
    return Lab.open(stack, ".", state_dir, port_base)


def _fail(exc: LabError) -> typer.Exit:
    print(f"error: {exc}", flush=True)
    return typer.Exit(2)


@app.command()
def up(stack: StackOpt = "lab", state_dir: DirOpt = None,
       port_base: Annotated[int | None, typer.Option(help="first of the lab's loopback ports (default 22000)")] = None,
       fresh: Annotated[bool, typer.Option(help="discard the hosts' disks from an earlier run")] = False) -> None:
    """Boot one container per host of the stack's fleet, and the UPS, BMC, LB and artifact services."""
    try:
        lab = _open(stack, state_dir, port_base)
        lab.up(fresh=fresh)
    except LabError as exc:
        raise _fail(exc) from exc
    _status_table(lab)


@app.command()
def down(stack: StackOpt = "lab", state_dir: DirOpt = None) -> None:
    """Power the hosts off and stop every lab service; fails if anything is left behind."""
    lab = _open(stack, state_dir)
    if lab.down():
        raise typer.Exit(1)


@app.command()
def status(stack: StackOpt = "lab", state_dir: DirOpt = None) -> None:
    """Hosts, ports, up/down, faults and services."""
    _status_table(_open(stack, state_dir))


@app.command()
def inventory(stack: StackOpt = "lab", state_dir: DirOpt = None) -> None:
    """Print the path of the lab's Ansible inventory (`ansible -i "$(fleet lab inventory)" all -m ping`)."""
    print(_open(stack, state_dir).inventory_path())


@app.command()
def releases(stack: StackOpt = "lab", state_dir: DirOpt = None) -> None:
    """Print the folder of the lab's copies of the bundles, whose serving image is the lab's build of each release
    (`fleet converge --release "$(fleet lab releases)/2026-10.yaml" ...`); exit 2 when the lab never wrote them."""
    folder = _open(stack, state_dir).releases_dir
    if not any(folder.glob("*.yaml")):
        print(f"error: {folder}: no bundles: the lab writes them at `fleet lab up`", flush=True)
        raise typer.Exit(2)
    print(folder)


@app.command()
def fault(target: Annotated[str, typer.Argument(help="a host, or a UPS for ups-on-battery")],
          kind: Annotated[str, typer.Argument(help="one of: " + ", ".join(FAULTS))],
          clear: Annotated[bool, typer.Option(help="remove the fault")] = False,
          stack: StackOpt = "lab", state_dir: DirOpt = None) -> None:
    """Inject (or --clear) a fault: gpu-missing, ecc-errors, ib-port-down, nvlink-degraded, ups-on-battery,
    host-down, ssh-hang."""
    try:
        _open(stack, state_dir).fault(target, kind, clear)
    except LabError as exc:
        raise _fail(exc) from exc


def _status_table(lab: Lab) -> None:
    from lab.cloud import banner_as_jump_user, cloud_hosts
    from lab.services import port_in_use, ssh_banner

    running = lab.daemon_pid()
    faults = lab.faults()
    cloud = set(cloud_hosts(lab.fleet))
    table = Table(title=f"lab {lab.stack!r} ({'up' if running else 'down'}) — {lab.layout.root}")
    for col in ("host", "site", "pool", "ssh", "serving", "state", "boots", "faults"):
        table.add_column(col)
    for name in sorted(lab.fleet.hosts):
        host = lab.fleet.hosts[name]
        st = lab.host_status(name) if running else {"state": "down"}
        state = st.get("state", "down")
        if state == "running":
            port = lab.ports.hosts[name].ssh
            up = banner_as_jump_user(port, timeout=1) if name in cloud else ssh_banner(port, timeout=1)
            state = ("up" if up else "booting/unreachable") + (" (bastion)" if name in cloud else "")
        table.add_row(name, lab.fleet.site_of(host).name, host.pool, str(lab.ports.hosts[name].ssh),
                      str(lab.ports.hosts[name].serving), state, str(st.get("boots", "-")),
                      ", ".join(faults.get(name, [])))
    console.print(table)
    svc = Table(title="services (127.0.0.1)")
    for col in ("service", "port", "state"):
        svc.add_column(col)
    services = {"apt + artifacts (http)": lab.ports.http, "upsd (NUT)": lab.ports.upsd,
                "haproxy runtime API": lab.ports.haproxy_api, "redfish emulator": lab.ports.redfish}
    services |= {f"haproxy frontend {p}": port for p, port in lab.ports.frontends.items()}
    for name, port in services.items():
        svc.add_row(name, str(port), "listening" if port_in_use(port) else "-")
    console.print(svc)
    ups_faults = {k: v for k, v in faults.items() if k not in lab.fleet.hosts}
    for ups, kinds in ups_faults.items():
        console.print(f"UPS {ups}: {', '.join(kinds)}")
