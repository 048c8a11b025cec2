"""Maintenance windows: cron + duration + IANA zone, midnight, DST, cutoff, freezes, iCalendar."""

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from infra.model.errors import InputError
from patching.rollout.policy import load_policy
from patching.rollout.windows import (
    Freeze,
    FreezeRange,
    MaintenanceCalendar,
    Window,
    build_calendar,
    format_duration,
    parse_duration,
)
from tests.conftest import write_yaml

BERLIN = ZoneInfo("Europe/Berlin")
H = dt.timedelta(hours=1)
M = dt.timedelta(minutes=1)


def at(*args: int, tz: ZoneInfo = BERLIN) -> dt.datetime:
    return dt.datetime(*args, tzinfo=tz)


def saturday_night(**kw) -> MaintenanceCalendar:
    # opens Saturday 22:00 Berlin time, 6 h, no new wave in the last 30 min
    window = Window(name="sat", cron="0 22 * * SAT", duration="6h", timezone="Europe/Berlin", cutoff="30m")
    return MaintenanceCalendar([window], **kw)


def test_durations_round_trip():
    assert parse_duration("1h30m") == dt.timedelta(minutes=90)
    assert parse_duration("2d") == dt.timedelta(days=2)
    assert parse_duration(90) == dt.timedelta(seconds=90)
    assert format_duration(dt.timedelta(minutes=90)) == "1h30m"
    assert format_duration(dt.timedelta(0)) == "0s"
    for bad in ("", "4 hours", "1.5h", "-3m", True, -1, "h"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_inside_a_window_that_crosses_midnight():
    cal = saturday_night()
    # 2026-11-28 is a Saturday
    assert cal.open_window(at(2026, 11, 28, 21, 59)) is None
    opened = cal.open_window(at(2026, 11, 28, 22, 0))
    assert opened is not None and opened.start == at(2026, 11, 28, 22, 0)
    after_midnight = cal.open_window(at(2026, 11, 29, 2, 0))
    assert after_midnight is not None and after_midnight.start == at(2026, 11, 28, 22, 0)
    assert after_midnight.end == at(2026, 11, 29, 4, 0)
    assert after_midnight.time_left(at(2026, 11, 29, 2, 0)) == 90 * M  # cutoff at 03:30
    assert cal.open_window(at(2026, 11, 29, 4, 0)) is None  # the end is exclusive
    # the same instant written in UTC is the same answer
    assert cal.open_window(at(2026, 11, 29, 1, 0, tz=ZoneInfo("UTC"))) is not None


def test_a_wave_fits_only_before_the_cutoff():
    cal = saturday_night()
    start = at(2026, 11, 29, 2, 0)
    assert cal.fits(start, 90 * M)
    assert not cal.fits(start, 91 * M)  # would end after 03:30
    assert not cal.fits(at(2026, 11, 29, 3, 45), 1 * M)  # inside the window, past the cutoff
    assert not cal.fits(at(2026, 11, 27, 12, 0), 1 * M)  # a Friday


def test_next_opening_skips_windows_too_short_for_the_wave():
    cal = saturday_night()
    assert cal.next_opening(at(2026, 11, 25, 12, 0)) == at(2026, 11, 28, 22, 0)
    # at 03:00 Sunday, 30 min are left: a 1 h wave waits for next Saturday
    assert cal.next_opening(at(2026, 11, 29, 3, 0), H) == at(2026, 12, 5, 22, 0)
    assert cal.next_opening(at(2026, 11, 29, 3, 0), 20 * M) == at(2026, 11, 29, 3, 0)
    assert cal.next_opening(at(2026, 11, 25, 12, 0), 6 * H) is None  # longer than any window's usable time


def test_dst_change_does_not_stretch_a_window():
    cal = saturday_night()
    # Europe/Berlin leaves DST on Sunday 2026-10-25 at 03:00 -> 02:00: a 6 h window ends at 03:00 local
    window = cal.open_window(at(2026, 10, 24, 23, 0))
    assert window is not None
    assert window.end is not None and window.end - window.start == 6 * H
    assert window.end.astimezone(BERLIN).hour == 3


def test_wave_fit_counts_elapsed_time_across_a_dst_change():
    cal = saturday_night()
    # Berlin enters DST on 2027-03-28 at 02:00 -> 03:00: the window still gives 5h30 of real time
    start = at(2027, 3, 27, 22, 0)
    assert cal.fits(start, 5 * H + 30 * M)
    assert not cal.fits(start, 5 * H + 31 * M)


def test_freeze_ranges_close_windows_and_push_the_next_opening():
    tz = "Europe/Berlin"
    freeze = Freeze(timezone=tz, ranges=[FreezeRange(start="2026-12-05", end="2026-12-06", reason="black friday")])
    cal = build_calendar(saturday_night().windows, freeze, "policy.yaml")
    assert cal.freeze_at(at(2026, 12, 5, 23, 0)).label == "black friday"
    assert cal.open_window(at(2026, 12, 5, 23, 0)) is None
    assert cal.fits(at(2026, 11, 28, 22, 0), H)  # an unfrozen Saturday still fits
    assert cal.next_opening(at(2026, 11, 30, 0, 0)) == at(2026, 12, 12, 22, 0)


def test_a_wave_may_not_run_into_a_freeze():
    freeze = Freeze(ranges=[FreezeRange(start="2026-11-29", end="2026-11-29")])
    cal = build_calendar([], freeze, "policy.yaml")  # no windows: always open, but the freeze holds
    utc = ZoneInfo("UTC")
    assert cal.fits(at(2026, 11, 28, 20, 0, tz=utc), 3 * H)
    assert not cal.fits(at(2026, 11, 28, 22, 0, tz=utc), 3 * H)
    assert cal.next_opening(at(2026, 11, 28, 22, 0, tz=utc), 3 * H) == at(2026, 11, 30, 0, 0, tz=utc)


ICS = """BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//test//freeze//EN
BEGIN:VEVENT
UID:1
SUMMARY:year-end freeze
DTSTART;VALUE=DATE:20261221
DTEND;VALUE=DATE:20270104
END:VEVENT
BEGIN:VEVENT
UID:2
SUMMARY:monthly close
DTSTART;TZID=Europe/Berlin:20261101T000000
DURATION:PT48H
RRULE:FREQ=MONTHLY;BYMONTHDAY=1
EXDATE;TZID=Europe/Berlin:20270201T000000
END:VEVENT
END:VCALENDAR
"""


def test_icalendar_events_and_recurrences_are_freezes(tmp_path):
    ics = tmp_path / "freeze.ics"
    ics.write_text(ICS)
    cal = build_calendar([], Freeze(ical=ics, timezone="Europe/Berlin"), "policy.yaml")
    assert cal.freeze_at(at(2026, 12, 24, 12, 0)).label == "year-end freeze"
    assert cal.freeze_at(at(2027, 1, 4, 0, 0)) is None  # DTEND is exclusive
    assert cal.freeze_at(at(2027, 3, 2, 23, 0)).label == "monthly close"  # recurrence, second day
    assert cal.freeze_at(at(2027, 3, 3, 0, 0)) is None
    assert cal.freeze_at(at(2027, 2, 1, 12, 0)) is None  # EXDATE


def test_bad_icalendar_is_an_input_error_naming_the_field(tmp_path):
    ics = tmp_path / "freeze.ics"
    ics.write_text("BEGIN:VCALENDAR\nBEGIN:VEVENT\nSUMMARY:no start\nEND:VEVENT\nEND:VCALENDAR\n")
    with pytest.raises(InputError) as err:
        build_calendar([], Freeze(ical=ics), "policy.yaml")
    assert "freeze.ical" in str(err.value) and "DTSTART" in str(err.value)
    with pytest.raises(InputError) as err:
        build_calendar([], Freeze(ical=tmp_path / "missing.ics"), "policy.yaml")
    assert "policy.yaml: freeze.ical" in str(err.value)


@pytest.mark.parametrize(("window", "field", "words"), [
    ({"cron": "0 25 * * *", "duration": "2h"}, "windows[0].cron", "five cron fields"),
    ({"cron": "0 0 * * * *", "duration": "2h"}, "windows[0].cron", "five cron fields"),
    ({"cron": "0 22 * * SAT", "duration": "2 hours"}, "windows[0].duration", "duration like"),
    ({"cron": "0 22 * * SAT", "duration": "0s"}, "windows[0].duration", "longer than 0s"),
    ({"cron": "0 22 * * SAT", "duration": "2h", "timezone": "Europe/Berln"}, "windows[0].timezone", "IANA"),
    ({"cron": "0 22 * * SAT", "duration": "2h", "cutoff": "2h"}, "windows[0]", "leaves no time"),
    ({"cron": "0 22 * * SAT", "duraton": "2h"}, "windows[0]", "did you mean 'duration'"),
])
def test_bad_window_syntax_names_the_field(tmp_path, window, field, words):
    path = write_yaml(tmp_path / "policy.yaml", {"windows": [window]})
    with pytest.raises(InputError) as err:
        load_policy(path)
    text = str(err.value)
    assert f"{path}: {field}" in text and words in text, text


def test_naive_datetimes_are_refused():
    with pytest.raises(ValueError):
        saturday_night().open_window(dt.datetime(2026, 11, 28, 23, 0))


def test_window_model_rejects_unknown_keys():
    with pytest.raises(ValidationError):
        Window.model_validate({"cron": "0 22 * * SAT", "duration": "2h", "cuttoff": "1h"})


def test_a_wave_ending_as_a_freeze_begins_fits_and_next_opening_says_so():
    freeze = Freeze(ranges=[FreezeRange(start="2026-11-29", end="2026-11-29")])
    cal = build_calendar([], freeze, "policy.yaml")
    utc = ZoneInfo("UTC")
    start = at(2026, 11, 28, 21, 0, tz=utc)  # ends at midnight, when the freeze begins
    assert cal.fits(start, 3 * H) and cal.next_opening(start, 3 * H) == start
    assert not cal.fits(start + M, 3 * H)
    assert cal.next_opening(start + M, 3 * H) == at(2026, 11, 30, 0, 0, tz=utc)
    # a zero-length wave at the freeze's first instant is in it
    assert not cal.fits(at(2026, 11, 29, 0, 0, tz=utc), dt.timedelta(0))
    assert cal.next_opening(at(2026, 11, 29, 0, 0, tz=utc)) == at(2026, 11, 30, 0, 0, tz=utc)


# --- DST: a wall time that happens twice or not at all opens the window once, at the first instant
# the zone's clock reaches it; `fits` and `next_opening` agree on every instant -----------------

UTC = dt.UTC
NEW_YORK = ZoneInfo("America/New_York")


def daily(cron: str, zone: str = "America/New_York", **kw) -> MaintenanceCalendar:
    kw.setdefault("duration", "1h")
    return MaintenanceCalendar([Window(cron=cron, timezone=zone, **kw)])


def test_a_repeated_wall_time_opens_once_at_its_first_occurrence():
    # 2026-11-01, New York: 02:00 EDT -> 01:00 EST, so 01:30 happens at 05:30 and at 06:30 UTC
    cal = daily("30 1 * * *")
    first = at(2026, 11, 1, 5, 30, tz=UTC)
    assert cal.next_opening(at(2026, 11, 1, 0, 0, tz=NEW_YORK)) == first
    window = cal.open_window(first)
    assert window is not None and window.start == first and window.end == first + H
    assert cal.fits(first, H)
    assert cal.open_window(at(2026, 11, 1, 6, 30, tz=UTC)) is None  # the second 01:30 opens nothing
    assert not cal.fits(at(2026, 11, 1, 6, 30, tz=UTC), M)
    assert cal.next_opening(at(2026, 11, 1, 6, 30, tz=UTC)) == at(2026, 11, 2, 1, 30, tz=NEW_YORK)
    # a window open across the change keeps its elapsed length and covers both 01:xx hours
    long = daily("30 1 * * *", duration="2h", cutoff="30m")
    assert long.fits(at(2026, 11, 1, 6, 0, tz=UTC), 60 * M)  # 01:00 EST, cutoff 07:00 UTC
    assert not long.fits(at(2026, 11, 1, 6, 0, tz=UTC), 61 * M)
    assert long.next_opening(at(2026, 11, 1, 6, 0, tz=UTC), 60 * M) == at(2026, 11, 1, 6, 0, tz=UTC)


def test_a_skipped_wall_time_opens_when_the_gap_ends():
    # 2026-03-08, New York: 02:00 EST -> 03:00 EDT; 02:30 never happens, the window opens at 03:00 EDT
    cal = daily("30 2 * * *")
    gap_end = at(2026, 3, 8, 7, 0, tz=UTC)
    assert cal.next_opening(at(2026, 3, 8, 0, 0, tz=NEW_YORK)) == gap_end
    assert cal.open_window(gap_end - dt.timedelta(seconds=1)) is None
    window = cal.open_window(gap_end)
    assert window is not None and window.start == gap_end and window.end == gap_end + H
    assert cal.fits(gap_end, H) and not cal.fits(gap_end, H + M)
    # every skipped time of a */15 cron opens at that one instant
    frequent = daily("*/15 2 * * *", duration="10m")
    assert frequent.next_opening(at(2026, 3, 8, 6, 50, tz=UTC)) == gap_end
    assert frequent.next_opening(gap_end + 10 * M) == at(2026, 3, 9, 2, 0, tz=NEW_YORK)
    # Santiago skips midnight itself (2026-09-06 00:00 -> 01:00): the window opens at 01:00 local
    santiago = ZoneInfo("America/Santiago")
    midnight = daily("0 0 * * *", "America/Santiago")
    assert midnight.next_opening(at(2026, 9, 5, 12, 0, tz=santiago)) == at(2026, 9, 6, 1, 0, tz=santiago)


def _transitions(name: str, year: int = 2026) -> list[dt.datetime]:
    """The UTC instants at which the zone's offset changed in `year` (they fall on quarter hours)."""
    tz = ZoneInfo(name)
    found = []
    t = dt.datetime(year, 1, 1, tzinfo=UTC)
    offset = t.astimezone(tz).utcoffset()
    while t.year == year:
        if t.astimezone(tz).utcoffset() != offset:
            offset = t.astimezone(tz).utcoffset()
            found.append(next(q for q in (t - H + k * 15 * M for k in range(1, 5))
                              if q.astimezone(tz).utcoffset() == offset))
        t += H
    return found


def _cron_at(wall: dt.datetime) -> str:
    return f"{wall.minute} {wall.hour} * * *"


# 1 h changes north and south, changes at midnight (Santiago), a 30 min change (Lord Howe)
DST_ZONES = ["America/New_York", "Europe/Berlin", "Australia/Sydney", "America/Santiago", "Australia/Lord_Howe"]


@pytest.mark.parametrize("name", DST_ZONES)
def test_fits_and_next_opening_agree_across_every_dst_change(name):
    tz = ZoneInfo(name)
    changes = _transitions(name)
    assert len(changes) == 2, changes
    for change in changes:
        before = (change - M).astimezone(tz).utcoffset()
        after = change.astimezone(tz).utcoffset()
        assert before is not None and after is not None and before != after
        # the wall times repeated (clocks back) or skipped (forward): [first, last)
        first = (change + min(before, after)).replace(tzinfo=None)
        last = (change + max(before, after)).replace(tzinfo=None)
        # cron times before, at the start of, inside, at the end of and after that range
        walls = [first - 30 * M, first, first + (last - first) / 2, last, last + 30 * M]
        calendars = [daily(_cron_at(w), name, duration="2h", cutoff="20m") for w in walls]
        for wall, cal in zip(walls, calendars, strict=True):
            # the rule, independently: the first instant the wall clock reads `wall`, else the change
            expected = wall.replace(tzinfo=tz).astimezone(UTC)
            if expected.astimezone(tz).replace(tzinfo=None) != wall:
                expected = change
            assert cal.next_opening(change - 3 * H) == expected, (name, wall)
        calendars.append(daily("*/20 * * * *", name, duration="15m", cutoff="5m"))
        # every 10 min for 3 h either side, and every 15 min within the hour of the change
        grid = sorted({change + k * 10 * M for k in range(-18, 19)} | {change + k * 15 * M for k in range(-4, 5)})
        for cal in calendars:
            usable = cal.windows[0].duration - cal.windows[0].cutoff
            for wave in (dt.timedelta(0), usable):  # a wave of `usable` fits only at the very opening
                previous = None
                for t in grid:
                    nxt = cal.next_opening(t, wave)
                    where = f"{cal.windows[0].cron} {name} t={t} wave={wave} -> {nxt}"
                    assert nxt is not None and nxt >= t, where
                    assert cal.fits(nxt, wave), where
                    assert (nxt == t) == cal.fits(t, wave), where
                    if previous is not None and t <= previous:  # the earliest fit after the last t is still ahead
                        assert nxt == previous, where
                    previous = nxt


# --- iCalendar: UNTIL as a DATE; a recurrence running for years --------------------------------

def _ics(*events: str) -> str:
    body = "".join(f"BEGIN:VEVENT\nUID:{i}\n{event.strip()}\nEND:VEVENT\n" for i, event in enumerate(events))
    return f"BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//test//freeze//EN\n{body}END:VCALENDAR\n"


def test_an_all_day_rrule_until_a_date_runs_through_that_day(tmp_path):
    ics = tmp_path / "holidays.ics"
    ics.write_text(_ics(
        "SUMMARY:christmas\nDTSTART;VALUE=DATE:20261224\nRRULE:FREQ=YEARLY;UNTIL=20271231",
        # UNTIL on the day of the last occurrence still includes it
        "SUMMARY:new year\nDTSTART;VALUE=DATE:20261231\nRRULE:FREQ=YEARLY;UNTIL=20271231",
        # a floating DATE-TIME UNTIL is read in DTSTART's zone
        "SUMMARY:nightly\nDTSTART;TZID=America/New_York:20261201T220000\nDURATION:PT1H\n"
        "RRULE:FREQ=DAILY;UNTIL=20261203T220000",
    ))
    cal = build_calendar([], Freeze(ical=ics, timezone="Europe/Berlin"), "policy.yaml")
    for year in (2026, 2027):
        assert cal.freeze_at(at(year, 12, 24, 0, 0)).label == "christmas"
        assert cal.freeze_at(at(year, 12, 24, 23, 59)).label == "christmas"
        assert cal.freeze_at(at(year, 12, 23, 23, 59)) is None  # the day in the freeze's zone
        assert cal.freeze_at(at(year, 12, 31, 12, 0)).label == "new year"
    assert cal.freeze_at(at(2028, 12, 24, 12, 0)) is None  # after UNTIL
    assert cal.freeze_at(at(2028, 12, 31, 12, 0)) is None
    assert cal.fits(at(2027, 12, 23, 12, 0), 12 * H) and not cal.fits(at(2027, 12, 23, 12, 0), 12 * H + M)
    assert cal.next_opening(at(2027, 12, 24, 8, 0), H) == at(2027, 12, 25, 0, 0)
    assert cal.freeze_at(at(2026, 12, 3, 22, 30, tz=NEW_YORK)).label == "nightly"
    assert cal.freeze_at(at(2026, 12, 4, 22, 30, tz=NEW_YORK)) is None


def test_a_freeze_recurring_since_2015_answers_like_a_new_one(tmp_path):
    # a weekly Wednesday freeze 06:00-08:00 Berlin time since 2015, and the same rule from 2026 on
    old, new = tmp_path / "old.ics", tmp_path / "new.ics"
    rule = "DURATION:PT2H\nRRULE:FREQ=WEEKLY;BYDAY=WE\nEXDATE;TZID=Europe/Berlin:20261111T060000"
    old.write_text(_ics(f"SUMMARY:weekly\nDTSTART;TZID=Europe/Berlin:20150107T060000\n{rule}"))
    new.write_text(_ics(f"SUMMARY:weekly\nDTSTART;TZID=Europe/Berlin:20260107T060000\n{rule}"))
    window = Window(cron="0 5 * * *", duration="4h", timezone="Europe/Berlin")
    since_2015 = build_calendar([window], Freeze(ical=old, timezone="Europe/Berlin"), "policy.yaml")
    since_2026 = build_calendar([window], Freeze(ical=new, timezone="Europe/Berlin"), "policy.yaml")
    # asked out of order: late first, then back to 2015 (the expansion is kept, and must hold both)
    assert since_2015.freeze_at(at(2026, 11, 4, 7, 0)).label == "weekly"
    assert since_2015.freeze_at(at(2015, 1, 7, 7, 59)).label == "weekly"
    assert since_2015.freeze_at(at(2015, 1, 7, 8, 0)) is None
    assert since_2015.freeze_at(at(2014, 12, 31, 7, 0)) is None  # before DTSTART
    assert since_2015.freeze_at(at(2020, 7, 1, 6, 0)).label == "weekly"  # summer time, years on
    assert since_2015.freeze_at(at(2036, 7, 2, 6, 0)).label == "weekly"  # well past what was read so far
    for cal in (since_2015, since_2026):
        assert cal.freeze_at(at(2026, 11, 11, 7, 0)) is None  # EXDATE
        assert not cal.fits(at(2026, 11, 4, 5, 0), 61 * M)  # would run into 06:00
        assert cal.fits(at(2026, 11, 4, 5, 0), 60 * M)  # ends as the freeze begins
        assert cal.next_opening(at(2026, 11, 4, 5, 0), 60 * M) == at(2026, 11, 4, 5, 0)
        assert cal.next_opening(at(2026, 11, 4, 5, 31), 30 * M) == at(2026, 11, 4, 8, 0)
        assert cal.next_opening(at(2026, 11, 11, 5, 30), 3 * H) == at(2026, 11, 11, 5, 30)
    day = at(2026, 10, 27, 12, 0, tz=UTC)
    for minutes in range(0, 60 * 36, 20):  # around the first Wednesday after the October DST change
        t = day + minutes * M
        assert since_2015.fits(t, 30 * M) == since_2026.fits(t, 30 * M), t
        assert since_2015.next_opening(t, 30 * M) == since_2026.next_opening(t, 30 * M), t


def test_a_finite_recurrence_ends(tmp_path):
    ics = tmp_path / "three.ics"
    ics.write_text(_ics("SUMMARY:three\nDTSTART;TZID=Europe/Berlin:20260107T060000\nDURATION:PT2H\n"
                        "RRULE:FREQ=WEEKLY;COUNT=3"))
    cal = build_calendar([], Freeze(ical=ics, timezone="Europe/Berlin"), "policy.yaml")
    assert cal.freeze_at(at(2026, 1, 21, 7, 0)).label == "three"
    assert cal.freeze_at(at(2026, 1, 28, 7, 0)) is None
    assert cal.next_opening(at(2026, 1, 21, 7, 0), 3 * H) == at(2026, 1, 21, 8, 0)
