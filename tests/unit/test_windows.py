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
