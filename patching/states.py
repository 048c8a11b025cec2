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


# The detail of a `skipped` state starts with one of these when the reason is one of them.
ALREADY_ON = "already on "  # + the release: the host runs the bundle already
UNREACHABLE = "unreachable"  # the host did not answer at preflight


class HostOutcome(StrEnum):
    """How a run ended for one selected host (what SSM calls a target's status); docs/patching.md."""

    PATCHED = "patched"  # this run took it to the bundle
    ALREADY_ON = "already_on"  # it ran the bundle before the run
    FAILED = "failed"  # it failed and was not rolled back (yet)
    ROLLED_BACK = "rolled_back"  # back on its previous bundle
    ROLLBACK_FAILED = "rollback_failed"  # could not be restored: left drained
    SKIPPED_UNREACHABLE = "skipped_unreachable"
    SKIPPED_OTHER = "skipped_other"  # e.g. its installed bundle is unknown
    NOT_REACHED = "not_reached"  # the run stopped (budget, abort) or paused before its wave
    IN_FLIGHT = "in_flight"  # the run stopped with the host part way (resume finishes it)


ON_BUNDLE = frozenset({HostOutcome.PATCHED, HostOutcome.ALREADY_ON})
BROKEN = frozenset({HostOutcome.FAILED, HostOutcome.ROLLED_BACK, HostOutcome.ROLLBACK_FAILED})


def host_outcome(state: HostState, detail: str = "") -> HostOutcome:
    """A host's outcome from its latest journaled state (and, for `skipped`, why)."""
    if state == HostState.SKIPPED:
        if detail.startswith(ALREADY_ON):
            return HostOutcome.ALREADY_ON
        return HostOutcome.SKIPPED_UNREACHABLE if detail.startswith(UNREACHABLE) else HostOutcome.SKIPPED_OTHER
    return {
        HostState.DONE: HostOutcome.PATCHED,
        HostState.PENDING: HostOutcome.NOT_REACHED,
        HostState.FAILED: HostOutcome.FAILED,
        HostState.ROLLED_BACK: HostOutcome.ROLLED_BACK,
        HostState.ROLLBACK_FAILED: HostOutcome.ROLLBACK_FAILED,
    }.get(state, HostOutcome.IN_FLIGHT)


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
    HARDWARE = "hardware"  # DCGM diagnostic and NCCL all-reduce bandwidth, against the host's own baseline
    SLO = "slo"  # latency and errors straight at the host's serving port
    BEHAVIOUR = "behaviour"  # golden and adversarial prompts: answers unchanged, refusals still refusals
    SOAK = "soak"  # the same under live traffic for a while, and GPU memory growth


class Verdict(StrEnum):
    """A gate's decision. `could_not_measure` is kept apart from `failed`: the figures are missing;
    `inconclusive`: there are figures, but not enough evidence either way (sample more, then the policy's
    `on_inconclusive` decides)."""

    PASSED = "passed"
    FAILED = "failed"
    INCONCLUSIVE = "inconclusive"
    COULD_NOT_MEASURE = "could_not_measure"


class Phase(StrEnum):
    """Whether a gate judged the new bundle or the previous one being restored."""

    ROLLOUT = "rollout"
    ROLLBACK = "rollback"


class ExitCode(IntEnum):
    """`fleet`'s exit codes (DESIGN.md section 6, docs/patching.md "Exit codes").

    Ordered by how much a person must do: when several apply, the run reports the first of
    FAILED, BLOCKED, REFUSED, NOTHING_DONE, PARTLY_DONE.
    """

    OK = 0  # done: every selected host is on the bundle (or as many as the policy's `require` asks)
    FAILED = 1  # a host failed, was rolled back or could not be rolled back, or a budget halted the run
    BAD_INPUT = 2  # nothing was touched
    REFUSED = 3  # nothing started now: locked, outside a window, in a freeze, or paused before a wave
    BLOCKED = 4  # preflight refused a wave (UPS, fabric, capacity): a person must look; resume retries it
    PARTLY_DONE = 5  # finished without a failure, but some selected hosts are not on the bundle
    NOTHING_DONE = 6  # finished without a failure, but it patched no host and not every one is on the bundle


EXIT_MEANING = {
    ExitCode.OK: "done: every selected host is on the bundle",
    ExitCode.FAILED: "failed: a host failed or was rolled back, or a failure budget halted the run",
    ExitCode.BAD_INPUT: "bad input: nothing was touched",
    ExitCode.REFUSED: "refused for now (lock, window or freeze): nothing is wrong, a later window continues",
    ExitCode.BLOCKED: "blocked by preflight (power, fabric or capacity): a person must look; resume retries",
    ExitCode.PARTLY_DONE: "partly done: some selected hosts are not on the bundle (listed above)",
    ExitCode.NOTHING_DONE: "nothing done: no host was patched and not every selected host is on the bundle",
}
