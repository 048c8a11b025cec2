"""Per-host states of a patch run and the transitions allowed between them (DESIGN.md section 5).

    pending -> draining -> applying -> rebooting -> verifying -> undraining -> soaking -> done
    (any step) -> failed -> rolling_back -> rolled_back | rollback_failed
    done -> rolling_back            (the run halted and the policy rolls back the wave or all)
    pending -> skipped              (unreachable at preflight, already on the target, cannot be rolled back)

The journal refuses a transition that is not in `TRANSITIONS`, so the stored history of every host
reads as a walk through this diagram.
"""

from __future__ import annotations

from enum import StrEnum


class HostState(StrEnum):
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
