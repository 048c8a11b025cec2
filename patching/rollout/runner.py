"""The patch run: a state machine over hosts, journaled before every action (DESIGN.md section 5).

Reading order follows the state diagram (patching/states.py):

    start()    read every host, plan with what was found, store run + plan; hosts `pending`
    execute()  wave by wave:  abort requested? -> window fits? -> preflight -> the wave's pipeline
               (draining, applying, rebooting, verifying, undraining, soaking -> done), each step
               journaled for every host *before* its action starts -> failure budgets -> roll back
               what failed (and, when the run halts, the wave or everything, as the policy says)

`execute()` is also resume: it is level-triggered. Hosts caught in flight are re-read through
`Actions.read_hosts` and re-enter the pipeline at their journaled state; a step whose effect is
already there (bundle installed, host back in the LB) is not redone; only LB state this run changed
is restored. Hosts reach the network only through `patching.rollout.actions.Actions`.

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
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from infra.model.errors import InputError, Problem
from patching.inventory.reader import FleetInventory, InventoryHost
from patching.journal.store import Journal, LockKeeper
from patching.release.bundle import Bundle
from patching.rollout.actions import Actions, HostFacts, Outcome, Results
from patching.rollout.plan import Plan, PlannedWave, build_plan
from patching.rollout.policy import Policy, resolve
from patching.rollout.windows import HORIZON, MaintenanceCalendar, format_duration
from patching.states import IN_FLIGHT, PIPELINE, HostState

KILL_ENV = "FLEET_KILL_AT"


class RunStatus(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"  # the next wave does not fit the window: resume continues it
    BLOCKED = "blocked"  # preflight refused the next wave (UPS, IB, capacity): resume retries it
    DONE = "done"
    FAILED = "failed"  # halted by a failure budget
    ABORTED = "aborted"


FINISHED = frozenset({RunStatus.DONE, RunStatus.FAILED, RunStatus.ABORTED})


@dataclass(frozen=True)
class RunResult:
    run_id: int
    status: RunStatus
    message: str
    hosts: Mapping[str, int]  # final state -> number of hosts
    rollback_failed: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        """0 done with every host on the bundle; 3 paused or refused by preflight; 1 anything else."""
        if self.status in (RunStatus.PAUSED, RunStatus.BLOCKED):
            return 3
        rolled = self.hosts.get(HostState.ROLLED_BACK, 0) + self.hosts.get(HostState.ROLLBACK_FAILED, 0)
        return 0 if self.status == RunStatus.DONE and rolled == 0 else 1


Notify = Callable[[str, str], None]  # (level: info | warn | error, text)


def _quiet(level: str, text: str) -> None:
    """Default notifier: the journal has everything, the terminal gets nothing."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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
        if state == self.state:
            self.seen += 1
            if self.seen == self.n:
                os.kill(os.getpid(), signal.SIGKILL)


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
        self.run_id = 0
        self.plan: Plan | None = None

    # ---- start --------------------------------------------------------------------------------------

    def start(
        self,
        *,
        owner: str,
        bundle_path: str,
        releases_dir: str,
        policy_path: str | None,
        history: Sequence[tuple[int, float]] = (),
    ) -> int:
        """Read the hosts, plan with what they are, and store the run. Touches nothing."""
        pools = {self.inventory.hosts[n].pool for n in self.inventory.selected}
        members = [h for h in self.inventory.hosts.values() if h.pool in pools]
        facts = self.actions.read_hosts(members)
        skip: dict[str, str] = {}
        current: dict[str, str | None] = {}
        known: dict[str, Bundle] = {}
        unresolved: dict[str, list[str]] = {}
        for name in self.inventory.selected:
            why, release = self._untouchable(name, facts.get(name))
            current[name] = release
            if why:
                skip[name] = why
            elif release and release != self.bundle.release and release not in known:
                if (previous := self.resolve_bundle(release)) is None:
                    unresolved.setdefault(release, []).append(name)
                else:
                    known[release] = previous
        if unresolved:
            raise InputError([Problem("--releases-dir", "", releases_dir, f"no manifest of bundle {release} "
                                      f"(installed on {', '.join(hosts)}) here or in the journal: without it "
                                      f"{'they' if len(hosts) > 1 else 'it'} could not be rolled back; "
                                      f"pass --releases-dir with the directory holding {release}.yaml")
                              for release, hosts in sorted(unresolved.items())])
        unhealthy = {n: _unhealthy_reason(f) for n, f in facts.items() if not f.healthy}
        plan = build_plan(
            self.inventory, self.policy, self.bundle, current=current, unhealthy=unhealthy, skip=skip,
            history=history, known_bundles=known, calendar=None if self.ignore_window else self.calendar,
            now=self.clock(),
        )
        self.run_id = self.journal.create_run(
            release=self.bundle.release, owner=owner, bundle_path=bundle_path,
            bundle=self.bundle.model_dump(mode="json"), releases_dir=releases_dir,
            inventory=list(self.inventory.sources), limit=self.inventory.limit, policy_path=policy_path,
            policy=self.policy.model_dump(mode="json", by_alias=True), plan=plan.to_dict(),
        )
        self._event("run", {"event": "started", "release": self.bundle.release, "hosts": len(plan.hosts),
                            "waves": len(plan.waves), "skipped": dict(plan.skipped),
                            "unhealthy": unhealthy})
        for name, why in plan.skipped.items():
            self.notify("warn", f"{name}: skipped: {why}")
        return self.run_id

    def _untouchable(self, name: str, facts: HostFacts | None) -> tuple[str | None, str | None]:
        """(why the host must not be touched, or None; the release it runs)."""
        if facts is None or not facts.reachable:
            detail = f": {facts.detail}" if facts and facts.detail else ""
            return f"unreachable at preflight{detail}", None
        release = facts.installed_release
        if release is None:
            return "its installed bundle is unknown: there would be nothing to roll back to", None
        return None, release  # one already on the target is reported so by the planner

    # ---- execute / resume ---------------------------------------------------------------------------

    def execute(self, run_id: int) -> RunResult:
        """Run (or resume) a stored run until it is done, halts, pauses or is refused by preflight."""
        self.run_id = run_id
        run = self.journal.run(run_id)
        self.plan = Plan.from_dict(run.plan)
        states = self.journal.latest_states(run_id)
        if run.status in FINISHED and not any(s in IN_FLIGHT for s in states.values()):
            return self._result(RunStatus(run.status), run.message)
        self.journal.set_run_status(run_id, RunStatus.RUNNING)
        self._event("run", {"event": "executing", "status_before": run.status})
        for wave in self.journal.waves(run_id):
            if wave.status == "done":
                continue
            planned = self.plan.waves[wave.index]
            run = self.journal.run(run_id)
            if run.stop_reason:
                break
            if wave.status == "pending":
                if run.abort_requested:
                    self.journal.set_stop(run_id, "aborted", wave.index)
                    self.notify("warn", f"abort requested: wave {wave.index} and later not started")
                    break
                refusal = self._window_refusal(planned)
                if refusal:
                    return self._stop_here(RunStatus.PAUSED, refusal)
                problems = self._preflight(planned)
                if problems:
                    return self._stop_here(RunStatus.BLOCKED, f"preflight refused wave {wave.index}: "
                                           + "; ".join(problems))
                self.journal.wave_started(run_id, wave.index)
                self.notify("info", f"wave {wave.index} ({planned.kind}): {len(planned.hosts)} host(s) "
                                    f"{self._pools_text(planned)}")
            self._run_wave(planned)
            failures = self._check_budgets(planned)
            self._settle()
            self.journal.wave_finished(run_id, wave.index, failures)
        self._settle()
        return self._finish()

    def _stop_here(self, status: RunStatus, message: str) -> RunResult:
        self.journal.set_run_status(self.run_id, status, message)
        self._event("run", {"event": status.value, "message": message})
        self.notify("warn", message)
        return self._result(status, message)

    def _window_refusal(self, wave: PlannedWave) -> str | None:
        if self.ignore_window:
            return None
        now = self.clock()
        predicted = dt.timedelta(seconds=wave.predicted_s)
        if self.calendar.fits(now, predicted):
            return None
        frozen = self.calendar.freeze_at(now)
        window = self.calendar.open_window(now)
        nxt = self.calendar.next_opening(now, predicted)
        later = f"; next opening {nxt.isoformat()}" if nxt else f"; no window fits it in the next {HORIZON.days} days"
        if frozen:
            why = f"freeze in force ({frozen.label})"
        elif window is None:
            why = "outside every maintenance window"
        else:
            left = window.time_left(now) or dt.timedelta(0)
            why = (f"wave {wave.index} is predicted to take {format_duration(predicted)}, "
                   f"{format_duration(left)} left before the cutoff of window {window.name}")
        self._event("window", {"wave": wave.index, "refused": why, "now": now.isoformat(),
                               "predicted_s": wave.predicted_s, "next_opening": nxt.isoformat() if nxt else None})
        return f"paused before wave {wave.index}: {why}{later}"

    # ---- preflight ----------------------------------------------------------------------------------

    def _preflight(self, wave: PlannedWave) -> list[str]:
        """Skip what cannot be touched, then refuse the wave (list of problems) on power, fabric or capacity."""
        assert self.plan is not None
        states = self.journal.latest_states(self.run_id)
        pending = [n for n in wave.hosts if states[n] == HostState.PENDING]
        pools = {self.plan.hosts[n].pool for n in pending}
        members = [h for h in self.inventory.hosts.values() if h.pool in pools]
        facts = self.actions.read_hosts(members)
        ready = []
        for name in pending:
            why, _ = self._untouchable(name, facts.get(name))
            if why is None and facts[name].installed_release == self.bundle.release:
                why = f"already on {self.bundle.release}"
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
            problems += [f"{n}: power: {_why(power.get(n))}" for n in ready if not _ok(power.get(n))]
            if self.policy.preflight.check_fabric:
                fabric = self.actions.check_fabric(hosts)
                measurements["fabric"] = _outcomes(fabric)
                problems += [f"{n}: fabric: {_why(fabric.get(n))}" for n in ready if not _ok(fabric.get(n))]
            capacity, figures = self._capacity(ready, members, facts)
            measurements["capacity"] = figures
            problems += capacity
        self._event("preflight", {"hosts": ready, "ok": not problems, "problems": problems,
                                  "measurements": measurements}, wave=wave.index)
        if problems:
            return problems
        for name in ready:
            release = facts[name].installed_release
            assert release is not None  # _untouchable refused hosts without one
            self.journal.record_previous_bundle(self.run_id, name, release)
            self.journal.record_lb_before(self.run_id, name, facts[name].lb_state)
        return []

    def _capacity(
        self, ready: Sequence[str], members: Sequence[InventoryHost], facts: Mapping[str, HostFacts]
    ) -> tuple[list[str], dict[str, Any]]:
        """Hosts out of each pool with this wave drained, against its max_unavailable and min_serving."""
        assert self.plan is not None
        problems = []
        figures = {}
        by_pool: dict[str, list[InventoryHost]] = defaultdict(list)
        for host in members:
            by_pool[host.pool].append(host)
        leaving = set(ready)
        for pool, hosts in sorted(by_pool.items()):
            budget = self.plan.pools[pool]
            serving = [h.name for h in hosts if (f := facts.get(h.name)) is not None and f.healthy]
            serving_after = len([n for n in serving if n not in leaving])
            out_after = len(hosts) - serving_after
            figures[pool] = {"size": len(hosts), "serving": len(serving), "serving_after": serving_after,
                             "max_unavailable": budget.max_unavailable, "min_serving": budget.min_serving}
            if out_after > budget.max_unavailable:
                problems.append(f"pool {pool}: {out_after} host(s) would be out, max_unavailable is "
                                f"{budget.max_unavailable}")
            if serving_after < budget.min_serving:
                problems.append(f"pool {pool}: {serving_after} host(s) would serve, min_serving is "
                                f"{budget.min_serving}")
        return problems, figures

    # ---- the wave pipeline --------------------------------------------------------------------------

    def _run_wave(self, wave: PlannedWave) -> None:
        """Walk the wave's hosts through the pipeline in lockstep; resumed hosts join at their own step."""
        states = self.journal.latest_states(self.run_id)
        hosts = [n for n in wave.hosts if states[n] == HostState.PENDING or states[n] in PIPELINE]
        resumed = [n for n in hosts if states[n] != HostState.PENDING]
        # level-triggered: what the resumed hosts are now decides what is redone
        facts = dict(self.actions.read_hosts(self._hosts(resumed))) if resumed else {}
        if resumed:
            self._event("resume", {"hosts": {n: states[n].value for n in resumed},
                                   "facts": {n: _facts_dict(f) for n, f in facts.items()}}, wave=wave.index)
        entry = {n: 0 if states[n] == HostState.PENDING else PIPELINE.index(states[n]) for n in hosts}
        live = list(hosts)
        for i, step in enumerate(PIPELINE):
            group = [n for n in live if entry[n] <= i]
            if not group:
                continue
            if self.lock:
                self.lock.check()
            rejoining = {n for n in group if entry[n] == i and n in facts}
            for name in group:
                if states[name] != step:
                    self._enter(name, wave.index, step)
            started = time.monotonic()
            results = self._step(step, group, rejoining, facts, wave)
            failed = [n for n in group if not _ok(results.get(n))]
            self._event("step", {"step": step.value, "hosts": group, "failed": failed,
                                 "seconds": round(time.monotonic() - started, 3)}, wave=wave.index)
            for name in failed:
                self._enter(name, wave.index, HostState.FAILED, _why(results.get(name)))
                self.notify("error", f"{name}: failed at {step}: {_why(results.get(name))}")
                live.remove(name)
        for name in live:
            self._enter(name, wave.index, HostState.DONE)
        if live:
            self.notify("info", f"wave {wave.index}: {len(live)} host(s) done on {self.bundle.release}")

    def _step(
        self, step: HostState, group: list[str], rejoining: set[str], facts: Mapping[str, HostFacts],
        wave: PlannedWave,
    ) -> dict[str, Outcome]:
        t = self.policy.timeouts
        if step == HostState.DRAINING:
            return self._drain(group)
        if step == HostState.APPLYING:
            done = {n for n in rejoining if facts[n].installed_release == self.bundle.release}
            results = self._call(self.actions.apply, [n for n in group if n not in done], self.bundle,
                                 t.apply.total_seconds())
            results |= {n: Outcome(True, f"{self.bundle.release} already installed") for n in done}
            for name in group:
                self._gate(name, wave.index, "ansible", results.get(name), phase="rollout")
            return results
        if step == HostState.REBOOTING:
            return self._call(self.actions.reboot_if_needed, group, self.bundle, t.reboot.total_seconds())
        if step == HostState.VERIFYING:
            return self._verify(group, self.bundle, wave.index, "rollout")
        if step == HostState.UNDRAINING:
            back = {n for n in rejoining if facts[n].lb_state == "serving"}
            results = self._undrain([n for n in group if n not in back])
            return results | {n: Outcome(True, "already serving") for n in back}
        return self._soak(group, wave.index)

    def _drain(self, names: list[str]) -> dict[str, Outcome]:
        before = self.journal.lb_before(self.run_id)
        # a host someone else took out of the LB stays theirs: we neither drain nor later undrain it
        ours = [n for n in names if before.get(n) != "drained"]
        results = self._call(self.actions.drain, ours, self.policy.timeouts.drain.total_seconds())
        return results | {n: Outcome(True, "was not serving before the run; left as found")
                          for n in names if n not in ours}

    def _undrain(self, names: list[str]) -> dict[str, Outcome]:
        before = self.journal.lb_before(self.run_id)
        ours = [n for n in names if before.get(n, "serving") != "drained"]
        results = self._call(self.actions.undrain, ours, self.policy.timeouts.undrain.total_seconds())
        return results | {n: Outcome(True, "was not serving before the run; left out of the LB")
                          for n in names if n not in ours}

    def _verify(self, names: list[str], bundle: Bundle, wave: int | None, phase: str) -> dict[str, Outcome]:
        """testinfra, then the SLO probe on the hosts that passed it; every decision journaled with its figures."""
        gate_s = self.policy.timeouts.gate.total_seconds()
        results: dict[str, Outcome] = {n: Outcome(True) for n in names}
        if self.policy.gates.testinfra:
            checks = self._call(self.actions.gate_testinfra, names, bundle, gate_s)
            for name in names:
                self._gate(name, wave, "testinfra", checks.get(name), phase=phase, release=bundle.release)
                results[name] = checks.get(name) or _no_result()
        probe = self.policy.gates.slo
        passing = [n for n in names if results[n].ok]
        if probe.enabled and passing:
            figures = self._call(self.actions.probe_slo, passing, probe, gate_s)
            thresholds = {"p99_ms": probe.p99_ms, "max_error_rate": probe.max_error_rate}
            for name in passing:
                verdict = _judge_latency(figures.get(name), probe.p99_ms, probe.max_error_rate)
                self._gate(name, wave, "slo", verdict, phase=phase, release=bundle.release, thresholds=thresholds)
                results[name] = verdict
        return results

    def _soak(self, names: list[str], wave: int | None) -> dict[str, Outcome]:
        soak = self.policy.gates.soak
        if soak.duration.total_seconds() <= 0:
            return {n: Outcome(True, "soak off") for n in names}
        figures = self._call(self.actions.soak, names, soak)
        probe = self.policy.gates.slo
        thresholds = {"p99_ms": probe.p99_ms, "max_error_rate": probe.max_error_rate,
                      "max_gpu_memory_slope_mib_per_hour": soak.max_gpu_memory_slope_mib_per_hour}
        results = {}
        for name in names:
            verdict = _judge_soak(figures.get(name), probe.p99_ms, probe.max_error_rate,
                                  soak.max_gpu_memory_slope_mib_per_hour)
            self._gate(name, wave, "soak", verdict, phase="rollout", thresholds=thresholds)
            results[name] = verdict
        return results

    # ---- budgets and rollback -----------------------------------------------------------------------

    def _check_budgets(self, wave: PlannedWave) -> int:
        """Count the wave's failures; halt the run (stop reason `budget`) when a budget is exceeded."""
        assert self.plan is not None
        states = self.journal.latest_states(self.run_id)
        failed_here = self.journal.hosts_that_failed(self.run_id, wave.index)
        in_wave = [n for n in wave.hosts if states[n] != HostState.SKIPPED]
        amount = self.policy.budgets.canary if wave.kind == "canary" else self.policy.budgets.per_wave
        allowed = resolve(amount, len(in_wave))
        failed_all = self.journal.hosts_that_failed(self.run_id)
        planned = [n for n in self.plan.hosts if states[n] != HostState.SKIPPED]
        allowed_all = resolve(self.policy.budgets.global_, len(planned))
        figures = {"wave_failed": len(failed_here), "wave_allowed": allowed, "run_failed": len(failed_all),
                   "run_allowed": allowed_all, "failed_hosts": sorted(failed_here)}
        exceeded = len(failed_here) > allowed or len(failed_all) > allowed_all
        self._event("budget", figures | {"exceeded": exceeded}, wave=wave.index)
        if exceeded:
            self.journal.set_stop(self.run_id, "budget", wave.index)
            self.notify("error", f"wave {wave.index}: failure budget exceeded ({len(failed_here)} failed, "
                                 f"{allowed} allowed in the wave; {len(failed_all)} failed, {allowed_all} allowed "
                                 f"in the run): halting, rollback: {self.policy.rollback}")
        return len(failed_here)

    def _settle(self) -> None:
        """Roll back every failed host, and when the run halted on a budget, the wave or all, per policy."""
        assert self.plan is not None
        states = self.journal.latest_states(self.run_id)
        run = self.journal.run(self.run_id)
        targets = {n for n, s in states.items() if s in (HostState.FAILED, HostState.ROLLING_BACK)}
        if run.stop_reason == "budget":
            if self.policy.rollback == "all":
                targets |= {n for n, s in states.items() if s == HostState.DONE}
            elif self.policy.rollback == "wave" and run.stop_wave is not None:
                targets |= {n for n in self.plan.waves[run.stop_wave].hosts if states[n] == HostState.DONE}
        by_wave: dict[int, list[str]] = defaultdict(list)
        for name in targets:
            by_wave[self.plan.hosts[name].wave].append(name)
        # newest wave first; each batch is one planned wave, so it fits the pools' budgets
        for index in sorted(by_wave, reverse=True):
            self._roll_back(sorted(by_wave[index]), index)

    def _roll_back(self, names: list[str], wave: int) -> None:
        """Re-apply each host's recorded previous bundle through the same actions and gates."""
        for name in names:
            if self.journal.latest_states(self.run_id)[name] != HostState.ROLLING_BACK:
                self._enter(name, wave, HostState.ROLLING_BACK)
        if self.lock:
            self.lock.check()
        self.notify("warn", f"rolling back {len(names)} host(s): {', '.join(names)}")
        previous = self.journal.previous_bundles(self.run_id)
        facts = self.actions.read_hosts(self._hosts(names))
        broken: dict[str, str] = {}

        def fail(results: Mapping[str, Outcome], names_: Iterable[str], what: str) -> None:
            for n in names_:
                if not _ok(results.get(n)):
                    broken[n] = f"{what}: {_why(results.get(n))}"

        for name in names:
            if name not in previous:
                broken[name] = "no previous bundle was recorded"
            elif not (f := facts.get(name)) or not f.reachable:
                broken[name] = "unreachable"
        live = [n for n in names if n not in broken]
        serving = [n for n in live if facts[n].lb_state == "serving"]
        fail(self._drain(serving), serving, "drain")
        by_release: dict[str, list[str]] = defaultdict(list)
        for name in live:
            if name not in broken:
                by_release[previous[name]].append(name)
        for release, group in sorted(by_release.items()):
            bundle = self.resolve_bundle(release)
            if bundle is None:  # checked at start; only a manifest deleted mid-run gets here
                broken |= dict.fromkeys(group, f"the manifest of its previous bundle {release} is gone")
                continue
            todo = [n for n in group if facts[n].installed_release != release]
            applied = self._call(self.actions.apply, todo, bundle, self.policy.timeouts.apply.total_seconds())
            for name in todo:
                self._gate(name, wave, "ansible", applied.get(name), phase="rollback", release=release)
            fail(applied, todo, f"apply {release}")
            group = [n for n in group if n not in broken]
            rebooted = self._call(self.actions.reboot_if_needed, group, bundle,
                                  self.policy.timeouts.reboot.total_seconds())
            fail(rebooted, group, "reboot")
            group = [n for n in group if n not in broken]
            fail(self._verify(group, bundle, wave, "rollback"), group, "gate")
        live = [n for n in live if n not in broken]
        fail(self._undrain(live), live, "undrain")
        for name in names:
            if name in broken:
                # left drained on purpose: a host that could not be restored must not take traffic
                self._enter(name, wave, HostState.ROLLBACK_FAILED, broken[name])
                self._event("rollback_failed", {"reason": broken[name]}, wave=wave, host=name)
                self.notify("error", f"ROLLBACK FAILED: {name}: {broken[name]}; the host is left drained")
            else:
                self._enter(name, wave, HostState.ROLLED_BACK, f"back on {previous[name]}")
                self.notify("warn", f"{name}: rolled back to {previous[name]}")

    # ---- the end --------------------------------------------------------------------------------------

    def _finish(self) -> RunResult:
        run = self.journal.run(self.run_id)
        states = self.journal.latest_states(self.run_id)
        for wave in self.journal.waves(self.run_id):
            if wave.status == "running":
                self.journal.wave_finished(self.run_id, wave.index,
                                           len(self.journal.hosts_that_failed(self.run_id, wave.index)))
        counts = Counter(states.values())
        if run.stop_reason == "budget":
            status, message = RunStatus.FAILED, (f"halted: failure budget exceeded in wave {run.stop_wave}; "
                                                 f"rollback policy {self.policy.rollback}")
        elif run.stop_reason == "aborted":
            status, message = RunStatus.ABORTED, f"aborted before wave {run.stop_wave}"
        else:
            status, message = RunStatus.DONE, f"{counts[HostState.DONE]} host(s) on {self.bundle.release}"
        if counts[HostState.ROLLED_BACK]:
            message += f"; {counts[HostState.ROLLED_BACK]} rolled back"
        broken = sorted(n for n, s in states.items() if s == HostState.ROLLBACK_FAILED)
        if broken:
            message += f"; ROLLBACK FAILED on {', '.join(broken)} (left drained)"
        self.journal.set_run_status(self.run_id, status, message, finished=True)
        self._event("run", {"event": "finished", "status": status.value, "message": message,
                            "hosts": {s.value: n for s, n in counts.items()}})
        return self._result(status, message)

    def _result(self, status: RunStatus, message: str) -> RunResult:
        states = self.journal.latest_states(self.run_id)
        counts = Counter(s.value for s in states.values())
        broken = tuple(sorted(n for n, s in states.items() if s == HostState.ROLLBACK_FAILED))
        return RunResult(self.run_id, status, message, dict(counts), broken)

    # ---- helpers --------------------------------------------------------------------------------------

    def _enter(self, name: str, wave: int | None, state: HostState, detail: str = "") -> None:
        """Persist a transition (the action it announces has not started yet), then honour a kill point."""
        self.journal.record_state(self.run_id, name, wave, state, detail)
        self.kill.after(state)

    def _hosts(self, names: Iterable[str]) -> list[InventoryHost]:
        return [self.inventory.hosts[n] for n in names]

    def _call(self, action: Callable[..., Results], names: Sequence[str], *args: Any) -> dict[str, Outcome]:
        if not names:
            return {}
        return dict(action(self._hosts(names), *args))

    def _gate(
        self, name: str, wave: int | None, gate: str, outcome: Outcome | None, *, phase: str,
        release: str | None = None, thresholds: Mapping[str, Any] | None = None,
    ) -> None:
        outcome = outcome or _no_result()
        self._event("gate", {"gate": gate, "phase": phase, "release": release or self.bundle.release,
                             "ok": outcome.ok, "timed_out": outcome.timed_out, "detail": outcome.detail,
                             "measurements": dict(outcome.measurements), "thresholds": dict(thresholds or {})},
                    wave=wave, host=name)

    def _event(self, kind: str, data: Mapping[str, Any], *, wave: int | None = None, host: str | None = None) -> None:
        self.journal.add_event(self.run_id, kind, data, wave=wave, host=host)

    def _pools_text(self, wave: PlannedWave) -> str:
        assert self.plan is not None
        return "(" + ", ".join(f"{p}: {n}" for p, n in sorted(self.plan.pool_counts(wave).items())) + ")"


def _no_result() -> Outcome:
    return Outcome(False, "no result from the action")


def _ok(outcome: Outcome | None) -> bool:
    return outcome is not None and outcome.ok


def _why(outcome: Outcome | None) -> str:
    if outcome is None:
        return "no result from the action"
    return ("timed out: " if outcome.timed_out else "") + (outcome.detail or ("ok" if outcome.ok else "failed"))


def _outcomes(results: Results) -> dict[str, Any]:
    return {n: {"ok": o.ok, "detail": o.detail, **dict(o.measurements)} for n, o in results.items()}


def _facts_dict(facts: HostFacts) -> dict[str, Any]:
    return {"reachable": facts.reachable, "installed_release": facts.installed_release,
            "lb_state": facts.lb_state, "detail": facts.detail}


def _unhealthy_reason(facts: HostFacts) -> str:
    return "unreachable" if not facts.reachable else f"load balancer: {facts.lb_state}"


def _judge_latency(outcome: Outcome | None, p99_ms: float, max_error_rate: float) -> Outcome:
    """The SLO verdict on a probe's figures: P99 below the threshold, error rate at most the maximum."""
    if outcome is None or not outcome.ok:
        return Outcome(False, f"probe failed: {_why(outcome)}", outcome.timed_out if outcome else False,
                       outcome.measurements if outcome else {})
    m = outcome.measurements
    p99, errors = m.get("p99_ms"), m.get("error_rate")
    if p99 is None or errors is None:
        return Outcome(False, "probe returned no p99_ms/error_rate", measurements=m)
    problems = []
    if p99 >= p99_ms:
        problems.append(f"p99 {p99:.1f} ms >= {p99_ms:g} ms")
    if errors > max_error_rate:
        problems.append(f"error rate {errors:.2%} > {max_error_rate:.2%}")
    if problems:
        return Outcome(False, "; ".join(problems), measurements=m)
    return Outcome(True, f"p99 {p99:.1f} ms, error rate {errors:.2%}", measurements=m)


def _judge_soak(outcome: Outcome | None, p99_ms: float, max_error_rate: float, max_slope: float) -> Outcome:
    """The soak verdict: latency and errors as for the SLO probe, and GPU memory growth under the slope limit."""
    latency = _judge_latency(outcome, p99_ms, max_error_rate)
    if outcome is None or not outcome.ok:
        return latency
    slope = outcome.measurements.get("gpu_memory_slope_mib_per_hour")
    problems = [] if latency.ok else [latency.detail]
    if slope is None:
        problems.append("soak returned no gpu_memory_slope_mib_per_hour")
    elif slope > max_slope:
        problems.append(f"GPU memory grows {slope:.0f} MiB/h > {max_slope:g} MiB/h")
    if problems:
        return Outcome(False, "; ".join(problems), measurements=outcome.measurements)
    return Outcome(True, f"{latency.detail}, GPU memory {slope:+.0f} MiB/h", measurements=outcome.measurements)
