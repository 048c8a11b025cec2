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
from rich.table import Table

from infra.model.errors import InputError, Problem, collect
from patching.cli.output import console, progress, say
from patching.inventory.hostkeys import ALLOW_FLAG, host_key_problems, unverified_warning
from patching.inventory.reader import FleetInventory, load_inventory
from patching.journal.lock import LockHeld, LockKeeper, LockLost, lock_staleness
from patching.journal.reports import build_report, write_reports
from patching.journal.store import Journal, JournalError, RunJournal, RunRecord
from patching.release.bundle import Bundle, load_bundle
from patching.rollout.actions import Actions, ActionsUnavailable
from patching.rollout.identity import same_name_other_content
from patching.rollout.plan import Plan, build_plan, check_policy_against, render_plan
from patching.rollout.policy import Policy, load_policy, parse_policy, schema
from patching.rollout.runner import Runner, RunResult, abort, window_refusal
from patching.rollout.survey import approved_plan_problems, plan_from, read_plan, survey
from patching.rollout.windows import MaintenanceCalendar, build_calendar
from patching.states import EXIT_MEANING, FINISHED, UNFINISHED, ExitCode, HostState, WaveStatus

DEFAULT_JOURNAL = Path(".fleet/journal.db")

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
UnverifiedOpt = Annotated[bool, typer.Option(
    ALLOW_FLAG, help="go on with hosts whose inventory turns SSH host-key checking off (said loudly every run)")]


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
    from patching.cli.schedule import check_schedule  # its own module: the schedule against the policy's windows
    policy_app.command("check-schedule")(check_schedule)
    app.add_typer(policy_app, name="policy")


@dataclass(frozen=True)
class Inputs:
    """Every validated input of a run: bundle, inventory, policy with its calendar, where old bundles are."""
    bundle: Bundle
    bundle_path: Path
    inventory: FleetInventory
    policy: Policy
    policy_path: Path | None
    calendar: MaintenanceCalendar
    releases_dir: Path


def load_inputs(
    release: Path, inventory: list[str], policy: Path | None, limit: list[str] | None, releases_dir: Path | None,
    allow_unverified_host_keys: bool = False,
) -> Inputs:
    """Every input of a run, validated together: one InputError lists all that is wrong."""
    from patching.release.compat import rule_problems

    problems: list[Problem] = []
    bundle = collect(problems, load_bundle, release)
    if bundle is not None:
        problems += rule_problems(bundle, release)
    fleet = collect(problems, load_inventory, inventory, limit)
    if fleet is not None:
        problems += host_key_problems(",".join(inventory), fleet.selected_vars(), allow_unverified_host_keys)
    rollout, calendar = collect(problems, load_policy, policy) or (None, None)
    if fleet is not None and rollout is not None:
        collect(problems, check_policy_against, fleet, rollout, str(policy or "<default policy>"))
    if releases_dir is not None and not releases_dir.is_dir():
        problems.append(Problem("--releases-dir", "", str(releases_dir), "no such directory"))
    if problems:
        raise InputError(problems)
    assert bundle is not None and fleet is not None and rollout is not None and calendar is not None
    return Inputs(bundle, release, fleet, rollout, policy, calendar, releases_dir or release.resolve().parent)


def _warn_unverified(fleet: FleetInventory) -> None:
    if warning := unverified_warning(fleet.selected_vars()):
        say(warning, stderr=True)


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
    offline: Annotated[bool, typer.Option(
        "--offline", help="read no host: current bundles from the journal's history, every host assumed "
                          "serving (such a plan cannot be run with `patch run --plan`)")] = False,
    allow_unverified_host_keys: UnverifiedOpt = False,
) -> None:
    """Print the waves a run would take (and write plan.json). Changes nothing.

    Reads every host of the selected pools first (installed bundle, load balancer, reachability), as a
    run would, and shows the real version change and the hosts it plans around; `fleet patch run
    --plan plan.json` then runs exactly this plan, or refuses if the fleet changed since.
    """
    # --offline connects to no host, so the inventory's host-key settings are the run's business then
    inputs = load_inputs(release, inventory, policy, limit, releases_dir, offline or allow_unverified_host_keys)
    now = dt.datetime.now(dt.UTC)
    _show_plan(_preview(inputs, journal, now) if offline else _survey_plan(inputs, journal, now), output)


def _survey_plan(inputs: Inputs, journal_path: Path, now: dt.datetime) -> Plan:
    """The plan from what the hosts are now (survey), with the journal's wave history."""
    history, _, recorded = _history(journal_path)
    resolve = bundle_resolver(inputs.releases_dir, inputs.bundle, recorded)
    _warn_unverified(inputs.inventory)
    found = survey(_make_actions(inputs, journal_path), inputs.inventory)
    if problems := same_name_other_content(inputs.bundle, str(inputs.bundle_path), found.of_selected(inputs.inventory),
                                           recorded.values()):
        raise InputError(problems)
    releases = {r for r in found.current.values() if r and r != inputs.bundle.release}
    bundles = {r: b for r in releases if (b := resolve(r)) is not None}
    return plan_from(found, inputs.inventory, inputs.policy, inputs.bundle, known_bundles=bundles, history=history,
                     calendar=inputs.calendar, now=now, policy_source=str(inputs.policy_path or "<default policy>"))


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
    allow_unverified_host_keys: UnverifiedOpt = False,
    approved: Annotated[Path | None, typer.Option(
        "--plan", help="run exactly this plan (`fleet plan -o plan.json`): refused with exit 2, naming what "
                       "changed, when the bundle, policy or selection differ or the fleet changed unsafely")] = None,
) -> None:
    """Roll the bundle out: canary, waves, gates, rollback.

    Exit 0 every selected host on the bundle, 1 failed or rolled back, 2 bad input (nothing touched),
    3 refused for now (window, freeze, lock), 4 blocked by preflight, 5 partly done, 6 nothing done.
    """
    if output is not None and not dry_run:
        raise InputError.single("-o", "", str(output), "writes the plan of a --dry-run; without --dry-run it "
                                "would start a real rollout (use `fleet plan -o` for the plan alone)")
    inputs = load_inputs(release, inventory, policy, limit, releases_dir, allow_unverified_host_keys)
    the_plan = read_plan(approved) if approved else None
    if dry_run:
        now = dt.datetime.now(dt.UTC)
        if the_plan is None:
            _show_plan(_survey_plan(inputs, journal, now), output)
            return
        found = survey(_make_actions(inputs, journal), inputs.inventory)
        if problems := approved_plan_problems(the_plan, found, inputs.inventory, inputs.bundle, inputs.policy,
                                              str(approved)):
            raise InputError(problems)
        _show_plan(the_plan, output)
        say(f"{approved}: the plan still holds", stderr=True)
        return
    if not ignore_window:
        refused = window_refusal(inputs.calendar, dt.datetime.now(dt.UTC), dt.timedelta(0), "the run")
        if refused:
            say(f"refused: {refused[0]} (--ignore-window overrides)", stderr=True)
            raise typer.Exit(ExitCode.REFUSED)
    db = _open(journal)
    _take_lock(db, steal_lock, inputs.policy)
    _warn_unverified(inputs.inventory)
    try:
        active = [r for r in db.runs() if r.status in UNFINISHED]
        if active:
            run = active[0]
            say(f"refused: run {run.id} ({run.release}) is {run.status}: `fleet patch resume` continues it, "
                "`fleet patch abort` ends it", stderr=True)
            raise typer.Exit(ExitCode.REFUSED)
        resolve = bundle_resolver(inputs.releases_dir, inputs.bundle, db.recorded_bundles())
        actions = _make_actions(inputs, journal)
        with LockKeeper(journal, _beat(inputs.policy), token=db.lock.token) as keeper:
            runner = Runner(db, actions, inputs.inventory, inputs.bundle, inputs.policy, inputs.calendar, resolve,
                            ignore_window=ignore_window, notify=progress, lock=keeper)
            try:
                run_id = runner.start(owner=_owner(), bundle_path=str(inputs.bundle_path.resolve()),
                                      releases_dir=str(inputs.releases_dir.resolve()),
                                      policy_path=str(inputs.policy_path.resolve()) if inputs.policy_path else None,
                                      history=db.wave_history(), approved=the_plan, approved_source=str(approved))
                db.lock.set_run(run_id)
            except ActionsUnavailable as exc:
                say(f"error: {exc}; no run was started", stderr=True)
                raise typer.Exit(ExitCode.FAILED) from None
            except LockLost as exc:
                say(f"refused: {exc}", stderr=True)
                raise typer.Exit(ExitCode.REFUSED) from None
            say(f"run {run_id}: release {inputs.bundle.release}, journal {journal}")
            result = _execute(runner, run_id)
        _finish(db.of_run(run_id), result, journal, report_dir)
    finally:
        db.lock.release()
        db.close()


def patch_resume(
    journal: JournalOpt = DEFAULT_JOURNAL,
    run: RunOpt = None,
    inventory: Annotated[list[str] | None, typer.Option("--inventory", "-i", help="default: the run's")] = None,
    ignore_window: IgnoreWindowOpt = False,
    steal_lock: StealOpt = False,
    report_dir: ReportOpt = None,
    allow_unverified_host_keys: UnverifiedOpt = False,
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
        if problems := host_key_problems(",".join(fleet.sources), fleet.selected_vars(), allow_unverified_host_keys):
            raise InputError(problems)
        _warn_unverified(fleet)
        releases = Path(record.releases_dir)
        inputs = Inputs(bundle, Path(record.bundle_path), fleet, rollout, None, calendar, releases)
        _take_lock(db, steal_lock, rollout, run_id=record.id)
        try:
            actions = _make_actions(inputs, journal)
            with LockKeeper(journal, _beat(rollout), token=db.lock.token) as keeper:
                resolve = bundle_resolver(releases, bundle, db.recorded_bundles())
                runner = Runner(db, actions, fleet, bundle, rollout, calendar, resolve,
                                ignore_window=ignore_window, notify=progress, lock=keeper)
                say(f"resuming run {record.id} ({record.release}, {record.status})")
                result = _execute(runner, record.id)
            _finish(db.of_run(record.id), result, journal, report_dir)
        finally:
            db.lock.release()
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
    brief: Annotated[bool, typer.Option(
        "--brief", help="for scripts (ci/patch-window.sh): one line of key=value, always these keys: "
                        "`run=<id|none> status=<running|paused|blocked|done|failed|aborted|none> "
                        "release=<name|none> lock=<free|held|stale>`, about the latest run (or --run); no "
                        "journal is `run=none status=none release=none lock=free`. `lock=stale`: its PID is dead "
                        "on this machine or its heartbeat is older than timeouts.lock_stale (--steal-lock takes "
                        "it). Exit 0; 2 if the journal cannot be read. Other output options are ignored")] = False,
) -> None:
    """Show the latest runs, the lock, and the hosts of one run that are not done."""
    if brief:
        fields = {"run": "none", "status": "none", "release": "none", "lock": "free"}
        if journal.exists() or run is not None:
            db = _open(journal, must_exist=True)
            try:
                latest = _pick_run(db, run) if run is not None or db.runs(1) else None
                if latest is not None:
                    fields |= {"run": str(latest.id), "status": str(latest.status), "release": latest.release}
                lock = db.lock.info()
                if lock is not None:
                    # judged by the policy of the run the lock is for (the latest run's, else the default)
                    try:
                        holder = latest if lock.run_id is None else db.run(lock.run_id)
                    except KeyError:
                        holder = latest
                    stale_after = (_stale_after(holder) if holder is not None
                                   else Policy().timeouts.lock_stale.total_seconds())
                    fields["lock"] = "stale" if lock_staleness(lock, stale_after) else "held"
            finally:
                db.close()
        say(" ".join(f"{key}={value}" for key, value in fields.items()))
        return
    if paused:
        latest = _latest_run(journal)
        resumable = latest is not None and latest.status in UNFINISHED
        if not quiet:
            say(f"run {latest.id} ({latest.release}) is {latest.status}" if latest else f"no run in {journal}")
        raise typer.Exit(ExitCode.OK if resumable else ExitCode.FAILED)
    db = _open(journal, must_exist=True)
    try:
        record = _pick_run(db, run)
        if quiet:
            return
        if as_json:
            sys.stdout.write(json.dumps(build_report(db.of_run(record.id)), indent=2) + "\n")
            return
        runs = Table(title=f"Runs in {journal}")
        for column in ("run", "release", "status", "waves done", "hosts", "message"):
            runs.add_column(column, overflow="fold")
        for r in db.runs(10):
            view = db.of_run(r.id)
            waves = view.waves()
            states = Counter(s.value for s in view.latest_states().values())
            runs.add_row(str(r.id), r.release, r.status,
                         f"{sum(w.status == WaveStatus.DONE for w in waves)}/{len(waves)}",
                         ", ".join(f"{k} {v}" for k, v in sorted(states.items())), r.message)
        console.print(runs)
        lock = db.lock.info()
        if lock:
            stale = lock_staleness(lock, _stale_after(record))
            say(f"lock: {lock}" + (f" - STALE: {stale}" if stale else ""))
        hosts = Table(title=f"Run {record.id}: hosts not done")
        for column in ("host", "wave", "state", "since", "detail"):
            hosts.add_column(column, overflow="fold")
        last = {}
        for row in db.of_run(record.id).host_history():
            last[row.host] = row
        for name, row in sorted(last.items()):
            if row.state != HostState.DONE:
                since = dt.datetime.fromtimestamp(row.at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
                hosts.add_row(name, "-" if row.wave is None else str(row.wave), row.state.value, since, row.detail)
        console.print(hosts)
    finally:
        db.close()


def patch_abort(
    journal: JournalOpt = DEFAULT_JOURNAL,
    run: RunOpt = None,
    rollback: Annotated[bool, typer.Option(
        "--rollback", help="also return the hosts this run patched to their previous bundle, through the "
                           "same gates (with no runner alive, this command does it now)")] = False,
    inventory: Annotated[list[str] | None, typer.Option(
        "--inventory", "-i", help="with --rollback: default the run's")] = None,
    report_dir: ReportOpt = None,
    allow_unverified_host_keys: UnverifiedOpt = False,
) -> None:
    """Stop a run after the hosts in flight finish; a paused or refused run is closed at once.

    With --rollback the hosts the run patched go back to the bundle each ran before (Argo Rollouts'
    abort): the runner does it before it stops, or, when no runner holds the journal, this command
    does it now, as `fleet patch resume` would. Exits as a run does.
    """
    db = _open(journal, must_exist=True)
    try:
        record = _pick_run(db, run)
        try:
            db.lock.acquire(_owner() + " (abort)", run_id=record.id, stale_after=_stale_after(record))
        except LockHeld as held:  # a runner has it (or had it): it reads the request before its next wave
            say(abort(db.of_run(record.id), held=held, rollback=rollback))
            return
        try:
            say(abort(db.of_run(record.id), held=None, rollback=rollback))
        finally:
            db.lock.release()
        closed = db.run(record.id).status not in UNFINISHED
    finally:
        db.close()
    if rollback and not closed:  # no runner alive: roll back now, the way resume finishes a run
        patch_resume(journal=journal, run=record.id, inventory=inventory, ignore_window=True, steal_lock=False,
                     report_dir=report_dir, allow_unverified_host_keys=allow_unverified_host_keys)


def policy_schema() -> None:
    """Print the rollout policy's JSON schema."""
    sys.stdout.write(json.dumps(schema(), indent=2) + "\n")


# ---- helpers ------------------------------------------------------------------------------------------


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
        stolen = db.lock.acquire(_owner(), run_id=run_id, steal=steal,
                                 stale_after=policy.timeouts.lock_stale.total_seconds())
    except LockHeld as held:
        say(f"refused: {held}", stderr=True)
        raise typer.Exit(ExitCode.REFUSED) from None
    if stolen:
        say(f"took the stale journal lock of {stolen}", stderr=True)


def _beat(policy: Policy) -> float:
    # four heartbeats per stale period: a busy moment never makes a live run look dead
    return max(policy.timeouts.lock_stale.total_seconds() / 4, 0.5)


def make_actions(inventory: FleetInventory, *, work_dir: Path) -> Actions:
    """The real host actions (patching/hosts/actions.py); ActionsUnavailable when they cannot run here."""
    try:
        from patching.hosts.actions import make_actions as make_host_actions
    except ImportError as exc:
        raise ActionsUnavailable(f"host actions unavailable: {exc}") from exc
    return make_host_actions(inventory, work_dir=work_dir)


def _make_actions(inputs: Inputs, journal: Path) -> Actions:
    try:
        return make_actions(inputs.inventory, work_dir=journal.resolve().parent)
    except ActionsUnavailable as exc:
        say(f"error: {exc}", stderr=True)
        raise typer.Exit(ExitCode.FAILED) from None


def _execute(runner: Runner, run_id: int) -> RunResult:
    try:
        return runner.execute(run_id)
    except LockLost as exc:
        say(f"refused: {exc}", stderr=True)
        raise typer.Exit(ExitCode.REFUSED) from None
    except ActionsUnavailable as exc:
        say(f"error: {exc}; run {run_id} is kept: `fleet patch resume` continues it", stderr=True)
        raise typer.Exit(ExitCode.FAILED) from None


def _finish(run: RunJournal, result: RunResult, journal: Path, report_dir: Path | None) -> None:
    out = report_dir or journal.resolve().parent / "reports" / f"run-{result.run_id}"
    write_reports(run, out)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(result.hosts.items()))
    say(f"run {result.run_id}: {result.status}: {result.message} [{counts}]",
        stderr=result.exit_code != ExitCode.OK)
    missing = result.not_on_bundle
    if missing and result.status in FINISHED:
        say(f"not on the bundle: {len(missing)} host(s)", stderr=True)
        for name, (outcome, why) in missing.items():
            say(f"  {name}: {outcome.value.replace('_', ' ')}" + (f": {why}" if why else ""), stderr=True)
    if result.rollback_failed:
        say(f"ROLLBACK FAILED, hosts left drained: {', '.join(result.rollback_failed)}", stderr=True)
    say(f"reports in {out}")
    if result.exit_code != ExitCode.OK:
        say(f"exit {int(result.exit_code)}: {EXIT_MEANING[result.exit_code]}", stderr=True)
    if result.status not in FINISHED:
        say("`fleet patch resume` continues this run", stderr=True)
    raise typer.Exit(result.exit_code)


def _owner() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    owner = f"{user}@{socket.gethostname()}"
    ci_run = os.environ.get("GITHUB_RUN_ID")
    return f"{owner} (GitHub run {ci_run})" if ci_run else owner
