"""`fleet policy check-schedule` (issue 12 item 3): the workflow's UTC cron and timeout against the policy's
windows (DST included), freezes and timeouts; and the shipped workflow agrees with the example policy."""

import datetime as dt
import shutil
import sys

import pytest
import typer
import yaml

import patching.cli.app as cli
from patching.cli.patch import register
from patching.rollout.policy import load_policy, parse_policy
from patching.rollout.schedule import check, load_workflow, suggest
from patching.rollout.windows import Window
from tests.conftest import ROOT, write_yaml

WORKFLOW = ROOT / ".github/workflows/patch-window.yml"
EXAMPLE = ROOT / "docs/policy.example.yaml"
Y2026 = ("--from", "2026-01-01", "--days", "365")
REPRODUCED = ("--from", "2026-12-02T01:45Z", "--days", "365")  # when issue 12 item 3 was reproduced


@pytest.fixture
def fleet(monkeypatch, capsys):
    """`fleet ARGS...` through patching.cli.app.main (the real exit-code mapping)."""
    app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
    register(app)
    monkeypatch.setattr(cli, "app", app)

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["fleet", *map(str, args)])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        out = capsys.readouterr()
        return exit_.value.code, out.out, out.err

    return run


def workflow(tmp_path, crons=("0 21 * * 6",), timeout=420, name="wf.yml"):
    """A copy of the shipped workflow with another schedule and timeout."""
    data = yaml.safe_load(WORKFLOW.read_text())
    data[True]["schedule"] = [{"cron": c} for c in crons]  # PyYAML reads the key `on` as true
    if timeout is None:
        del data["jobs"]["patch"]["timeout-minutes"]
    else:
        data["jobs"]["patch"]["timeout-minutes"] = timeout
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"name": data["name"], "on": data.pop(True), **data}, sort_keys=False))
    return path


def policy(tmp_path, **changes):
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(changes)
    return write_yaml(tmp_path / "policy.yaml", data)


# ---- the shipped files ------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [None, "2026-01-01", "2026-03-20", "2026-10-20", "2027-06-01"])
def test_the_shipped_workflow_agrees_with_the_example_policy(fleet, start):
    args = ("--from", start) if start else ()
    code, out, err = fleet("policy", "check-schedule", "--policy", EXAMPLE, "--workflow", WORKFLOW, *args)
    assert code == 0, out + err
    assert " 0 outside," in out and "0 too late" in out and " 0 get none" in out and "agree" in out
    assert "timeout-minutes 420 >= 375" in out


def test_the_old_schedule_never_met_the_window(fleet, tmp_path):
    """The schedule issue 12 found: Tue/Thu 02:00 UTC, 300 minutes, against Saturday night in Berlin."""
    old = workflow(tmp_path, crons=("0 2 * * 2,4",), timeout=300)
    code, out, err = fleet("policy", "check-schedule", "--policy", EXAMPLE, "--workflow", old, *REPRODUCED)
    assert code == 1
    # 104 Tuesdays and Thursdays; four fall in the year-end freeze (21 Dec - 3 Jan)
    assert ("(a) 104 trigger(s) in 365 days: 0 inside a window with time for a 40m wave, 100 outside "
            "(first: 2026-12-03T02:00Z Thu), 0 too late for a wave, 4 in a freeze") in out
    assert "(b) 52 window opening(s): 0 get a trigger, 50 get none" in out
    assert "(c) timeout-minutes 300 < 375 = longest window 6h (saturday-night) + drain 10m + undrain 5m" in out
    assert err.count("DISAGREE") == 3
    assert "DISAGREE (a) 100 trigger(s) fall outside every window" in err
    assert "DISAGREE (b) 50 window opening(s) get no trigger" in err
    assert "DISAGREE (c) timeout-minutes 300 is shorter than the 375" in err
    assert "... and 90 more (--all lists every one)" in out
    code, out, _ = fleet("policy", "check-schedule", "--policy", EXAMPLE, "--workflow", old, *REPRODUCED, "--all")
    assert code == 1 and "2026-12-31T02:00Z Thu" not in out and "2026-12-17T02:00Z Thu: outside" in out


def test_suggest_on_the_shipped_policy_is_the_shipped_schedule(fleet, tmp_path):
    old = workflow(tmp_path, crons=("0 2 * * 2,4",), timeout=300)
    code, out, _ = fleet("policy", "check-schedule", "--policy", EXAMPLE, "--workflow", old, *Y2026, "--suggest")
    assert code == 1  # the workflow still disagrees; the suggestion itself passes
    assert '  - cron: "0 21 * * 6"' in out and "timeout-minutes: at least 375" in out
    assert "suggest: (a) 52 trigger(s) in 365 days: 51 inside a window with time for a 40m wave, 0 outside" in out
    assert "suggest: (b) 52 window opening(s): 51 get a trigger, 0 get none, 1 in a freeze" in out
    shipped = load_workflow(WORKFLOW)
    assert shipped.crons == ("0 21 * * 6",) and shipped.timeout_minutes >= 375


# ---- DST, cutoff, freezes ---------------------------------------------------------------------------


def test_a_trigger_at_the_summer_opening_misses_the_winter_window(fleet, tmp_path):
    summer = workflow(tmp_path, crons=("0 20 * * 6",))  # 22:00 CEST; in winter 21:00 CET is 20:00 UTC + 1h
    code, out, err = fleet("policy", "check-schedule", "--policy", EXAMPLE, "--workflow", summer, *Y2026, "--all")
    assert code == 1
    # outside from January to the last Saturday of March, and from the last Sunday of October on
    assert "first: 2026-01-03T20:00Z Sat" in out
    assert "2026-03-21T20:00Z Sat: outside" in out and "2026-03-28T20:00Z Sat: outside" in out
    figures = _figures(summer)
    outside = figures.of("outside")
    assert dt.datetime(2026, 4, 4, 20, tzinfo=dt.UTC) not in outside  # summer: inside
    assert dt.datetime(2026, 10, 31, 20, tzinfo=dt.UTC) in outside  # the first winter Saturday
    assert "(b)" in err  # the winter openings get no trigger


def test_a_trigger_near_the_cutoff_is_too_late_in_summer_only(tmp_path):
    # Sunday 01:00 UTC: summer cutoff 01:15 UTC (a 40m wave does not fit), winter cutoff 02:15 UTC
    figures = _figures(workflow(tmp_path, crons=("0 1 * * 0",)))
    late = figures.of("late")
    assert dt.datetime(2026, 7, 5, 1, tzinfo=dt.UTC) in late
    assert dt.datetime(2026, 1, 4, 1, tzinfo=dt.UTC) in figures.of("fits")
    assert any("too late in their window for a 40m wave" in d for d in figures.disagreements)


def test_triggers_in_a_freeze_are_not_disagreements_and_frozen_openings_need_none(tmp_path):
    figures = _figures(workflow(tmp_path))
    frozen = figures.of("frozen")
    assert frozen == [dt.datetime(2026, 12, 26, 21, tzinfo=dt.UTC)]  # 2027-01-02 is past the horizon
    assert [o.occurrence.start for o in figures.openings if o.usable == "frozen"] == frozen
    assert figures.disagreements == []


def test_a_freeze_starting_during_the_wave_makes_the_trigger_too_late(tmp_path):
    # a freeze from Sunday 2026-06-07 (Berlin) starts 22:00 UTC Saturday: a 40m wave from 21:30 meets it
    path = policy(tmp_path, freeze={"timezone": "Europe/Berlin", "ranges": [{"start": "2026-06-07",
                                                                            "end": "2026-06-07"}]})
    figures = _figures(workflow(tmp_path, crons=("30 21 * * 6",)), path)
    assert figures.of("late") == [dt.datetime(2026, 6, 6, 21, 30, tzinfo=dt.UTC)]


def test_the_timeout_must_cover_the_longest_window_plus_drain_and_undrain(fleet, tmp_path):
    short = workflow(tmp_path, timeout=374)
    code, out, err = fleet("policy", "check-schedule", "--policy", EXAMPLE, "--workflow", short, *Y2026)
    assert code == 1 and "(c) timeout-minutes 374 < 375" in out and err.count("DISAGREE") == 1
    longer = policy(tmp_path, timeouts={"drain": "30m", "undrain": "20m"})
    code, out, err = fleet("policy", "check-schedule", "--policy", longer, "--workflow", workflow(tmp_path),
                           *Y2026)
    assert code == 0 and "(c) timeout-minutes 420 >= 410 = longest window 6h (saturday-night) + drain 30m" in out
    code, out, err = fleet("policy", "check-schedule", "--policy", policy(tmp_path, timeouts={"drain": "1h"}),
                           "--workflow", workflow(tmp_path), *Y2026)
    assert code == 1 and "(c) timeout-minutes 420 < 425" in out


def test_an_unused_window_is_named(fleet, tmp_path):
    windows = yaml.safe_load(EXAMPLE.read_text())["windows"] + [
        {"name": "wednesday", "cron": "0 3 * * WED", "duration": "2h", "timezone": "UTC"}]
    code, out, err = fleet("policy", "check-schedule", "--policy", policy(tmp_path, windows=windows),
                           "--workflow", workflow(tmp_path), *Y2026)
    assert code == 1
    assert "wednesday 2026-01-07T03:00+0000 Wed = 2026-01-07T03:00Z Wed: no trigger" in out
    assert "DISAGREE (b) 50 window opening(s) get no trigger" in err  # 52 Wednesdays, 2 in the freeze


def test_a_window_too_short_for_a_wave_is_named(fleet, tmp_path):
    windows = [{"name": "tiny", "cron": "0 21 * * SAT", "duration": "1h", "timezone": "UTC", "cutoff": "30m"}]
    code, _, err = fleet("policy", "check-schedule", "--policy", policy(tmp_path, windows=windows),
                         "--workflow", workflow(tmp_path), *Y2026)
    assert code == 1 and "window tiny leaves 30m before its cutoff: no 40m wave" in err


def test_no_windows_always_agree_but_say_nothing_bounds_a_run(fleet, tmp_path):
    code, out, _ = fleet("policy", "check-schedule", "--workflow", workflow(tmp_path, crons=("0 2 * * 2,4",)),
                         *Y2026)
    assert code == 0 and "105 inside a window" in out and "nothing stops a run before the job is killed" in out


# ---- --suggest ----------------------------------------------------------------------------------------


def _suggested(window: dict, estimate: str = "40m") -> tuple[str, ...]:
    rollout = parse_policy({"waves": {"estimate": estimate}}, "test")
    return suggest(rollout, Window(**window), dt.datetime(2026, 1, 1, tzinfo=dt.UTC)).crons


@pytest.mark.parametrize(("window", "crons"), [
    ({"cron": "0 22 * * SAT", "duration": "6h", "timezone": "Europe/Berlin", "cutoff": "45m"}, ("0 21 * * 6",)),
    # New York (UTC-5 / UTC-4): 22:00 Friday is 03:00 UTC Saturday in winter, the later of the two
    ({"cron": "0 22 * * FRI", "duration": "4h", "timezone": "America/New_York"}, ("0 3 * * 6",)),
    # a midnight opening falls on the day before in UTC (Berlin is ahead)
    ({"cron": "30 0 * * SUN,WED", "duration": "3h", "timezone": "Europe/Berlin"}, ("30 23 * * 2,6",)),
    # no DST, half-hour offset
    ({"cron": "0 2 * * *", "duration": "2h", "timezone": "Asia/Kolkata"}, ("30 20 * * *",)),
    ({"cron": "0 1,13 * * *", "duration": "3h", "timezone": "UTC"}, ("0 1,13 * * *",)),
])
def test_suggested_cron_lines(window, crons):
    assert _suggested(window) == crons


def test_no_suggestion_for_a_window_shorter_than_the_dst_shift(fleet, tmp_path):
    # 1h30m - 0 cutoff - 40m wave leaves 50m, and the opening moves by 1h in UTC
    assert _suggested({"cron": "0 22 * * SAT", "duration": "1h30m", "timezone": "Europe/Berlin"}) == ()
    windows = [{"name": "short", "cron": "0 22 * * SAT", "duration": "1h30m", "timezone": "Europe/Berlin"}]
    code, _, err = fleet("policy", "check-schedule", "--policy", policy(tmp_path, windows=windows), "--workflow",
                         workflow(tmp_path, timeout=500), *Y2026, "--suggest")
    assert code == 1 and "window short: no cron line: its opening moves by 1h in UTC" in err


def test_every_suggestion_passes_its_own_check(tmp_path):
    for start in ("2026-01-01", "2026-07-01"):
        begin = dt.datetime.fromisoformat(start).replace(tzinfo=dt.UTC)
        for zone_name in ("Europe/Berlin", "America/New_York", "Australia/Sydney", "Asia/Tokyo"):
            path = policy(tmp_path, windows=[{"name": "w", "cron": "0 22 * * SAT", "duration": "6h",
                                              "timezone": zone_name, "cutoff": "45m"}], freeze={})
            rollout, calendar = load_policy(path)
            crons = suggest(rollout, rollout.windows[0], begin).crons
            figures = check(rollout, calendar, crons, 375, begin, 365)
            assert figures.disagreements == [], (zone_name, crons)


# ---- bad input ---------------------------------------------------------------------------------------


def test_bad_input_exits_2_naming_the_field(fleet, tmp_path):
    code, _, err = fleet("policy", "check-schedule", "--policy", EXAMPLE, "--workflow", tmp_path / "missing.yml")
    assert code == 2 and "missing.yml: cannot read file" in err
    code, _, err = fleet("policy", "check-schedule", "--policy", EXAMPLE, "--workflow",
                         workflow(tmp_path, crons=("0 21 * * 6", "0 25 * * *", "0 0 * *")))
    assert code == 2 and "on.schedule[1].cron: not a valid cron expression (value: '0 25 * * *')" in err
    assert "on.schedule[2].cron: expected five cron fields" in err
    code, _, err = fleet("policy", "check-schedule", "--policy", EXAMPLE, "--workflow",
                         workflow(tmp_path, timeout=None))
    assert code == 2 and "jobs.patch.timeout-minutes: missing" in err
    code, _, err = fleet("policy", "check-schedule", "--policy", EXAMPLE, "--workflow",
                         workflow(tmp_path, timeout="${{ vars.T }}"))
    assert code == 2 and "jobs.patch.timeout-minutes: expected a number of minutes" in err
    code, _, err = fleet("policy", "check-schedule", "--policy", tmp_path / "nope.yaml", "--workflow", WORKFLOW,
                         "--from", "tuesday")
    assert code == 2 and "nope.yaml" in err and "--from" in err
    code, _, err = fleet("policy", "check-schedule", "--workflow", WORKFLOW, "--days", "0")
    assert code == 2
    no_schedule = tmp_path / "dispatch.yml"
    no_schedule.write_text("on: {workflow_dispatch: {}}\njobs: {patch: {timeout-minutes: 400}}\n")
    code, _, err = fleet("policy", "check-schedule", "--workflow", no_schedule)
    assert code == 2 and "on.schedule: no schedule" in err
    frequent = workflow(tmp_path, crons=("* * * * *",))
    code, _, err = fleet("policy", "check-schedule", "--workflow", frequent)
    assert code == 2 and "fires more than" in err


def test_the_job_is_patch_or_the_only_one_or_named(tmp_path):
    one = tmp_path / "one.yml"
    one.write_text('on: {schedule: [{cron: "0 21 * * 6"}]}\njobs: {rollout: {timeout-minutes: 400}}\n')
    assert load_workflow(one).job == "rollout"
    two = tmp_path / "two.yml"
    shutil.copy(one, two)
    two.write_text(two.read_text().replace("}}", "}, other: {timeout-minutes: 5}}"))
    assert load_workflow(two, "other").timeout_minutes == 5
    with pytest.raises(Exception, match="which job patches"):
        load_workflow(two)


def _figures(workflow_path, policy_path=EXAMPLE):
    rollout, calendar = load_policy(policy_path)
    flow = load_workflow(workflow_path)
    return check(rollout, calendar, flow.crons, flow.timeout_minutes, dt.datetime(2026, 1, 1, tzinfo=dt.UTC), 365)
