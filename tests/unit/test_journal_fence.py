"""The journal lock fences writes by token; a resumed wave's duration leaves out its runner's downtime;
an older journal gains the new columns when opened."""

import sqlite3
import time
import types

import pytest

from patching.journal import lock as lock_module
from patching.journal import store
from patching.journal.lock import LockHeld, LockKeeper, LockLost
from patching.journal.store import SCHEMA_VERSION, Journal, RunJournal
from patching.states import HostState, RunStatus, StopReason

PLAN = {"waves": [{"index": 0, "kind": "canary", "hosts": ["a1"], "predicted_s": 60.0},
                  {"index": 1, "kind": "wave", "hosts": ["a2", "a3"], "predicted_s": 60.0}],
        "skipped": {}}
PIPELINE = (HostState.DRAINING, HostState.APPLYING, HostState.REBOOTING, HostState.VERIFYING,
            HostState.UNDRAINING, HostState.SOAKING, HostState.DONE)


def new_run(journal: Journal) -> RunJournal:
    return journal.create_run(release="2026-11", owner="t", bundle_path="b.yaml", bundle={}, releases_dir=".",
                              inventory=["inv"], limit=None, policy_path=None, policy={}, plan=PLAN)


def make_stale(journal: Journal) -> None:
    """As if the holder stopped heartbeating five minutes ago (its PID is ours, so alive: only age counts)."""
    journal.db.execute("UPDATE lock SET heartbeat_at = ?", (time.time() - 300,))


def snapshot(journal: Journal, run_id: int) -> tuple:
    run = journal.of_run(run_id)
    return (run.host_history(), run.events(), run.record(), run.waves(), run.previous_bundles(), run.lb_before(),
            journal.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])


@pytest.fixture
def path(tmp_path):
    return tmp_path / "journal.db"


@pytest.fixture
def journals(path):
    opened: list[Journal] = []

    def open_one(**kwargs) -> Journal:
        opened.append(Journal(path, **kwargs))
        return opened[-1]

    yield open_one
    for journal in opened:
        journal.close()


def test_a_stolen_lock_fences_every_write_of_the_old_holder(journals):
    a, b = journals(), journals()
    a.lock.acquire("A")
    run_a = new_run(a)
    run_a.wave_started(0)
    run_a.record_state("a1", 0, HostState.DRAINING)
    run_a.add_event("step", {"n": 1})
    make_stale(a)
    stolen = b.lock.acquire("B", steal=True, stale_after=120)
    assert stolen is not None and stolen.owner == "A"
    before = snapshot(b, run_a.id)

    writes = [
        lambda: run_a.record_state("a1", 0, HostState.APPLYING),
        lambda: run_a.add_event("step", {"n": 2}),
        lambda: run_a.set_run_status(RunStatus.FAILED, "A thinks it failed", finished=True),
        lambda: run_a.set_stop(StopReason.BUDGET, 0),
        lambda: run_a.wave_started(1),
        lambda: run_a.wave_finished(0, failures=1),
        lambda: run_a.wave_resumed(0),
        lambda: run_a.record_previous_bundle("a2", "2026-10"),
        lambda: run_a.record_lb_before("a2", "serving"),
        lambda: new_run(a),
        lambda: a.lock.set_run(run_a.id),
    ]
    for write in writes:
        with pytest.raises(LockLost, match=r"taken by another process|no longer ours"):
            write()
    assert snapshot(b, run_a.id) == before  # nothing of A's landed after the steal
    assert a.of_run(run_a.id).latest_states()["a1"] == HostState.DRAINING  # nor in A's own view
    with pytest.raises(LockLost, match=r"now B \(PID"):
        run_a.add_event("x", {})

    run_b = b.of_run(run_a.id)
    run_b.record_state("a1", 0, HostState.APPLYING)
    run_b.add_event("step", {"n": 3})
    run_b.set_run_status(RunStatus.RUNNING, "resumed by B")
    b.lock.set_run(run_a.id)
    assert [r.state for r in run_b.host_history() if r.host == "a1"][-2:] == ["draining", "applying"]
    assert run_b.record().message == "resumed by B"

    assert a.lock.heartbeat() is False
    a.lock.release()
    assert b.lock.info() is not None and b.lock.info().owner == "B"  # A's release left B's lock alone
    assert b.lock.heartbeat() is True
    run_a.request_abort()  # `fleet patch abort`'s message needs no lock
    assert run_b.record().abort_requested


def test_a_released_lock_fences_and_a_journal_that_never_took_it_writes_as_before(journals):
    a, b, c = journals(), journals(), journals()
    a.lock.acquire("A")
    run = new_run(a)
    a.lock.release()
    with pytest.raises(LockLost, match="does not hold the journal lock"):
        run.add_event("after release", {})
    b.lock.acquire("B")
    unfenced = c.of_run(run.id)  # tests, reports, status: never took the lock, not fenced
    unfenced.record_state("a1", 0, HostState.DRAINING)
    unfenced.add_event("written without the lock", {})
    assert [e.kind for e in b.of_run(run.id).events()] == ["written without the lock"]
    a.lock.release()  # holds no lock any more: deletes nothing
    assert b.lock.info().owner == "B"


def test_fenced_from_the_start_needs_the_lock_before_its_first_write(journals):
    strict = journals(fenced=True)
    with pytest.raises(LockLost, match="does not hold"):
        new_run(strict)
    assert strict.runs() == []
    strict.lock.acquire("strict")
    run = new_run(strict)
    run.record_state("a1", 0, HostState.DRAINING)
    assert strict.runs()[0].id == run.id


def test_the_lock_was_deleted_under_us(journals):
    a = journals()
    a.lock.acquire("A")
    run = new_run(a)
    a.db.execute("DELETE FROM lock")
    with pytest.raises(LockLost, match="was released"):
        run.add_event("x", {})


def test_writes_inside_a_transaction_are_fenced_and_commit_together(journals):
    a = journals()
    a.lock.acquire("A")
    run = new_run(a)
    with a.transaction():
        run.record_state("a1", 0, HostState.DRAINING)
        run.add_event("drain", {"host": "a1"})
    assert len(run.events()) == 1
    with pytest.raises(RuntimeError), a.transaction():
        run.add_event("rolled back", {})
        raise RuntimeError
    assert len(run.events()) == 1


def test_a_second_acquire_by_the_thief_gets_a_new_token(journals):
    a, b = journals(), journals()
    a.lock.acquire("A")
    token_a = a.lock.token
    make_stale(a)
    b.lock.acquire("B", steal=True)
    assert b.lock.token and b.lock.token != token_a and len(b.lock.token) == 32
    assert a.db.execute("SELECT token FROM lock").fetchone()[0] == b.lock.token
    with pytest.raises(LockHeld):
        a.lock.acquire("A again")  # B is alive: A may not steal it back


def test_a_keeper_with_the_token_notices_a_theft_by_another_connection_of_this_process(journals, path):
    a, b = journals(), journals()
    a.lock.acquire("A")
    with LockKeeper(path, interval=0.05, token=a.lock.token) as keeper:
        time.sleep(0.15)
        assert not keeper.lost.is_set()
        make_stale(a)
        b.lock.acquire("B", steal=True)
        time.sleep(0.2)
        assert keeper.lost.is_set()  # same PID and host name as the thief: only the token tells them apart
    assert b.lock.info().owner == "B"
    fresh = b.lock.info().heartbeat_at
    with LockKeeper(path, interval=0.05, token=b.lock.token) as keeper:
        time.sleep(0.2)
        assert not keeper.lost.is_set() and b.lock.info().heartbeat_at > fresh


# ---- a resumed wave's duration --------------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch):
    """The journal's and the lock's time.time, moved by hand."""
    now = [time.time()]
    fake = types.SimpleNamespace(time=lambda: now[0])
    monkeypatch.setattr(store, "time", fake)
    monkeypatch.setattr(lock_module, "time", fake)
    return now


def test_a_resumed_wave_leaves_the_runners_downtime_out_of_its_duration(journals, clock):
    first = journals()
    first.lock.acquire("first")
    run = new_run(first)
    run.wave_started(0)
    started = clock[0]
    for state in PIPELINE[:2]:
        clock[0] += 10
        run.record_state("a1", 0, state)
    clock[0] += 5
    run.add_event("gate", {"ok": True}, wave=0, host="a1")
    last_write = clock[0]  # 25 s into the wave
    first.close()  # SIGKILL: no release, no more writes

    clock[0] += 3600  # the runner is dead for an hour
    second = journals()
    second.lock.acquire("resume", steal=True)  # stale: no heartbeat for an hour
    resumed = second.of_run(run.id)
    resumed.set_run_status(RunStatus.RUNNING)  # what Runner.execute writes before it reaches the wave
    resumed.add_event("run", {"event": "executing"})
    clock[0] += 2
    gap = resumed.wave_resumed(0)
    assert gap == pytest.approx(clock[0] - last_write) and gap == pytest.approx(3602)
    assert resumed.wave_resumed(0) == 0.0  # counted once per resume
    for state in PIPELINE[2:]:
        clock[0] += 10
        resumed.record_state("a1", 0, state)
    resumed.wave_finished(0, failures=0)
    wave = resumed.waves()[0]
    assert wave.downtime_s == pytest.approx(gap)
    assert wave.finished_at - wave.started_at == pytest.approx(25 + 3602 + 50)
    assert second.wave_history() == [(1, pytest.approx(25 + 50))]
    assert wave.started_at == pytest.approx(started)


def test_downtime_counts_from_the_waves_start_when_the_crash_came_before_its_first_write(journals, clock):
    first = journals()
    first.lock.acquire("first")
    run = new_run(first)
    run.add_event("run", {"event": "started"})
    clock[0] += 100
    run.wave_started(0)  # then killed before a1's first state
    first.close()
    clock[0] += 600
    second = journals()
    second.lock.acquire("resume", steal=True)
    assert second.of_run(run.id).wave_resumed(0) == pytest.approx(600)


def test_wave_resumed_without_a_crash_or_on_a_wave_not_running_counts_nothing(journals, clock):
    a = journals()
    run = new_run(a)
    run.wave_started(0)
    run.record_state("a1", 0, HostState.DRAINING)
    clock[0] += 60
    assert run.wave_resumed(0) == 0.0  # everything was written by this connection: no runner was dead
    assert run.wave_resumed(1) == 0.0  # pending
    with pytest.raises(KeyError):
        run.wave_resumed(7)
    assert [w.downtime_s for w in run.waves()] == [0.0, 0.0]


# ---- schema 1 journals ------------------------------------------------------------------------------


def test_a_schema_1_journal_opens_and_gains_the_token_and_downtime_columns(path):
    old = Journal(path)
    run = new_run(old)
    run.wave_started(0)
    run.wave_finished(0, failures=0)
    old.lock.acquire("an old runner")
    old.close()
    db = sqlite3.connect(path)  # back to schema 1, as the previous release wrote it
    db.execute("ALTER TABLE lock DROP COLUMN token")
    db.execute("ALTER TABLE waves DROP COLUMN downtime_s")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()

    journal = Journal(path)
    try:
        assert journal.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert journal.db.execute("SELECT token FROM lock").fetchone() == (None,)
        assert [w.downtime_s for w in journal.of_run(run.id).waves()] == [0.0, 0.0]
        assert len(journal.wave_history()) == 1
        with pytest.raises(LockHeld):
            journal.lock.acquire("new")  # the old runner's lock still counts
        journal.db.execute("UPDATE lock SET heartbeat_at = ?", (time.time() - 300,))
        journal.lock.acquire("new", steal=True)
        journal.of_run(run.id).add_event("fenced", {})
        again = Journal(path)  # migrated once: a second open changes nothing
        assert again.db.execute("PRAGMA user_version").fetchone()[0] == 2
        again.close()
    finally:
        journal.close()
