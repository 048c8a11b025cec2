"""Does a workflow's schedule meet a policy's windows? The pure part of `fleet policy check-schedule`.

GitHub starts `.github/workflows/patch-window.yml` on its own cron, always read in UTC; the policy's
windows open on theirs, in their own time zones, which shift against UTC with daylight saving time.
When the two disagree the workflow never patches and stays green. Over a horizon `check` finds:

(a) every trigger outside a freeze lands in an open window with time left for one wave (the policy's
    wave estimate) before the cutoff: `MaintenanceCalendar.fits`, what the runner itself asks;
(b) every window opening a wave could use (not frozen) gets at least one such trigger;
(c) the job's `timeout-minutes` covers the longest window plus the drain and undrain timeouts, so the
    runner stops starting waves (at the cutoff) long before GitHub kills the job and leaves the lock.

`suggest` derives UTC cron lines from a window (a trigger at the latest UTC time of the opening over
the year, which is inside the window in both seasons when the window is long enough).
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from croniter import CroniterBadCronError, CroniterBadDateError, croniter  # type: ignore[import-untyped]

from infra.model.errors import InputError, Problem, load_yaml
from patching.rollout.policy import Policy
from patching.rollout.windows import MaintenanceCalendar, OpenWindow, Window, format_duration, zone
from patching.rollout.windows import occurrences as window_occurrences  # the calendar's rule for openings

MAX_TRIGGERS = 20_000  # a schedule firing more often than this in the horizon is not a patch window's

Verdict = Literal["fits", "late", "outside", "frozen"]


@dataclass(frozen=True)
class Workflow:
    """What check-schedule reads from a workflow file: its UTC schedule and the patch job's timeout."""

    path: Path
    crons: tuple[str, ...]
    job: str
    timeout_minutes: float


def _cron_problem(expr: Any) -> str | None:
    """Why `expr` is not a cron line GitHub runs (five fields, read in UTC), or None."""
    if not isinstance(expr, str) or len(expr.split()) != 5:
        return "expected five cron fields: minute hour day-of-month month day-of-week (GitHub reads them in UTC)"
    try:
        if not croniter.is_valid(expr):
            return "not a valid cron expression"
        croniter(expr, dt.datetime(2026, 1, 1, tzinfo=dt.UTC)).get_next(dt.datetime)
    except (CroniterBadCronError, CroniterBadDateError, ValueError, OverflowError):
        return "never fires: no date matches it (e.g. February 30)"
    return None


def load_workflow(path: Path, job: str | None = None) -> Workflow:
    """The `on.schedule[].cron` lines and the job's `timeout-minutes`; every problem is an InputError."""
    data = load_yaml(path)
    source = str(path)
    if not isinstance(data, dict):
        raise InputError.single(source, "", None, "not a GitHub workflow (expected a mapping)")
    problems: list[Problem] = []
    # YAML 1.1 (PyYAML) reads the bare key `on` as the boolean true
    triggers = data.get("on", data.get(True))
    schedule = triggers.get("schedule") if isinstance(triggers, dict) else None
    crons: list[str] = []
    if not isinstance(schedule, list) or not schedule:
        problems.append(Problem(source, "on.schedule", None, "no schedule: nothing triggers the workflow by cron"))
    else:
        for index, entry in enumerate(schedule):
            expr = entry.get("cron") if isinstance(entry, dict) else None
            if (why := _cron_problem(expr)) is not None:
                problems.append(Problem(source, f"on.schedule[{index}].cron", expr, why))
            else:
                crons.append(str(expr))
    jobs = data.get("jobs")
    name, timeout = job or "", None
    if not isinstance(jobs, dict) or not jobs:
        problems.append(Problem(source, "jobs", None, "no jobs"))
    else:
        if not name:
            name = "patch" if "patch" in jobs else next(iter(jobs)) if len(jobs) == 1 else ""
        if name not in jobs or not isinstance(jobs[name], dict):
            problems.append(Problem(source, "jobs", name or None, "which job patches? name it with --job "
                                    f"(jobs: {', '.join(map(str, jobs))})"))
        else:
            timeout = jobs[name].get("timeout-minutes")
            if timeout is None:
                problems.append(Problem(source, f"jobs.{name}.timeout-minutes", None, "missing: GitHub's default "
                                        "(360) would decide when a run is killed; set it"))
            elif isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
                problems.append(Problem(source, f"jobs.{name}.timeout-minutes", timeout,
                                        "expected a number of minutes above 0 (an expression cannot be checked)"))
    if problems:
        raise InputError(problems)
    assert isinstance(timeout, int | float)
    return Workflow(path, tuple(crons), name, float(timeout))


def trigger_times(crons: Sequence[str], start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """Every instant in (start, end) at which one of the UTC cron lines fires, sorted, each once."""
    found: set[dt.datetime] = set()
    for expr in crons:
        times = croniter(expr, start.astimezone(dt.UTC))
        while (at := times.get_next(dt.datetime)) < end:
            found.add(at)
            if len(found) > MAX_TRIGGERS:
                raise InputError.single("--workflow", "on.schedule", expr, f"fires more than {MAX_TRIGGERS} times "
                                        f"before {end:%Y-%m-%d}: not the schedule of a maintenance window")
    return sorted(found)


def _occurrences(window: Window, start: dt.datetime, end: dt.datetime) -> list[OpenWindow]:
    """The window's openings in [start, end), in UTC, read by the calendar's own rule (windows.py: a wall
    time skipped or repeated by DST opens once), which looks HORIZON ahead at a time."""
    out: list[OpenWindow] = []
    after = start
    while len(out) <= MAX_TRIGGERS:
        found = False
        for occurrence in window_occurrences(window, after):
            if occurrence.start >= end:
                return out
            if occurrence.start < start or (out and occurrence.start <= out[-1].start):
                continue  # opened before the horizon, or already counted
            out.append(occurrence)
            found = True
        if not found:
            return out
        after = out[-1].start
    return out


@dataclass
class Opening:
    """One opening of a window in the horizon, and whether a trigger uses it."""

    window: Window
    occurrence: OpenWindow
    usable: Literal["yes", "frozen", "too-short"]
    trigger: dt.datetime | None = None


@dataclass
class Figures:
    """Checks (a), (b), (c) of one schedule against one policy, and what disagrees, in words."""

    triggers: list[tuple[dt.datetime, Verdict]]
    openings: list[Opening]
    timeout_minutes: float | None
    needed: dt.timedelta | None  # longest window + drain + undrain; None without windows
    longest: Window | None
    disagreements: list[str] = field(default_factory=list)

    def of(self, verdict: Verdict) -> list[dt.datetime]:
        return [at for at, v in self.triggers if v == verdict]


def check(policy: Policy, calendar: MaintenanceCalendar, crons: Sequence[str], timeout_minutes: float | None,
          start: dt.datetime, days: int) -> Figures:
    """The three checks over [start, start + days). `timeout_minutes` None: skip (c)."""
    end = start + dt.timedelta(days=days)
    wave = policy.waves.estimate
    longest = max(policy.windows, key=lambda w: w.duration, default=None)
    # triggers a little past the horizon still serve an opening inside it
    reach = end + (longest.duration if longest else dt.timedelta(0))
    times = trigger_times(crons, start, reach)
    triggers: list[tuple[dt.datetime, Verdict]] = []
    fitting: list[dt.datetime] = []
    for at in times:
        if calendar.fits(at, wave):
            verdict: Verdict = "fits"
            fitting.append(at)
        elif calendar.freeze_at(at) is not None:
            verdict = "frozen"
        elif calendar.open_window(at) is not None:
            verdict = "late"  # inside a window, but a wave would run past the cutoff or into a freeze
        else:
            verdict = "outside"
        if at < end:
            triggers.append((at, verdict))
    openings = []
    for window in policy.windows:
        for occurrence in _occurrences(window, start, end):
            assert occurrence.cutoff_at is not None
            latest = occurrence.cutoff_at - wave  # the last instant a wave may start in this opening
            if latest < occurrence.start:
                openings.append(Opening(window, occurrence, "too-short"))
                continue
            first = calendar.next_opening(occurrence.start, wave)
            if first is None or first > latest:
                openings.append(Opening(window, occurrence, "frozen"))
                continue
            index = bisect.bisect_left(fitting, occurrence.start)
            used = fitting[index] if index < len(fitting) and fitting[index] <= latest else None
            openings.append(Opening(window, occurrence, "yes", used))
    needed = None
    if longest is not None:
        needed = longest.duration + policy.timeouts.drain + policy.timeouts.undrain
    figures = Figures(triggers, openings, timeout_minutes, needed, longest)
    _judge(figures, policy, days)
    return figures


def _judge(figures: Figures, policy: Policy, days: int) -> None:
    wave = format_duration(policy.waves.estimate)
    bad = figures.disagreements
    outside, late = figures.of("outside"), figures.of("late")
    if not figures.triggers:
        bad.append(f"(a) the schedule does not fire in {days} days")
    if outside:
        bad.append(f"(a) {len(outside)} trigger(s) fall outside every window (first {utc_text(outside[0])})")
    if late:
        bad.append(f"(a) {len(late)} trigger(s) come too late in their window for a {wave} wave "
                   f"(first {utc_text(late[0])})")
    unused = [o for o in figures.openings if o.usable == "yes" and o.trigger is None]
    if unused:
        bad.append(f"(b) {len(unused)} window opening(s) get no trigger: those windows are never used "
                   f"(first {opening_text(unused[0])})")
    short = [o for o in figures.openings if o.usable == "too-short"]
    if short:
        o = short[0]
        bad.append(f"(b) window {o.occurrence.name} leaves {format_duration(o.window.duration - o.window.cutoff)} "
                   f"before its cutoff: no {wave} wave (waves.estimate) ever fits it")
    if figures.needed is not None and figures.timeout_minutes is not None \
            and figures.timeout_minutes * 60 < figures.needed.total_seconds():
        bad.append(f"(c) timeout-minutes {minutes_text(figures.timeout_minutes)} is shorter than the "
                   f"{minutes_text(figures.needed.total_seconds() / 60)} a window can keep the job busy: a run "
                   "still inside its window is killed mid-wave and leaves its lock")


def utc_text(at: dt.datetime) -> str:
    """An instant as 2026-12-05T21:00Z Sat."""
    return f"{at.astimezone(dt.UTC):%Y-%m-%dT%H:%MZ %a}"


def opening_text(opening: Opening) -> str:
    """An opening in its zone and in UTC."""
    local = opening.occurrence.start.astimezone(zone(opening.window.timezone))
    return f"{opening.occurrence.name} {local:%Y-%m-%dT%H:%M%z %a} = {utc_text(opening.occurrence.start)}"


def minutes_text(value: float) -> str:
    """Minutes without a needless .0."""
    return f"{value:g}" if value != int(value) else str(int(value))


@dataclass(frozen=True)
class Suggestion:
    """UTC cron lines for one window, or why there are none."""

    window: Window
    crons: tuple[str, ...]
    why: str


def _values(expanded: list[Any], full: range) -> list[int]:
    return list(full) if expanded == ["*"] else sorted(int(v) for v in expanded)


def _field(values: Sequence[Any]) -> str:
    return "*" if list(values) == ["*"] else ",".join(str(v) for v in sorted(set(values)))


def suggest(policy: Policy, window: Window, start: dt.datetime) -> Suggestion:
    """Trigger at the opening's latest UTC time over a year: in the season with the smallest UTC offset
    that is the opening itself, in the others it is later by the difference (opening + 1h in a European
    summer), which still leaves time for a wave when the window is long enough."""
    year = _occurrences(window, start, start + dt.timedelta(days=370))
    offsets = sorted({o.start.astimezone(zone(window.timezone)).utcoffset() or dt.timedelta(0) for o in year})
    smallest, spread = offsets[0], offsets[-1] - offsets[0]
    room = window.duration - window.cutoff - policy.waves.estimate
    if spread > room:
        return Suggestion(window, (), f"its opening moves by {format_duration(spread)} in UTC over the year and it "
                          f"leaves {format_duration(max(room, dt.timedelta(0)))} for a wave to start: no UTC time is "
                          "inside it in every season; lengthen the window or shorten the cutoff")
    minutes, hours, doms, months, dows = croniter(window.cron).expanded
    shift = int(smallest.total_seconds() // 60)
    groups: dict[tuple[int, int], set[int]] = {}
    for hour, minute in itertools.product(_values(hours, range(24)), _values(minutes, range(60))):
        day, at = divmod(hour * 60 + minute - shift, 24 * 60)
        groups.setdefault((day, at % 60), set()).add(at // 60)
    if len(groups) > 6:
        return Suggestion(window, (), "it opens at too many times of day for a short schedule")
    lines = []
    for (day, minute), utc_hours in sorted(groups.items()):
        dom, month, dow = _field(doms), _field(months), _field(dows)
        if day:
            if dom != "*" or month != "*":
                return Suggestion(window, (), f"its opening falls on the {'next' if day > 0 else 'previous'} day in "
                                  "UTC and it names days of the month: write the UTC schedule by hand")
            if dow != "*":
                dow = _field([(int(d) + day) % 7 for d in dows])
        lines.append(f"{minute} {_field(sorted(utc_hours))} {dom} {month} {dow}")
    local = ", ".join(f"UTC{_offset(o)}" for o in offsets)
    return Suggestion(window, tuple(lines), f"opens {window.cron} in {window.timezone} ({local}); the latest UTC "
                      f"opening is inside it all year with {format_duration(room - spread)} to spare for a "
                      f"{format_duration(policy.waves.estimate)} wave")


def _offset(delta: dt.timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    h, m = divmod(abs(minutes), 60)
    return f"{sign}{h}" + (f":{m:02d}" if m else "")
