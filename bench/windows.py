"""Benchmark: `MaintenanceCalendar.fits()` with a weekly iCalendar freeze that has run since 2015,
against the same rule starting in 2026 (the baseline), measured in the same run.

    .venv/bin/python bench/windows.py                 # 2,000 calls per round, 5 rounds
    .venv/bin/python bench/windows.py --calls 500 --rounds 3

Both calendars have the same Saturday-night window (Europe/Berlin) and the same freeze, a weekly
Wednesday 06:00-08:00 RRULE with an EXDATE; only DTSTART differs (2015-01-07 or 2026-01-07). Each
call asks about a different instant in November 2026 (as a plan does, wave after wave), so no
per-instant cache answers twice; in each round both calendars run, in turn first. A recurrence is
expanded once per calendar, on its first question: that one-off cost is shown apart ("first call").
The ratio is since-2015 / 2026 per call: about 1 means a rule's age costs nothing per question.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patching.rollout.windows import Freeze, MaintenanceCalendar, Window, build_calendar  # noqa: E402

ICS = """BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//bench//freeze//EN
BEGIN:VEVENT
UID:weekly
SUMMARY:weekly freeze
DTSTART;TZID=Europe/Berlin:{start}T060000
DURATION:PT2H
RRULE:FREQ=WEEKLY;BYDAY=WE
EXDATE;TZID=Europe/Berlin:20261111T060000
END:VEVENT
END:VCALENDAR
"""
WINDOW = Window(name="sat", cron="0 22 * * SAT", duration="6h", timezone="Europe/Berlin", cutoff="30m")
WAVE = dt.timedelta(minutes=45)


def calendar(folder: Path, start: str) -> MaintenanceCalendar:
    ics = folder / f"freeze-{start}.ics"
    ics.write_text(ICS.format(start=start))
    return build_calendar([WINDOW], Freeze(ical=ics, timezone="Europe/Berlin"), "bench")


def instants(calls: int, round_: int) -> list[dt.datetime]:
    # spread over November 2026; each round shifted by a few seconds so every instant is new
    base = dt.datetime(2026, 11, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=7 * round_ + 1)
    step = dt.timedelta(days=30) / calls
    return [base + i * step for i in range(calls)]


def per_call_us(cal: MaintenanceCalendar, ats: list[dt.datetime]) -> float:
    started = time.perf_counter()
    for at in ats:
        cal.fits(at, WAVE)
    return (time.perf_counter() - started) / len(ats) * 1e6


def first_call_us(folder: Path, start: str) -> float:
    cal = calendar(folder, start)
    started = time.perf_counter()
    cal.fits(dt.datetime(2026, 11, 28, 23, 0, 17, tzinfo=dt.UTC), WAVE)
    return (time.perf_counter() - started) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="fits() calls per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per calendar; the median counts (default 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        first_old, first_new = first_call_us(folder, "20150107"), first_call_us(folder, "20260107")
        old, new = calendar(folder, "20150107"), calendar(folder, "20260107")
        answers_old = [old.fits(at, WAVE) for at in instants(200, -1)]
        answers_new = [new.fits(at, WAVE) for at in instants(200, -1)]
        if answers_old != answers_new:
            sys.exit("the two calendars disagree: the benchmark would compare different work")
        times_old, times_new = [], []
        for round_ in range(args.rounds):  # alternating which goes first, so neither always runs warmer
            ats = instants(args.calls, round_)
            shifted = [at + dt.timedelta(microseconds=1) for at in ats]
            if round_ % 2:
                times_new.append(per_call_us(new, shifted))
                times_old.append(per_call_us(old, ats))
            else:
                times_old.append(per_call_us(old, ats))
                times_new.append(per_call_us(new, shifted))
    o, n = statistics.median(times_old), statistics.median(times_new)
    print(f"fits(), {args.calls} instants x {args.rounds} rounds (medians), weekly freeze + a Saturday window:")
    print(f"fits() since-2015 rule: {o:.1f} µs/call, 2026 rule: {n:.1f} µs/call, ratio {o / n:.2f}")
    print(f"first call (expands the recurrence once): since-2015 {first_old / 1000:.2f} ms, "
          f"2026 {first_new / 1000:.2f} ms")


if __name__ == "__main__":
    main()
