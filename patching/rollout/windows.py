"""Maintenance windows and freezes: when a wave may start (DESIGN.md section 5).

A window opens at each time its cron expression fires, in its IANA time zone, and stays open for its
duration, measured in real elapsed time (a 6 h window that crosses a DST change is still 6 h long).
All arithmetic is done in UTC: Python adds a timedelta to a zone-aware datetime on the wall clock,
which would make a wave crossing a DST change an hour too short or too long.
No new wave may start unless its predicted duration ends before the window's *cutoff*, a margin
before the end kept free for rollback. A freeze (date ranges, or the VEVENTs of an iCalendar file)
closes every window it overlaps. With no window configured, the calendar is always open (freezes
still apply).

Wall times that happen twice or not at all (DST). A window opens at the first instant at which its
zone's wall clock reaches the cron's time:
- a time in the hour repeated when the clocks go back (01:30 on 2026-11-01 in America/New_York)
  opens the window once, at its first occurrence (01:30 EDT, 05:30 UTC), not again an hour later;
- a time in the gap when the clocks go forward (02:30 on 2026-03-08 there) opens the window at the
  instant the gap ends (03:00 EDT), when the clock jumps past it; several skipped times (a */15
  cron) all open at that one instant.
This is what cron itself does with fixed-time jobs (run once in a repeated hour, at once after a
skipped one): a nightly window still opens once a night, never before its wall time and as soon as
possible after it. A cron that fires every hour therefore gives no second opening in a repeated
hour. `open_window`, `fits` and `next_opening` all read openings through this one rule
(`_opening`), so whatever `next_opening(t, d)` returns, `fits(that, d)` is true, and
`next_opening(t, d) == t` whenever `fits(t, d)`.

A wave meets a freeze when their half-open intervals overlap: a wave ending just as a freeze
begins is allowed, as one ending exactly at the cutoff is. A zero-length wave counts as 1 µs.
Recurring freezes are expanded once per calendar and kept (sorted UTC starts), so a rule that has
run since 2015 costs a lookup, not a walk from its DTSTART, on every question.
"""

from __future__ import annotations

import bisect
import copy
import datetime as dt
import functools
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter  # type: ignore[import-untyped]
from dateutil.rrule import rrule, rruleset, rrulestr  # type: ignore[import-untyped]
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from infra.model.errors import InputError, Problem
from infra.model.strict import StrictModel

# what `parse_duration` reads, and the pattern the policy's JSON schema gives for a duration
DURATION_PATTERN = r"^(\d+d)?(\d+h)?(\d+m)?(\d+s)?$"
_DURATION = re.compile(DURATION_PATTERN)
# How far ahead `next_opening` looks before it gives up, and at most how many openings it tries.
HORIZON = dt.timedelta(days=400)
_MAX_OCCURRENCES = 5000


MAX_DURATION = dt.timedelta(days=366)  # no window, timeout or soak of a patch run lasts longer than a year


def parse_duration(value: Any) -> dt.timedelta:
    """'4h', '30m', '1h30m', '2d', '90s' or a number of seconds -> timedelta; anything else is an error,
    and so is anything longer than MAX_DURATION."""
    if isinstance(value, dt.timedelta):
        seconds: float = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError("expected a duration like 4h, 30m, 1h30m or 90s")
    elif isinstance(value, int | float):
        if value != value or value < 0:  # NaN, negative
            raise ValueError("a duration cannot be negative")
        seconds = value
    else:
        match = _DURATION.match(value.strip()) if isinstance(value, str) and value.strip() else None
        if not match:
            raise ValueError("expected a duration like 4h, 30m, 1h30m or 90s")
        days, hours, minutes, secs = (int(g[:-1]) if g else 0 for g in match.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if seconds > MAX_DURATION.total_seconds():  # before timedelta(), which overflows on 9999999999d
        raise ValueError(f"longer than {MAX_DURATION.days} days")
    return dt.timedelta(seconds=seconds)


def format_duration(value: dt.timedelta) -> str:
    """timedelta -> the shortest text `parse_duration` reads back ('1h30m', '0s')."""
    total = int(value.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if total >= size:
            parts.append(f"{total // size}{unit}")
            total %= size
    return "".join(parts) or "0s"


Duration = Annotated[
    dt.timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "examples": ["4h", "30m", "1h30m"]}),
]


def _positive_duration(value: dt.timedelta) -> dt.timedelta:
    if value <= dt.timedelta(0):
        raise ValueError("must be longer than 0s")
    return value


# a limit or an interval: 0s would mean "no limit" or "as fast as possible", never what was meant
PositiveDuration = Annotated[Duration, AfterValidator(_positive_duration)]


def zone(name: str) -> ZoneInfo:
    """An IANA time zone by name; ValueError (with the name) when it does not exist."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown IANA time zone {name!r} (e.g. 'Europe/Berlin', 'UTC')") from exc


class Window(StrictModel):
    """One recurring maintenance window."""

    name: str = Field(default="", description="shown in plans and reports")
    cron: str = Field(description="when the window opens: five cron fields (minute hour day month weekday)")
    duration: Duration = Field(description="how long it stays open, e.g. 6h")
    timezone: str = Field(default="UTC", description="IANA time zone the cron expression is read in")
    cutoff: Duration = Field(
        default=dt.timedelta(0), description="no wave may be predicted to end later than this before the window closes"
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError("expected five cron fields: minute hour day-of-month month day-of-week")
        try:  # a valid expression can still name a day that never comes (0 0 30 2 *)
            croniter(value, dt.datetime(2026, 1, 1)).get_next(dt.datetime)
        except (CroniterBadDateError, ValueError, OverflowError):
            raise ValueError("never fires: no date matches it (e.g. February 30)") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        zone(value)
        return value

    @field_validator("duration")
    @classmethod
    def _positive(cls, value: dt.timedelta) -> dt.timedelta:
        if value <= dt.timedelta(0):
            raise ValueError("a window must last longer than 0s")
        return value

    @model_validator(mode="after")
    def _cutoff_inside(self) -> Window:
        if self.cutoff >= self.duration:
            raise ValueError(
                f"cutoff {format_duration(self.cutoff)} leaves no time in a {format_duration(self.duration)} window"
            )
        return self


MIN_YEAR, MAX_YEAR = 2000, 2999  # a freeze outside these years is a typo, and date arithmetic would overflow


class FreezeRange(StrictModel):
    """Whole days (first and last inclusive) in which no wave may run."""

    start: dt.date
    end: dt.date
    reason: str = ""

    @model_validator(mode="after")
    def _ordered(self) -> FreezeRange:
        if self.end.year > MAX_YEAR or self.start.year < MIN_YEAR:
            raise ValueError(f"dates from {MIN_YEAR} to {MAX_YEAR} only")
        if self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        return self


class Freeze(StrictModel):
    """Change freezes: date ranges and/or an iCalendar file of VEVENTs."""

    timezone: str = Field(default="UTC", description="zone of the freeze dates and of floating iCalendar times")
    ranges: list[FreezeRange] = []
    ical: Path | None = Field(default=None, description="iCalendar file; a relative path is read next to the policy")

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        zone(value)
        return value


@dataclass(frozen=True)
class OpenWindow:
    """One occurrence of a window, in UTC. `end` is None for the always-open calendar (no windows configured).

    UTC because a local time in a repeated hour never compares equal to one in another zone (PEP 495).
    """

    name: str
    start: dt.datetime
    end: dt.datetime | None
    cutoff_at: dt.datetime | None

    def time_left(self, at: dt.datetime) -> dt.timedelta | None:
        """Time from `at` until the cutoff (never negative); None when there is no cutoff."""
        if self.cutoff_at is None:
            return None
        return max(self.cutoff_at - at, dt.timedelta(0))


@dataclass(frozen=True)
class FreezePeriod:
    """A freeze: one interval, or a recurring one (an iCalendar RRULE, in local time) when `recurrence` is set."""

    label: str
    start: dt.datetime  # UTC
    length: dt.timedelta  # elapsed time
    recurrence: rruleset | None = None
    # the recurrence's occurrences, expanded once and kept (the rruleset must not change afterwards)
    _expansion: _Expansion | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.recurrence is not None:
            object.__setattr__(self, "_expansion", _Expansion(self.recurrence))

    def overlapping(self, begin: dt.datetime, end: dt.datetime) -> dt.datetime | None:
        """Start (UTC) of an occurrence that overlaps [begin, end), or None."""
        begin, end = _utc(begin), _utc(end)
        if self._expansion is None:
            return self.start if self.start < end and begin < self.start + self.length else None
        starts = self._expansion.through(max(begin, end))
        # the latest occurrence starting at or before `begin` may still be running at `begin`
        last = bisect.bisect_right(starts, begin)
        if last and begin < starts[last - 1] + self.length:
            return starts[last - 1]
        nxt = bisect.bisect_left(starts, begin)
        return starts[nxt] if nxt < len(starts) and starts[nxt] < end else None

    def end_of(self, occurrence: dt.datetime) -> dt.datetime:
        """When the occurrence starting at `occurrence` ends."""
        return occurrence + self.length


# how many occurrences of a recurring freeze `_Expansion` reads at a time, and how far (UTC) an
# occurrence not read yet may start before the last one read (rruleset orders by local wall time)
_BATCH = 256
_ORDER_SLACK = dt.timedelta(days=2)


class _Expansion:
    """A recurring freeze's occurrences as sorted UTC starts, read from the rruleset as far as asked
    and kept: dateutil walks a rule from its DTSTART on every `before`/`after`, which made each
    question about a rule running since 2015 cost hundreds of occurrences."""

    def __init__(self, recurrence: rruleset):
        self._source: Iterator[dt.datetime] = iter(recurrence)
        self.starts: list[dt.datetime] = []
        self._complete_before: dt.datetime | None = None  # every occurrence starting earlier is in `starts`
        self._done = False

    def through(self, at: dt.datetime) -> list[dt.datetime]:
        """The sorted UTC starts, holding at least every occurrence that starts at or before `at`."""
        while not self._done and (self._complete_before is None or self._complete_before <= at):
            batch = list(itertools.islice(self._source, _BATCH))
            self._done = len(batch) < _BATCH
            for occurrence in batch:
                bisect.insort(self.starts, _utc(occurrence))
            if batch:
                self._complete_before = _utc(batch[-1]) - _ORDER_SLACK
        return self.starts


class MaintenanceCalendar:
    """Windows plus freezes: answers whether, and until when, a wave may run."""

    def __init__(self, windows: Sequence[Window], freezes: Sequence[FreezePeriod] = ()):
        self.windows = list(windows)
        self.freezes = list(freezes)

    def freeze_at(self, at: dt.datetime) -> FreezePeriod | None:
        """The freeze in force at `at`, if any."""
        return next((f for f in self.freezes if f.overlapping(at, at + dt.timedelta(microseconds=1))), None)

    def open_window(self, at: dt.datetime) -> OpenWindow | None:
        """The window occurrence containing `at`, or None when outside every window or in a freeze.

        With several windows open at once, the one whose cutoff is latest wins.
        """
        at = _utc(at)
        if self.freeze_at(at):
            return None
        if not self.windows:
            return OpenWindow("always", at, None, None)
        found = [w for w in (_containing(window, at) for window in self.windows) if w is not None]
        return max(found, key=lambda w: w.cutoff_at or at, default=None)

    def fits(self, at: dt.datetime, duration: dt.timedelta) -> bool:
        """Whether a wave starting at `at` and lasting `duration` ends by the cutoff and meets no freeze."""
        at = _utc(at)
        window = self.open_window(at)
        if window is None:
            return False
        if window.cutoff_at is not None and at + duration > window.cutoff_at:
            return False
        return not self._freezes_met(at, duration)

    def next_opening(self, after: dt.datetime, duration: dt.timedelta = dt.timedelta(0)) -> dt.datetime | None:
        """The earliest instant >= `after` at which a wave of `duration` fits (`fits` is true there, and
        this is `after` itself when it fits); None if none within HORIZON."""
        after = _utc(after)
        if self.windows and duration > max(w.duration - w.cutoff for w in self.windows):
            return None  # longer than any window can give
        candidates = []
        if not self.windows:
            candidates.append(self._first_unfrozen(after, None, duration))
        for window in self.windows:
            for occurrence in occurrences(window, after):
                start = self._first_unfrozen(max(after, occurrence.start), occurrence.cutoff_at, duration)
                if start is not None:
                    candidates.append(start)
                    break
        return min((c for c in candidates if c is not None), default=None)

    def _first_unfrozen(
        self, start: dt.datetime, cutoff: dt.datetime | None, duration: dt.timedelta
    ) -> dt.datetime | None:
        # slide the start past every freeze the wave would meet; give up at the cutoff
        start = origin = _utc(start)
        for _ in range(_MAX_OCCURRENCES):
            if (cutoff is not None and start + duration > cutoff) or start - origin > HORIZON:
                return None
            hits = self._freezes_met(start, duration)
            if not hits:
                return start
            start = max(f.end_of(o) for f, o in hits)
        return None

    def _freezes_met(self, start: dt.datetime, duration: dt.timedelta) -> list[tuple[FreezePeriod, dt.datetime]]:
        # the freezes (and their occurrences) a wave [start, start + duration) meets; one `fits` and
        # `next_opening` share, so they agree. A zero-length wave still meets a freeze starting at `start`.
        end = start + max(duration, _TICK)
        return [(f, o) for f in self.freezes if (o := f.overlapping(start, end)) is not None]


_TICK = dt.timedelta(microseconds=1)


def _utc(at: dt.datetime) -> dt.datetime:
    if at.tzinfo is None:
        raise ValueError("window checks need a time zone-aware datetime")
    return at.astimezone(dt.UTC)


def _occurrence(window: Window, start: dt.datetime) -> OpenWindow:
    start = _utc(start)
    end = start + window.duration  # elapsed time: DST changes do not stretch a window
    return OpenWindow(window.name or window.cron, start, end, end - window.cutoff)


def _opening(wall: dt.datetime, tz: ZoneInfo) -> dt.datetime:
    """The instant (UTC) at which a window whose cron fires at the naive local time `wall` opens: the
    first instant the zone's clock reaches `wall` (see the module docstring)."""
    instant = wall.replace(tzinfo=tz).astimezone(dt.UTC)  # fold=0: the first of a repeated time
    if instant.astimezone(tz).replace(tzinfo=None) == wall:
        return instant
    # `wall` is skipped. fold=0 read it with the offset before the gap, which lands past the gap's
    # end; fold=1, with the offset after it, lands before the gap. The gap ends between the two.
    low = int(wall.replace(tzinfo=tz, fold=1).timestamp())
    high = int(instant.timestamp())
    before = _offset(tz, dt.datetime.fromtimestamp(low, dt.UTC))
    while high - low > 1:  # tz offsets change on whole seconds
        middle = (low + high) // 2
        if _offset(tz, dt.datetime.fromtimestamp(middle, dt.UTC)) == before:
            low = middle
        else:
            high = middle
    return dt.datetime.fromtimestamp(high, dt.UTC)


def _offset(tz: ZoneInfo, instant: dt.datetime) -> dt.timedelta:
    offset = instant.astimezone(tz).utcoffset()
    assert offset is not None
    return offset


@functools.lru_cache(maxsize=256)
def _parsed_cron(expression: str) -> Any:
    return croniter(expression, dt.datetime(2000, 1, 1))


def _cron(expression: str, wall: dt.datetime) -> Any:
    """A croniter at the naive local time `wall`: a copy of one parsed once per expression (parsing
    was half the cost of a `fits`); a croniter's own state is its current time alone."""
    times = copy.copy(_parsed_cron(expression))
    times.set_current(wall, force=True)
    return times


def _latest_opening(window: Window, at: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The window's latest opening at or before `at` (UTC), as (naive local cron time, UTC instant)."""
    return _latest_opening_of(window.cron, window.timezone, at)


@functools.lru_cache(maxsize=4096)  # a plan asks `fits` and `next_opening` about the same instants over and over
def _latest_opening_of(cron: str, timezone: str, at: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    tz = zone(timezone)
    # A cron time opening at or before `at` reads at most `at` plus the zone's offset then, and
    # offsets two days either side bound that (no zone has changed by more than a day at once).
    # croniter runs on naive wall times, so DST is left to `_opening`.
    slack = max(_offset(tz, at + dt.timedelta(days=days)) for days in (-2, 0, 2))
    times = _cron(cron, (at + slack).replace(tzinfo=None) + dt.timedelta(seconds=1))
    for _ in range(_MAX_OCCURRENCES):
        # walking back, the first cron time whose opening is not after `at` is the latest one:
        # `_opening` never puts a later wall time at an earlier instant
        wall = times.get_prev(dt.datetime)
        start = _opening(wall, tz)
        if start <= at:
            return wall, start
    raise ValueError(f"window {cron!r}: no opening found before {at.isoformat()}")


def _containing(window: Window, at: dt.datetime) -> OpenWindow | None:
    # the latest opening lasts longest: if it does not contain `at`, no earlier one does
    occurrence = _occurrence(window, _latest_opening(window, at)[1])
    assert occurrence.end is not None
    return occurrence if at < occurrence.end else None


def occurrences(window: Window, after: dt.datetime) -> Iterable[OpenWindow]:
    """The window's occurrences still open at or after `after`, in order: the one containing it, if
    any, then each later opening within HORIZON."""
    tz = zone(window.timezone)
    wall, last = _latest_opening(window, after)
    current = _occurrence(window, last)
    assert current.end is not None
    if after < current.end:
        yield current
    times = _cron(window.cron, wall)
    for _ in range(_MAX_OCCURRENCES):
        start = _opening(times.get_next(dt.datetime), tz)
        if start <= last:  # another skipped time opening at the same instant
            continue
        if start - after > HORIZON:
            return
        last = start
        yield _occurrence(window, start)


def build_calendar(windows: Sequence[Window], freeze: Freeze, source: str) -> MaintenanceCalendar:
    """The calendar for a policy; reads the freeze iCalendar file (InputError naming `freeze.ical` if bad)."""
    tz = zone(freeze.timezone)
    periods = []
    for r in freeze.ranges:
        start = _utc(dt.datetime.combine(r.start, dt.time(), tz))
        end = _utc(dt.datetime.combine(r.end + dt.timedelta(days=1), dt.time(), tz))
        periods.append(FreezePeriod(r.reason or f"freeze {r.start}..{r.end}", start, end - start))
    if freeze.ical is not None:
        periods += read_ical(freeze.ical, tz, source)
    return MaintenanceCalendar(windows, periods)


def read_ical(path: Path, tz: ZoneInfo, source: str) -> list[FreezePeriod]:
    """Every VEVENT of an iCalendar file as a freeze; RRULE/EXDATE recurrences are honoured."""
    import icalendar

    field = "freeze.ical"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError.single(source, field, str(path), f"cannot read the iCalendar file: {exc.strerror}") from exc
    try:
        calendar = icalendar.Calendar.from_ical(data)
    except ValueError as exc:
        raise InputError.single(source, field, str(path), f"not an iCalendar file: {exc}") from exc
    periods: list[FreezePeriod] = []
    problems: list[Problem] = []
    for index, event in enumerate(calendar.walk("VEVENT")):
        label = str(event.get("SUMMARY") or f"{path.name} event {index + 1}")
        try:
            periods.append(_event_period(event, label, tz))
        except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as exc:
            # AttributeError: a property given twice (two RRULE lines) comes back as a list
            problems.append(Problem(source, f"{field} ({path.name}: VEVENT {index + 1})", label,
                                    str(exc) or type(exc).__name__))
    if problems:
        raise InputError(problems)
    return periods


def _event_period(event: Any, label: str, tz: ZoneInfo) -> FreezePeriod:
    if "DTSTART" not in event:
        raise ValueError("VEVENT without DTSTART")
    start = _as_datetime(event["DTSTART"].dt, tz)
    if "DTEND" in event:
        end = _as_datetime(event["DTEND"].dt, tz)
    elif "DURATION" in event:
        end = start + event["DURATION"].dt
    else:
        # RFC 5545 3.6.1: a date-only event without an end lasts one day, a date-time one has no length
        all_day = not isinstance(event["DTSTART"].dt, dt.datetime)
        end = start + (dt.timedelta(days=1) if all_day else dt.timedelta(0))
    if end < start:
        raise ValueError("DTEND is before DTSTART")
    recurrence = None
    if "RRULE" in event:
        recurrence = rruleset()
        recurrence.rrule(_rrule(event["RRULE"], start))
        exdates = event.get("EXDATE")
        for group in exdates if isinstance(exdates, list) else [exdates] if exdates else []:
            for item in group.dts:
                recurrence.exdate(_as_datetime(item.dt, tz))
    return FreezePeriod(label, _utc(start), _utc(end) - _utc(start), recurrence)


def _rrule(recur: Any, start: dt.datetime) -> rrule:
    """An event's RRULE (an icalendar vRecur) as a dateutil rule from `start` (its aware DTSTART).

    RFC 5545 3.3.10: UNTIL takes DTSTART's value type. A DATE (UNTIL=20271231, as all-day events are
    exported) includes that whole day, in DTSTART's zone (the freeze's zone for an all-day or floating
    DTSTART); a floating DATE-TIME is read in that zone too. dateutil takes neither with an aware
    DTSTART, so UNTIL is taken out of the text and put on the parsed rule.
    """
    import icalendar

    untils = recur.get("UNTIL")
    if not untils:
        return rrulestr(recur.to_ical().decode(), dtstart=start)
    if len(untils) != 1:
        raise ValueError("RRULE with more than one UNTIL")
    until = untils[0]
    if isinstance(until, dt.datetime):
        until = until if until.tzinfo else until.replace(tzinfo=start.tzinfo)
    else:  # a DATE: through the end of that day
        until = dt.datetime.combine(until, dt.time.max, start.tzinfo)
    rest = icalendar.vRecur({key: value for key, value in recur.items() if key.upper() != "UNTIL"})
    rule = rrulestr(rest.to_ical().decode(), dtstart=start)
    if not isinstance(rule, rrule):
        raise ValueError("RRULE is not a single rule")
    return rule.replace(until=until)


def _as_datetime(value: dt.date | dt.datetime, tz: ZoneInfo) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=tz)  # floating time: the freeze's zone
    return dt.datetime.combine(value, dt.time(), tz)
