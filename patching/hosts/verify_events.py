"""pytest plugin for `fleet verify`: one JSON line per finished check, to $FLEET_VERIFY_EVENTS.

Loaded into the host-check run with `-p patching.hosts.verify_events`; under xdist the controller gets
every worker's reports, so the lines come from one process. The first line gives the number of
checks collected.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

_OUT: Any = None
_WORKER = False


def pytest_configure(config: pytest.Config) -> None:
    """Note whether this process is an xdist worker: only the controller writes events."""
    global _WORKER
    _WORKER = hasattr(config, "workerinput")  # xdist workers report through the controller


def _emit(record: dict[str, Any]) -> None:
    global _OUT
    path = os.environ.get("FLEET_VERIFY_EVENTS")
    if not path or _WORKER:
        return
    if _OUT is None:
        _OUT = open(path, "a", buffering=1)  # noqa: SIM115 - one line per event until the run ends
    _OUT.write(json.dumps(record) + "\n")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Emit how many checks were collected."""
    _emit({"collected": len(session.items)})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """Under xdist: emit how many checks a worker collected."""
    _emit({"collected": len(ids), "worker": getattr(node, "gateway", None) and node.gateway.id})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Emit one line per finished check: host, check, outcome, message, seconds."""
    if report.when != "call" and not (report.when == "setup" and not report.passed):
        return
    message = ""
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1]
        message = message.removeprefix("Failed: ")
    elif report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2]).removeprefix("Skipped: ")
    props = dict(report.user_properties)
    _emit({"nodeid": report.nodeid, "host": props.get("host"), "check": props.get("check"), "outcome": report.outcome,
           "message": message, "seconds": round(report.duration, 3)})
