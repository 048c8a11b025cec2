"""`fleet converge`, `fleet verify`, `fleet drift`: pin hosts to a bundle, check them, find drift.

Registered on the main app by `register(app)`. Exit codes as everywhere (DESIGN.md section 6): 0 done,
1 a host failed, a check failed or something drifted, 2 bad input (nothing touched).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from patching.cli.output import say
from patching.inventory.hostkeys import ALLOW_FLAG
from patching.states import ExitCode

ReleaseOpt = Annotated[Path, typer.Option("--release", help="the bundle (releases/YYYY-MM.yaml)")]
InventoryOpt = Annotated[Path, typer.Option("--inventory", help="the Ansible inventory (file or directory)")]
LimitOpt = Annotated[str | None, typer.Option("--limit", help="Ansible host pattern: hosts or groups, comma-separated")]
UnverifiedOpt = Annotated[bool, typer.Option(
    ALLOW_FLAG, help="go on with hosts whose inventory turns SSH host-key checking off (said loudly)")]

out = Console(highlight=False)
if not out.is_terminal:  # CI logs: wide tables rather than folded cells
    out = Console(highlight=False, width=160)


def register(app: typer.Typer) -> None:
    """Add the converge, verify and drift commands to the `fleet` app."""
    app.command("converge")(converge)
    app.command("verify")(verify)
    app.command("drift")(drift)


def converge(
    release: ReleaseOpt,
    inventory: InventoryOpt,
    limit: LimitOpt = None,
    report: Annotated[Path | None, typer.Option(help="also write the per-host recap here (JSON)")] = None,
    allow_unverified_host_keys: UnverifiedOpt = False,
) -> None:
    """Converge hosts to a bundle: playbooks/site.yml through ansible-runner, then a per-host recap.

    Exit 0 when every host converged, 1 when one failed or was unreachable, 2 on bad input.
    """
    from patching.hosts.converge import run_converge
    from patching.inventory.target import load_target

    target = load_target(release, inventory, limit, allow_unverified_host_keys)
    say(f"converging {len(target.hosts)} host(s) to {target.bundle.release}: {', '.join(target.hosts)}")
    with Progress(TextColumn("[bold]{task.description}"), TimeElapsedColumn(), console=out,
                  transient=True, disable=not out.is_terminal) as progress:
        task = progress.add_task("starting", total=None)

        def on_task(name: str) -> None:
            if out.is_terminal:
                progress.update(task, description=name)
            else:  # CI logs: one line per task, so a long run is never silent
                say(f"{time.strftime('%H:%M:%S')} {name}")

        result = run_converge(
            target.bundle_path, target.inventory_path, limit, on_task=on_task,
            on_failure=lambda host, what: out.print(f"FAILED {host}: {what}", markup=False),
        )
    table = Table(title=f"converge to {target.bundle.release}: {result.seconds:.0f}s")
    for column in ("host", "ok", "changed", "failed", "unreachable", "skipped", "first failure"):
        table.add_column(column, overflow="fold")
    for name in target.hosts:
        h = result.hosts.get(name)
        if h is None:
            table.add_row(name, "-", "-", "-", "-", "-", "not run")
            continue
        table.add_row(name, str(h.ok), str(h.changed), str(h.failed), str(h.unreachable), str(h.skipped),
                      Text(h.first_failure or ""))
    out.print(table)
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps({"release": target.bundle.release, "status": result.status, "rc": result.rc,
                                      "seconds": round(result.seconds, 1),
                                      "hosts": {n: vars(h) for n, h in result.hosts.items()}}, indent=2) + "\n")
    missing = [n for n in target.hosts if n not in result.hosts]
    if not result.succeeded or missing:
        say(f"converge failed: ansible-runner {result.status} (rc {result.rc})", stderr=True)
        raise typer.Exit(ExitCode.FAILED)
    say(f"{len(result.hosts)} host(s) on {target.bundle.release}; {result.changed} change(s)")


def verify(
    release: ReleaseOpt,
    inventory: InventoryOpt,
    limit: LimitOpt = None,
    workers: Annotated[int, typer.Option(help="xdist worker processes; 0 (default): one process that reads every "
                                              "host at once, one SSH session per host, then runs the checks")] = 0,
    junit: Annotated[Path, typer.Option(help="JUnit XML report")] = Path("reports/verify.xml"),
    allow_unverified_host_keys: UnverifiedOpt = False,
) -> None:
    """Run the host checks (tests/hosts) against a bundle: progress while they run, then a summary.

    Exit 0 when every check passed, 1 when one failed, 2 on bad input.
    """
    from patching.hosts.verify import run_verify
    from patching.inventory.target import load_target

    target = load_target(release, inventory, limit, allow_unverified_host_keys)
    how = f"{workers} xdist workers" if workers else "every host read at once"
    say(f"checking {len(target.hosts)} host(s) against {target.bundle.release} ({how})")
    with Progress(TextColumn("checks"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=out, transient=True, disable=not out.is_terminal) as progress:
        task = progress.add_task("", total=None)

        def on_check(check, total):
            progress.update(task, total=total or None, advance=1, description=f"{check.host}: {check.check}")
            if check.outcome == "failed" and out.is_terminal:  # the table below lists them for logs
                out.print(f"FAILED {check.check}: {check.message}", markup=False)

        result = run_verify(target.bundle_path, target.inventory_path, target.hosts, workers, junit, on_check)
    table = Table(title=f"host checks against {target.bundle.release}: {result.seconds:.1f}s")
    for column in ("host", "passed", "failed", "skipped"):
        table.add_column(column)
    for name in target.hosts:
        row = result.by_host().get(name, {})
        table.add_row(name, str(row.get("passed", 0)), str(row.get("failed", 0)), str(row.get("skipped", 0)))
    out.print(table)
    if result.failures:
        failed = Table(title="failed checks")
        for column in ("host", "check", "message"):
            failed.add_column(column, overflow="fold")
        for c in sorted(result.failures, key=lambda c: (c.host, c.check)):
            failed.add_row(c.host, Text(c.check), Text(c.message))
        out.print(failed)
    say(f"JUnit: {result.junit}")
    if not result.checks or result.rc not in (0, 1):
        log = result.log.read_text(errors="replace").strip().splitlines()[-15:] if result.log else []
        say(f"the host checks did not run (pytest exit {result.rc}):\n" + "\n".join(log), stderr=True)
        raise typer.Exit(ExitCode.FAILED)
    if not result.succeeded:
        say(f"{len(result.failures)} check(s) failed", stderr=True)
        raise typer.Exit(ExitCode.FAILED)
    say(f"all {len(result.checks)} checks passed or did not apply")


def drift(
    release: ReleaseOpt,
    inventory: InventoryOpt,
    limit: LimitOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the differences as JSON")] = False,
    allow_unverified_host_keys: UnverifiedOpt = False,
) -> None:
    """Read every host's installed versions, holds and manifest over SSH (Fabric, in parallel) and
    print what differs from the bundle.

    Exit 0 when nothing drifted, 1 when something did (or a host could not be read), 2 on bad input.
    """
    from patching.hosts.drift import drift as find_drift
    from patching.inventory.target import load_target

    target = load_target(release, inventory, limit, allow_unverified_host_keys)
    found = find_drift(target.bundle, target.hostvars)
    if as_json:
        print(json.dumps([vars(d) for d in found], indent=2))
    elif found:
        table = Table(title=f"drift from {target.bundle.release}: {len(found)} difference(s)")
        for column in ("host", "what", "expected", "found"):
            table.add_column(column, overflow="fold")
        for d in found:
            table.add_row(d.host, Text(d.item), Text(d.expected), Text(d.found))
        out.print(table)
    if found:
        hosts = sorted({d.host for d in found})
        say(f"{len(hosts)} host(s) drifted from {target.bundle.release}: {', '.join(hosts)}", stderr=True)
        raise typer.Exit(ExitCode.FAILED)
    if not as_json:
        say(f"no drift: {len(target.hosts)} host(s) match {target.bundle.release}")
