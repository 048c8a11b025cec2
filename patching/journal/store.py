"""The run journal: SQLite in WAL mode, the single source of truth of a patch run (DESIGN.md section 5).

- `runs` and `waves` carry a status that moves forward; everything else is append-only (triggers
  refuse UPDATE and DELETE): `host_states` (one row per state change, checked against the state
  diagram), `events` (what happened, with the measurements behind every gate decision),
  `previous_bundles` (what each host ran before the run touched it: rollback re-applies it) and
  `lb_changes` (each host's load-balancer state before the run drained it: resume restores only those).
- Every write commits at once, so a state is on disk *before* the action it announces starts.
- `lock` holds one row: owner, PID, host name and a heartbeat. A second run is refused; a lock whose
  heartbeat is older than the stale limit, or whose PID is dead on this machine, is stale and may be
  stolen on request.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patching.states import HostState, check_transition

SCHEMA_VERSION = 1

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
CREATE TABLE IF NOT EXISTS lock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    owner TEXT NOT NULL,
    pid INTEGER NOT NULL,
    hostname TEXT NOT NULL,
    run_id INTEGER,
    acquired_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);
"""

_APPEND_ONLY = ("host_states", "events", "previous_bundles", "lb_changes")


class JournalError(Exception):
    """The journal file cannot be used (not a journal, newer schema, unreadable)."""


class LockHeld(Exception):
    """Another run holds the journal's lock (exit 3). `stale` says why it may be stolen, if it may."""

    def __init__(self, lock: LockInfo, stale: str | None):
        self.lock = lock
        self.stale = stale
        if stale:
            text = f"the journal lock is stale ({stale}); held by {lock}. --steal-lock takes it"
        else:
            text = f"another run holds the journal lock: {lock}"
        super().__init__(text)


class LockLost(Exception):
    """Our lock was stolen (we were judged stale): stop before touching anything else."""


@dataclass(frozen=True)
class LockInfo:
    owner: str
    pid: int
    hostname: str
    run_id: int | None
    acquired_at: float
    heartbeat_at: float

    def __str__(self) -> str:
        age = time.time() - self.heartbeat_at
        run = f"run {self.run_id}, " if self.run_id is not None else ""
        return f"{self.owner} (PID {self.pid} on {self.hostname}, {run}last heartbeat {age:.0f}s ago)"


@dataclass(frozen=True)
class RunRecord:
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


@dataclass(frozen=True)
class WaveRecord:
    run_id: int
    index: int
    kind: str
    hosts: int
    predicted_s: float
    status: str
    started_at: float | None
    finished_at: float | None
    failures: int


@dataclass(frozen=True)
class StateRow:
    id: int
    host: str
    wave: int | None
    state: HostState
    at: float
    detail: str


@dataclass(frozen=True)
class EventRow:
    id: int
    wave: int | None
    host: str | None
    kind: str
    at: float
    data: dict[str, Any]


# whole words of a key ('access_token', 'auth', 'client-secret'), not substrings ('max_tokens', 'passed')
_SECRET_KEY = re.compile(
    r"(^|[_\-.])(password|passwd|pass|secret|token|api[_-]?key|credentials?|authori[sz]ation|auth|cookie"
    r"|private[_-]?key|bearer)($|[_\-.])",
    re.IGNORECASE,
)
_SECRET_TEXT = (
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}"), r"\1 ***"),
    (re.compile(r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key)(\s*[=:]\s*)[^\s,;&\"']+"), r"\1\2***"),
    (re.compile(r"(://)[^/\s:@]+:[^/\s@]+@"), r"\1***@"),
)


def redact(value: Any) -> Any:
    """Mask secrets in event data before it is stored: keys that name one, and tokens/passwords in text."""
    if isinstance(value, Mapping):
        return {k: "***" if _SECRET_KEY.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        for pattern, replacement in _SECRET_TEXT:
            value = pattern.sub(replacement, value)
    return value


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Journal:
    """One journal file. Not thread-safe: one Journal per thread (the lock keeper opens its own)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: autocommit, every statement is durable when it returns
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=10)
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
        self._latest: dict[int, dict[str, HostState]] = {}

    def _create(self) -> None:
        self.db.executescript(_SCHEMA)
        for table in _APPEND_ONLY:
            for op in ("UPDATE", "DELETE"):
                self.db.execute(
                    f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
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

    def journal_mode(self) -> str:
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
    ) -> int:
        """A new run with its waves; every planned host `pending`, every skipped host `pending -> skipped`."""
        now = time.time()
        with self.transaction():
            cur = self.db.execute(
                "INSERT INTO runs (release, status, owner, created_at, updated_at, bundle_path, bundle_json,"
                " releases_dir, inventory_json, limit_text, policy_path, policy_json, plan_json)"
                " VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (release, owner, now, now, bundle_path, json.dumps(bundle), releases_dir, json.dumps(list(inventory)),
                 limit, policy_path, json.dumps(policy), json.dumps(plan)),
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
        self._latest.pop(run_id, None)
        return run_id

    def run(self, run_id: int) -> RunRecord:
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
        return RunRecord(
            id=r["id"], release=r["release"], status=r["status"], message=r["message"],
            stop_reason=r["stop_reason"], stop_wave=r["stop_wave"], abort_requested=bool(r["abort_requested"]),
            owner=r["owner"], created_at=r["created_at"], updated_at=r["updated_at"], finished_at=r["finished_at"],
            bundle_path=r["bundle_path"], bundle=json.loads(r["bundle_json"]), releases_dir=r["releases_dir"],
            inventory=json.loads(r["inventory_json"]), limit=r["limit_text"], policy_path=r["policy_path"],
            policy=json.loads(r["policy_json"]), plan=json.loads(r["plan_json"]),
        )

    def set_run_status(self, run_id: int, status: str, message: str = "", *, finished: bool = False) -> None:
        now = time.time()
        self.db.execute(
            "UPDATE runs SET status = ?, message = ?, updated_at = ?, finished_at = ? WHERE id = ?",
            (status, message, now, now if finished else None, run_id),
        )

    def set_stop(self, run_id: int, reason: str, wave: int | None) -> None:
        """Record why the run stops starting waves (`budget`, `aborted`); the first reason stays."""
        self.db.execute(
            "UPDATE runs SET stop_reason = ?, stop_wave = ?, updated_at = ? WHERE id = ? AND stop_reason IS NULL",
            (reason, wave, time.time(), run_id),
        )

    def request_abort(self, run_id: int) -> None:
        self.db.execute("UPDATE runs SET abort_requested = 1, updated_at = ? WHERE id = ?", (time.time(), run_id))

    def waves(self, run_id: int) -> list[WaveRecord]:
        rows = self.db.execute(
            "SELECT run_id, idx, kind, hosts, predicted_s, status, started_at, finished_at, failures FROM waves"
            " WHERE run_id = ? ORDER BY idx",
            (run_id,),
        ).fetchall()
        return [WaveRecord(*r) for r in rows]

    def wave_started(self, run_id: int, index: int) -> None:
        self.db.execute(
            "UPDATE waves SET status = 'running', started_at = COALESCE(started_at, ?) WHERE run_id = ? AND idx = ?",
            (time.time(), run_id, index),
        )

    def wave_finished(self, run_id: int, index: int, failures: int) -> None:
        self.db.execute(
            "UPDATE waves SET status = 'done', finished_at = ?, failures = ? WHERE run_id = ? AND idx = ?",
            (time.time(), failures, run_id, index),
        )

    # ---- host states ----------------------------------------------------------------------------

    def latest_states(self, run_id: int) -> dict[str, HostState]:
        """Every host of the run and its current state."""
        if run_id not in self._latest:
            rows = self.db.execute(
                "SELECT host, state FROM host_states WHERE id IN"
                " (SELECT MAX(id) FROM host_states WHERE run_id = ? GROUP BY host)",
                (run_id,),
            ).fetchall()
            self._latest[run_id] = {host: HostState(state) for host, state in rows}
        return self._latest[run_id]

    def record_state(self, run_id: int, host: str, wave: int | None, state: HostState, detail: str = "") -> None:
        """Append a state change; refuses one the state diagram does not allow (IllegalTransition)."""
        latest = self.latest_states(run_id)
        check_transition(host, latest[host], state)
        self.db.execute(
            "INSERT INTO host_states (run_id, host, wave, state, at, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, host, wave, state.value, time.time(), redact(detail)),
        )
        latest[host] = state

    def host_history(self, run_id: int) -> list[StateRow]:
        rows = self.db.execute(
            "SELECT id, host, wave, state, at, detail FROM host_states WHERE run_id = ? ORDER BY id", (run_id,)
        ).fetchall()
        return [StateRow(i, h, w, HostState(s), a, d) for i, h, w, s, a, d in rows]

    def hosts_that_failed(self, run_id: int, wave: int | None = None) -> set[str]:
        """Hosts that went through `failed` in this run (in one wave, or in any)."""
        sql = "SELECT DISTINCT host FROM host_states WHERE run_id = ? AND state = 'failed'"
        args: tuple[Any, ...] = (run_id,)
        if wave is not None:
            sql += " AND wave = ?"
            args += (wave,)
        return {r[0] for r in self.db.execute(sql, args).fetchall()}

    # ---- what a host was before the run touched it ----------------------------------------------

    def record_previous_bundle(self, run_id: int, host: str, release: str) -> None:
        """The bundle a host ran before this run touched it; the first record stays (rollback target)."""
        self.db.execute(
            "INSERT OR IGNORE INTO previous_bundles (run_id, host, release, at) VALUES (?, ?, ?, ?)",
            (run_id, host, release, time.time()),
        )

    def previous_bundles(self, run_id: int) -> dict[str, str]:
        rows = self.db.execute("SELECT host, release FROM previous_bundles WHERE run_id = ?", (run_id,)).fetchall()
        return dict(rows)

    def record_lb_before(self, run_id: int, host: str, state: str) -> None:
        """A host's load-balancer state before this run first drained it; the first record stays."""
        self.db.execute(
            "INSERT OR IGNORE INTO lb_changes (run_id, host, before, at) VALUES (?, ?, ?, ?)",
            (run_id, host, state, time.time()),
        )

    def lb_before(self, run_id: int) -> dict[str, str]:
        rows = self.db.execute("SELECT host, before FROM lb_changes WHERE run_id = ?", (run_id,)).fetchall()
        return dict(rows)

    # ---- events ---------------------------------------------------------------------------------

    def add_event(
        self, run_id: int, kind: str, data: Mapping[str, Any], *, wave: int | None = None, host: str | None = None
    ) -> None:
        """Append an event; secrets in `data` are masked before it is stored."""
        self.db.execute(
            "INSERT INTO events (run_id, wave, host, kind, at, data) VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, wave, host, kind, time.time(), json.dumps(redact(data), default=str)),
        )

    def events(self, run_id: int) -> list[EventRow]:
        rows = self.db.execute(
            "SELECT id, wave, host, kind, at, data FROM events WHERE run_id = ? ORDER BY id", (run_id,)
        ).fetchall()
        return [EventRow(i, w, h, k, a, json.loads(d)) for i, w, h, k, a, d in rows]

    # ---- history for the planner ----------------------------------------------------------------

    def wave_history(self, limit: int = 200) -> list[tuple[int, float]]:
        """(hosts, seconds) of the latest waves that finished without a failure."""
        rows = self.db.execute(
            "SELECT hosts, finished_at - started_at FROM waves WHERE status = 'done' AND failures = 0"
            " AND started_at IS NOT NULL AND finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [(int(h), float(s)) for h, s in rows]

    def last_known_releases(self) -> dict[str, str]:
        """Each host's bundle as the journal last left it: the run's release if done, the previous if rolled back."""
        rows = self.db.execute(
            "SELECT hs.host, hs.state, r.release, pb.release FROM host_states hs"
            " JOIN (SELECT host, MAX(id) AS id FROM host_states WHERE state IN ('done', 'rolled_back')"
            "       GROUP BY host) last ON last.id = hs.id"
            " JOIN runs r ON r.id = hs.run_id"
            " LEFT JOIN previous_bundles pb ON pb.run_id = hs.run_id AND pb.host = hs.host"
        ).fetchall()
        out = {}
        for host, state, release, previous in rows:
            known = release if state == HostState.DONE.value else previous
            if known:
                out[host] = known
        return out

    # ---- the lock -------------------------------------------------------------------------------

    def lock_info(self) -> LockInfo | None:
        row = self.db.execute(
            "SELECT owner, pid, hostname, run_id, acquired_at, heartbeat_at FROM lock WHERE id = 1"
        ).fetchone()
        return LockInfo(*row) if row else None

    def acquire_lock(
        self, owner: str, *, run_id: int | None = None, steal: bool = False, stale_after: float = 120.0
    ) -> LockInfo | None:
        """Take the lock. Returns the stale lock that was stolen, if any; raises LockHeld otherwise."""
        now = time.time()
        with self.transaction():
            current = self.lock_info()
            stolen = None
            if current is not None:
                stale = lock_staleness(current, stale_after, now)
                if stale is None or not steal:
                    raise LockHeld(current, stale)
                stolen = current
            self.db.execute(
                "INSERT OR REPLACE INTO lock (id, owner, pid, hostname, run_id, acquired_at, heartbeat_at)"
                " VALUES (1, ?, ?, ?, ?, ?, ?)",
                (owner, os.getpid(), socket.gethostname(), run_id, now, now),
            )
        return stolen

    def set_lock_run(self, run_id: int) -> None:
        self.db.execute("UPDATE lock SET run_id = ? WHERE pid = ? AND hostname = ?",
                        (run_id, os.getpid(), socket.gethostname()))

    def heartbeat(self) -> bool:
        """Refresh our lock's heartbeat; False when the lock is no longer ours."""
        cur = self.db.execute(
            "UPDATE lock SET heartbeat_at = ? WHERE id = 1 AND pid = ? AND hostname = ?",
            (time.time(), os.getpid(), socket.gethostname()),
        )
        return cur.rowcount == 1

    def release_lock(self) -> None:
        self.db.execute("DELETE FROM lock WHERE pid = ? AND hostname = ?", (os.getpid(), socket.gethostname()))


def lock_staleness(lock: LockInfo, stale_after: float, now: float | None = None) -> str | None:
    """Why a lock may be considered abandoned, or None while its holder looks alive."""
    age = (now or time.time()) - lock.heartbeat_at
    if lock.hostname == socket.gethostname() and not pid_alive(lock.pid):
        return f"PID {lock.pid} is not running on {lock.hostname}"
    if age > stale_after:
        return f"no heartbeat for {age:.0f}s (stale after {stale_after:.0f}s)"
    return None


class LockKeeper:
    """Heartbeats our lock from a thread (long host actions block the runner) and notices if it is stolen."""

    def __init__(self, path: Path, interval: float):
        self.path = path
        self.interval = interval
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="journal-heartbeat", daemon=True)

    def __enter__(self) -> LockKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def check(self) -> None:
        """Raise LockLost if another process took the lock."""
        if self.lost.is_set():
            raise LockLost("the journal lock was taken by another process; stopping before the next action")

    def _beat(self) -> None:
        journal = Journal(self.path)
        try:
            while not self._stop.wait(self.interval):
                if not journal.heartbeat():
                    self.lost.set()
                    return
        finally:
            journal.close()
