"""`fleet verify`: the host checks (tests/hosts, pytest-testinfra) against a bundle, with progress.

The checks run in a pytest subprocess, which reads every host at once (a thread and one SSH session per host);
a small plugin (patching/hosts/verify_events.py) streams each finished check back, for the progress
display and the summary; JUnit XML is written for CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patching.hosts.ansible_env import controlled_environment, host_key_problem
from patching.hosts.toolpath import path_with_our_bin
from patching.inventory.target import ANSIBLE_CFG, HOST_CHECKS, ROOT


@dataclass(frozen=True)
class CheckResult:
    """One check on one host."""

    host: str
    check: str
    outcome: str  # passed, failed, skipped
    message: str
    seconds: float


@dataclass
class VerifyResult:
    """Every check's result, pytest's exit status and where the details are."""

    rc: int
    checks: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0
    log: Path | None = None
    junit: Path | None = None
    timed_out: bool = False  # stopped at `timeout_s`: pytest and everything it started were killed

    def by_host(self) -> dict[str, dict[str, int]]:
        """host -> passed/failed/skipped counts."""
        counts: dict[str, dict[str, int]] = {}
        for c in self.checks:
            row = counts.setdefault(c.host, {"passed": 0, "failed": 0, "skipped": 0})
            row[c.outcome] = row.get(c.outcome, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def failures(self) -> list[CheckResult]:
        """The checks that failed."""
        return [c for c in self.checks if c.outcome == "failed"]

    @property
    def succeeded(self) -> bool:
        """pytest exited 0 and no check failed."""
        return self.rc == 0 and not self.failures


def run_verify(bundle_path: Path, inventory: Path, hosts: list[str] | tuple[str, ...], workers: int,
               junit: Path | None = None, on_check: Callable[[CheckResult, int], None] | None = None,
               extra_args: list[str] | None = None, timeout_s: float | None = None) -> VerifyResult:
    """Run the host checks for `hosts`; `on_check(result, total)` is called as each check finishes.

    workers 0 runs the checks in one process (no xdist), which reads every host at once before the first
    check (tests/hosts/conftest.py); N > 0 spreads the hosts over N xdist workers. With `timeout_s`, pytest runs in
    a process group of its own, killed whole (xdist workers, SSH sessions) when the time is up; the
    result is then `timed_out`, with the checks that had finished.
    """
    workdir = Path(tempfile.mkdtemp(prefix="fleet-verify-"))
    events, log = workdir / "events.jsonl", workdir / "pytest.log"
    events.touch()
    junit = Path(junit) if junit else workdir / "junit.xml"
    junit.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", str(HOST_CHECKS), "--bundle", str(Path(bundle_path).absolute()),
           "--ansible-inventory", str(Path(inventory).absolute()), "--hosts", ",".join(f"ansible://{h}" for h in hosts),
           "-p", "patching.hosts.verify_events", "-p", "no:cacheprovider", "-o", "addopts=", "-q",
           "--junitxml", str(junit), "-o", "junit_family=xunit2", "--rootdir", str(ROOT)]
    cmd += ["-n", str(workers), "--dist", "loadgroup"] if workers > 0 else ["-p", "no:xdist"]
    cmd += extra_args or []
    # host keys checked, no secret of ours handed to the checks (patching/hosts/ansible_env.py)
    env = controlled_environment({"FLEET_VERIFY_EVENTS": str(events), "ANSIBLE_CONFIG": str(ANSIBLE_CFG),
                                  "PATH": path_with_our_bin()})
    result = VerifyResult(rc=-1, log=log, junit=junit)
    started = time.monotonic()
    total = 0
    with open(log, "w") as out, open(events) as feed:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=timeout_s is not None)
        try:
            while True:
                done = proc.poll() is not None
                for line in feed:
                    record = json.loads(line)
                    if "collected" in record:
                        total = max(total, record["collected"])
                        continue
                    check = _check(record)
                    result.checks.append(check)
                    if on_check:
                        on_check(check, total)
                if done:
                    break
                if timeout_s is not None and time.monotonic() - started > timeout_s:
                    _kill_group(proc)
                    result.timed_out = True
                    continue  # read what the checks reported before they were stopped
                time.sleep(0.1)
        except BaseException:
            if timeout_s is not None:  # in a session of its own, pytest would not see our Ctrl-C
                _kill_group(proc)
            raise
    result.rc = proc.returncode
    result.seconds = time.monotonic() - started
    events.unlink()
    if result.succeeded and junit.parent != workdir:
        shutil.rmtree(workdir)  # nothing to look at; a failed run keeps its pytest log
        result.log = None
    return result


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """Kill the process group we started (pytest leads it: its xdist workers, their SSH sessions)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _check(record: dict[str, Any]) -> CheckResult:
    nodeid = record["nodeid"]
    message = record.get("message", "")
    if record["outcome"] == "failed" and (problem := host_key_problem(message)):
        message = problem  # the check never reached the host: say why first
    return CheckResult(record.get("host") or "?", record.get("check") or nodeid.split("::")[-1],
                       record["outcome"], message, record.get("seconds", 0))
