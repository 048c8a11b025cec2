"""ci/patch-window.sh (issue 12 item 3): what the scheduled workflow runs, with a stub `fleet` that records
its argv and answers scripted exit codes and output; and `fleet patch status --brief`, what the script reads."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import typer

import patching.cli.app as cli
from patching.cli.patch import register
from patching.journal.store import Journal
from tests.conftest import ROOT

SCRIPT = ROOT / "ci/patch-window.sh"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")

STUB = textwrap.dedent("""\
    #!{python}
    # A stand-in for `fleet`: records argv, answers from the spec by subcommand ("patch status", ...).
    import json, os, sys
    args = sys.argv[1:]
    key = " ".join(args[:2])
    with open(os.environ["STUB_LOG"], "a") as fh:
        fh.write(json.dumps(args) + "\\n")
    spec = json.load(open(os.environ["STUB_SPEC"]))
    answers = spec.get(key, {{"rc": 0}})
    if isinstance(answers, list):  # one answer per call, the last one repeats
        calls = [json.loads(line)[:2] for line in open(os.environ["STUB_LOG"])]
        answers = answers[min(calls.count(args[:2]), len(answers)) - 1]
    sys.stdout.write(answers.get("out", ""))
    sys.stderr.write(answers.get("err", ""))
    sys.exit(answers.get("rc", 0))
""")


def brief(run="none", status="none", lock="free", release="2026-11"):
    return {"out": f"run={run} status={status} release={release if run != 'none' else 'none'} lock={lock}\n"}


def script(tmp_path, spec, **env):
    """Runs ci/patch-window.sh with the stub as FLEET; returns (exit code, stdout+stderr, fleet calls)."""
    stub = tmp_path / "fleet"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    log = tmp_path / "calls.jsonl"
    log.write_text("")
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "FLEET": str(stub), "STUB_LOG": str(log),
            "STUB_SPEC": str(tmp_path / "spec.json"), "RELEASE": "releases/2026-11.yaml",
            "INVENTORY": "inventory/production", "POLICY": "docs/policy.example.yaml",
            "JOURNAL": str(tmp_path / "journal.db"), "REPORTS": str(tmp_path / "reports")}
    proc = subprocess.run([BASH, str(SCRIPT)], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**base, **env})
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return proc.returncode, proc.stdout + proc.stderr, calls


def started(calls) -> list[list[str]]:
    """The `patch run` / `patch resume` calls."""
    return [c for c in calls if c[:2] in (["patch", "run"], ["patch", "resume"])]


def annotations(output: str, level: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"::{level}::")]


# ---- the schedule check comes first ------------------------------------------------------------------


def test_schedule_disagreement_is_red_and_starts_nothing(tmp_path):
    code, out, calls = script(tmp_path, {"policy check-schedule": {
        "rc": 1, "err": "DISAGREE (a) 100 trigger(s) fall outside every window\n"}})
    assert code != 0
    assert annotations(out, "error") and "check-schedule" in annotations(out, "error")[0]
    assert "DISAGREE (a)" in out
    assert calls == [["policy", "check-schedule", "--policy", "docs/policy.example.yaml",
                      "--workflow", ".github/workflows/patch-window.yml"]]


def test_bad_input_to_the_schedule_check_is_red_too(tmp_path):
    code, out, calls = script(tmp_path, {"policy check-schedule": {"rc": 2}})
    assert code != 0 and annotations(out, "error") and started(calls) == []


# ---- run or resume ----------------------------------------------------------------------------------


def test_no_unfinished_run_starts_one_and_green_when_done(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "summary.md").write_text("## run 1: done\n5 hosts on 2026-11\n")
    code, out, calls = script(tmp_path, {"patch status": brief(), "patch run": {"rc": 0, "out": "run 1: done\n"}},
                              LIMIT="dgx-a*")
    assert code == 0, out
    assert started(calls) == [["patch", "run", "--release", "releases/2026-11.yaml", "--inventory",
                               "inventory/production", "--policy", "docs/policy.example.yaml", "--journal",
                               str(tmp_path / "journal.db"), "--report-dir", str(reports), "--limit", "dgx-a*"]]
    assert ["patch", "status", "--journal", str(tmp_path / "journal.db"), "--brief"] in calls
    assert "5 hosts on 2026-11" in out, "the summary is printed"
    assert not annotations(out, "error") and not annotations(out, "warning")


@pytest.mark.parametrize("status", ["done", "failed", "aborted", "none"])
def test_a_finished_run_or_none_means_a_new_run(tmp_path, status):
    answer = brief("4", status) if status != "none" else brief()
    code, _, calls = script(tmp_path, {"patch status": answer})
    assert code == 0 and [c[:2] for c in started(calls)] == [["patch", "run"]]


def test_paused_run_with_a_stale_lock_is_resumed_stealing_it(tmp_path):
    code, out, calls = script(tmp_path, {"patch status": brief("7", "paused", "stale"), "patch resume": {"rc": 0}})
    assert code == 0, out
    assert started(calls) == [["patch", "resume", "--journal", str(tmp_path / "journal.db"), "--report-dir",
                               str(tmp_path / "reports"), "--steal-lock"]]


def test_running_run_whose_runner_was_killed_is_resumed_stealing_the_lock(tmp_path):
    # the job that ran it hit its timeout: the run stays `running` and its lock's PID is dead
    code, _, calls = script(tmp_path, {"patch status": brief("7", "running", "stale"), "patch resume": {"rc": 0}})
    assert code == 0 and started(calls)[0][:2] == ["patch", "resume"] and "--steal-lock" in started(calls)[0]


def test_paused_run_with_a_live_lock_is_resumed_without_stealing_and_refused_is_a_notice(tmp_path):
    refused = "refused: another run holds the journal lock: ops@host (PID 4242 on host, last heartbeat 3s ago)\n"
    code, out, calls = script(tmp_path, {"patch status": brief("7", "paused", "held"),
                                         "patch resume": {"rc": 3, "err": refused}})
    assert code == 0, out
    assert started(calls) == [["patch", "resume", "--journal", str(tmp_path / "journal.db"), "--report-dir",
                               str(tmp_path / "reports")]]
    [notice] = annotations(out, "notice")
    assert "another run holds the journal lock" in notice and "next window" in notice
    assert not annotations(out, "error")


def test_blocked_run_with_a_free_lock_is_resumed_without_stealing(tmp_path):
    code, _, calls = script(tmp_path, {"patch status": brief("7", "blocked", "free"), "patch resume": {"rc": 0}})
    assert code == 0 and "--steal-lock" not in started(calls)[0]


# ---- exit codes -----------------------------------------------------------------------------------


def test_refused_outside_the_window_is_a_green_notice_naming_why(tmp_path):
    why = "refused: outside every maintenance window; next opening 2026-12-05T21:00:00+00:00 (--ignore-window " \
          "overrides)\n"
    code, out, _ = script(tmp_path, {"patch status": brief(), "patch run": {"rc": 3, "err": why}})
    assert code == 0
    [notice] = annotations(out, "notice")
    assert "outside every maintenance window; next opening 2026-12-05T21:00" in notice
    assert "(no report: nothing was started)" in out


def test_paused_before_a_wave_is_a_green_notice(tmp_path):
    paused = ("run 7: paused: paused before wave 2: the wave is predicted to take 40m, 20m left before the cutoff"
              " of window saturday-night [done 3, pending 9]\n`fleet patch resume` continues this run\n")
    code, out, _ = script(tmp_path, {"patch status": brief("7", "paused", "free"),
                                     "patch resume": {"rc": 3, "err": paused}})
    assert code == 0
    [notice] = annotations(out, "notice")
    assert "run 7: paused: paused before wave 2" in notice


def test_blocked_is_red_with_an_error(tmp_path):
    blocked = ("run 8: blocked: preflight refused wave 0: UPS ups-a is not on line power (ups.status OB) "
               "[pending 5]\n")
    code, out, _ = script(tmp_path, {"patch status": brief(), "patch run": {"rc": 4, "err": blocked}})
    assert code == 4
    [error] = annotations(out, "error")
    assert "blocked by preflight" in error and "UPS ups-a is not on line power" in error
    assert "a person must look" in error
    assert not annotations(out, "notice")


def test_failed_is_red(tmp_path):
    failed = "run 9: failed: failure budget exceeded in wave 0 [rolled_back 1, pending 4]\n"
    code, out, _ = script(tmp_path, {"patch status": brief(), "patch run": {"rc": 1, "err": failed}})
    assert code == 1
    [error] = annotations(out, "error")
    assert "the rollout failed" in error and "failure budget exceeded" in error


@pytest.mark.parametrize(("rc", "what"), [(5, "partly done"), (6, "nothing done")])
def test_partly_or_nothing_done_is_red_unless_warn_is_asked(tmp_path, rc, what):
    line = "run 10: done: 2 host(s) skipped (unreachable) [done 3, skipped 2]\n"
    spec = {"patch status": brief(), "patch run": {"rc": rc, "err": line}}
    code, out, _ = script(tmp_path, spec)
    assert code == rc
    [error] = annotations(out, "error")
    assert what in error and "2 host(s) skipped" in error and "FLEET_CI_ON_PARTIAL=warn" in error
    code, out, _ = script(tmp_path, spec, FLEET_CI_ON_PARTIAL="warn")
    assert code == 0
    [warning] = annotations(out, "warning")
    assert what in warning and "2 host(s) skipped" in warning
    assert not annotations(out, "error")


@pytest.mark.parametrize("rc", [2, 7, 130])
def test_any_other_exit_code_is_red(tmp_path, rc):
    code, out, _ = script(tmp_path, {"patch status": brief(), "patch run": {"rc": rc, "err": "error: boom\n"}})
    assert code == rc and annotations(out, "error")


def test_a_journal_that_cannot_be_read_is_red_and_starts_nothing(tmp_path):
    code, out, calls = script(tmp_path, {"patch status": {"rc": 2, "err": "error: --journal: not a journal\n"}})
    assert code == 2 and annotations(out, "error") and started(calls) == []


def test_missing_inputs_and_a_bad_partial_setting_are_refused(tmp_path):
    code, out, calls = script(tmp_path, {}, RELEASE="")
    assert code == 2 and "$RELEASE is not set" in out and calls == []
    code, out, calls = script(tmp_path, {}, FLEET_CI_ON_PARTIAL="ignore")
    assert code == 2 and "FLEET_CI_ON_PARTIAL must be fail or warn" in out and calls == []


def test_annotation_messages_are_escaped(tmp_path):
    code, out, _ = script(tmp_path, {"patch status": brief(),
                                     "patch run": {"rc": 1, "err": "run 3: failed: 100% of the wave failed\n"}})
    assert code == 1 and "100%25 of the wave" in annotations(out, "error")[0]


def test_the_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_with_the_real_fleet_the_brief_status_and_bad_input_flow_through(tmp_path):
    """The real `fleet`: the shipped schedule passes, an absent journal reads as no run, a run with a missing
    inventory is bad input (2) and red."""
    fleet = ROOT / ".venv/bin/fleet"
    if not fleet.exists():
        fleet = shutil.which("fleet")  # type: ignore[assignment]
        if fleet is None:
            pytest.skip("no fleet executable")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "FLEET": str(fleet),
           "RELEASE": "releases/2026-11.yaml", "INVENTORY": str(tmp_path / "missing.yml"),
           "POLICY": "docs/policy.example.yaml", "JOURNAL": str(tmp_path / "journal.db"),
           "REPORTS": str(tmp_path / "reports")}
    proc = subprocess.run([BASH, str(SCRIPT)], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    out = proc.stdout + proc.stderr
    assert "agree" in out and "journal " in out and "run none none" in out
    assert proc.returncode == 2, out
    assert annotations(out, "error") and "missing.yml" in out


# ---- fleet patch status --brief ---------------------------------------------------------------------


@pytest.fixture
def fleet(monkeypatch, capsys):
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


NO_RUN = "run=none status=none release=none lock=free\n"
PAUSED = "run=1 status=paused release=2026-11"


def _journal_with_run(path, status: str) -> Journal:
    journal = Journal(path)
    plan = {"waves": [{"index": 0, "kind": "wave", "hosts": ["x1"], "predicted_s": 1}], "skipped": {}}
    run = journal.create_run(release="2026-11", owner="t", bundle_path="b", bundle={}, releases_dir=".",
                             inventory=[], limit=None, policy_path=None, policy={"timeouts": {"lock_stale": "1m"}},
                             plan=plan)
    run.set_run_status(status, finished=status in ("done", "failed", "aborted"))
    return journal


def test_brief_without_a_journal_or_a_run(fleet, tmp_path):
    journal = tmp_path / "journal.db"
    assert fleet("patch", "status", "--brief", "--journal", journal) == (0, NO_RUN, "")
    assert not journal.exists(), "reading never creates a journal"
    Journal(journal).close()
    assert fleet("patch", "status", "--brief", "--journal", journal)[1] == NO_RUN
    code, _, err = fleet("patch", "status", "--brief", "--run", "3", "--journal", tmp_path / "other.db")
    assert code == 2 and "no journal here" in err


def test_brief_names_the_run_and_the_lock(fleet, tmp_path):
    path = tmp_path / "journal.db"
    journal = _journal_with_run(path, "paused")
    assert fleet("patch", "status", "--brief", "--journal", path)[1] == f"{PAUSED} lock=free\n"
    journal.lock.acquire("ci", run_id=1)  # our own PID, a fresh heartbeat
    assert fleet("patch", "status", "--brief", "--journal", path)[1].endswith(" lock=held\n")
    # no heartbeat for longer than the run's timeouts.lock_stale (1m)
    journal.db.execute("UPDATE lock SET heartbeat_at = ?", (time.time() - 61,))
    assert fleet("patch", "status", "--brief", "--journal", path)[1] == f"{PAUSED} lock=stale\n"
    # a dead PID on this machine, heartbeat fresh
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    journal.db.execute("UPDATE lock SET heartbeat_at = ?, pid = ?", (time.time(), dead.pid))
    assert fleet("patch", "status", "--brief", "--journal", path)[1].endswith(" lock=stale\n")
    # --run names an older run; the other flags do not change the answer
    _journal_with_run(path, "done").close()
    code, out, _ = fleet("patch", "status", "--brief", "--json", "--paused", "--journal", path)
    assert (code, out) == (0, "run=2 status=done release=2026-11 lock=stale\n")
    assert fleet("patch", "status", "--brief", "--run", "1", "--journal", path)[1].startswith("run=1 status=paused ")
    journal.close()


def test_paused_still_answers_by_exit_code(fleet, tmp_path):
    path = tmp_path / "journal.db"
    _journal_with_run(path, "blocked").close()
    assert fleet("patch", "status", "--paused", "-q", "--journal", path) == (0, "", "")
