"""`fleet plan`, `fleet patch run|resume|status|abort`, `fleet policy schema` (DESIGN.md section 6).

All input (bundle and its compatibility rules, inventory, policy with its windows and freezes,
`--limit`) is validated before the journal is opened or any host action exists: bad input exits 2
with every problem named. `run` refuses with 3 outside a window, in a freeze, or when another run
holds the journal; a rollout that failed or rolled back exits 1. Nothing here ever prompts.
"""

from __future__ import annotations

import datetime as dt
import functools
import getpass
import json
import os
import socket
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from infra.model.errors import InputError, Problem, collect
from patching.inventory.reader import FleetInventory, load_inventory
from patching.journal.store import Journal, JournalError, LockHeld, LockKeeper, LockLost, RunRecord, lock_staleness
from patching.release.bundle import Bundle, load_bundle
from patching.rollout import actions as host_actions
from patching.rollout.plan import Plan, build_plan, check_policy_against, render_plan
from patching.rollout.policy import Policy, load_policy, parse_policy, schema
from patching.rollout.runner import FINISHED, Runner, RunResult, RunStatus
from patching.rollout.windows import MaintenanceCalendar, build_calendar, format_duration
from patching.states import IN_FLIGHT, HostState

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REFUSED = 0, 1, 2, 3
DEFAULT_JOURNAL = Path(".fleet/journal.db")
UNFINISHED = (RunStatus.RUNNING, RunStatus.PAUSED, RunStatus.BLOCKED)

console = Console(highlight=False, soft_wrap=True)

ReleaseOpt = Annotated[Path, typer.Option("--release", help="the bundle to roll out (releases/YYYY-MM.yaml)")]
InventoryOpt = Annotated[list[str], typer.Option("--inventory", "-i", help="Ansible inventory source (repeatable)")]
PolicyOpt = Annotated[Path | None, typer.Option("--policy", help="rollout policy (docs/policy.md); default if absent")]
LimitOpt = Annotated[list[str] | None, typer.Option("--limit", "-l", help="Ansible host pattern(s) to patch")]
JournalOpt = Annotated[Path, typer.Option("--journal", help="the run journal (SQLite)")]
ReleasesOpt = Annotated[
    Path | None, typer.Option("--releases-dir", help="where previous bundles' manifests are (default: the bundle's)")
]
RunOpt = Annotated[int | None, typer.Option("--run", help="run id (default: the latest)")]
ReportOpt = Annotated[Path | None, typer.Option("--report-dir", help="default: <journal dir>/reports/run-<id>")]
IgnoreWindowOpt = Annotated[bool, typer.Option("--ignore-window", help="run outside windows and freezes")]
StealOpt = Annotated[bool, typer.Option("--steal-lock", help="take a stale journal lock (reported first)")]


def register(app: typer.Typer) -> None:
    """Add the plan, patch and policy commands to the `fleet` app."""
    app.command("plan")(plan)
    patch_app = typer.Typer(help="Roll a bundle out in canary waves, journaled; resume, watch, abort.",
                            no_args_is_help=True)
    patch_app.command("run")(patch_run)
    patch_app.command("resume")(patch_resume)
    patch_app.command("status")(patch_status)
    patch_app.command("abort")(patch_abort)
    app.add_typer(patch_app, name="patch")
    policy_app = typer.Typer(help="The rollout policy file.", no_args_is_help=True)
    policy_app.command("schema")(policy_schema)
    app.add_typer(policy_app, name="policy")


@dataclass(frozen=True)
class Inputs:
    bundle: Bundle
    bundle_path: Path
    inventory: FleetInventory
    policy: Policy
    policy_path: Path | None
    calendar: MaintenanceCalendar
    releases_dir: Path


def load_inputs(
    release: Path, inventory: list[str], policy: Path | None, limit: list[str] | None, releases_dir: Path | None
) -> Inputs:
    """Every input of a run, validated together: one InputError lists all that is wrong."""
    from patching.release.compat import rule_problems

    problems: list[Problem] = []
    bundle = collect(problems, load_bundle, release)
    if bundle is not None:
        problems += rule_problems(bundle, release)
    fleet = collect(problems, load_inventory, inventory, limit)
    rollout, calendar = collect(problems, load_policy, policy) or (None, None)
    if fleet is not None and rollout is not None:
        collect(problems, check_policy_against, fleet, rollout, str(policy or "<default policy>"))
    if releases_dir is not None and not releases_dir.is_dir():
        problems.append(Problem("--releases-dir", "", str(releases_dir), "no such directory"))
    if problems:
        raise InputError(problems)
    assert bundle is not None and fleet is not None and rollout is not None and calendar is not None
    return Inputs(bundle, release, fleet, rollout, policy, calendar, releases_dir or release.resolve().parent)


def bundle_resolver(releases_dir: Path, target: Bundle, recorded: Mapping[str, Mapping[str, Any]]
                    ) -> Callable[[str], Bundle | None]:
    """release -> Bundle from `<releases_dir>/<release>.yaml`, else the copy an earlier run in the journal
    recorded (`recorded`: a host's previous bundle, for rollback); None when neither has it. Read once each."""

    @functools.cache
    def resolve(release: str) -> Bundle | None:
        if release == target.release:
            return target
        path = releases_dir / f"{release}.yaml"
        if path.is_file():
            return load_bundle(path)
        manifest = recorded.get(release)
        return Bundle.model_validate(manifest) if manifest is not None else None

    return resolve


def _history(journal_path: Path) -> tuple[list[tuple[int, float]], dict[str, str], dict[str, dict[str, Any]]]:
    """What the journal knows before a run: wave durations, hosts' last releases, bundles it rolled out."""
    if not journal_path.exists():
        return [], {}, {}
    journal = _open(journal_path)
    try:
        return journal.wave_history(), journal.last_known_releases(), journal.recorded_bundles()
    finally:
        journal.close()


def _preview(inputs: Inputs, journal_path: Path, now: dt.datetime) -> Plan:
    """The plan from the inventory and the journal alone, without reading any host."""
    history, known, recorded = _history(journal_path)
    resolve = bundle_resolver(inputs.releases_dir, inputs.bundle, recorded)
    current = {n: known[n] for n in inputs.inventory.selected if n in known}
    bundles = {r: b for r in set(current.values()) if r != inputs.bundle.release and (b := resolve(r)) is not None}
    return build_plan(inputs.inventory, inputs.policy, inputs.bundle, policy_source=str(inputs.policy_path or
                      "<default policy>"), current=current, history=history, known_bundles=bundles,
                      calendar=inputs.calendar, now=now)


def plan(
    release: ReleaseOpt,
    inventory: InventoryOpt,
    policy: PolicyOpt = None,
    limit: LimitOpt = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="write the plan as JSON here")] = None,
    journal: JournalOpt = DEFAULT_JOURNAL,
    releases_dir: ReleasesOpt = None,
) -> None:
    """Print the waves a run would take (and write plan.json), without touching any host.

    Hosts' current bundles and wave durations come from the journal's history when there is one.
    """
    inputs = load_inputs(release, inventory, policy, limit, releases_dir)
    _show_plan(_preview(inputs, journal, dt.datetime.now(dt.UTC)), output)


def _show_plan(the_plan: Plan, output: Path | None) -> None:
    console.print(render_plan(the_plan))
    for note in the_plan.notes:
        say(f"note: {note}", stderr=True)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(the_plan.to_dict(), indent=2) + "\n")
        say(f"wrote {output}", stderr=True)


def patch_run(
    release: ReleaseOpt,
    inventory: InventoryOpt,
    policy: PolicyOpt = None,
    limit: LimitOpt = None,
    journal: JournalOpt = DEFAULT_JOURNAL,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan and stop")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="with --dry-run: write plan.json")] = None,
    ignore_window: IgnoreWindowOpt = False,
    steal_lock: StealOpt = False,
    report_dir: ReportOpt = None,
    releases_dir: ReleasesOpt = None,
) -> None:
    """Roll the bundle out: canary, waves, gates, rollback.

    Exit 0 done, 1 failed or rolled back, 2 bad input (nothing touched), 3 refused (window, freeze, lock).
    """
    inputs = load_inputs(release, inventory, policy, limit, releases_dir)
    now = dt.datetime.now(dt.UTC)
    preview = _preview(inputs, journal, now)
    if dry_run:
        _show_plan(preview, output)
        return
    if not ignore_window and preview.waves:
        refusal = _window_refusal(inputs.calendar, now, preview.waves[0].predicted_s)
        if refusal:
            say(f"refused: {refusal} (--ignore-window overrides)", stderr=True)
            raise typer.Exit(EXIT_REFUSED)
    db = _open(journal)
    _take_lock(db, steal_lock, inputs.policy)
    try:
        active = [r for r in db.runs() if r.status in UNFINISHED]
        if active:
            run = active[0]
            say(f"refused: run {run.id} ({run.release}) is {run.status}: `fleet patch resume` continues it, "
                "`fleet patch abort` ends it", stderr=True)
            raise typer.Exit(EXIT_REFUSED)
        resolve = bundle_resolver(inputs.releases_dir, inputs.bundle, db.recorded_bundles())
        actions = _make_actions(inputs, journal)
        with LockKeeper(journal, _beat(inputs.policy)) as keeper:
            runner = Runner(db, actions, inputs.inventory, inputs.bundle, inputs.policy, inputs.calendar, resolve,
                            ignore_window=ignore_window, notify=_progress, lock=keeper)
            history = db.wave_history()
            try:
                run_id = runner.start(owner=_owner(), bundle_path=str(inputs.bundle_path.resolve()),
                                      releases_dir=str(inputs.releases_dir.resolve()),
                                      policy_path=str(inputs.policy_path.resolve()) if inputs.policy_path else None,
                                      history=history)
            except host_actions.ActionsUnavailable as exc:
                say(f"error: {exc}; no run was started", stderr=True)
                raise typer.Exit(EXIT_FAILED) from None
            db.set_lock_run(run_id)
            say(f"run {run_id}: release {inputs.bundle.release}, journal {journal}")
            result = _execute(runner, run_id)
        _finish(db, result, journal, report_dir)
    finally:
        db.release_lock()
        db.close()


def patch_resume(
    journal: JournalOpt = DEFAULT_JOURNAL,
    run: RunOpt = None,
    inventory: Annotated[list[str] | None, typer.Option("--inventory", "-i", help="default: the run's")] = None,
    ignore_window: IgnoreWindowOpt = False,
    steal_lock: StealOpt = False,
    report_dir: ReportOpt = None,
) -> None:
    """Continue a run: re-read the hosts caught in flight, finish or roll them back, then go on with the waves."""
    db = _open(journal, must_exist=True)
    try:
        record = _pick_run(db, run)
        bundle = Bundle.model_validate(record.bundle)
        rollout = parse_policy(record.policy, f"{journal} (run {record.id} policy)")
        calendar = build_calendar(rollout.windows, rollout.freeze, str(record.policy_path or "<run policy>"))
        fleet = load_inventory(inventory or record.inventory, record.limit)
        missing = sorted(n for n in Plan.from_dict(record.plan).hosts if n not in fleet.hosts)
        if missing:
            raise InputError.single("--inventory", "", missing, f"host(s) of run {record.id} are not in the inventory")
        releases = Path(record.releases_dir)
        inputs = Inputs(bundle, Path(record.bundle_path), fleet, rollout, None, calendar, releases)
        _take_lock(db, steal_lock, rollout, run_id=record.id)
        try:
            actions = _make_actions(inputs, journal)
            with LockKeeper(journal, _beat(rollout)) as keeper:
                resolve = bundle_resolver(releases, bundle, db.recorded_bundles())
                runner = Runner(db, actions, fleet, bundle, rollout, calendar, resolve,
                                ignore_window=ignore_window, notify=_progress, lock=keeper)
                say(f"resuming run {record.id} ({record.release}, {record.status})")
                result = _execute(runner, record.id)
            _finish(db, result, journal, report_dir)
        finally:
            db.release_lock()
    finally:
        db.close()


def patch_status(
    journal: JournalOpt = DEFAULT_JOURNAL,
    run: RunOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the run's report as JSON")] = False,
    paused: Annotated[bool, typer.Option(
        "--paused", help="answer by exit code: 0 if the latest run can be resumed (paused, blocked or "
                         "interrupted), 1 if not (no journal, no run, or it finished)")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print nothing")] = False,
) -> None:
    """Show the latest runs, the lock, and the hosts of one run that are not done."""
    from patching.journal.reports import build_report

    if paused:
        latest = _latest_run(journal)
        resumable = latest is not None and latest.status in UNFINISHED
        if not quiet:
            say(f"run {latest.id} ({latest.release}) is {latest.status}" if latest else f"no run in {journal}")
        raise typer.Exit(EXIT_OK if resumable else EXIT_FAILED)
    db = _open(journal, must_exist=True)
    try:
        record = _pick_run(db, run)
        if quiet:
            return
        if as_json:
            sys.stdout.write(json.dumps(build_report(db, record.id), indent=2) + "\n")
            return
        runs = Table(title=f"Runs in {journal}")
        for column in ("run", "release", "status", "waves done", "hosts", "message"):
            runs.add_column(column, overflow="fold")
        for r in db.runs(10):
            waves = db.waves(r.id)
            states = Counter(s.value for s in db.latest_states(r.id).values())
            runs.add_row(str(r.id), r.release, r.status, f"{sum(w.status == 'done' for w in waves)}/{len(waves)}",
                         ", ".join(f"{k} {v}" for k, v in sorted(states.items())), r.message)
        console.print(runs)
        lock = db.lock_info()
        if lock:
            stale = lock_staleness(lock, _stale_after(record))
            say(f"lock: {lock}" + (f" - STALE: {stale}" if stale else ""))
        hosts = Table(title=f"Run {record.id}: hosts not done")
        for column in ("host", "wave", "state", "since", "detail"):
            hosts.add_column(column, overflow="fold")
        last = {}
        for row in db.host_history(record.id):
            last[row.host] = row
        for name, row in sorted(last.items()):
            if row.state != HostState.DONE:
                since = dt.datetime.fromtimestamp(row.at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
                hosts.add_row(name, "-" if row.wave is None else str(row.wave), row.state.value, since, row.detail)
        console.print(hosts)
    finally:
        db.close()


def patch_abort(journal: JournalOpt = DEFAULT_JOURNAL, run: RunOpt = None) -> None:
    """Stop a run after the hosts in flight finish; a paused or refused run is closed at once."""
    db = _open(journal, must_exist=True)
    try:
        record = _pick_run(db, run)
        if record.status not in UNFINISHED:
            raise InputError.single("--run", "", record.id, f"run {record.id} is already {record.status}")
        db.request_abort(record.id)
        in_flight = any(s in IN_FLIGHT for s in db.latest_states(record.id).values())
        try:
            db.acquire_lock(_owner() + " (abort)", run_id=record.id, stale_after=_stale_after(record))
        except LockHeld as held:
            if held.stale:
                say(f"abort recorded for run {record.id}; its runner is gone ({held.stale}): "
                    "`fleet patch resume --steal-lock` finishes the hosts in flight and stops")
            else:
                say(f"abort recorded for run {record.id}; the runner stops after the hosts in flight finish")
            return
        try:
            if record.status in (RunStatus.PAUSED, RunStatus.BLOCKED) and not in_flight:
                db.set_stop(record.id, "aborted", None)
                db.set_run_status(record.id, RunStatus.ABORTED, f"aborted while {record.status}", finished=True)
                say(f"run {record.id} aborted (it was {record.status}; no host was in flight)")
            else:
                say(f"abort recorded for run {record.id}: `fleet patch resume` finishes the hosts in flight and stops")
        finally:
            db.release_lock()
    finally:
        db.close()


def policy_schema() -> None:
    """Print the rollout policy's JSON schema."""
    sys.stdout.write(json.dumps(schema(), indent=2) + "\n")


# ---- helpers ------------------------------------------------------------------------------------------


def say(text: str, stderr: bool = False) -> None:
    """A plain line (no wrapping or markup), so messages stay greppable in CI logs."""
    print(text, file=sys.stderr if stderr else sys.stdout, flush=True)


_STYLES = {"info": "", "warn": "yellow", "error": "bold red"}


def _progress(level: str, text: str) -> None:
    stamp = dt.datetime.now().strftime("%H:%M:%S")
    console.print(f"[dim]{stamp}[/dim] {text}", style=_STYLES.get(level, ""), markup=True)


def _open(path: Path, must_exist: bool = False) -> Journal:
    if must_exist and not path.exists():
        raise InputError.single("--journal", "", str(path), "no journal here (no run has been started with it)")
    try:
        return Journal(path)
    except JournalError as exc:
        raise InputError.single("--journal", "", str(path), str(exc)) from exc


def _latest_run(journal: Path) -> RunRecord | None:
    if not journal.exists():
        return None
    db = _open(journal)
    try:
        runs = db.runs(1)
        return runs[0] if runs else None
    finally:
        db.close()


def _stale_after(record: RunRecord) -> float:
    return parse_policy(record.policy, f"run {record.id} policy").timeouts.lock_stale.total_seconds()


def _pick_run(db: Journal, run: int | None) -> RunRecord:
    if run is None:
        runs = db.runs(1)
        if not runs:
            raise InputError.single("--journal", "", str(db.path), "the journal has no run")
        return runs[0]
    try:
        return db.run(run)
    except KeyError:
        raise InputError.single("--run", "", run, f"no such run in {db.path}") from None


def _take_lock(db: Journal, steal: bool, policy: Policy, run_id: int | None = None) -> None:
    try:
        stolen = db.acquire_lock(_owner(), run_id=run_id, steal=steal,
                                 stale_after=policy.timeouts.lock_stale.total_seconds())
    except LockHeld as held:
        say(f"refused: {held}", stderr=True)
        raise typer.Exit(EXIT_REFUSED) from None
    if stolen:
        say(f"took the stale journal lock of {stolen}", stderr=True)


def _beat(policy: Policy) -> float:
    # four heartbeats per stale period: a busy moment never makes a live run look dead
    return max(policy.timeouts.lock_stale.total_seconds() / 4, 0.5)


def _make_actions(inputs: Inputs, journal: Path) -> host_actions.Actions:
    try:
        return host_actions.make_actions(inputs.inventory, inputs.bundle, inputs.policy,
                                         work_dir=journal.resolve().parent)
    except host_actions.ActionsUnavailable as exc:
        say(f"error: {exc}", stderr=True)
        raise typer.Exit(EXIT_FAILED) from None


def _execute(runner: Runner, run_id: int) -> RunResult:
    try:
        return runner.execute(run_id)
    except LockLost as exc:
        say(f"refused: {exc}", stderr=True)
        raise typer.Exit(EXIT_REFUSED) from None
    except host_actions.ActionsUnavailable as exc:
        say(f"error: {exc}; run {run_id} is kept: `fleet patch resume` continues it", stderr=True)
        raise typer.Exit(EXIT_FAILED) from None


def _finish(db: Journal, result: RunResult, journal: Path, report_dir: Path | None) -> None:
    from patching.journal.reports import write_reports

    out = report_dir or journal.resolve().parent / "reports" / f"run-{result.run_id}"
    write_reports(db, result.run_id, out)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(result.hosts.items()))
    say(f"run {result.run_id}: {result.status}: {result.message} [{counts}]",
        stderr=result.exit_code != EXIT_OK)
    if result.rollback_failed:
        say(f"ROLLBACK FAILED, hosts left drained: {', '.join(result.rollback_failed)}", stderr=True)
    say(f"reports in {out}")
    if result.status not in FINISHED:
        say("`fleet patch resume` continues this run", stderr=True)
    raise typer.Exit(result.exit_code)


def _window_refusal(calendar: MaintenanceCalendar, now: dt.datetime, first_wave_s: float) -> str | None:
    duration = dt.timedelta(seconds=first_wave_s)
    if calendar.fits(now, duration):
        return None
    nxt = calendar.next_opening(now, duration)
    later = f"; next opening {nxt.isoformat()}" if nxt else ""
    frozen = calendar.freeze_at(now)
    if frozen:
        return f"freeze in force ({frozen.label}){later}"
    window = calendar.open_window(now)
    if window is None:
        return f"outside every maintenance window{later}"
    left = format_duration(window.time_left(now) or dt.timedelta(0))
    predicted = format_duration(duration)
    return f"the first wave ({predicted} predicted) does not fit the {left} left in window {window.name}{later}"


def _owner() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    owner = f"{user}@{socket.gethostname()}"
    ci_run = os.environ.get("GITHUB_RUN_ID")
    return f"{owner} (GitHub run {ci_run})" if ci_run else owner
