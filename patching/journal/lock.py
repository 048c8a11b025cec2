"""The journal's lock: one row (owner, PID, host name, run, heartbeat) that keeps two runs apart.

A second run is refused (`LockHeld`); a lock whose heartbeat is older than the stale limit, or whose
PID is dead on this machine, is stale and may be stolen on request. The holder heartbeats it from a
thread (`LockKeeper`) and notices when another process took it (`LockLost`).

Fencing: every acquisition writes a fresh random token into the row, and the `JournalLock` that took it
remembers it. Once a connection has taken the lock it is fenced: each of its journal writes first checks,
inside the write's own transaction, that the row still carries its token (`check_ours`), and raises
`LockLost` writing nothing when it does not (stolen, released, or never taken). `heartbeat`, `set_run`
and `release` match the token too, so two connections of one process never touch each other's lock.
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_SCHEMA = """
CREATE TABLE IF NOT EXISTS lock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    owner TEXT NOT NULL,
    pid INTEGER NOT NULL,
    hostname TEXT NOT NULL,
    run_id INTEGER,
    acquired_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    token TEXT
);
"""


@dataclass(frozen=True)
class LockInfo:
    """Who holds the lock, for which run, and when it last proved it was alive."""

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


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_staleness(lock: LockInfo, stale_after: float, now: float | None = None) -> str | None:
    """Why a lock may be considered abandoned, or None while its holder looks alive."""
    age = (now or time.time()) - lock.heartbeat_at
    if lock.hostname == socket.gethostname() and not pid_alive(lock.pid):
        return f"PID {lock.pid} is not running on {lock.hostname}"
    if age > stale_after:
        return f"no heartbeat for {age:.0f}s (stale after {stale_after:.0f}s)"
    return None


class JournalLock:
    """The lock row of one journal connection (autocommit: every write is durable when it returns).

    `token` is the token of the lock this connection took (None when it holds none); `fenced` is set once
    it took the lock (or by `Journal(path, fenced=True)`) and stays set: from then on its writes need
    the lock to be ours (`check_ours`)."""

    def __init__(self, db: sqlite3.Connection, token: str | None = None):
        self.db = db
        self.token = token
        self.fenced = False
        self.acquired_at: float | None = None

    def info(self) -> LockInfo | None:
        """The current holder, or None when the journal is not locked."""
        row = self.db.execute(
            "SELECT owner, pid, hostname, run_id, acquired_at, heartbeat_at FROM lock WHERE id = 1"
        ).fetchone()
        return LockInfo(*row) if row else None

    def acquire(
        self, owner: str, *, run_id: int | None = None, steal: bool = False, stale_after: float = 120.0
    ) -> LockInfo | None:
        """Take the lock. Returns the stale lock that was stolen, if any; raises LockHeld otherwise."""
        now = time.time()
        token = secrets.token_hex(16)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            current = self.info()
            stolen = None
            if current is not None:
                stale = lock_staleness(current, stale_after, now)
                if stale is None or not steal:
                    raise LockHeld(current, stale)
                stolen = current
            self.db.execute(
                "INSERT OR REPLACE INTO lock (id, owner, pid, hostname, run_id, acquired_at, heartbeat_at, token)"
                " VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                (owner, os.getpid(), socket.gethostname(), run_id, now, now, token),
            )
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self.token, self.fenced, self.acquired_at = token, True, now
        return stolen

    def check_ours(self) -> None:
        """Inside a write transaction: LockLost unless the lock row carries our token. No-op while unfenced."""
        if not self.fenced:
            return
        row = self.db.execute("SELECT token FROM lock WHERE id = 1").fetchone()
        if self.token is not None and row is not None and row[0] == self.token:
            return
        if self.token is None:
            why = "this journal connection does not hold the journal lock (released or never taken)"
        elif row is None:
            why = "the journal lock was released"
        else:
            why = f"the journal lock was taken by another process (now {self.info()})"
        raise LockLost(f"{why}; stopping: nothing more is written to the journal")

    def set_run(self, run_id: int) -> None:
        """Name the run our lock is for (once the run exists); LockLost when the lock is no longer ours."""
        cur = self.db.execute("UPDATE lock SET run_id = ? WHERE id = 1 AND token = ?", (run_id, self.token))
        if self.token is None or cur.rowcount != 1:
            raise LockLost("the journal lock is no longer ours; stopping: nothing more is written to the journal")

    def heartbeat(self) -> bool:
        """Refresh our lock's heartbeat; False when the lock is no longer ours. Without a token (a keeper
        told none) the lock is recognised by this process's PID and host name, as before tokens."""
        if self.token is not None:
            cur = self.db.execute("UPDATE lock SET heartbeat_at = ? WHERE id = 1 AND token = ?",
                                  (time.time(), self.token))
        else:
            cur = self.db.execute(
                "UPDATE lock SET heartbeat_at = ? WHERE id = 1 AND pid = ? AND hostname = ?",
                (time.time(), os.getpid(), socket.gethostname()),
            )
        return cur.rowcount == 1

    def release(self) -> None:
        """Drop our lock (someone else's stays; without a token there is none of ours). Stays fenced."""
        if self.token is not None:
            self.db.execute("DELETE FROM lock WHERE id = 1 AND token = ?", (self.token,))
        self.token = None


class LockKeeper:
    """Heartbeats our lock from a thread (long host actions block the runner) and notices if it is stolen.

    `token`: the holder's `JournalLock.token`; without it the lock is recognised by PID and host name."""

    def __init__(self, path: Path, interval: float, token: str | None = None):
        self.path = path
        self.interval = interval
        self.token = token
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
        # a connection of its own: sqlite3 connections are not shared across threads
        db = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        try:
            lock = JournalLock(db, token=self.token)
            while not self._stop.wait(self.interval):
                if not lock.heartbeat():
                    self.lost.set()
                    return
        finally:
            db.close()
