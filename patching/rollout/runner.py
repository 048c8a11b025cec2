"""The patch run: a state machine over hosts, journaled before every action (DESIGN.md section 5).

It reads like the diagram in patching/states.py:

    start()    read every host, plan once with what was found, store run + plan; hosts `pending`
    execute()  wave by wave: abort requested? -> window fits? -> preflight -> the wave's hosts
               through HANDLERS in diagram order (draining, applying, rebooting, verifying,
               undraining, soaking -> done), each step journaled for every host *before* its
               action starts -> failure budgets -> roll back what must be rolled back
    _roll_back the `rolling_back` state's own steps (ROLLBACK_STEPS), then rolled_back | rollback_failed

`execute()` is also resume: it is level-triggered. Hosts caught in flight are re-read through
`Actions.read_hosts` and re-enter the pipeline at their journaled state; a step whose effect is
already there (bundle installed, host back in the LB) is not redone; only LB state this run changed
is restored. Hosts reach the network only through `patching.rollout.actions.Actions`; every gate
verdict comes from `patching.rollout.gates`.

Crash tests: FLEET_KILL_AT=<state>:<n> makes the process SIGKILL itself right after the n-th
transition into <state> is persisted.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from infra.model.errors import InputError, Problem
from patching.inventory.reader import FleetInventory, InventoryHost
from patching.journal.lock import LockHeld, LockKeeper
from patching.journal.store import Journal, RunJournal
from patching.release.bundle import Bundle, Probes
from patching.rollout import gates, stats
from patching.rollout.actions import Actions, HostSnapshot, Outcome, Results
from patching.rollout.budgets import capacity_problems, check_budgets
from patching.rollout.identity import same_name_other_content
from patching.rollout.plan import Plan, PlannedWave
from patching.rollout.policy import Policy, required_hosts
from patching.rollout.survey import PLAN_FIELD, approved_plan_problems, plan_from, skip_reason, survey
from patching.rollout.windows import HORIZON, MaintenanceCalendar, format_duration
from patching.states import (
    ALREADY_ON,
    BROKEN,
    FINISHED,
    IN_FLIGHT,
    ON_BUNDLE,
    PIPELINE,
    UNFINISHED,
    ExitCode,
    Gate,
    HostOutcome,
    HostState,
    Phase,
    RunStatus,
    StopReason,
    Verdict,
    WaveStatus,
    host_outcome,
)

KILL_ENV = "FLEET_KILL_AT"
# where a host may be to serve as the reference probed beside a host's own SLO baseline (Runner._reference_host)
REFERENCE_STATES = frozenset({HostState.PENDING, HostState.DONE, HostState.ROLLED_BACK})

__all__ = ["FINISHED", "KILL_ENV", "RunResult", "RunStatus", "Runner", "abort", "window_refusal"]


@dataclass(frozen=True)
class RunResult:
    """How a run ended (or stopped for now): its status, message, and every selected host's outcome."""

    run_id: int
    status: RunStatus
    message: str
    hosts: Mapping[str, int]  # final state -> number of hosts
    rollback_failed: tuple[str, ...] = ()
    outcomes: Mapping[str, tuple[HostOutcome, str]] = field(default_factory=dict)  # host -> (outcome, why)
    required: int = 0  # hosts that must end on the bundle (the policy's `require`)

    @property
    def on_bundle(self) -> list[str]:
        """The selected hosts that run the bundle now."""
        return sorted(n for n, (o, _) in self.outcomes.items() if o in ON_BUNDLE)

    @property
    def not_on_bundle(self) -> dict[str, tuple[HostOutcome, str]]:
        """Every selected host that does not run the bundle, with its outcome and why."""
        return {n: v for n, v in sorted(self.outcomes.items()) if v[0] not in ON_BUNDLE}

    @property
    def exit_code(self) -> ExitCode:
        """ExitCode's rules, most serious first: failed, blocked, refused (paused), nothing done, partly done."""
        outcomes = {o for o, _ in self.outcomes.values()}
        if self.status == RunStatus.FAILED or outcomes & BROKEN:
            return ExitCode.FAILED
        if self.status == RunStatus.BLOCKED:
            return ExitCode.BLOCKED
        if self.status in (RunStatus.PAUSED, RunStatus.RUNNING):
            return ExitCode.REFUSED
        if len(self.on_bundle) >= self.required:
            return ExitCode.OK
        if HostOutcome.PATCHED not in outcomes:
            return ExitCode.NOTHING_DONE
        return ExitCode.PARTLY_DONE


Notify = Callable[[str, str], None]  # (level: info | warn | error, text)


def _quiet(level: str, text: str) -> None:
    """Default notifier: the journal has everything, the terminal gets nothing."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def window_refusal(calendar: MaintenanceCalendar, now: dt.datetime, predicted: dt.timedelta, what: str
                   ) -> tuple[str, dict[str, Any]] | None:
    """Why `what` (lasting `predicted`) may not start now, with the figures; None when it fits a window."""
    if calendar.fits(now, predicted):
        return None
    frozen = calendar.freeze_at(now)
    window = calendar.open_window(now)
    nxt = calendar.next_opening(now, predicted)
    if frozen:
        why = f"freeze in force ({frozen.label})"
    elif window is None:
        why = "outside every maintenance window"
    else:
        left = window.time_left(now) or dt.timedelta(0)
        why = (f"{what} is predicted to take {format_duration(predicted)}, "
               f"{format_duration(left)} left before the cutoff of window {window.name}")
    later = f"; next opening {nxt.isoformat()}" if nxt else f"; no window fits it in the next {HORIZON.days} days"
    figures = {"refused": why, "now": now.isoformat(), "predicted_s": predicted.total_seconds(),
               "next_opening": nxt.isoformat() if nxt else None}
    return why + later, figures


def abort(run: RunJournal, *, held: LockHeld | None, rollback: bool = False) -> str:
    """`fleet patch abort`: ask the run to stop before its next wave; with `rollback`, also to return the
    hosts it patched to their previous bundle, through the same gates (like Argo Rollouts' abort). With
    the lock ours (`held` None) and nothing to do, a paused or blocked run is closed at once. Returns
    what happened, in words."""
    record = run.record()
    if record.status not in UNFINISHED:
        raise InputError.single("--run", "", record.id, f"run {record.id} is already {record.status}")
    run.request_abort(rollback=rollback)
    states = run.latest_states().values()
    in_flight = any(s in IN_FLIGHT for s in states)
    patched = rollback and HostState.DONE in states
    what = "abort and rollback" if rollback else "abort"
    if held is not None and held.stale:
        return (f"{what} recorded for run {run.id}; its runner is gone ({held.stale}): "
                "`fleet patch resume --steal-lock` finishes the hosts in flight and stops")
    if held is not None:
        after = ", then rolls back the hosts it patched" if rollback else ""
        return f"{what} recorded for run {run.id}; the runner stops after the hosts in flight finish{after}"
    if record.status in (RunStatus.PAUSED, RunStatus.BLOCKED) and not in_flight and not patched:
        run.set_stop(StopReason.ABORTED, None)
        run.set_run_status(RunStatus.ABORTED, f"aborted while {record.status}", finished=True)
        return f"run {run.id} aborted (it was {record.status}; no host was in flight)"
    return f"{what} recorded for run {run.id}: `fleet patch resume` finishes the hosts in flight and stops"


class _KillPoint:
    """FLEET_KILL_AT=<state>:<n>: SIGKILL ourselves right after the n-th transition into <state> is on disk."""

    def __init__(self, spec: str | None):
        self.state: HostState | None = None
        self.n = 0
        self.seen = 0
        if spec:
            state, _, n = spec.partition(":")
            self.state, self.n = HostState(state), int(n or 1)

    def after(self, state: HostState) -> None:
        """Called after each persisted transition."""
        if state == self.state:
            self.seen += 1
            if self.seen == self.n:
                os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Wave:
    """The hosts of one wave on their way through the pipeline."""

    planned: PlannedWave
    rejoining: dict[str, HostSnapshot] = field(default_factory=dict)  # resumed hosts as re-read now

    @property
    def index(self) -> int:
        """The wave's index in the plan."""
        return self.planned.index


class Runner:
    """Runs (and resumes) patch runs of one bundle over one inventory with one policy."""

    def __init__(
        self,
        journal: Journal,
        actions: Actions,
        inventory: FleetInventory,
        bundle: Bundle,
        policy: Policy,
        calendar: MaintenanceCalendar,
        resolve_bundle: Callable[[str], Bundle | None],
        *,
        ignore_window: bool = False,
        clock: Callable[[], dt.datetime] = _utcnow,
        notify: Notify = _quiet,
        lock: LockKeeper | None = None,
    ):
        self.journal = journal
        self.actions = actions
        self.inventory = inventory
        self.bundle = bundle
        self.policy = policy
        self.calendar = calendar
        self.resolve_bundle = resolve_bundle
        self.ignore_window = ignore_window
        self.clock = clock
        self.notify = notify
        self.lock = lock
        self.kill = _KillPoint(os.environ.get(KILL_ENV))
        self._run: RunJournal | None = None
        self._plan: Plan | None = None

    @property
    def run(self) -> RunJournal:
        """The run being executed."""
        assert self._run is not None, "start() or execute() first"
        return self._run

    @property
    def plan(self) -> Plan:
        """The run's stored plan."""
        assert self._plan is not None, "start() or execute() first"
        return self._plan

    # ---- start ----------------------------------------------------------------------------------

    def start(
        self,
        *,
        owner: str,
        bundle_path: str,
        releases_dir: str,
        policy_path: str | None,
        history: Sequence[tuple[int, float]] = (),
        approved: Plan | None = None,
        approved_source: str = PLAN_FIELD,
    ) -> int:
        """Read the hosts, plan once with what they are (or take the `approved` plan, if it still holds),
        and store the run. Touches nothing; InputError when the approved plan may not run now."""
        found = survey(self.actions, self.inventory)
        if problems := same_name_other_content(self.bundle, bundle_path, found.of_selected(self.inventory),
                                               self.journal.recorded_bundles().values()):
            raise InputError(problems)  # a release is known by its content, not its name
        if approved is not None and (problems := approved_plan_problems(
                approved, found, self.inventory, self.bundle, self.policy, approved_source)):
            raise InputError(problems)
        current = dict(found.current)
        known = self._rollback_bundles({n: r for n, r in current.items() if r and n not in found.skip}, releases_dir)
        plan = approved or plan_from(found, self.inventory, self.policy, self.bundle, known_bundles=known,
                                     history=history, calendar=None if self.ignore_window else self.calendar,
                                     now=self.clock())
        unhealthy = dict(found.unhealthy)
        self._run = self.journal.create_run(
            release=self.bundle.release, owner=owner, bundle_path=bundle_path,
            bundle=self.bundle.model_dump(mode="json"), releases_dir=releases_dir,
            inventory=list(self.inventory.sources), limit=self.inventory.limit, policy_path=policy_path,
            policy=self.policy.model_dump(mode="json", by_alias=True), plan=plan.to_dict(),
        )
        self._plan = plan
        self._event("run", {"event": "started", "release": self.bundle.release, "hosts": len(plan.hosts),
                            "waves": len(plan.waves), "skipped": dict(plan.skipped),
                            "unhealthy": unhealthy, "approved_plan": approved is not None})
        for name, why in plan.skipped.items():
            self.notify("warn", f"{name}: skipped: {why}")
        return self.run.id

    def _rollback_bundles(self, current: Mapping[str, str], releases_dir: str) -> dict[str, Bundle]:
        """The manifest of every bundle the hosts run now (rollback re-applies it); bad input if one is missing."""
        known: dict[str, Bundle] = {}
        unresolved: dict[str, list[str]] = defaultdict(list)
        for name, release in current.items():
            if release == self.bundle.release or release in known:
                continue
            if (previous := self.resolve_bundle(release)) is None:
                unresolved[release].append(name)
            else:
                known[release] = previous
        if unresolved:
            raise InputError([Problem("--releases-dir", "", releases_dir, f"no manifest of bundle {release} "
                                      f"(installed on {', '.join(hosts)}) here or in the journal: without it "
                                      f"{'they' if len(hosts) > 1 else 'it'} could not be rolled back; "
                                      f"pass --releases-dir with the directory holding {release}.yaml")
                              for release, hosts in sorted(unresolved.items())])
        return known

    # ---- execute / resume -----------------------------------------------------------------------

    def execute(self, run_id: int) -> RunResult:
        """Run (or resume) a stored run until it is done, halts, pauses or is refused by preflight."""
        self._run = run = self.journal.of_run(run_id)
        record = run.record()
        self._plan = Plan.from_dict(record.plan)
        states = run.latest_states()
        if record.status in FINISHED and not any(s in IN_FLIGHT for s in states.values()):
            return self._result(RunStatus(record.status), record.message)
        run.set_run_status(RunStatus.RUNNING)
        self._event("run", {"event": "executing", "status_before": record.status})
        try:
            return self._execute_waves(run)
        except (_RollbackRefused, _NeedsAPerson) as stopped:
            return self._stop_here(RunStatus.BLOCKED, str(stopped))

    def _execute_waves(self, run: RunJournal) -> RunResult:
        for stored in run.waves():
            if stored.status == WaveStatus.DONE:
                continue
            planned = self.plan.waves[stored.index]
            record = run.record()
            if record.stop_reason:
                break
            if stored.status == WaveStatus.PENDING:
                if record.abort_requested:
                    run.set_stop(StopReason.ABORTED, stored.index)
                    self.notify("warn", f"abort requested: wave {stored.index} and later not started")
                    break
                if refusal := self._window_refusal(planned):
                    return self._stop_here(RunStatus.PAUSED, refusal)
                if problems := self._preflight(planned):
                    return self._stop_here(RunStatus.BLOCKED, f"preflight refused wave {stored.index}: "
                                           + "; ".join(problems))
                run.wave_started(stored.index)
                self.notify("info", f"wave {stored.index} ({planned.kind}): {len(planned.hosts)} host(s) "
                                    f"{self._pools_text(planned)}")
            elif stored.status == WaveStatus.RUNNING and (gap := run.wave_resumed(stored.index)):
                # the runner was dead for `gap`: kept out of the wave's duration (window-fit forecasts)
                self._event("wave", {"event": "resumed", "downtime_s": round(gap, 3)}, wave=stored.index)
            self._run_wave(planned)
            failures = self._check_budgets(planned)
            self._roll_back_what_must()
            run.wave_finished(stored.index, failures)
        record = run.record()
        if record.abort_requested and record.stop_reason is None:  # asked during the last wave
            run.set_stop(StopReason.ABORTED, None)
        self._roll_back_what_must()
        return self._finish()

    def _stop_here(self, status: RunStatus, message: str) -> RunResult:
        self.run.set_run_status(status, message)
        self._event("run", {"event": status.value, "message": message})
        self.notify("warn", message)
        return self._result(status, message)

    def _window_refusal(self, wave: PlannedWave) -> str | None:
        if self.ignore_window:
            return None
        refused = window_refusal(self.calendar, self.clock(), dt.timedelta(seconds=wave.predicted_s),
                                 f"wave {wave.index}")
        if refused is None:
            return None
        message, figures = refused
        self._event("window", {"wave": wave.index, **figures})
        return f"paused before wave {wave.index}: {message}"

    # ---- preflight ------------------------------------------------------------------------------

    def _preflight(self, wave: PlannedWave) -> list[str]:
        """Skip what cannot be touched, then refuse the wave (list of problems) on power, fabric or capacity."""
        states = self.run.latest_states()
        pending = [n for n in wave.hosts if states[n] == HostState.PENDING]
        pools = {self.plan.hosts[n].pool for n in pending}
        members = [h for h in self.inventory.hosts.values() if h.pool in pools]
        facts = self.actions.read_hosts(members)
        ready = []
        for name in pending:
            why, release = skip_reason(facts.get(name))
            if why is None and release == self.bundle.release:
                why = f"{ALREADY_ON}{self.bundle.release}"
            if why:
                self._enter(name, wave.index, HostState.SKIPPED, why)
                self.notify("warn", f"{name}: skipped: {why}")
            else:
                ready.append(name)
        problems: list[str] = []
        measurements: dict[str, Any] = {}
        if ready:
            hosts = self._hosts(ready)
            power = self.actions.check_power(hosts, self.policy.preflight.ups_min_charge_pct)
            measurements["power"] = _outcomes(power)
            problems += [f"{n}: power: {gates.why(power.get(n))}" for n in ready if not _ok(power.get(n))]
            if self.policy.preflight.check_fabric:
                fabric = self.actions.check_fabric(hosts)
                measurements["fabric"] = _outcomes(fabric)
                problems += [f"{n}: fabric: {gates.why(fabric.get(n))}" for n in ready if not _ok(fabric.get(n))]
            healthy = {n: f.healthy for n, f in facts.items()}
            capacity, figures = capacity_problems(ready, members, healthy, self.plan.pools)
            measurements["capacity"] = figures
            problems += capacity
        self._event("preflight", {"hosts": ready, "ok": not problems, "problems": problems,
                                  "measurements": measurements}, wave=wave.index)
        if problems:
            return problems
        for name in ready:
            release = facts[name].installed_release
            assert release is not None  # skip_reason refused hosts without one
            self.run.record_previous_bundle(name, release)
            self.run.record_lb_before(name, facts[name].lb_state)
        return []

    # ---- the wave: one handler per pipeline state, in diagram order -----------------------------

    def _run_wave(self, planned: PlannedWave) -> None:
        """Walk the wave's hosts through HANDLERS in lockstep; resumed hosts join at their own state."""
        states = self.run.latest_states()
        halted = self.run.record().stop_reason is not None  # a resumed wave: no host that has not started starts
        hosts = [n for n in planned.hosts if (states[n] == HostState.PENDING and not halted) or states[n] in PIPELINE]
        resumed = [n for n in hosts if states[n] != HostState.PENDING]
        wave = _Wave(planned)
        if resumed:  # level-triggered: what the resumed hosts are now decides what is redone
            wave.rejoining = dict(self.actions.read_hosts(self._hosts(resumed)))
            self._event("resume", {"hosts": {n: states[n].value for n in resumed},
                                   "facts": {n: _snapshot_dict(f) for n, f in wave.rejoining.items()}},
                        wave=wave.index)
        entry = {n: 0 if states[n] == HostState.PENDING else PIPELINE.index(states[n]) for n in hosts}
        live = list(hosts)
        for i, (state, handler) in enumerate(HANDLERS.items()):
            group = [n for n in live if entry[n] <= i]
            if not group:
                continue
            if self.lock:
                self.lock.check()
            for name in group:
                if states[name] != state:
                    self._enter(name, wave.index, state)
            # only the hosts that re-enter at this very state were caught in it by a crash
            caught = {n: f for n, f in wave.rejoining.items() if entry[n] == i}
            started = time.monotonic()
            results = handler(self, group, _Wave(planned, caught))
            failed = [n for n in group if not _ok(results.get(n))]
            self._event("step", {"step": state.value, "hosts": group, "failed": failed,
                                 "seconds": round(time.monotonic() - started, 3)}, wave=wave.index)
            for name in failed:
                self._enter(name, wave.index, HostState.FAILED, gates.why(results.get(name)))
                self.notify("error", f"{name}: failed at {state}: {gates.why(results.get(name))}")
                live.remove(name)
            if failed:
                self._check_budgets(planned, step=state.value)
        for name in live:
            self._enter(name, wave.index, HostState.DONE)
        if live:
            self.notify("info", f"wave {wave.index}: {len(live)} host(s) done on {self.bundle.release}")

    def _draining(self, names: list[str], wave: _Wave) -> dict[str, Outcome]:
        """Its own SLO figures and golden answers while it still serves (the baseline when its pool has no peer
        left on the old bundle), then out of the load balancer, in-flight requests finished; then, drained,
        its hardware figures when the bundle changes its driver, NCCL or fabric."""
        fresh = [n for n in names if n not in wave.rejoining]
        self._record_own_baselines(fresh)
        self._record_own_answers(fresh)
        results = self._drain(names)
        # drained and still on the old bundle (a host a restart caught here too): its hardware figures, once
        measured = {e.host for e in self.run.events()
                    if e.kind == "baseline" and e.data.get("gate") == Gate.HARDWARE.value}
        old = [n for n in names if n not in measured and _ok(results.get(n))
               and (n in fresh or wave.rejoining[n].installed_release != self.bundle.release)]
        self._record_own_hardware(old)
        return results

    def _applying(self, names: list[str], wave: _Wave) -> dict[str, Outcome]:
        """The bundle through patch.yml; the Ansible result is the first gate."""
        done = {n for n, f in wave.rejoining.items() if f.installed_release == self.bundle.release}
        todo = [n for n in names if n not in done]
        results = self._call(self.actions.apply, todo, self.bundle, self.policy.timeouts.apply.total_seconds(),
                             self._components({n: self.plan.hosts[n].current for n in todo if n in self.plan.hosts}))
        results |= {n: Outcome(True, f"{self.bundle.release} already installed") for n in done}
        return self._judge(Gate.ANSIBLE, results, names, wave.index, Phase.ROLLOUT, self.bundle)

    def _rebooting(self, names: list[str], wave: _Wave) -> dict[str, Outcome]:
        """Rebooted where the loaded driver is not the bundle's, and back."""
        timeout_s = self.policy.timeouts.reboot.total_seconds()
        return self._call(self.actions.reboot_if_needed, names, self.bundle, timeout_s)

    def _verifying(self, names: list[str], wave: _Wave) -> dict[str, Outcome]:
        """testinfra, then the SLO probe against its baseline, then the behaviour probes."""
        return self._verify(names, self.bundle, wave.index, Phase.ROLLOUT)

    def _undraining(self, names: list[str], wave: _Wave) -> dict[str, Outcome]:
        """Back in the load balancer (unless it was out before the run)."""
        back = {n for n, f in wave.rejoining.items() if f.lb_state == "serving"}
        results = self._undrain([n for n in names if n not in back])
        return results | {n: Outcome(True, "already serving") for n in back}

    def _soaking(self, names: list[str], wave: _Wave) -> dict[str, Outcome]:
        """Live traffic for the soak's duration: latency, errors and GPU memory growth."""
        return self._soak(names, wave.index, Phase.ROLLOUT, self.bundle)

    # ---- what the handlers share ------------------------------------------------------------------

    def _drain(self, names: list[str]) -> dict[str, Outcome]:
        before = self.run.lb_before()
        # a host someone else took out of the LB stays theirs: we neither drain nor later undrain it
        ours = [n for n in names if before.get(n) != "drained"]
        results = self._call(self.actions.drain, ours, self.policy.timeouts.drain.total_seconds())
        return results | {n: Outcome(True, "was not serving before the run; left as found")
                          for n in names if n not in ours}

    def _undrain(self, names: list[str]) -> dict[str, Outcome]:
        before = self.run.lb_before()
        ours = [n for n in names if before.get(n, "serving") != "drained"]
        results = self._call(self.actions.undrain, ours, self.policy.timeouts.undrain.total_seconds())
        return results | {n: Outcome(True, "was not serving before the run; left out of the LB")
                          for n in names if n not in ours}

    def _verify(self, names: list[str], bundle: Bundle, wave: int, phase: Phase) -> dict[str, Outcome]:
        """testinfra, then (rolling out a bundle that changes the driver, NCCL or fabric) the hardware checks,
        the SLO probe and the behaviour probes, each on the hosts that passed the one before; every decision
        journaled with its figures."""
        gate_s = self.policy.timeouts.gate.total_seconds()
        results: dict[str, Outcome] = {n: Outcome(True) for n in names}
        if self.policy.gates.testinfra:
            checks = self._call(self.actions.gate_testinfra, names, bundle, gate_s)
            results = self._judge(Gate.TESTINFRA, checks, names, wave, phase, bundle)
        passing = [n for n in names if results[n].ok]
        if phase == Phase.ROLLOUT and (due := [n for n in passing if self._hardware_due(n, bundle)]):
            results |= self._hardware_gate(due, bundle, wave, phase)
        passing = [n for n in names if results[n].ok]
        if self.policy.gates.slo.enabled and passing:
            results |= self._slo_gate(passing, bundle, wave, phase)
        passing = [n for n in names if results[n].ok]
        if passing and (probes := self._behaviour_probes(bundle, phase)) is not None:
            answers = self._call(self.actions.probe_behaviour, passing, probes, gate_s)
            own = self._own_answers() if phase == Phase.ROLLOUT else {}
            with_baseline = {n: _with_baseline(o, own.get(n)) for n, o in answers.items()}
            results |= self._judge(Gate.BEHAVIOUR, with_baseline, passing, wave, phase, bundle)
        return results

    def _behaviour_probes(self, bundle: Bundle, phase: Phase) -> Probes | None:
        """The bundle's probes, when the gate is on and it has any. A rollback runs the adversarial ones only:
        golden answers are compared with the host's own before the patch, which a rollback has not."""
        probes = bundle.probes
        if phase == Phase.ROLLBACK:
            probes = probes.model_copy(update={"golden": []})
        return probes if self.policy.gates.behaviour.enabled and probes.all() else None

    def _record_own_answers(self, names: list[str]) -> None:
        """The golden probes' answers while the hosts still run their old bundle (`baseline` events)."""
        if not names or (probes := self._behaviour_probes(self.bundle, Phase.ROLLOUT)) is None or not probes.golden:
            return
        golden = probes.model_copy(update={"adversarial": []})
        answers = self._call(self.actions.probe_behaviour, names, golden, self.policy.timeouts.gate.total_seconds())
        for name in names:
            outcome = answers.get(name)
            if outcome is not None and outcome.measured:
                shas = {p["id"]: p.get("answer_sha256") for p in outcome.measurements.get("probes", [])}
                self._event("baseline", {"gate": Gate.BEHAVIOUR.value, "answers": shas}, host=name)

    def _own_answers(self) -> dict[str, dict[str, str | None]]:
        """Each host's golden answers (sha256 per probe id) from before its patch, from the journal."""
        return {e.host: e.data["answers"] for e in self.run.events()
                if e.kind == "baseline" and e.host and e.data.get("gate") == Gate.BEHAVIOUR.value}

    # ---- the hardware gate: DCGM and NCCL on the drained host, against its own figure and its pool's -------

    def _hardware_due(self, name: str, bundle: Bundle) -> bool:
        """Whether the bundle changes a component of `gates.hardware.when_changed` on the host (when what it
        ran is unknown, or its manifest is, it may change anything: yes)."""
        hw = self.policy.gates.hardware
        if not hw.enabled:
            return False
        planned = self.plan.hosts.get(name)
        current = planned.current if planned is not None else None
        if current is None or (diff := self.plan.diffs.get(current)) is None:
            return current != bundle.release
        return any(changed.split(".")[0] in hw.when_changed for changed, _, _ in diff)

    def _record_own_hardware(self, names: list[str]) -> None:
        """The drained hosts' hardware figures on the old bundle (`baseline` events, read back on resume)."""
        due = [n for n in names if self._hardware_due(n, self.bundle)]
        if not due:
            return
        figures = self._call(self.actions.check_hardware, due, self.policy.gates.hardware,
                             self.policy.timeouts.gate.total_seconds())
        for name in due:
            outcome = figures.get(name)
            if outcome is not None and outcome.measured:
                self._event("baseline", {"gate": Gate.HARDWARE.value, "measurements": dict(outcome.measurements)},
                            host=name)

    def _hardware_gate(self, names: list[str], bundle: Bundle, wave: int, phase: Phase) -> dict[str, Outcome]:
        figures = self._call(self.actions.check_hardware, names, self.policy.gates.hardware,
                             self.policy.timeouts.gate.total_seconds())
        own, seen = self._hardware_figures()
        pools = {n: h.pool for n, h in self.inventory.hosts.items()}
        judged = {}
        for name, outcome in figures.items():
            _, kind = _bandwidth(outcome.measurements.get("nccl") or {})
            pool = {peer: busbw for peer, (busbw, peer_kind) in seen.items()
                    if peer != name and pools.get(peer) == pools.get(name) and peer_kind == kind}
            before, before_kind = own.get(name, (None, None))
            baseline = {"own": before if before_kind == kind else None, "pool": pool}
            judged[name] = Outcome(outcome.ok, outcome.detail, outcome.timed_out,
                                   {**outcome.measurements, "baseline": baseline}, outcome.measured)
        return self._judge(Gate.HARDWARE, judged, names, wave, phase, bundle)

    def _hardware_figures(self) -> tuple[dict[str, tuple[float, tuple]], dict[str, tuple[float, tuple]]]:
        """From the journal, each host's bus bandwidth with the GPUs it was measured on: (its own from before its
        patch, the latest of any host: before its patch or after it, when that passed)."""
        own: dict[str, tuple[float, tuple]] = {}
        seen: dict[str, tuple[float, tuple]] = {}
        for event in self.run.events():
            data = event.data
            if not event.host or data.get("gate") != Gate.HARDWARE.value:
                continue
            if event.kind == "gate" and not data.get("ok"):
                continue
            if event.kind not in ("baseline", "gate") or not isinstance(nccl := data["measurements"].get("nccl"),
                                                                        Mapping):
                continue
            figure = _bandwidth(nccl)
            seen[event.host] = figure
            if event.kind == "baseline":
                own[event.host] = figure
        return own, seen

    # ---- the SLO gate: against a baseline of the same interval, sampling more when unsure -----------------

    def _slo_gate(self, names: list[str], bundle: Bundle, wave: int, phase: Phase) -> dict[str, Outcome]:
        """Probe the hosts and, in the same interval, up to `baseline_peers` hosts of each one's pool still on
        the previous bundle; judge each host against its peers (else its own figures from before the drain).
        An inconclusive answer samples more, up to `max_requests`; then `on_inconclusive` decides."""
        slo = self.policy.gates.slo
        gate_s = self.policy.timeouts.gate.total_seconds()
        peers = self._peers(names, bundle) if phase == Phase.ROLLOUT else {}
        own = self._own_baselines() if phase == Phase.ROLLOUT else {}
        # a host judged against its own figures from before the drain: the reference probed beside them then is
        # probed beside it now, so the machine's drift between the two intervals is measured, not blamed on it
        references = {n: ref["host"] for n in names if not peers.get(n) and n in own
                      and (ref := own[n].measurements.get("reference")) and ref["host"] not in names}
        measured: dict[str, Outcome] = {}
        peer_figures: dict[str, Outcome] = {}
        decisions: dict[str, gates.Decision] = {}
        pending, asked, bound = list(names), slo.needed_requests(), slo.request_bound()
        total = 0
        while pending and asked > 0:
            probe = slo.model_copy(update={"requests": asked})
            compared_with = {p for n in pending for p in peers.get(n, ())} | {references[n] for n in pending
                                                                              if n in references}
            extra = sorted(compared_with - set(pending))
            answers = self._call(self.actions.probe_slo, pending + extra, probe, gate_s)  # one interval
            total += asked
            for name in extra:
                peer_figures[name] = gates.merge_rounds(peer_figures.get(name), answers.get(name))
            for name in pending:
                measured[name] = gates.merge_rounds(measured.get(name), answers.get(name))
                decisions[name] = gates.judge(Gate.SLO, measured[name], self.policy,
                                              self._baseline_of(name, peers, peer_figures, own))
            pending = [n for n in pending if decisions[n].verdict == Verdict.INCONCLUSIVE]
            asked = min(max(asked, bound // 4), bound - total)
            if pending and asked > 0:
                self._event("resample", {"gate": Gate.SLO.value, "hosts": pending, "requests_so_far": total,
                                         "more": asked, "why": {n: decisions[n].detail for n in pending}},
                            wave=wave)
        unsure = [n for n in names if decisions[n].verdict == Verdict.INCONCLUSIVE]
        results = {n: self._journal_decision(decisions[n], n, wave, phase, bundle) for n in names}
        if unsure and slo.on_inconclusive == "pause":
            raise _NeedsAPerson(f"SLO gate inconclusive on {', '.join(unsure)} after {total} requests: a person "
                                "decides (`fleet patch resume` measures again, `fleet patch abort --rollback` "
                                "rolls back)")
        return results

    def _peers(self, names: list[str], bundle: Bundle) -> dict[str, list[str]]:
        """For each host: up to `baseline_peers` hosts of its pool serving and still not on `bundle`."""
        states = self.run.latest_states()
        wanted = self.policy.gates.slo.baseline_peers
        if wanted <= 0:
            return {}
        batch = set(names)
        candidates: dict[str, list[str]] = defaultdict(list)
        for host in self.inventory.hosts.values():
            if host.name in batch or states.get(host.name) in IN_FLIGHT or states.get(host.name) == HostState.DONE:
                continue
            candidates[host.pool].append(host.name)
        pools = {n: self.inventory.hosts[n].pool for n in names}
        members = sorted({m for p in set(pools.values()) for m in candidates.get(p, ())})
        facts = self.actions.read_hosts(self._hosts(members)) if members else {}
        serving = {n for n, f in facts.items() if f.healthy and f.installed_release != bundle.release}
        return {n: sorted(m for m in candidates.get(pools[n], ()) if m in serving)[:wanted] for n in names}

    def _baseline_of(self, name: str, peers: Mapping[str, list[str]], peer_figures: Mapping[str, Outcome],
                     own: Mapping[str, Outcome]) -> gates.Baseline | None:
        """Its peers' figures of this interval when there are any, else its own from before the drain."""
        mine = peers.get(name) or []
        if mine and (base := gates.Baseline.of(f"peers {', '.join(mine)} on the previous bundle, same interval",
                                               [peer_figures[p] for p in mine if p in peer_figures])):
            return base
        if name not in own:
            return None
        base = gates.Baseline.of("its own figures before the drain", [own[name]])
        reference = own[name].measurements.get("reference")
        if base is None or not reference:
            return base
        return base.drift_corrected(reference["host"], reference.get("medians") or {},
                                    peer_figures.get(reference["host"]))

    def _record_own_baselines(self, names: list[str]) -> None:
        """Probe the hosts while they still serve; journaled as `baseline` events (read back on resume).

        A host whose pool has no peer left to compare with after its patch will be judged against these figures,
        taken minutes earlier; on a shared machine (or a fleet whose load moves) that interval alone can move a
        P95 by tens of percent. So a reference host outside the batch, serving and not in flight, is probed in
        the same interval, its medians journaled beside the figures: the SLO gate probes it again beside the
        patched host and scales the baseline by its drift (gates.Baseline.drift_corrected). Hosts with peers
        are judged against those instead (same interval already); the reference rides in the same probe call."""
        slo = self.policy.gates.slo
        if not slo.enabled or not names:
            return
        # enough for the quantile at the confidence whatever `requests` says: a short baseline decides nothing
        enough = max(slo.needed_requests(), stats.samples_for_quantile(slo.quantile, slo.confidence))
        probe = slo.model_copy(update={"requests": enough})
        reference = self._reference_host(names)
        figures = self._call(self.actions.probe_slo, names + ([reference] if reference else []), probe,
                             self.policy.timeouts.gate.total_seconds())
        ref = figures.get(reference) if reference else None
        medians = gates.medians(ref.measurements) if ref is not None and ref.ok and ref.measured else {}
        for name in names:
            outcome = figures.get(name)
            if outcome is not None and outcome.ok and outcome.measured:
                data = dict(outcome.measurements)
                if medians:
                    data["reference"] = {"host": reference, "medians": medians}
                self._event("baseline", {"gate": Gate.SLO.value, "measurements": data}, host=name)

    def _reference_host(self, batch: list[str]) -> str | None:
        """A host outside `batch` that the run will not touch before the batch's SLO gate and that was last seen
        serving (pending, done, rolled back), of the batch's site first; None when there is none. Nothing is read
        to choose it: a reference that does not answer its probe is simply not recorded."""
        states = self.run.latest_states()
        sites = {self.inventory.hosts[n].site for n in batch}
        candidates = sorted((h for h in self.inventory.hosts.values() if h.name not in batch
                             and states.get(h.name, HostState.PENDING) in REFERENCE_STATES),
                            key=lambda h: (h.site not in sites, h.name))
        return candidates[0].name if candidates else None

    def _own_baselines(self) -> dict[str, Outcome]:
        """The latest pre-drain SLO figures of each host, from the journal."""
        out = {}
        for event in self.run.events():
            if event.kind == "baseline" and event.host and event.data.get("gate") == Gate.SLO.value:
                out[event.host] = Outcome(True, measurements=event.data["measurements"])
        return out

    def _journal_decision(self, decision: gates.Decision, name: str, wave: int, phase: Phase,
                          bundle: Bundle) -> Outcome:
        self._event("gate", {"gate": decision.gate.value, "phase": phase.value, "release": bundle.release,
                             "verdict": decision.verdict.value, "ok": decision.ok,
                             "timed_out": decision.timed_out, "detail": decision.detail,
                             "measurements": dict(decision.measurements),
                             "thresholds": dict(decision.thresholds)}, wave=wave, host=name)
        return decision.outcome()

    def _soak(self, names: list[str], wave: int, phase: Phase, bundle: Bundle) -> dict[str, Outcome]:
        soak = self.policy.gates.soak
        if soak.duration.total_seconds() <= 0:
            return {n: Outcome(True, "soak off") for n in names}
        # the soak's own length, and the gate timeout on top for its last probe and scrape
        timeout_s = soak.duration.total_seconds() + self.policy.timeouts.gate.total_seconds()
        figures = self._call(self.actions.soak, names, soak, timeout_s)
        return self._judge(Gate.SOAK, figures, names, wave, phase, bundle)

    def _judge(self, gate: Gate, measured: Mapping[str, Outcome], names: Iterable[str], wave: int, phase: Phase,
               bundle: Bundle) -> dict[str, Outcome]:
        """The gate's verdict on each host, journaled with its figures; the verdicts as step results."""
        out = {}
        for name in names:
            out[name] = self._journal_decision(gates.judge(gate, measured.get(name), self.policy), name, wave,
                                               phase, bundle)
        return out

    # ---- budgets and rollback -------------------------------------------------------------------

    def _check_budgets(self, wave: PlannedWave, *, step: str | None = None) -> int:
        """Count the failures so far; halt the run (stop reason `budget`) as soon as a budget is exceeded.

        Called after every step of a wave (`step`) and once the wave is finished. The bases are fixed
        by the plan (docs/policy.md "Failure budgets"): a host skipped later neither shrinks nor grows them.
        """
        check = check_budgets(
            self.policy, canary=wave.kind == "canary", wave_hosts=len(wave.hosts),
            wave_failed=sorted(self.run.hosts_that_failed(wave.index)),
            run_hosts=len(self.plan.hosts), run_failed=len(self.run.hosts_that_failed()),
        )
        if step is None or check.exceeded:
            self._event("budget", check.figures() | ({"after_step": step} if step else {}), wave=wave.index)
        if check.exceeded and self.run.record().stop_reason is None:
            self.run.set_stop(StopReason.BUDGET, wave.index)
            self.notify("error", f"wave {wave.index}: failure budget exceeded ({check.wave_failed} failed, "
                                 f"{check.wave_allowed} allowed in the wave; {check.run_failed} failed, "
                                 f"{check.run_allowed} allowed in the run): no new host starts; rollback: "
                                 f"{self.policy.rollback}")
        return check.wave_failed

    def _roll_back_what_must(self) -> None:
        """Roll back every failed host, and when the run halted on a budget, the wave or all, per policy."""
        states = self.run.latest_states()
        record = self.run.record()
        targets = {n for n, s in states.items() if s in (HostState.FAILED, HostState.ROLLING_BACK)}
        if record.stop_reason == StopReason.ABORTED and record.abort_rollback:
            targets |= {n for n, s in states.items() if s == HostState.DONE}
        if record.stop_reason == StopReason.BUDGET:
            if self.policy.rollback == "all":
                targets |= {n for n, s in states.items() if s == HostState.DONE}
            elif self.policy.rollback == "wave" and record.stop_wave is not None:
                targets |= {n for n in self.plan.waves[record.stop_wave].hosts if states[n] == HostState.DONE}
        by_wave: dict[int, list[str]] = defaultdict(list)
        for name in targets:
            by_wave[self.plan.hosts[name].wave].append(name)
        # newest wave first; each batch is one planned wave, so it fits the pools' budgets
        for index in sorted(by_wave, reverse=True):
            self._roll_back(sorted(by_wave[index]), index)

    def _roll_back(self, names: list[str], wave: int) -> None:
        """The `rolling_back` state: ROLLBACK_STEPS re-apply each host's recorded previous bundle through the
        same actions and gates; a host any step breaks ends `rollback_failed`, left drained."""
        for name in names:
            if self.run.latest_states()[name] != HostState.ROLLING_BACK:
                self._enter(name, wave, HostState.ROLLING_BACK)
        if self.lock:
            self.lock.check()
        self.notify("warn", f"rolling back {len(names)} host(s): {', '.join(names)}")
        facts = dict(self.actions.read_hosts(self._hosts(names)))
        rollback = _Rollback(names, wave, self.run.previous_bundles(), facts)
        self._rollback_preflight(rollback)
        for step in ROLLBACK_STEPS:
            step(self, rollback)
        for name in names:
            if name in rollback.broken:
                # left drained on purpose: a host that could not be restored must not take traffic
                self._enter(name, wave, HostState.ROLLBACK_FAILED, rollback.broken[name])
                self._event("rollback_failed", {"reason": rollback.broken[name]}, wave=wave, host=name)
                self.notify("error", f"ROLLBACK FAILED: {name}: {rollback.broken[name]}; the host is left drained")
            else:
                self._enter(name, wave, HostState.ROLLED_BACK, f"back on {rollback.previous[name]}")
                self.notify("warn", f"{name}: rolled back to {rollback.previous[name]}")

    def _rollback_preflight(self, rollback: _Rollback) -> None:
        """Power before a rollback re-applies a driver (not the fabric: a port down may be what the bundle
        broke, and the rollback what mends it). Refused: the hosts stay `rolling_back`, the run `blocked`."""
        live = [n for n in rollback.names if (f := rollback.facts.get(n)) is not None and f.reachable]
        if not live:
            return
        power = self.actions.check_power(self._hosts(live), self.policy.preflight.ups_min_charge_pct)
        problems = [f"{n}: power: {gates.why(power.get(n))}" for n in live if not _ok(power.get(n))]
        self._event("preflight", {"phase": Phase.ROLLBACK.value, "hosts": live, "ok": not problems,
                                  "problems": problems, "measurements": {"power": _outcomes(power)}},
                    wave=rollback.wave)
        if problems:
            raise _RollbackRefused(f"preflight refused the rollback of {', '.join(live)}: " + "; ".join(problems))

    def _rollback_check(self, rollback: _Rollback) -> None:
        """Only hosts with a recorded previous bundle that answer can be rolled back."""
        for name in rollback.names:
            if name not in rollback.previous:
                rollback.broken[name] = "no previous bundle was recorded"
            elif not (f := rollback.facts.get(name)) or not f.reachable:
                rollback.broken[name] = "unreachable"

    def _rollback_drain(self, rollback: _Rollback) -> None:
        """Out of the load balancer again (a host that reached `done` serves)."""
        serving = [n for n in rollback.live() if rollback.facts[n].lb_state == "serving"]
        rollback.fail(self._drain(serving), serving, "drain")

    def _rollback_apply(self, rollback: _Rollback) -> None:
        """Per previous release: apply it where it is not installed or an apply began, reboot if needed, verify."""
        by_release: dict[str, list[str]] = defaultdict(list)
        for name in rollback.live():
            by_release[rollback.previous[name]].append(name)
        # a host stamped with its previous release whose apply of the new bundle began may be half-applied (the
        # stamp is written last): it gets that release applied again too
        touched = {row.host for row in self.run.host_history() if row.state == HostState.APPLYING}
        for release, group in sorted(by_release.items()):
            bundle = self.resolve_bundle(release)
            if bundle is None:  # checked at start; only a manifest deleted mid-run gets here
                rollback.broken |= dict.fromkeys(group, f"the manifest of its previous bundle {release} is gone")
                continue
            todo = [n for n in group if rollback.facts[n].installed_release != release or n in touched]
            # what the rollout applied, put back: the components the change from `release` touches
            applied = self._call(self.actions.apply, todo, bundle, self.policy.timeouts.apply.total_seconds(),
                                 self._components(dict.fromkeys(todo, release)))
            rollback.fail(self._judge(Gate.ANSIBLE, applied, todo, rollback.wave, Phase.ROLLBACK, bundle), todo,
                          f"apply {release}")
            group = [n for n in group if n not in rollback.broken]
            rebooted = self._call(self.actions.reboot_if_needed, group, bundle,
                                  self.policy.timeouts.reboot.total_seconds())
            rollback.fail(rebooted, group, "reboot")
            group = [n for n in group if n not in rollback.broken]
            rollback.fail(self._verify(group, bundle, rollback.wave, Phase.ROLLBACK), group, "gate")

    def _rollback_undrain(self, rollback: _Rollback) -> None:
        """Back in the load balancer, the hosts that were restored."""
        live = rollback.live()
        rollback.fail(self._undrain(live), live, "undrain")

    def _rollback_soak(self, rollback: _Rollback) -> None:
        """The soak, as after a patch: a restored host that fails it is drained again and left out."""
        by_release: dict[str, list[str]] = defaultdict(list)
        for name in rollback.live():
            by_release[rollback.previous[name]].append(name)
        for release, group in sorted(by_release.items()):
            bundle = self.resolve_bundle(release)
            assert bundle is not None  # _rollback_apply broke the hosts whose manifest is gone
            rollback.fail(self._soak(group, rollback.wave, Phase.ROLLBACK, bundle), group, "soak")
        failed = [n for n in rollback.names if n in rollback.broken and rollback.broken[n].startswith("soak")]
        if failed:  # it serves since the undrain: out again, it must not take traffic
            drained = self._drain(failed)
            for name in failed:
                if not _ok(drained.get(name)):
                    rollback.broken[name] += f"; and it could not be drained again: {gates.why(drained.get(name))}"

    # ---- the end ----------------------------------------------------------------------------------

    def _finish(self) -> RunResult:
        record = self.run.record()
        states = self.run.latest_states()
        for stored in self.run.waves():
            if stored.status == WaveStatus.RUNNING:
                self.run.wave_finished(stored.index, len(self.run.hosts_that_failed(stored.index)))
        counts = Counter(states.values())
        if record.stop_reason == StopReason.BUDGET:
            status, message = RunStatus.FAILED, (f"halted: failure budget exceeded in wave {record.stop_wave}; "
                                                 f"rollback policy {self.policy.rollback}")
        elif record.stop_reason == StopReason.ABORTED:
            status = RunStatus.ABORTED
            message = (f"aborted before wave {record.stop_wave}" if record.stop_wave is not None
                       else "aborted after its last wave")
            if record.abort_rollback:
                message += "; the hosts it patched rolled back as asked"
        else:
            status, message = RunStatus.DONE, ""
        message = "; ".join(m for m in (message, self._on_bundle_text()) if m)
        broken = sorted(n for n, s in states.items() if s == HostState.ROLLBACK_FAILED)
        if broken:
            message += f"; ROLLBACK FAILED on {', '.join(broken)} (left drained)"
        self.run.set_run_status(status, message, finished=True)
        result = self._result(status, message)
        self._event("run", {"event": "finished", "status": status.value, "message": message,
                            "hosts": {s.value: n for s, n in counts.items()}, "exit_code": int(result.exit_code),
                            "outcomes": {n: o.value for n, (o, _) in result.outcomes.items()}})
        return result

    def _on_bundle_text(self) -> str:
        """'4 of 5 selected host(s) on 2026-11 (3 patched, 1 already on; 1 required)' and so on."""
        result = self._result(RunStatus.DONE, "")
        kinds = Counter(o for o, _ in result.outcomes.values())
        parts = [f"{kinds[o]} {o.value.replace('_', ' ')}" for o in HostOutcome if kinds[o]]
        required = "" if result.required == len(result.outcomes) else f"; {result.required} required"
        return (f"{len(result.on_bundle)} of {len(result.outcomes)} selected host(s) on {self.bundle.release} "
                f"({', '.join(parts)}{required})")

    def _result(self, status: RunStatus, message: str) -> RunResult:
        last: dict[str, tuple[HostState, str]] = {}
        for row in self.run.host_history():
            last[row.host] = (row.state, row.detail)
        outcomes = {n: (host_outcome(state, detail), detail) for n, (state, detail) in last.items()}
        counts = Counter(state.value for state, _ in last.values())
        broken = tuple(sorted(n for n, (s, _) in last.items() if s == HostState.ROLLBACK_FAILED))
        return RunResult(self.run.id, status, message, dict(counts), broken, outcomes,
                         required_hosts(self.policy.require, len(outcomes)))

    # ---- plumbing -----------------------------------------------------------------------------------

    def _enter(self, name: str, wave: int | None, state: HostState, detail: str = "") -> None:
        """Persist a transition (the action it announces has not started yet), then honour a kill point."""
        self.run.record_state(name, wave, state, detail)
        self.kill.after(state)

    def _hosts(self, names: Iterable[str]) -> list[InventoryHost]:
        return [self.inventory.hosts[n] for n in names]

    def _components(self, releases: Mapping[str, str | None]) -> dict[str, frozenset[str]]:
        """host -> the components to apply to it, for each host whose change from `releases[host]` (the bundle it
        ran before this run) is known (Plan.components_from); the others get every component."""
        out = {}
        for name, release in releases.items():
            if (components := self.plan.components_from(release)) is not None:
                out[name] = components
        return out

    def _call(self, action: Callable[..., Results], names: Sequence[str], *args: Any) -> dict[str, Outcome]:
        if not names:
            return {}
        return dict(action(self._hosts(names), *args))

    def _event(self, kind: str, data: Mapping[str, Any], *, wave: int | None = None, host: str | None = None) -> None:
        self.run.add_event(kind, data, wave=wave, host=host)

    def _pools_text(self, wave: PlannedWave) -> str:
        return "(" + ", ".join(f"{p}: {n}" for p, n in sorted(self.plan.pool_counts(wave).items())) + ")"


# The pipeline's states and their handlers, in the order of the diagram (patching/states.py PIPELINE).
HANDLERS: dict[HostState, Callable[[Runner, list[str], _Wave], dict[str, Outcome]]] = {
    HostState.DRAINING: Runner._draining,
    HostState.APPLYING: Runner._applying,
    HostState.REBOOTING: Runner._rebooting,
    HostState.VERIFYING: Runner._verifying,
    HostState.UNDRAINING: Runner._undraining,
    HostState.SOAKING: Runner._soaking,
}
assert tuple(HANDLERS) == PIPELINE


def _bandwidth(nccl: Mapping[str, Any]) -> tuple[float, tuple]:
    """An all-reduce figure and what it was measured on: (bus bandwidth GB/s, (GPU count, GPU names))."""
    return float(nccl.get("busbw_gbps") or 0.0), (nccl.get("gpus"), tuple(nccl.get("devices") or ()))


def _with_baseline(outcome: Outcome, answers: Mapping[str, str | None] | None) -> Outcome:
    """A behaviour outcome with the host's own answers from before the patch, for the judge."""
    if answers is None:
        return outcome
    return Outcome(outcome.ok, outcome.detail, outcome.timed_out,
                   {**outcome.measurements, "baseline": dict(answers)}, outcome.measured)


class _NeedsAPerson(Exception):
    """A gate stayed inconclusive and the policy says a person decides: the run stops `blocked`, the hosts
    where they are (`resume` measures again)."""


class _RollbackRefused(Exception):
    """The rollback's preflight refused it: the run stops `blocked`; resume retries the rollback."""


@dataclass
class _Rollback:
    """One batch of hosts in `rolling_back`: what each ran before, what it is now, what broke."""

    names: list[str]
    wave: int
    previous: Mapping[str, str]
    facts: Mapping[str, HostSnapshot]
    broken: dict[str, str] = field(default_factory=dict)

    def live(self) -> list[str]:
        """The hosts no step has broken yet."""
        return [n for n in self.names if n not in self.broken]

    def fail(self, results: Mapping[str, Outcome], names: Iterable[str], what: str) -> None:
        """Mark the hosts whose result is not ok as broken by `what`."""
        for n in names:
            if not _ok(results.get(n)):
                self.broken[n] = f"{what}: {gates.why(results.get(n))}"


# What `rolling_back` does, in order.
ROLLBACK_STEPS: tuple[Callable[[Runner, _Rollback], None], ...] = (
    Runner._rollback_check,
    Runner._rollback_drain,
    Runner._rollback_apply,
    Runner._rollback_undrain,
    Runner._rollback_soak,
)


def _ok(outcome: Outcome | None) -> bool:
    return outcome is not None and outcome.ok


def _outcomes(results: Results) -> dict[str, Any]:
    return {n: {"ok": o.ok, "detail": o.detail, **dict(o.measurements)} for n, o in results.items()}


def _snapshot_dict(facts: HostSnapshot) -> dict[str, Any]:
    return {"reachable": facts.reachable, "installed_release": facts.installed_release,
            "lb_state": facts.lb_state, "detail": facts.detail}
