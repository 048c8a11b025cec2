"""`fleet policy check-schedule`: do the scheduled workflow and the rollout policy agree? (issue 12)

The checks are patching/rollout/schedule.py's; this prints their figures, the disagreements and, with
`--suggest`, a schedule derived from the windows, checked the same way.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from infra.model.errors import InputError, Problem, collect
from patching.cli.output import say
from patching.rollout.policy import Policy, load_policy
from patching.rollout.schedule import (
    Figures,
    check,
    load_workflow,
    minutes_text,
    opening_text,
    suggest,
    utc_text,
)
from patching.rollout.windows import MaintenanceCalendar, format_duration
from patching.states import ExitCode

DEFAULT_WORKFLOW = Path(".github/workflows/patch-window.yml")
MAX_DAYS = 1000
SHOWN = 10  # triggers or openings listed per kind, unless --all


def _shown(items: Sequence[Any], show_all: bool) -> tuple[Sequence[Any], int]:
    return (items, 0) if show_all else (items[:SHOWN], max(len(items) - SHOWN, 0))


def report(figures: Figures, policy: Policy, days: int, show_all: bool, label: str = "") -> None:
    """Print the figures of one check, with the triggers and openings that disagree."""
    wave = format_duration(policy.waves.estimate)
    n = len(figures.triggers)
    outside, late, frozen = figures.of("outside"), figures.of("late"), figures.of("frozen")
    first = f" (first: {utc_text(outside[0])})" if outside else ""
    say(f"{label}(a) {n} trigger(s) in {days} days: {len(figures.of('fits'))} inside a window with time for a "
        f"{wave} wave, {len(outside)} outside{first}, {len(late)} too late for a wave, {len(frozen)} in a freeze")
    for kind, items in (("outside every window", outside), ("too late for a wave", late)):
        shown, more = _shown(items, show_all)
        for at in shown:
            say(f"{label}    {utc_text(at)}: {kind}")
        if more:
            say(f"{label}    ... and {more} more (--all lists every one)")
    openings = figures.openings
    usable = [o for o in openings if o.usable == "yes"]
    used = [o for o in usable if o.trigger is not None]
    unused = [o for o in usable if o.trigger is None]
    frozen_o = sum(o.usable == "frozen" for o in openings)
    short = sum(o.usable == "too-short" for o in openings)
    if not policy.windows:
        say(f"{label}(b) the policy has no windows: every trigger outside a freeze may patch")
    else:
        first = f" (first: {opening_text(unused[0])})" if unused else ""
        say(f"{label}(b) {len(openings)} window opening(s): {len(used)} get a trigger, {len(unused)} get none"
            f"{first}, {frozen_o} in a freeze" + (f", {short} too short for a {wave} wave" if short else ""))
        shown, more = _shown(unused, show_all)
        for o in shown:
            say(f"{label}    {opening_text(o)}: no trigger")
        if more:
            say(f"{label}    ... and {more} more (--all lists every one)")
    if figures.timeout_minutes is None:
        return
    if figures.needed is None or figures.longest is None:
        say(f"{label}(c) timeout-minutes {minutes_text(figures.timeout_minutes)}; the policy has no windows, so "
            "nothing stops a run before the job is killed: the next trigger resumes it once the lock is stale")
        return
    t = policy.timeouts
    verb = ">=" if figures.timeout_minutes * 60 >= figures.needed.total_seconds() else "<"
    say(f"{label}(c) timeout-minutes {minutes_text(figures.timeout_minutes)} {verb} "
        f"{minutes_text(figures.needed.total_seconds() / 60)} = longest window "
        f"{format_duration(figures.longest.duration)}"
        f" ({figures.longest.name or figures.longest.cron}) + drain {format_duration(t.drain)} + undrain "
        f"{format_duration(t.undrain)}")


# ---- --suggest-------------------------------------------------------------------------------------------


def _suggest_all(policy: Policy, calendar: MaintenanceCalendar, start: dt.datetime, days: int,
                 show_all: bool) -> bool:
    """Print suggested cron lines and timeout, checked like the workflow's; True when they pass."""
    if not policy.windows:
        say("suggest: the policy has no windows; any schedule may patch (outside freezes)")
        return True
    crons: list[str] = []
    ok = True
    for s in (suggest(policy, w, start) for w in policy.windows):
        name = s.window.name or s.window.cron
        if not s.crons:
            say(f"suggest: window {name}: no cron line: {s.why}", stderr=True)
            ok = False
            continue
        say(f"suggest: window {name}: {s.why}")
        crons += [c for c in s.crons if c not in crons]
    longest = max(policy.windows, key=lambda w: w.duration)
    needed = longest.duration + policy.timeouts.drain + policy.timeouts.undrain
    minutes = math.ceil(needed.total_seconds() / 60)
    say("suggest: on.schedule (UTC):")
    for c in crons:
        say(f'  - cron: "{c}"')
    say(f"suggest: timeout-minutes: at least {minutes} (plus the job's own setup time)")
    if crons:
        figures = check(policy, calendar, crons, minutes, start, days)
        report(figures, policy, days, show_all, label="suggest: ")
        for problem in figures.disagreements:
            say(f"suggest: DISAGREE {problem}", stderr=True)
        ok = ok and not figures.disagreements
    return ok


# ---- the command -----------------------------------------------------------------------------------------


def _start(text: str | None) -> dt.datetime:
    if text is None:
        return dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    try:
        at = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError.single("--from", "", text, "expected an ISO date or time, e.g. 2026-12-01 or "
                                "2026-12-01T02:00Z") from None
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)


def check_schedule(
    policy: Annotated[Path | None, typer.Option("--policy", help="rollout policy (docs/policy.md); default if absent")
                      ] = None,
    workflow: Annotated[Path, typer.Option("--workflow", help="the GitHub workflow whose on.schedule starts the "
                                           "patch job (cron in UTC)")] = DEFAULT_WORKFLOW,
    job: Annotated[str | None, typer.Option("--job", help="the job that runs the rollout (default: `patch`, or "
                                            "the only job)")] = None,
    days: Annotated[int, typer.Option("--days", min=1, max=MAX_DAYS, help="horizon in days")] = 365,
    start: Annotated[str | None, typer.Option("--from", help="start of the horizon (ISO, UTC unless given; "
                                              "default: now)")] = None,
    suggest_: Annotated[bool, typer.Option("--suggest", help="also print UTC cron lines and a timeout derived "
                                           "from the windows, checked the same way")] = False,
    show_all: Annotated[bool, typer.Option("--all", help="list every trigger and opening that disagrees")] = False,
) -> None:
    """Check the workflow's cron and timeout against the policy's windows, freezes and timeouts.

    (a) every trigger outside a freeze is inside a window with time for a wave before the cutoff; (b) every
    window opening gets a trigger; (c) timeout-minutes >= longest window + drain + undrain timeouts.
    Exit 0 when they agree, 1 when they disagree (each disagreement named), 2 for bad input.
    """
    problems: list[Problem] = []
    begin = collect(problems, _start, start)
    loaded = collect(problems, load_policy, policy)
    flow = collect(problems, load_workflow, workflow, job)
    if problems:
        raise InputError(problems)
    assert begin is not None and loaded is not None and flow is not None
    rollout, calendar = loaded
    source = str(policy or "<default policy>")
    windows = "; ".join(f"{w.name or w.cron}: {w.cron!r} {w.timezone}, {format_duration(w.duration)}, cutoff "
                        f"{format_duration(w.cutoff)}" for w in rollout.windows) or "none (always open)"
    say(f"workflow {flow.path} job {flow.job}: cron {', '.join(repr(c) for c in flow.crons)} (UTC), "
        f"timeout-minutes {minutes_text(flow.timeout_minutes)}")
    say(f"policy {source}: windows {windows}; {len(calendar.freezes)} freeze(s); wave estimate "
        f"{format_duration(rollout.waves.estimate)}")
    say(f"horizon: {days} days from {utc_text(begin)}")
    figures = check(rollout, calendar, flow.crons, flow.timeout_minutes, begin, days)
    report(figures, rollout, days, show_all)
    suggestion_ok = _suggest_all(rollout, calendar, begin, days, show_all) if suggest_ else True
    for problem in figures.disagreements:
        say(f"DISAGREE {problem}", stderr=True)
    if figures.disagreements:
        say(f"{flow.path} and {source} disagree: the scheduled workflow cannot patch as the policy intends "
            "(`--suggest` derives a schedule from the windows)", stderr=True)
        raise typer.Exit(ExitCode.FAILED)
    if not suggestion_ok:
        raise typer.Exit(ExitCode.FAILED)
    say(f"{flow.path} and {source} agree")
