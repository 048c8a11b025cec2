"""A CPU hog: one busy loop per core, for tests and benchmarks that must hold on a busy machine.

Each loop is a separate Python process that stops by itself after `seconds` at the latest (bounded even if
whoever started it dies), and is killed by its PID when the `hogging` block ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_LOOP = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def cores() -> int:
    """The cores this process may run on (what a hog has to fill)."""
    return len(os.sched_getaffinity(0))


def start(seconds: float, per_core: int = 1) -> list[subprocess.Popen]:
    """`per_core` busy loops per core, each ending after `seconds` at the latest."""
    code = _LOOP.format(seconds=float(seconds))
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(cores() * per_core)]


def stop(procs: list[subprocess.Popen]) -> None:
    """Kill the loops (by their PIDs) and reap them."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    for proc in procs:
        proc.wait()


@contextmanager
def hogging(seconds: float, per_core: int = 1) -> Iterator[list[subprocess.Popen]]:
    """Busy loops on every core for the block (at most `seconds`)."""
    procs = start(seconds, per_core)
    try:
        yield procs
    finally:
        stop(procs)
