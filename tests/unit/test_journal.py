"""The journal: WAL, append-only history, the state diagram enforced, the lock, history for the planner."""

import multiprocessing
import os
import sqlite3
import time

import pytest

from patching.journal.store import Journal, JournalError, LockHeld, LockKeeper, lock_staleness, redact
from patching.states import TRANSITIONS, HostState, IllegalTransition

PLAN = {"waves": [{"index": 0, "kind": "canary", "hosts": ["a1"], "predicted_s": 60.0},
                  {"index": 1, "kind": "wave", "hosts": ["a2", "a3"], "predicted_s": 60.0}],
        "skipped": {"a4": "unreachable at preflight"}}


def new_run(journal: Journal, release: str = "2026-11", plan: dict = PLAN) -> int:
    return journal.create_run(release=release, owner="t", bundle_path="b.yaml", bundle={}, releases_dir=".",
                              inventory=["inv"], limit=None, policy_path=None, policy={}, plan=plan)


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "journal.db")
    yield j
    j.close()


def test_wal_mode_and_schema(journal):
    assert journal.journal_mode() == "wal"
    run = new_run(journal)
    assert journal.latest_states(run) == {"a1": "pending", "a2": "pending", "a3": "pending", "a4": "skipped"}
    assert [w.status for w in journal.waves(run)] == ["pending", "pending"]
    assert journal.run(run).status == "running"


def test_state_changes_are_appended_and_checked_against_the_diagram(journal):
    run = new_run(journal)
    for state in (HostState.DRAINING, HostState.APPLYING, HostState.FAILED, HostState.ROLLING_BACK):
        journal.record_state(run, "a1", 0, state)
    with pytest.raises(IllegalTransition):
        journal.record_state(run, "a1", 0, HostState.DONE)
    with pytest.raises(IllegalTransition):
        journal.record_state(run, "a2", 1, HostState.APPLYING)  # pending -> applying skips draining
    assert [r.state for r in journal.host_history(run) if r.host == "a1"] == [
        "pending", "draining", "applying", "failed", "rolling_back"]
    assert journal.hosts_that_failed(run) == {"a1"} and journal.hosts_that_failed(run, 1) == set()


def test_history_and_events_are_append_only(journal):
    run = new_run(journal)
    journal.add_event(run, "gate", {"ok": True})
    journal.record_previous_bundle(run, "a1", "2026-10")
    journal.record_lb_before(run, "a1", "serving")
    for sql in ("UPDATE host_states SET state = 'done'", "DELETE FROM host_states",
                "UPDATE events SET data = '{}'", "DELETE FROM events",
                "UPDATE previous_bundles SET release = 'x'", "DELETE FROM lb_changes"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            journal.db.execute(sql)


def test_previous_bundle_and_lb_state_keep_the_first_record(journal):
    run = new_run(journal)
    journal.record_previous_bundle(run, "a1", "2026-10")
    journal.record_previous_bundle(run, "a1", "2026-11")  # a resume must not overwrite the rollback target
    journal.record_lb_before(run, "a1", "serving")
    journal.record_lb_before(run, "a1", "drained")
    assert journal.previous_bundles(run) == {"a1": "2026-10"} and journal.lb_before(run) == {"a1": "serving"}


def test_every_write_is_visible_to_another_connection_at_once(journal, tmp_path):
    run = new_run(journal)
    journal.record_state(run, "a1", 0, HostState.DRAINING)
    other = Journal(tmp_path / "journal.db")
    assert other.latest_states(run)["a1"] == HostState.DRAINING
    other.close()


def test_events_mask_secrets(journal):
    run = new_run(journal)
    journal.add_event(run, "gate", {"headers": {"Authorization": "Bearer abc.def.ghi"}, "password": "hunter2",
                                    "detail": "GET https://admin:s3cret@bmc/redfish failed; token=abcd1234",
                                    "max_tokens": 512})
    data = journal.events(run)[0].data
    text = str(data)
    assert "hunter2" not in text and "s3cret" not in text and "abcd1234" not in text and "abc.def" not in text
    assert data["max_tokens"] == 512
    assert redact({"auth": "x"}) == {"auth": "***"}


def test_a_second_run_is_refused_and_a_live_lock_is_not_stale(journal, tmp_path):
    journal.acquire_lock("first")
    other = Journal(tmp_path / "journal.db")
    with pytest.raises(LockHeld) as held:
        other.acquire_lock("second", steal=True)  # steal never takes a live lock
    assert held.value.stale is None and "first" in str(held.value) and str(os.getpid()) in str(held.value)
    journal.release_lock()
    assert other.acquire_lock("second") is None
    other.release_lock()
    other.close()


def _hold_lock_and_die(path):
    Journal(path).acquire_lock("doomed")
    os._exit(0)  # dies without releasing


def test_lock_of_a_dead_pid_is_stale_and_can_be_stolen(journal, tmp_path):
    child = multiprocessing.get_context("fork").Process(target=_hold_lock_and_die, args=(tmp_path / "journal.db",))
    child.start()
    child.join()
    with pytest.raises(LockHeld) as held:
        journal.acquire_lock("me")
    assert held.value.stale and f"PID {child.pid} is not running" in held.value.stale
    assert "--steal-lock" in str(held.value)
    stolen = journal.acquire_lock("me", steal=True)
    assert stolen is not None and stolen.owner == "doomed"
    assert journal.lock_info().owner == "me"


def test_lock_without_heartbeat_is_stale(journal):
    journal.acquire_lock("me")
    journal.db.execute("UPDATE lock SET pid = 1, hostname = 'elsewhere', heartbeat_at = ?", (time.time() - 300,))
    lock = journal.lock_info()
    assert lock_staleness(lock, stale_after=120) == "no heartbeat for 300s (stale after 120s)"
    assert lock_staleness(lock, stale_after=600) is None  # another machine's PID cannot be checked


def test_heartbeat_keeps_the_lock_fresh_and_notices_theft(journal, tmp_path):
    journal.acquire_lock("me")
    before = journal.lock_info().heartbeat_at
    with LockKeeper(tmp_path / "journal.db", interval=0.05) as keeper:
        time.sleep(0.2)
        assert journal.lock_info().heartbeat_at > before
        journal.db.execute("UPDATE lock SET pid = 1, hostname = 'thief'")
        time.sleep(0.2)
        assert keeper.lost.is_set()
        with pytest.raises(Exception, match="taken by another process"):
            keeper.check()


def test_history_for_the_planner(journal):
    run = new_run(journal)
    journal.record_previous_bundle(run, "a1", "2026-10")
    journal.record_previous_bundle(run, "a2", "2026-10")
    for host, wave in (("a1", 0), ("a2", 1)):
        for state in (HostState.DRAINING, HostState.APPLYING, HostState.REBOOTING, HostState.VERIFYING,
                      HostState.UNDRAINING, HostState.SOAKING, HostState.DONE):
            journal.record_state(run, host, wave, state)
    for state in (HostState.ROLLING_BACK, HostState.ROLLED_BACK):
        journal.record_state(run, "a2", 1, state)
    journal.wave_started(run, 0)
    journal.wave_finished(run, 0, failures=0)
    journal.wave_started(run, 1)
    journal.wave_finished(run, 1, failures=1)  # waves with failures do not predict normal ones
    assert journal.last_known_releases() == {"a1": "2026-11", "a2": "2026-10"}
    history = journal.wave_history()
    assert len(history) == 1 and history[0][0] == 1 and history[0][1] >= 0


def test_not_a_journal(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalError):
        Journal(path)


def test_the_diagram_has_no_dead_ends():
    reachable = {HostState.PENDING}
    frontier = [HostState.PENDING]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(HostState)
