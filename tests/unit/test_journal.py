"""The journal: WAL, append-only history, the state diagram enforced, the lock, history for the planner."""

import multiprocessing
import os
import sqlite3
import time

import pytest

from patching.journal.lock import LockHeld, LockKeeper, lock_staleness
from patching.journal.redact import redact
from patching.journal.store import Journal, JournalError, RunJournal
from patching.states import TRANSITIONS, HostState, IllegalTransition

PLAN = {"waves": [{"index": 0, "kind": "canary", "hosts": ["a1"], "predicted_s": 60.0},
                  {"index": 1, "kind": "wave", "hosts": ["a2", "a3"], "predicted_s": 60.0}],
        "skipped": {"a4": "unreachable at preflight"}}


def new_run(journal: Journal, release: str = "2026-11", plan: dict = PLAN) -> RunJournal:
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
    assert run.latest_states() == {"a1": "pending", "a2": "pending", "a3": "pending", "a4": "skipped"}
    assert [w.status for w in run.waves()] == ["pending", "pending"]
    assert run.record().status == "running"


def test_state_changes_are_appended_and_checked_against_the_diagram(journal):
    run = new_run(journal)
    for state in (HostState.DRAINING, HostState.APPLYING, HostState.FAILED, HostState.ROLLING_BACK):
        run.record_state("a1", 0, state)
    with pytest.raises(IllegalTransition):
        run.record_state("a1", 0, HostState.DONE)
    with pytest.raises(IllegalTransition):
        run.record_state("a2", 1, HostState.APPLYING)  # pending -> applying skips draining
    assert [r.state for r in run.host_history() if r.host == "a1"] == [
        "pending", "draining", "applying", "failed", "rolling_back"]
    assert run.hosts_that_failed() == {"a1"} and run.hosts_that_failed(1) == set()


def test_history_and_events_are_append_only(journal):
    run = new_run(journal)
    run.add_event("gate", {"ok": True})
    run.record_previous_bundle("a1", "2026-10")
    run.record_lb_before("a1", "serving")
    for sql in ("UPDATE host_states SET state = 'done'", "DELETE FROM host_states",
                "UPDATE events SET data = '{}'", "DELETE FROM events",
                "UPDATE previous_bundles SET release = 'x'", "DELETE FROM lb_changes"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            journal.db.execute(sql)


def test_previous_bundle_and_lb_state_keep_the_first_record(journal):
    run = new_run(journal)
    run.record_previous_bundle("a1", "2026-10")
    run.record_previous_bundle("a1", "2026-11")  # a resume must not overwrite the rollback target
    run.record_lb_before("a1", "serving")
    run.record_lb_before("a1", "drained")
    assert run.previous_bundles() == {"a1": "2026-10"} and run.lb_before() == {"a1": "serving"}


def test_every_write_is_visible_to_another_connection_at_once(journal, tmp_path):
    run = new_run(journal)
    run.record_state("a1", 0, HostState.DRAINING)
    other = Journal(tmp_path / "journal.db")
    assert other.of_run(run.id).latest_states()["a1"] == HostState.DRAINING
    other.close()


def test_events_mask_secrets(journal):
    run = new_run(journal)
    run.add_event("gate", {"headers": {"Authorization": "Bearer abc.def.ghi"}, "password": "hunter2",
                                    "detail": "GET https://admin:s3cret@bmc/redfish failed; token=abcd1234",
                                    "max_tokens": 512})
    data = run.events()[0].data
    text = str(data)
    assert "hunter2" not in text and "s3cret" not in text and "abcd1234" not in text and "abc.def" not in text
    assert data["max_tokens"] == 512
    assert redact({"auth": "x"}) == {"auth": "***"}


def test_a_second_run_is_refused_and_a_live_lock_is_not_stale(journal, tmp_path):
    journal.lock.acquire("first")
    other = Journal(tmp_path / "journal.db")
    with pytest.raises(LockHeld) as held:
        other.lock.acquire("second", steal=True)  # steal never takes a live lock
    assert held.value.stale is None and "first" in str(held.value) and str(os.getpid()) in str(held.value)
    journal.lock.release()
    assert other.lock.acquire("second") is None
    other.lock.release()
    other.close()


def _hold_lock_and_die(path):
    Journal(path).lock.acquire("doomed")
    os._exit(0)  # dies without releasing


def test_lock_of_a_dead_pid_is_stale_and_can_be_stolen(journal, tmp_path):
    child = multiprocessing.get_context("fork").Process(target=_hold_lock_and_die, args=(tmp_path / "journal.db",))
    child.start()
    child.join()
    with pytest.raises(LockHeld) as held:
        journal.lock.acquire("me")
    assert held.value.stale and f"PID {child.pid} is not running" in held.value.stale
    assert "--steal-lock" in str(held.value)
    stolen = journal.lock.acquire("me", steal=True)
    assert stolen is not None and stolen.owner == "doomed"
    assert journal.lock.info().owner == "me"


def test_lock_without_heartbeat_is_stale(journal):
    journal.lock.acquire("me")
    journal.db.execute("UPDATE lock SET pid = 1, hostname = 'elsewhere', heartbeat_at = ?", (time.time() - 300,))
    lock = journal.lock.info()
    assert lock_staleness(lock, stale_after=120) == "no heartbeat for 300s (stale after 120s)"
    assert lock_staleness(lock, stale_after=600) is None  # another machine's PID cannot be checked


def test_heartbeat_keeps_the_lock_fresh_and_notices_theft(journal, tmp_path):
    journal.lock.acquire("me")
    before = journal.lock.info().heartbeat_at
    with LockKeeper(tmp_path / "journal.db", interval=0.05) as keeper:
        time.sleep(0.2)
        assert journal.lock.info().heartbeat_at > before
        journal.db.execute("UPDATE lock SET pid = 1, hostname = 'thief'")
        time.sleep(0.2)
        assert keeper.lost.is_set()
        with pytest.raises(Exception, match="taken by another process"):
            keeper.check()


def test_history_for_the_planner(journal):
    run = new_run(journal)
    run.record_previous_bundle("a1", "2026-10")
    run.record_previous_bundle("a2", "2026-10")
    for host, wave in (("a1", 0), ("a2", 1)):
        for state in (HostState.DRAINING, HostState.APPLYING, HostState.REBOOTING, HostState.VERIFYING,
                      HostState.UNDRAINING, HostState.SOAKING, HostState.DONE):
            run.record_state(host, wave, state)
    for state in (HostState.ROLLING_BACK, HostState.ROLLED_BACK):
        run.record_state("a2", 1, state)
    run.wave_started(0)
    run.wave_finished(0, failures=0)
    run.wave_started(1)
    run.wave_finished(1, failures=1)  # waves with failures do not predict normal ones
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


def test_a_damaged_journal_is_refused_with_the_word_and_left_as_it_is(tmp_path):
    path = tmp_path / "journal.db"
    journal = Journal(path)
    run = new_run(journal)
    for i in range(200):
        run.add_event("step", {"n": i, "pad": "x" * 200})
    journal.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    journal.close()
    data = bytearray(path.read_bytes())
    page = 4096
    data[3 * page + 8: 3 * page + 600] = b"\xa5" * 592  # an interior page's cell pointers and content
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="damaged"):
        Journal(path)
    assert path.read_bytes() == bytes(data)


def test_an_index_that_disagrees_with_its_table_is_refused_as_damaged(tmp_path):
    path = tmp_path / "journal.db"
    journal = Journal(path)
    run = new_run(journal)
    for i in range(100):
        run.add_event("step", {"n": i})
    journal.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    root = journal.db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'events_by_run'").fetchone()[0]
    page_size = journal.db.execute("PRAGMA page_size").fetchone()[0]
    journal.close()
    data = bytearray(path.read_bytes())
    page = slice((root - 1) * page_size, root * page_size)
    entry = bytes([6, 4, 9, 1, 1, 100, 100])  # the index entry (run 1, event 100) -> row 100
    assert data[page].count(entry) == 1
    at = (root - 1) * page_size + data[page].find(entry)
    data[at + 6] = 120  # now points at a row that does not exist; every page stays well formed
    path.write_bytes(bytes(data))
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    assert db.execute("PRAGMA quick_check").fetchall() == [("ok",)]  # the damage quick_check cannot see
    assert db.execute("PRAGMA integrity_check").fetchall() != [("ok",)]
    db.close()
    with pytest.raises(JournalError, match=r"damaged.*missing from index events_by_run"):
        Journal(path)
    assert path.read_bytes() == bytes(data)
