#!/usr/bin/python3
"""Simulated nv-hostengine (DCGM 4.2.3): the host engine dcgmi connects to, as nvidia-dcgm.service runs it.

`nv-hostengine -n [--service-account USER]` stays in the foreground (the packaged unit's form);
without -n it forks into the background; `--term` stops a running one. Messages are DCGM's
(hostengine/src/main.cpp). Like the real one it starts even when NVML cannot reach the driver ("DCGM will
proceed without managing GPUs"): what needs the GPUs then fails in dcgmi, not here.
"""

from __future__ import annotations

import os
import signal
import sys
import time

sys.dont_write_bytecode = True  # the package owns every file beside it: no __pycache__ there
import fleetsim  # noqa: E402

PIDFILE = "nv-hostengine.pid"
PORT = 5555


def running_pid() -> int | None:
    """The pid of a running host engine, None when none runs."""
    try:
        pid = int((fleetsim.run_dir() / PIDFILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if fleetsim.pid_alive(pid) else None


def terminate() -> int:
    pid = running_pid()
    if pid is None:
        print("Unable to terminate host engine, it may not be running.")
        return 1
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while fleetsim.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if fleetsim.pid_alive(pid):
        print("Unable to terminate host engine.")
        return 1
    print("Host engine successfully terminated.")
    return 0


def foreground(version: str) -> int:
    """Run in this process until SIGTERM/SIGINT, with the pid file the daemon form writes."""
    path = fleetsim.run_dir() / PIDFILE

    def stop(_signum, _frame):
        path.unlink(missing_ok=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    fleetsim.write_atomic(path, f"{os.getpid()}\n")
    print(f"Started host engine version {version} using port number: {PORT} ", flush=True)
    while True:
        time.sleep(3600)


def main(argv: list[str]) -> int:
    args = list(argv)
    daemon, term = True, False
    while args:
        arg = args.pop(0)
        if arg in ("-n", "--no-daemon"):
            daemon = False
        elif arg in ("-t", "--term"):
            term = True
        elif arg == "--service-account" and args:
            args.pop(0)  # the unit runs it as root with this account for the diagnostics' children
        else:
            sys.stderr.write(f"nv-hostengine: the lab simulation does not implement {arg!r}\n")
            return 1
    if term:
        return terminate()
    try:
        version = fleetsim.package_info("dcgm")["upstream_version"]
    except fleetsim.SimError as exc:
        sys.stderr.write(exc.message + "\n")
        return 1
    pid = running_pid()
    if pid is not None:
        print(f"Host engine already running with pid {pid}")
        return 1
    if not daemon:
        return foreground(version)
    fleetsim.daemonize(PIDFILE, f"Started host engine version {version} using port number: {PORT} ")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
