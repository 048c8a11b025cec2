"""`fleet`: the command line (DESIGN.md section 6); exit codes are `patching.states.ExitCode`.

Exit codes: 0 done, 1 rollout failed or rolled back, 2 bad input (nothing touched),
3 refused (locked, outside the window, freeze).
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from infra.model.errors import InputError
from patching.cli.hosts import register as register_host_commands
from patching.cli.output import say
from patching.cli.patch import register as register_patch_commands
from patching.hosts.toolpath import put_our_bin_first
from patching.journal.store import JournalError
from patching.states import ExitCode

app = typer.Typer(
    help="Provision, pin, patch and verify a hybrid GPU fleet serving DeepSeek-class models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
release_app = typer.Typer(help="Check release bundles (releases/YYYY-MM.yaml).", no_args_is_help=True)
app.add_typer(release_app, name="release")
register_patch_commands(app)
register_host_commands(app)


def _register_lab() -> None:
    from lab.cli import app as lab_app

    @lab_app.command("demo")
    def demo(stack: Annotated[str, typer.Option(help="the lab stack")] = "lab") -> None:
        """The whole story: converge to 2026-10, roll 2026-11 out under traffic, catch a bad release."""
        from patching.cli.demo import run_demo

        run_demo(stack)

    app.add_typer(lab_app, name="lab")


_register_lab()

out = Console()


@release_app.command("check")
def release_check(
    file: Annotated[Path, typer.Argument(help="the bundle to check")],
    against: Annotated[Path | None, typer.Option(help="the bundle it replaces: print what changes")] = None,
    on: Annotated[str | None, typer.Option(help="judge end-of-life as of this date (YYYY-MM-DD)")] = None,
) -> None:
    """Validate a bundle, apply every compatibility rule, and show what changes against an older one.

    Exit 0 when the bundle is usable (warnings allowed), 2 when it is malformed or breaks a rule.
    """
    from patching.release.bundle import load_bundle
    from patching.release.compat import check_bundle, diff_bundles

    today = _parse_date(on, "--on") if on else None
    bundles = [load_bundle(file)] + ([load_bundle(against)] if against else [])
    new = bundles[0]
    if against:
        changes = diff_bundles(bundles[1], new)
        table = Table(title=f"{against} -> {file}: {len(changes)} pinned value(s) change")
        for column in ("field", "old", "new"):
            table.add_column(column, overflow="fold")
        for field, old, value in changes:
            table.add_row(field, _cell(old), _cell(value))
        out.print(table)
    findings = check_bundle(new, today)
    errors = [f for f in findings if f.severity == "error"]
    for f in findings:
        say(f"{file}: {f}", stderr=f.severity == "error")
    if errors:
        say(f"{file}: {len(errors)} compatibility rule(s) broken", stderr=True)
        raise typer.Exit(ExitCode.BAD_INPUT)
    advisories = ", ".join(a.id for a in new.advisories) or "none"
    say(f"{file}: release {new.release} OK ({len(findings)} warning(s)); fixes {advisories}")


@app.command("inventory")
def inventory(
    stack: Annotated[str, typer.Option(help="the stack whose fleet to render (Pulumi.<stack>.yaml)")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write here instead of stdout")] = None,
    project_dir: Annotated[Path, typer.Option(help="where Pulumi.<stack>.yaml lives")] = Path("."),
) -> None:
    """Render the stack's fleet as an Ansible inventory (YAML written as JSON: Ansible reads it as YAML, the fleet
    commands read 10,000 hosts of it in well under a second), without cloud access.

    Cloud hosts get their addresses from `pulumi up` (the stack's `ansible_inventory` output);
    rendered offline, they appear without `ansible_host`.
    """
    from infra.model.fleet import load_stack
    from infra.model.inventory import render_inventory

    if output is not None and output.is_dir():
        raise InputError.single("-o", "", str(output), "is a directory: give the file to write")
    text = render_inventory(load_stack(stack, project_dir))
    if output:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(text)
        except OSError as exc:
            raise InputError.single("-o", "", str(output), f"cannot write it: {exc.strerror or exc}") from exc
        say(f"wrote {output}", stderr=True)
    else:
        sys.stdout.write(text)


@app.command("known-hosts")
def known_hosts(
    inventory: Annotated[list[str], typer.Option("--inventory", "-i", help="Ansible inventory source (repeatable)")],
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="merge into this known_hosts file (the inventory's access.known_hosts_file, "
                               "~/.ssh/known_hosts by default) instead of printing")] = None,
) -> None:
    """The SSH host keys the inventory records, as known_hosts lines: each cloud host's (`fleet_ssh_host_keys`,
    read from its console output at `pulumi up`) and each bastion's (`fleet_ssh_bastion`, from the stack).

    With -o the file keeps its other lines; lines for the same hosts are replaced; it is written atomically,
    0600. Run it before the first Ansible run against new cloud hosts: their keys are then known, never
    trusted on first use.
    """
    from infra.model.access import HostVarError, known_hosts_lines, merge_known_hosts
    from patching.inventory.reader import load_inventory

    fleet = load_inventory(inventory)
    try:
        lines = known_hosts_lines(fleet.vars)
    except HostVarError as exc:
        raise InputError.single(", ".join(inventory), f"{exc.host}.{exc.var}", exc.value, exc.message) from exc
    if not lines:
        say(f"{', '.join(inventory)}: no host records fleet_ssh_host_keys or fleet_ssh_bastion (cloud hosts get "
            "their keys from `pulumi up`); nothing to write", stderr=True)
        return
    if output is None:
        sys.stdout.write("".join(f"{line}\n" for line in lines))
        return
    target = output.expanduser()
    if target.is_dir():
        raise InputError.single("-o", "", str(output), "is a directory: give the known_hosts file to write")
    try:
        merge_known_hosts(target, lines)
    except OSError as exc:
        raise InputError.single("-o", "", str(output), f"cannot write it: {exc.strerror or exc}") from exc
    say(f"wrote {len(lines)} host key line(s) to {target}", stderr=True)


def _parse_date(text: str, option: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise InputError.single(option, "", text, "expected a date YYYY-MM-DD") from exc


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def main() -> None:
    """Console-script entry: run the app, map bad input to exit code 2."""
    # ansible-runner and pytest start ansible's tools by name: prefer the ones installed beside us
    put_our_bin_first()
    try:
        rc = app(standalone_mode=False)  # click returns typer.Exit's code instead of exiting
        sys.exit(rc if isinstance(rc, int) else ExitCode.OK)
    except InputError as exc:
        for problem in exc.problems:
            say(f"error: {problem}", stderr=True)
        sys.exit(ExitCode.BAD_INPUT)
    except JournalError as exc:  # a journal found damaged while reading it
        say(f"error: --journal: {exc}", stderr=True)
        sys.exit(ExitCode.BAD_INPUT)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        say("aborted", stderr=True)
        sys.exit(130)
    except Exception as exc:
        # click's usage errors (typer vendors click, so match on the interface, not the class)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(ExitCode.BAD_INPUT)
        raise
