"""`fleet plan`, `fleet patch ...`, `fleet policy schema`: exit codes, and bad input stopping everything
before a host action exists (the Actions factory is replaced by a spy that records every call)."""

import datetime as dt
import json
import sys

import pytest
import typer
import yaml

import patching.cli.app as cli
import patching.cli.patch as cli_patch
from patching.cli.patch import register
from patching.journal.store import Journal
from patching.rollout import actions as host_actions
from tests.conftest import write_yaml
from tests.unit.fakefleet import FakeFleet


def host(pool: str, site: str, ring: int = 1, **extra) -> dict:
    return {"ansible_host": "127.0.0.1", "fleet_pool": pool, "fleet_site": site, "fleet_site_kind": "onprem",
            "fleet_patch_ring": ring, "fleet_serving_port": 8000, "fleet_max_unavailable": 1,
            "fleet_min_serving": 1, "fleet_lb": {"kind": "haproxy", "api": "127.0.0.1:9999", "backend": pool,
                                                 "server": "x"}} | extra


@pytest.fixture
def inventory(tmp_path):
    hosts = {"a1": host("a", "s1", 0), "a2": host("a", "s1"), "a3": host("a", "s1"), "b1": host("b", "s2", 0),
             "b2": host("b", "s2")}
    return write_yaml(tmp_path / "inventory.yml", {"all": {"hosts": hosts}})


@pytest.fixture
def spy(monkeypatch):
    """Replaces the Actions factory: records calls and hands out fake hosts (FakeFleet)."""
    calls = []
    fleets = {}

    def make_actions(inventory, *, work_dir):
        calls.append(inventory.selected)
        key = str(work_dir)
        if key not in fleets:
            fleets[key] = FakeFleet.fresh(inventory)
        return fleets[key]

    monkeypatch.setattr(cli_patch, "make_actions", make_actions)
    return calls, fleets


@pytest.fixture
def fleet(monkeypatch, capsys):
    """Runs `fleet ARGS...` through patching.cli.app.main (the real exit-code mapping) with our commands."""
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


@pytest.fixture
def release(root):
    return root / "releases/2026-11.yaml"


def run_args(release, inventory, tmp_path, *extra):
    return ("patch", "run", "--release", release, "-i", inventory, "--journal", tmp_path / "j/journal.db", *extra)


# ---- bad input: exit 2, before any host action exists --------------------------------------------


def bad_bundle(tmp_path, bundle_data):
    bundle_data["serving"]["image"] = "vllm/vllm-openai:latest"
    return write_yaml(tmp_path / "bad-bundle.yaml", bundle_data), None, None, None, "serving.image"


def mismatched_bundle(tmp_path, bundle_data):
    bundle_data["fabric_manager"] = "580.82.07"  # != driver: the compatibility rules refuse it
    return write_yaml(tmp_path / "fm.yaml", bundle_data), None, None, None, "fabric_manager"


def missing_var_inventory(tmp_path, bundle_data):
    bad = host("a", "s1")
    del bad["fleet_pool"]
    return None, write_yaml(tmp_path / "bad-inv.yml", {"all": {"hosts": {"a1": bad}}}), None, None, \
        "a1.fleet_pool"


def unparsable_inventory(tmp_path, bundle_data):
    path = tmp_path / "broken.yml"
    path.write_text("all:\n  hosts: [\n")
    return None, path, None, None, "Unable to parse"


def unknown_policy_key(tmp_path, bundle_data):
    return None, None, write_yaml(tmp_path / "p.yaml", {"budgets": {"per_waves": 1}}), None, "did you mean 'per_wave'"


def bad_window(tmp_path, bundle_data):
    policy = {"windows": [{"cron": "0 22 * * SAT", "duration": "6h", "timezone": "Europe/Berln"}]}
    return None, None, write_yaml(tmp_path / "p.yaml", policy), None, "windows[0].timezone"


def bad_cron(tmp_path, bundle_data):
    policy = {"windows": [{"cron": "every saturday", "duration": "6h"}]}
    return None, None, write_yaml(tmp_path / "p.yaml", policy), None, "windows[0].cron"


def missing_ical(tmp_path, bundle_data):
    return None, None, write_yaml(tmp_path / "p.yaml", {"freeze": {"ical": "nope.ics"}}), None, "freeze.ical"


def unknown_canary(tmp_path, bundle_data):
    return None, None, write_yaml(tmp_path / "p.yaml", {"canary": {"hosts": ["a9"]}}), None, "canary.hosts[0]"


def unknown_limit(tmp_path, bundle_data):
    return None, None, None, ["a1", "c7"], "--limit: matches no host or group"


@pytest.mark.parametrize("case", [bad_bundle, mismatched_bundle, missing_var_inventory, unparsable_inventory,
                                  unknown_policy_key, bad_window, bad_cron, missing_ical, unknown_canary,
                                  unknown_limit], ids=lambda f: f.__name__)
@pytest.mark.parametrize("command", ["run", "plan"])
def test_bad_input_exits_2_before_any_action(fleet, spy, tmp_path, release, inventory, bundle_data, case, command):
    bundle, inv, policy, limit, words = case(tmp_path, bundle_data)
    journal = tmp_path / "j/journal.db"
    args = ["--release", bundle or release, "-i", inv or inventory, "--journal", journal]
    args += ["--policy", policy] if policy else []
    for pattern in limit or []:
        args += ["--limit", pattern]
    code, _, err = fleet(*(["patch", "run"] if command == "run" else ["plan"]), *args)
    assert code == 2, err
    assert words in err, err
    assert spy[0] == [] and not journal.exists()  # no Actions were made, no journal was opened


def test_every_problem_is_reported_at_once(fleet, spy, tmp_path, inventory, bundle_data):
    bundle = write_yaml(tmp_path / "b.yaml", bundle_data | {"release": "November"})
    policy = write_yaml(tmp_path / "p.yaml", {"rollback": "never"})
    code, _, err = fleet("patch", "run", "--release", bundle, "-i", inventory, "--policy", policy,
                         "--limit", "zz9", "--journal", tmp_path / "journal.db")
    assert code == 2
    assert "release" in err and "rollback" in err and "zz9" in err


# ---- plan, dry run, schema ----------------------------------------------------------------------


def only_reads(spy) -> bool:
    return all(action == "read" for fake in spy[1].values() for action, _, _ in fake.calls)


def test_plan_reads_the_hosts_and_writes_json(fleet, spy, tmp_path, release, inventory):
    out = tmp_path / "plan.json"
    code, stdout, _ = fleet("plan", "--release", release, "-i", inventory, "-o", out, "--journal",
                            tmp_path / "none.db")
    assert code == 0 and "canary" in stdout and "Plan: release 2026-11" in stdout
    plan = json.loads(out.read_text())
    assert plan["waves"][0]["hosts"] == ["a1", "b1"] and len(spy[0]) == 1 and only_reads(spy)
    # what the hosts run, read from them: the real version change, not "unknown"
    assert {h["current"] for h in plan["hosts"].values()} == {"2026-10"} and plan["diffs"]["2026-10"]
    assert plan["seen"]["a2"] == {"reachable": True, "release": "2026-10", "digest": None, "lb_state": "serving"}
    assert "manifest unknown" not in stdout and "2026-10" in stdout


def test_plan_shows_the_hosts_it_plans_around(fleet, spy, monkeypatch, tmp_path, release, inventory):
    original = cli_patch.make_actions

    def with_a3_drained(inv, *, work_dir):
        fake = original(inv, work_dir=work_dir)
        fake.hosts["a3"]["lb"] = "drained"
        return fake

    monkeypatch.setattr(cli_patch, "make_actions", with_a3_drained)
    code, stdout, _ = fleet("plan", "--release", release, "-i", inventory, "-o", tmp_path / "p.json",
                            "--journal", tmp_path / "none.db")
    assert code == 0 and "Out of service now: 1 host(s)" in stdout and "load balancer: drained" in stdout
    assert json.loads((tmp_path / "p.json").read_text())["unhealthy"] == {"a3": "load balancer: drained"}


def test_plan_offline_reads_no_host(fleet, spy, tmp_path, release, inventory):
    code, stdout, _ = fleet("plan", "--release", release, "-i", inventory, "--offline", "--journal",
                            tmp_path / "none.db")
    assert code == 0 and "Plan: release 2026-11" in stdout and spy[0] == []


def test_dry_run_prints_the_plan_and_stops(fleet, spy, tmp_path, release, inventory):
    code, stdout, _ = fleet(*run_args(release, inventory, tmp_path, "--dry-run"))
    assert code == 0 and "Plan: release 2026-11" in stdout
    assert only_reads(spy) and not (tmp_path / "j/journal.db").exists()


# ---- the approved plan --------------------------------------------------------------------------


def approve(fleet, tmp_path, release, inventory, *extra):
    out = tmp_path / "approved.json"
    code, _, err = fleet("plan", "--release", release, "-i", inventory, "-o", out, "--journal",
                         tmp_path / "j/journal.db", *extra)
    assert code == 0, err
    return out


def test_run_with_plan_executes_exactly_the_approved_plan(fleet, spy, tmp_path, release, inventory):
    approved = approve(fleet, tmp_path, release, inventory)
    code, _, err = fleet(*run_args(release, inventory, tmp_path, "--plan", approved))
    assert code == 0, err
    record = Journal(tmp_path / "j/journal.db").runs()[0]
    assert record.plan == json.loads(approved.read_text())
    started = next(e for e in Journal(tmp_path / "j/journal.db").of_run(record.id).events() if e.kind == "run")
    assert started.data["approved_plan"] is True


def test_run_with_plan_refuses_when_the_fleet_changed_unsafely(fleet, spy, tmp_path, release, inventory):
    approved = approve(fleet, tmp_path, release, inventory)
    [fake] = spy[1].values()
    fake.hosts["a2"]["lb"] = "drained"  # someone took a2 out since: pool a has less room
    fake.hosts["b2"]["installed"] = "2026-11"  # and b2 was patched by hand
    fake.calls.clear()
    code, _, err = fleet(*run_args(release, inventory, tmp_path, "--plan", approved))
    assert code == 2
    assert "a2 was serving when planned and is not now" in err and "seen.a2" in err
    assert "b2 ran 2026-10 when planned and runs 2026-11 now" in err
    assert only_reads(spy) and Journal(tmp_path / "j/journal.db").runs() == []


def test_run_with_plan_refuses_another_policy_or_bundle(fleet, spy, tmp_path, release, inventory):
    approved = approve(fleet, tmp_path, release, inventory)
    policy = write_yaml(tmp_path / "p.yaml", {"waves": {"size": 1}})
    code, _, err = fleet(*run_args(release, inventory, tmp_path, "--plan", approved, "--policy", policy))
    assert code == 2 and "policy_digest" in err and "not the one that cut the plan's waves" in err
    data = json.loads(approved.read_text())
    data["bundle_digest"] = "0" * 64
    approved.write_text(json.dumps(data))
    code, _, err = fleet(*run_args(release, inventory, tmp_path, "--plan", approved))
    assert code == 2 and "bundle_digest" in err and Journal(tmp_path / "j/journal.db").runs() == []


def test_run_with_an_offline_or_unreadable_plan_is_bad_input(fleet, spy, tmp_path, release, inventory):
    offline = approve(fleet, tmp_path, release, inventory, "--offline")
    code, _, err = fleet(*run_args(release, inventory, tmp_path, "--plan", offline))
    assert code == 2 and "without reading the hosts (--offline)" in err
    junk = tmp_path / "junk.json"
    junk.write_text("[1, 2")
    code, _, err = fleet(*run_args(release, inventory, tmp_path, "--plan", junk))
    assert code == 2 and "junk.json" in err and "not JSON" in err


def test_policy_schema(fleet):
    code, stdout, _ = fleet("policy", "schema")
    assert code == 0 and "rollback" in json.loads(stdout)["properties"]


# ---- refusals: exit 3 ---------------------------------------------------------------------------


def test_run_in_a_freeze_is_refused_unless_ignore_window(fleet, spy, tmp_path, release, inventory):
    today = dt.datetime.now(dt.UTC).date()
    policy = write_yaml(tmp_path / "p.yaml", {"freeze": {"ranges": [
        {"start": str(today - dt.timedelta(days=1)), "end": str(today + dt.timedelta(days=1)), "reason": "audit"}]}})
    code, _, err = fleet(*run_args(release, inventory, tmp_path, "--policy", policy))
    assert code == 3 and "freeze in force (audit)" in err and spy[0] == []
    code, _, err = fleet(*run_args(release, inventory, tmp_path, "--policy", policy, "--ignore-window"))
    assert code == 0, err


def test_run_outside_every_window_is_refused(fleet, spy, tmp_path, release, inventory):
    now = dt.datetime.now(dt.UTC)
    later = now + dt.timedelta(hours=3)
    policy = write_yaml(tmp_path / "p.yaml", {"windows": [
        {"cron": f"{later.minute} {later.hour} * * *", "duration": "1h"}]})
    code, _, err = fleet(*run_args(release, inventory, tmp_path, "--policy", policy))
    assert code == 3 and "outside every maintenance window; next opening" in err and spy[0] == []


def test_locked_journal_refuses_a_second_run(fleet, spy, tmp_path, release, inventory):
    journal = Journal(tmp_path / "j/journal.db")
    journal.lock.acquire("someone else")
    code, _, err = fleet(*run_args(release, inventory, tmp_path))
    assert code == 3 and "another run holds the journal lock: someone else" in err and spy[0] == []
    journal.lock.release()


# ---- runs end to end with fake hosts ------------------------------------------------------------


def test_run_status_and_reports(fleet, spy, tmp_path, release, inventory):
    code, stdout, err = fleet(*run_args(release, inventory, tmp_path, "--report-dir", tmp_path / "rep"))
    assert code == 0, err
    assert "run 1: done" in stdout and spy[0] == [("a1", "a2", "a3", "b1", "b2")]
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"report.json", "junit.xml", "summary.md",
                                                               "events.jsonl"}
    code, stdout, _ = fleet("patch", "status", "--journal", tmp_path / "j/journal.db")
    assert code == 0 and "2026-11" in stdout and "done" in stdout
    code, stdout, _ = fleet("patch", "status", "--json", "--journal", tmp_path / "j/journal.db")
    assert json.loads(stdout)["run"]["status"] == "done"
    # the second run finds every host on the bundle and has nothing to do
    code, stdout, _ = fleet(*run_args(release, inventory, tmp_path))
    assert code == 0 and "run 2: done: 5 of 5 selected host(s) on 2026-11 (5 already on)" in stdout


def test_previous_bundle_comes_from_releases_dir_or_the_journal(fleet, spy, tmp_path, release, inventory):
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / release.name).write_text(release.read_text())  # 2026-11 without 2026-10 beside it
    code, _, err = fleet(*run_args(lone / release.name, inventory, tmp_path))
    assert code == 2 and "--releases-dir" in err and "no manifest of bundle 2026-10" in err, err
    [fake] = spy[1].values()
    assert {action for action, _, _ in fake.calls} == {"read"}, "nothing but reads before the refusal"
    assert Journal(tmp_path / "j/journal.db").runs() == []
    # --releases-dir names where 2026-10.yaml is ...
    code, stdout, err = fleet("patch", "run", "--release", lone / release.name, "-i", inventory,
                              "--journal", tmp_path / "k/journal.db", "--releases-dir", release.parent)
    assert code == 0 and "run 1: done: 5 of 5 selected host(s) on 2026-11 (5 patched)" in stdout, err
    # ... or an earlier run of the same journal recorded 2026-10's manifest
    code, _, err = fleet(*run_args(release.parent / "2026-10.yaml", inventory, tmp_path))
    assert code == 0, err
    code, stdout, err = fleet(*run_args(lone / release.name, inventory, tmp_path))
    assert code == 0 and "run 2: done: 5 of 5 selected host(s) on 2026-11 (5 patched)" in stdout, err


def test_failed_rollout_exits_1_and_resume_keeps_saying_so(fleet, spy, tmp_path, release, inventory, monkeypatch):
    original = FakeFleet.fresh

    def slow_canary(inventory, **kw):
        fake = original(inventory, **kw)
        fake.slow[("a1", "2026-11")] = 900.0
        return fake

    monkeypatch.setattr(FakeFleet, "fresh", slow_canary)
    code, _, err = fleet(*run_args(release, inventory, tmp_path))
    assert code == 1 and "failed" in err and "rolled back" in err
    code, _, err = fleet("patch", "resume", "--journal", tmp_path / "j/journal.db")
    assert code == 1
    code, _, err = fleet("patch", "abort", "--journal", tmp_path / "j/journal.db")
    assert code == 2 and "already failed" in err


def short_window(tmp_path):
    """A window open now for 39 minutes, and a journal whose history predicts 5 min for a wave of 2 hosts
    (the canary) and 50 min for a wave of 1: the canary fits, the next wave does not."""
    journal = Journal(tmp_path / "j/journal.db")
    plan = {"waves": [{"index": 0, "kind": "wave", "hosts": ["x1", "x2"], "predicted_s": 1},
                      {"index": 1, "kind": "wave", "hosts": ["x3"], "predicted_s": 1}], "skipped": {}}
    run = journal.create_run(release="2026-10", owner="t", bundle_path="b", bundle={}, releases_dir=".",
                             inventory=[], limit=None, policy_path=None, policy={}, plan=plan)
    journal.db.execute("UPDATE waves SET status = 'done', started_at = 0, finished_at = CASE idx WHEN 0 THEN 300"
                       " ELSE 3000 END WHERE run_id = ?", (run.id,))
    run.set_run_status("done", finished=True)
    journal.close()
    now = dt.datetime.now(dt.UTC)
    return write_yaml(tmp_path / "p.yaml", {"windows": [{"cron": f"{now.minute} {now.hour} * * *",
                                                          "duration": "39m"}]})


def test_paused_run_resumes_or_aborts(fleet, spy, tmp_path, release, inventory):
    policy = short_window(tmp_path)
    code, _, err = fleet(*run_args(release, inventory, tmp_path, "--policy", policy))
    assert code == 3 and "paused before wave 1" in err and "`fleet patch resume` continues this run" in err
    code, _, err = fleet(*run_args(release, inventory, tmp_path, "--ignore-window"))
    assert code == 3 and "run 2 (2026-11) is paused" in err
    journal = tmp_path / "j/journal.db"
    code, _, err = fleet("patch", "resume", "--journal", journal, "--ignore-window")
    assert code == 0, err
    assert spy[0] == [("a1", "a2", "a3", "b1", "b2")] * 2


def test_status_paused_answers_by_exit_code(fleet, spy, tmp_path, release, inventory):
    journal = tmp_path / "j/journal.db"
    assert fleet("patch", "status", "--paused", "--quiet", "--journal", journal) == (1, "", "")
    policy = short_window(tmp_path)
    assert fleet(*run_args(release, inventory, tmp_path, "--policy", policy))[0] == 3
    code, stdout, _ = fleet("patch", "status", "--paused", "--journal", journal)
    assert code == 0 and "run 2 (2026-11) is paused" in stdout
    assert fleet("patch", "resume", "--journal", journal, "--ignore-window")[0] == 0
    assert fleet("patch", "status", "--paused", "-q", "--journal", journal)[0] == 1


def test_abort_closes_a_paused_run(fleet, spy, tmp_path, release, inventory):
    policy = short_window(tmp_path)
    assert fleet(*run_args(release, inventory, tmp_path, "--policy", policy))[0] == 3
    journal = tmp_path / "j/journal.db"
    code, stdout, _ = fleet("patch", "abort", "--journal", journal)
    assert code == 0 and "run 2 aborted (it was paused" in stdout
    assert Journal(journal).run(2).status == "aborted"


def test_abort_rollback_of_a_paused_run_rolls_back_now(fleet, spy, tmp_path, release, inventory):
    policy = short_window(tmp_path)
    assert fleet(*run_args(release, inventory, tmp_path, "--policy", policy))[0] == 3
    journal = tmp_path / "j/journal.db"
    patched = {h for h, s in Journal(journal).of_run(2).latest_states().items() if s == "done"}
    assert patched, "the canary wave ran before the pause"
    code, stdout, err = fleet("patch", "abort", "--rollback", "--journal", journal)
    assert code == 1 and "abort and rollback recorded for run 2" in stdout, err
    states = Journal(journal).of_run(2).latest_states()
    assert {h for h, s in states.items() if s == "rolled_back"} == patched
    assert Journal(journal).run(2).status == "aborted"
    fake = spy[1][str(journal.parent)]
    assert all(fake.hosts[h]["installed"] == "2026-10" and fake.hosts[h]["lb"] == "serving" for h in patched)


def test_without_host_actions_a_run_explains_itself(fleet, tmp_path, release, inventory, monkeypatch):
    def unavailable(*args, **kwargs):
        raise host_actions.ActionsUnavailable("host actions unavailable: ansible_runner is missing")

    monkeypatch.setattr(cli_patch, "make_actions", unavailable)
    code, _, err = fleet(*run_args(release, inventory, tmp_path))
    assert code == 1 and "ansible_runner is missing" in err
    assert Journal(tmp_path / "j/journal.db").lock.info() is None  # the lock was given back


def test_ansible_failing_to_start_is_an_error_not_unreachable_hosts(fleet, spy, tmp_path, release, inventory,
                                                                     monkeypatch):
    def no_ansible(self, hosts):
        raise host_actions.ActionsUnavailable("ansible could not run (rc 127): ansible not found")

    monkeypatch.setattr(FakeFleet, "read_hosts", no_ansible)
    code, stdout, err = fleet(*run_args(release, inventory, tmp_path))
    assert code == 1 and "ansible could not run" in err and "no run was started" in err
    assert "skipped" not in stdout + err
    journal = Journal(tmp_path / "j/journal.db")
    assert journal.runs() == [] and journal.lock.info() is None


def test_status_and_resume_need_a_journal(fleet, tmp_path):
    for command in ("status", "resume", "abort"):
        code, _, err = fleet("patch", command, "--journal", tmp_path / "none.db")
        assert code == 2 and "no journal here" in err


def test_resume_refuses_when_plan_hosts_left_the_inventory(fleet, spy, tmp_path, release, inventory):
    fleet(*run_args(release, inventory, tmp_path))
    smaller = write_yaml(tmp_path / "small.yml", {"all": {"hosts": {"a1": host("a", "s1", 0)}}})
    code, _, err = fleet("patch", "resume", "--journal", tmp_path / "j/journal.db", "-i", smaller)
    assert code == 2 and "are not in the inventory" in err
    assert yaml.safe_load(smaller.read_text())


def test_an_inventory_that_turns_host_key_checking_off_is_refused_unless_allowed(fleet, spy, tmp_path, release):
    hosts = {"a1": host("a", "s1", 0, ansible_ssh_common_args="-o StrictHostKeyChecking=no"), "a2": host("a", "s1")}
    inventory = write_yaml(tmp_path / "lax.yml", {"all": {"hosts": hosts}})
    code, _, err = fleet(*run_args(release, inventory, tmp_path, "--ignore-window"))
    assert code == 2 and "a1.ansible_ssh_common_args" in err and "turns SSH host-key checking off" in err
    assert spy[0] == [] and not (tmp_path / "j/journal.db").exists()
    code, _, err = fleet(*run_args(release, inventory, tmp_path, "--ignore-window", "--allow-unverified-host-keys"))
    assert code == 0, err
    assert "WARNING: SSH host keys are NOT verified for 1 host(s): a1" in err and spy[0]
