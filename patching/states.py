"""Every named state of the patch pipeline: hosts, runs, waves, stops, gates and exit codes (DESIGN.md 5, 6).

Per-host states and the transitions allowed between them:

    pending -> draining -> applying -> rebooting -> verifying -> undraining -> soaking -> done
    (any step) -> failed -> rolling_back -> rolled_back | rollback_failed
    done -> rolling_back            (the run halted and the policy rolls back the wave or all)
    pending -> skipped              (unreachable at preflight, already on the target, cannot be rolled back)

The journal refuses a transition that is not in `TRANSITIONS`, so the stored history of every host
reads as a walk through this diagram.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class HostState(StrEnum):
    """One host's place in the state diagram above."""

    PENDING = "pending"
    DRAINING = "draining"
    APPLYING = "applying"
    REBOOTING = "rebooting"
    VERIFYING = "verifying"
    UNDRAINING = "undraining"
    SOAKING = "soaking"
    DONE = "done"
    FAILED = "failed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    SKIPPED = "skipped"


# The forward path of a wave, in order; a resumed host re-enters it at its persisted state.
PIPELINE = (
    HostState.DRAINING,
    HostState.APPLYING,
    HostState.REBOOTING,
    HostState.VERIFYING,
    HostState.UNDRAINING,
    HostState.SOAKING,
)

# States in which the host is (or may be) out of the load balancer because of this run.
IN_FLIGHT = frozenset(PIPELINE) | {HostState.FAILED, HostState.ROLLING_BACK}

TRANSITIONS: dict[HostState, frozenset[HostState]] = {
    HostState.PENDING: frozenset({HostState.DRAINING, HostState.SKIPPED}),
    HostState.DRAINING: frozenset({HostState.APPLYING, HostState.FAILED}),
    HostState.APPLYING: frozenset({HostState.REBOOTING, HostState.FAILED}),
    HostState.REBOOTING: frozenset({HostState.VERIFYING, HostState.FAILED}),
    HostState.VERIFYING: frozenset({HostState.UNDRAINING, HostState.FAILED}),
    HostState.UNDRAINING: frozenset({HostState.SOAKING, HostState.FAILED}),
    HostState.SOAKING: frozenset({HostState.DONE, HostState.FAILED}),
    HostState.DONE: frozenset({HostState.ROLLING_BACK}),
    HostState.FAILED: frozenset({HostState.ROLLING_BACK}),
    HostState.ROLLING_BACK: frozenset({HostState.ROLLED_BACK, HostState.ROLLBACK_FAILED}),
    HostState.ROLLED_BACK: frozenset(),
    HostState.ROLLBACK_FAILED: frozenset(),
    HostState.SKIPPED: frozenset(),
}


class IllegalTransition(Exception):
    """A transition the state diagram does not allow: a bug in the runner, never bad input."""


def check_transition(host: str, old: HostState, new: HostState) -> None:
    """Raise IllegalTransition unless `old -> new` is an edge of the diagram."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"{host}: {old} -> {new} is not an allowed transition")


class RunStatus(StrEnum):
    """Where a run stands; the journal's `runs.status`."""

    RUNNING = "running"
    PAUSED = "paused"  # the next wave does not fit the window: resume continues it
    BLOCKED = "blocked"  # preflight refused the next wave (UPS, IB, capacity): resume retries it
    DONE = "done"
    FAILED = "failed"  # halted by a failure budget
    ABORTED = "aborted"


FINISHED = frozenset({RunStatus.DONE, RunStatus.FAILED, RunStatus.ABORTED})
UNFINISHED = frozenset({RunStatus.RUNNING, RunStatus.PAUSED, RunStatus.BLOCKED})


class WaveStatus(StrEnum):
    """A planned wave: not started, under way, or finished (its failures counted)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"


class StopReason(StrEnum):
    """Why a run stopped starting waves (the first reason recorded stays)."""

    BUDGET = "budget"  # a failure budget was exceeded
    ABORTED = "aborted"  # `fleet patch abort`


class Gate(StrEnum):
    """The checks a host passes after it was changed, in the order they run."""

    ANSIBLE = "ansible"  # the playbook's own result
    TESTINFRA = "testinfra"  # the host checks (tests/hosts) against the bundle
    SLO = "slo"  # latency and errors straight at the host's serving port
    SOAK = "soak"  # the same under live traffic for a while, and GPU memory growth


class Verdict(StrEnum):
    """A gate's decision. `could_not_measure` is kept apart from `failed`: the figures are missing."""

    PASSED = "passed"
    FAILED = "failed"
    COULD_NOT_MEASURE = "could_not_measure"


class Phase(StrEnum):
    """Whether a gate judged the new bundle or the previous one being restored."""

    ROLLOUT = "rollout"
    ROLLBACK = "rollback"


class ExitCode(IntEnum):
    """`fleet`'s exit codes (DESIGN.md section 6)."""

    OK = 0  # done: every selected host is on the bundle
    FAILED = 1  # the rollout failed or was rolled back
    BAD_INPUT = 2  # nothing was touched
    REFUSED = 3  # locked, outside a window, in a freeze, or refused by preflight
