"""The run journal: SQLite in WAL mode, the single source of truth of a patch run (DESIGN.md section 5).

- `runs` and `waves` carry a status that moves forward; everything else is append-only (triggers
  refuse UPDATE and DELETE): `host_states` (one row per state change, checked against the state
  diagram), `events` (what happened, with the measurements behind every gate decision),
  `previous_bundles` (what each host ran before the run touched it: rollback re-applies it) and
  `lb_changes` (each host's load-balancer state before the run drained it: resume restores only those).
- Every write commits at once, so a state is on disk *before* the action it announces starts.
- `lock` holds one row: owner, PID, host name, a heartbeat and a token (patching/journal/lock.py).
- Fencing: a Journal that took the lock makes each write in one BEGIN IMMEDIATE transaction that first
  checks the lock row still carries its token, and raises LockLost writing nothing when it does not
  (`Journal.write`). A Journal that never took it (tests, status, reports) writes unfenced unless opened
  with `fenced=True`. `RunJournal.request_abort` stays unfenced: it is `fleet patch abort`'s message to
  the holder. Reads are never fenced.
- `waves.downtime_s`: time a resumed wave spent with its runner dead (`RunJournal.wave_resumed`);
  `wave_history` leaves it out of the durations it gives the planner.
- `Journal` is the file; `RunJournal` is the view of one run that the runner, the CLI and the reports
  read and write through.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patching.journal.lock import LOCK_SCHEMA, JournalLock
from patching.journal.redact import redact
from patching.states import HostState, RunStatus, StopReason, WaveStatus, check_transition

SCHEMA_VERSION = 2  # 2: lock.token, waves.downtime_s

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    release TEXT NOT NULL,
    status TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    stop_reason TEXT,
    stop_wave INTEGER,
    abort_requested INTEGER NOT NULL DEFAULT 0,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    bundle_path TEXT NOT NULL,
    bundle_json TEXT NOT NULL,
    releases_dir TEXT NOT NULL,
    inventory_json TEXT NOT NULL,
    limit_text TEXT,
    policy_path TEXT,
    policy_json TEXT NOT NULL,
    plan_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS waves (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    idx INTEGER NOT NULL,
    kind TEXT NOT NULL,
    hosts INTEGER NOT NULL,
    predicted_s REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    started_at REAL,
    finished_at REAL,
    failures INTEGER NOT NULL DEFAULT 0,
    downtime_s REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS host_states (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    host TEXT NOT NULL,
    wave INTEGER,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS host_states_by_host ON host_states (run_id, host, id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    wave INTEGER,
    host TEXT,
    kind TEXT NOT NULL,
    at REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, id);
CREATE TABLE IF NOT EXISTS previous_bundles (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    host TEXT NOT NULL,
    release TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (run_id, host)
);
CREATE TABLE IF NOT EXISTS lb_changes (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    host TEXT NOT NULL,
    before TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (run_id, host)
);
""" + LOCK_SCHEMA

_APPEND_ONLY = ("host_states", "events", "previous_bundles", "lb_changes")
# columns added since schema 1, added to an older journal when it is opened: (table, column, declaration)
_ADDED_COLUMNS = (("lock", "token", "TEXT"), ("waves", "downtime_s", "REAL NOT NULL DEFAULT 0"))
APPLICATION_ID = 0x464C5452  # 'FLTR' in the SQLite header: this file is a fleet journal
_OUR_TABLES = {"runs", "waves", "host_states", "events", "previous_bundles", "lb_changes", "lock"}


def _damaged(path: Path, why: str) -> JournalError:
    return JournalError(f"{path}: the journal is damaged ({why}); keep it for inspection and start a new one")


def _check_is_ours(path: Path) -> None:
    """Refuse (JournalError) a file that is not a fleet journal, or one SQLite finds damaged; reads only."""
    if path.is_dir():
        raise JournalError(f"{path}: is a directory, not a journal")
    if path.stat().st_size == 0:
        raise JournalError(f"{path}: an empty file, not a journal of ours (give a new path, or the journal's)")
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if app_id != APPLICATION_ID and not (app_id == 0 and tables >= _OUR_TABLES):  # older journals: no id
                raise JournalError(f"{path}: not a journal of ours (an SQLite database of another application)")
            # integrity_check, not quick_check: an index that disagrees with its table passes quick_check,
            # and its first read fails with a bare "malformed" (about 2 ms per MB of journal)
            problems = [r[0] for r in db.execute("PRAGMA integrity_check(5)")]
            if problems != ["ok"]:
                raise _damaged(path, f"SQLite's integrity check: {'; '.join(problems)}")
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        if "malformed" in str(exc):
            raise _damaged(path, f"SQLite: {exc}") from exc
        raise JournalError(f"{path}: not a journal of ours: {exc}") from exc
    except UnicodeDecodeError:
        raise _damaged(path, "text that is not UTF-8") from None


class JournalError(Exception):
    """The journal file cannot be used (not a journal, newer schema, unreadable)."""


@dataclass(frozen=True)
class RunRecord:
    """A run as stored: what was asked (bundle, inventory, policy, plan) and where it stands."""

    id: int
    release: str
    status: str
    message: str
    stop_reason: str | None
    stop_wave: int | None
    abort_requested: bool
    owner: str
    created_at: float
    updated_at: float
    finished_at: float | None
    bundle_path: str
    bundle: dict[str, Any]
    releases_dir: str
    inventory: list[str]
    limit: str | None
    policy_path: str | None
    policy: dict[str, Any]
    plan: dict[str, Any]
    abort_rollback: bool = False  # the abort asked for the hosts this run patched to be rolled back


@dataclass(frozen=True)
class WaveRecord:
    """A planned wave as stored: its status, times and failures."""

    run_id: int
    index: int
    kind: str
    hosts: int
    predicted_s: float
    status: str
    started_at: float | None
    finished_at: float | None
    failures: int
    downtime_s: float = 0.0  # time it spent with its runner dead, between a crash and the resume


@dataclass(frozen=True)
class StateRow:
    """One host state change."""

    id: int
    host: str
    wave: int | None
    state: HostState
    at: float
    detail: str


@dataclass(frozen=True)
class EventRow:
    """One journaled event (its data already masked for secrets)."""

    id: int
    wave: int | None
    host: str | None
    kind: str
    at: float
    data: dict[str, Any]


class Journal:
    """One journal file. Not thread-safe: one Journal per thread (the lock keeper opens its own).

    Fenced once it took the lock (`self.lock.acquire`), or from the start with `fenced=True`: then every
    write needs the lock to be ours and raises LockLost, writing nothing, when it is not (see `write`)."""

    def __init__(self, path: str | Path, *, fenced: bool = False):
        self.path = Path(path)
        self.opened_at = time.time()
        self._resumed: set[tuple[int, int]] = set()  # (run, wave) wave_resumed counted by this connection
        if self.path.exists():
            _check_is_ours(self.path)  # before a byte is written: another file stays as it was
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise JournalError(f"{self.path}: cannot create its directory: {exc.strerror or exc}") from exc
        try:
            # isolation_level=None: autocommit, every statement is durable when it returns
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=10)
            self.db.text_factory = self._text
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalError(f"{self.path}: journal schema {version} is newer than this tool's {SCHEMA_VERSION}")
            if version < SCHEMA_VERSION:
                self._create()
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"{self.path}: not a usable journal: {exc}") from exc
        self.lock = JournalLock(self.db)
        self.lock.fenced = fenced

    def _text(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _damaged(self.path, "text that is not UTF-8") from None

    def _create(self) -> None:
        """A new journal's schema, or an older journal's migration to this one (idempotent)."""
        self.db.executescript(_SCHEMA)
        with self.transaction():  # two tools opening one older journal at once add each column once
            for table, column, declaration in _ADDED_COLUMNS:
                if column not in {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            for table in _APPEND_ONLY:
                for op in ("UPDATE", "DELETE"):
                    self.db.execute(
                        f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                        f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                    )
            self.db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the connection."""
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT: several writes that land together or not at all."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """One runner write: BEGIN IMMEDIATE, the lock checked still ours (fenced Journals: LockLost, and
        nothing written, when it is not), the write, COMMIT. Inside `transaction()` it only checks."""
        if self.db.in_transaction:
            self.lock.check_ours()
            yield
            return
        with self.transaction():
            self.lock.check_ours()
            yield

    def took_over_at(self) -> float:
        """When this connection started writing for its run: it took the lock then (or opened the file).
        A row of the run stamped earlier was written by a runner before it (one that may have crashed)."""
        return self.lock.acquired_at if self.lock.acquired_at is not None else self.opened_at

    def journal_mode(self) -> str:
        """SQLite's journal mode of the file (WAL)."""
        return str(self.db.execute("PRAGMA journal_mode").fetchone()[0])

    # ---- runs and waves -------------------------------------------------------------------------
    def create_run(
        self,
        *,
        release: str,
        owner: str,
        bundle_path: str,
        bundle: Mapping[str, Any],
        releases_dir: str,
        inventory: Sequence[str],
        limit: str | None,
        policy_path: str | None,
        policy: Mapping[str, Any],
        plan: Mapping[str, Any],
    ) -> RunJournal:
        """A new run with its waves; every planned host `pending`, every skipped host `pending -> skipped`."""
        now = time.time()
        with self.write():
            cur = self.db.execute(
                "INSERT INTO runs (release, status, owner, created_at, updated_at, bundle_path, bundle_json,"
                " releases_dir, inventory_json, limit_text, policy_path, policy_json, plan_json)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (release, RunStatus.RUNNING.value, owner, now, now, bundle_path, json.dumps(bundle), releases_dir,
                 json.dumps(list(inventory)), limit, policy_path, json.dumps(policy), json.dumps(plan)),
            )
            run_id = int(cur.lastrowid or 0)
            self.db.executemany(
                "INSERT INTO waves (run_id, idx, kind, hosts, predicted_s) VALUES (?, ?, ?, ?, ?)",
                [(run_id, w["index"], w["kind"], len(w["hosts"]), w["predicted_s"]) for w in plan["waves"]],
            )
            rows = [(run_id, host, w["index"], HostState.PENDING.value, now, "") for w in plan["waves"]
                    for host in w["hosts"]]
            for host, why in plan["skipped"].items():
                rows += [(run_id, host, None, HostState.PENDING.value, now, ""),
                         (run_id, host, None, HostState.SKIPPED.value, now, why)]
            self.db.executemany(
                "INSERT INTO host_states (run_id, host, wave, state, at, detail) VALUES (?, ?, ?, ?, ?, ?)", rows
            )
        return RunJournal(self, run_id)

    def run(self, run_id: int) -> RunRecord:
        """The stored run (KeyError when there is none with this id)."""
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(run_id)
        return self._run_record(row)

    def runs(self, limit: int = 20) -> list[RunRecord]:
        """The latest runs, newest first."""
        rows = self.db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [self._run_record(r) for r in rows]

    def recorded_bundles(self) -> dict[str, dict[str, Any]]:
        """release -> the bundle manifest an earlier run of this journal rolled out (the newest run's copy)."""
        rows = self.db.execute("SELECT release, bundle_json FROM runs ORDER BY id").fetchall()
        return {release: json.loads(manifest) for release, manifest in rows}

    def _run_record(self, row: Sequence[Any]) -> RunRecord:
        cols = [d[1] for d in self.db.execute("PRAGMA table_info(runs)").fetchall()]
        r = dict(zip(cols, row, strict=True))
        try:
            return self._decode_run(r)
        except (ValueError, TypeError, KeyError) as exc:  # json.JSONDecodeError is a ValueError
            raise _damaged(self.path, f"run {r.get('id')}: {exc}") from exc

    def _decode_run(self, r: dict[str, Any]) -> RunRecord:
        return RunRecord(
            id=r["id"], release=r["release"], status=r["status"], message=r["message"],
            stop_reason=r["stop_reason"], stop_wave=r["stop_wave"], abort_requested=bool(r["abort_requested"]),
            abort_rollback=r["abort_requested"] == 2,
            owner=r["owner"], created_at=r["created_at"], updated_at=r["updated_at"], finished_at=r["finished_at"],
            bundle_path=r["bundle_path"], bundle=json.loads(r["bundle_json"]), releases_dir=r["releases_dir"],
            inventory=json.loads(r["inventory_json"]), limit=r["limit_text"], policy_path=r["policy_path"],
            policy=json.loads(r["policy_json"]), plan=json.loads(r["plan_json"]),
        )

    def of_run(self, run_id: int) -> RunJournal:
        """The view of one stored run (KeyError when there is none with this id)."""
        self.run(run_id)
        return RunJournal(self, run_id)

    # ---- history for the planner ----------------------------------------------------------------

    def wave_history(self, limit: int = 200) -> list[tuple[int, float]]:
        """(hosts, seconds) of the latest waves that finished without a failure; a resumed wave's seconds
        leave out the time its runner was dead (`RunJournal.wave_resumed`)."""
        rows = self.db.execute(
            "SELECT hosts, MAX(finished_at - started_at - downtime_s, 0) FROM waves WHERE status = ? AND failures = 0"
            " AND started_at IS NOT NULL AND finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT ?",
            (WaveStatus.DONE.value, limit),
        ).fetchall()
        return [(int(h), float(s)) for h, s in rows]

    def last_known_releases(self) -> dict[str, str]:
        """Each host's bundle as the journal last left it: the run's release if done, the previous if rolled back."""
        rows = self.db.execute(
            "SELECT hs.host, hs.state, r.release, pb.release FROM host_states hs"
            " JOIN (SELECT host, MAX(id) AS id FROM host_states WHERE state IN (?, ?)"
            "       GROUP BY host) last ON last.id = hs.id"
            " JOIN runs r ON r.id = hs.run_id"
            " LEFT JOIN previous_bundles pb ON pb.run_id = hs.run_id AND pb.host = hs.host",
            (HostState.DONE.value, HostState.ROLLED_BACK.value),
        ).fetchall()
        out = {}
        for host, state, release, previous in rows:
            known = release if state == HostState.DONE.value else previous
            if known:
                out[host] = known
        return out


class RunJournal:
    """One run of a journal: its status, waves, host states, events and what hosts were before it."""

    def __init__(self, journal: Journal, run_id: int):
        self.journal = journal
        self.db = journal.db
        self.id = run_id
        self._latest: dict[str, HostState] | None = None

    def record(self) -> RunRecord:
        """The run as stored now."""
        return self.journal.run(self.id)

    # ---- status and waves -----------------------------------------------------------------------

    def set_run_status(self, status: RunStatus, message: str = "", *, finished: bool = False) -> None:
        """Move the run to a status (RunStatus), with the message people read."""
        now = time.time()
        with self.journal.write():
            self.db.execute(
                "UPDATE runs SET status = ?, message = ?, updated_at = ?, finished_at = ? WHERE id = ?",
                (status, message, now, now if finished else None, self.id),
            )

    def set_stop(self, reason: StopReason, wave: int | None) -> None:
        """Record why the run stops starting waves (`budget`, `aborted`); the first reason stays."""
        with self.journal.write():
            self.db.execute(
                "UPDATE runs SET stop_reason = ?, stop_wave = ?, updated_at = ? WHERE id = ? AND stop_reason IS NULL",
                (reason, wave, time.time(), self.id),
            )

    def request_abort(self, *, rollback: bool = False) -> None:
        """Ask the runner to stop before its next wave (`fleet patch abort`); with `rollback`, also to return
        the hosts this run patched to their previous bundle (`abort_requested` 2; a request only grows).
        Unfenced on purpose: another process writes it without the lock, as a message to the runner."""
        self.db.execute("UPDATE runs SET abort_requested = MAX(abort_requested, ?), updated_at = ? WHERE id = ?",
                        (2 if rollback else 1, time.time(), self.id))

    def waves(self) -> list[WaveRecord]:
        """The run's waves in order."""
        rows = self.db.execute(
            "SELECT run_id, idx, kind, hosts, predicted_s, status, started_at, finished_at, failures, downtime_s"
            " FROM waves WHERE run_id = ? ORDER BY idx",
            (self.id,),
        ).fetchall()
        return [WaveRecord(*r) for r in rows]

    def wave_started(self, index: int) -> None:
        """A wave is under way (its first start time stays across resumes)."""
        with self.journal.write():
            self.db.execute(
                "UPDATE waves SET status = ?, started_at = COALESCE(started_at, ?) WHERE run_id = ? AND idx = ?",
                (WaveStatus.RUNNING.value, time.time(), self.id, index),
            )

    def wave_resumed(self, index: int) -> float:
        """A wave that is `running` in the journal is resumed: the time its runner was dead, from the run's
        last host state or event written before this connection took over (not before the wave started)
        to now, is added to the wave's downtime, which `wave_history` leaves out. Returns those seconds;
        0 when the wave is not running or this connection already counted its resume."""
        with self.journal.write():
            row = self.db.execute(
                "SELECT status, started_at FROM waves WHERE run_id = ? AND idx = ?", (self.id, index)
            ).fetchone()
            if row is None:
                raise KeyError(index)
            status, started_at = row
            if status != WaveStatus.RUNNING.value or started_at is None or (self.id, index) in self.journal._resumed:
                return 0.0
            before = self.journal.took_over_at()
            last = self.db.execute(
                "SELECT MAX(at) FROM (SELECT MAX(at) AS at FROM host_states WHERE run_id = ? AND at < ?"
                " UNION ALL SELECT MAX(at) FROM events WHERE run_id = ? AND at < ?)",
                (self.id, before, self.id, before),
            ).fetchone()[0]
            if last is None:  # nothing written before we took over: this connection ran it all along
                return 0.0
            gap = max(time.time() - max(float(last), float(started_at)), 0.0)
            self.db.execute(
                "UPDATE waves SET downtime_s = downtime_s + ? WHERE run_id = ? AND idx = ?", (gap, self.id, index)
            )
        self.journal._resumed.add((self.id, index))
        return gap

    def wave_finished(self, index: int, failures: int) -> None:
        """A wave is finished, with the number of hosts that failed in it."""
        with self.journal.write():
            self.db.execute(
                "UPDATE waves SET status = ?, finished_at = ?, failures = ? WHERE run_id = ? AND idx = ?",
                (WaveStatus.DONE.value, time.time(), failures, self.id, index),
            )

    # ---- host states ----------------------------------------------------------------------------

    def latest_states(self) -> dict[str, HostState]:
        """Every host of the run and its current state."""
        if self._latest is None:
            rows = self.db.execute(
                "SELECT host, state FROM host_states WHERE id IN"
                " (SELECT MAX(id) FROM host_states WHERE run_id = ? GROUP BY host)",
                (self.id,),
            ).fetchall()
            self._latest = {host: HostState(state) for host, state in rows}
        return self._latest

    def record_state(self, host: str, wave: int | None, state: HostState, detail: str = "") -> None:
        """Append a state change; refuses one the state diagram does not allow (IllegalTransition)."""
        latest = self.latest_states()
        check_transition(host, latest[host], state)
        with self.journal.write():
            self.db.execute(
                "INSERT INTO host_states (run_id, host, wave, state, at, detail) VALUES (?, ?, ?, ?, ?, ?)",
                (self.id, host, wave, state.value, time.time(), redact(detail)),
            )
        latest[host] = state

    def host_history(self) -> list[StateRow]:
        """Every state change of every host, in order."""
        rows = self.db.execute(
            "SELECT id, host, wave, state, at, detail FROM host_states WHERE run_id = ? ORDER BY id", (self.id,)
        ).fetchall()
        return [StateRow(i, h, w, HostState(s), a, d) for i, h, w, s, a, d in rows]

    def hosts_that_failed(self, wave: int | None = None) -> set[str]:
        """Hosts that went through `failed` in this run (in one wave, or in any)."""
        sql = "SELECT DISTINCT host FROM host_states WHERE run_id = ? AND state = ?"
        args: tuple[Any, ...] = (self.id, HostState.FAILED.value)
        if wave is not None:
            sql += " AND wave = ?"
            args += (wave,)
        return {r[0] for r in self.db.execute(sql, args).fetchall()}

    # ---- what a host was before the run touched it ----------------------------------------------

    def record_previous_bundle(self, host: str, release: str) -> None:
        """The bundle a host ran before this run touched it; the first record stays (rollback target)."""
        with self.journal.write():
            self.db.execute(
                "INSERT OR IGNORE INTO previous_bundles (run_id, host, release, at) VALUES (?, ?, ?, ?)",
                (self.id, host, release, time.time()),
            )

    def previous_bundles(self) -> dict[str, str]:
        """host -> the release it ran before this run touched it."""
        rows = self.db.execute("SELECT host, release FROM previous_bundles WHERE run_id = ?", (self.id,)).fetchall()
        return dict(rows)

    def record_lb_before(self, host: str, state: str) -> None:
        """A host's load-balancer state before this run first drained it; the first record stays."""
        with self.journal.write():
            self.db.execute(
                "INSERT OR IGNORE INTO lb_changes (run_id, host, before, at) VALUES (?, ?, ?, ?)",
                (self.id, host, state, time.time()),
            )

    def lb_before(self) -> dict[str, str]:
        """host -> its load-balancer state before this run drained it."""
        rows = self.db.execute("SELECT host, before FROM lb_changes WHERE run_id = ?", (self.id,)).fetchall()
        return dict(rows)

    # ---- events ---------------------------------------------------------------------------------

    def add_event(
        self, kind: str, data: Mapping[str, Any], *, wave: int | None = None, host: str | None = None
    ) -> None:
        """Append an event; secrets in `data` are masked before it is stored."""
        text = json.dumps(redact(data), default=str)
        with self.journal.write():
            self.db.execute(
                "INSERT INTO events (run_id, wave, host, kind, at, data) VALUES (?, ?, ?, ?, ?, ?)",
                (self.id, wave, host, kind, time.time(), text),
            )

    def events(self) -> list[EventRow]:
        """Every event of the run, in order."""
        rows = self.db.execute(
            "SELECT id, wave, host, kind, at, data FROM events WHERE run_id = ? ORDER BY id", (self.id,)
        ).fetchall()
        return [EventRow(i, w, h, k, a, json.loads(d)) for i, w, h, k, a, d in rows]

    # ---- history for the planner ----------------------------------------------------------------
