"""What the fleet is now, read before planning, and whether an approved plan still holds.

`survey()` is the refresh before a plan (like `terraform plan` reading real state): every host of the
selected hosts' pools is read once (installed bundle, load-balancer state, reachability), and the
planner is given what was found. `fleet plan` and `fleet patch run` share it, so the plan a person
approves is cut from the same facts a run would use.

`approved_plan_problems()` is the check `fleet patch run --plan plan.json` makes before it runs an
approved plan instead of cutting a new one: same bundle (by content), same policy, same hosts, and no
change since that makes the plan unsafe. What is unsafe:

- a host the plan saw serving is not serving now (unreachable, drained, down): its pool has less
  room than the plan's waves assume;
- a planned host runs another bundle than the plan saw: the version change approved is not the one
  the run would make, nor the rollback target;
- a host is added to or gone from the selection.

A host that was out of service at plan time and serves again is no risk (the pool has more room than
planned); it is still not patched, since the approved plan did not include it.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.model.errors import InputError, Problem, read_text
from patching.inventory.reader import FleetInventory
from patching.release.bundle import Bundle
from patching.rollout.actions import Actions, HostSnapshot
from patching.rollout.plan import PLAN_FORMAT, Plan, build_plan, policy_digest
from patching.rollout.policy import Policy
from patching.rollout.windows import MaintenanceCalendar
from patching.states import UNREACHABLE

PLAN_FIELD = "--plan"


@dataclass(frozen=True)
class Survey:
    """The hosts of the selected pools as read now, and what the planner makes of them."""

    facts: Mapping[str, HostSnapshot]  # every member of the selected hosts' pools
    current: Mapping[str, str | None]  # selected host -> the release it runs (None when unknown)
    skip: Mapping[str, str]  # selected hosts that must not be touched, with why
    unhealthy: Mapping[str, str]  # pool members out of service now, with why

    def of_selected(self, inventory: FleetInventory) -> dict[str, HostSnapshot]:
        """The facts of the selected hosts only."""
        return {n: self.facts[n] for n in inventory.selected if n in self.facts}

    def seen(self) -> dict[str, dict[str, Any]]:
        """The facts as a plan stores them."""
        return {n: {"reachable": f.reachable, "release": f.installed_release, "digest": f.installed_digest,
                    "lb_state": f.lb_state} for n, f in sorted(self.facts.items())}


def survey(actions: Actions, inventory: FleetInventory) -> Survey:
    """Read every host of the selected hosts' pools once."""
    pools = {inventory.hosts[n].pool for n in inventory.selected}
    members = [h for h in inventory.hosts.values() if h.pool in pools]
    facts = dict(actions.read_hosts(members))
    skip: dict[str, str] = {}
    current: dict[str, str | None] = {}
    for name in inventory.selected:
        why, release = skip_reason(facts.get(name))
        current[name] = release
        if why:
            skip[name] = why
    unhealthy = {n: unhealthy_reason(f) for n, f in facts.items() if not f.healthy}
    return Survey(facts, current, skip, unhealthy)


def skip_reason(facts: HostSnapshot | None) -> tuple[str | None, str | None]:
    """(why the host must not be touched, or None; the release it runs)."""
    if facts is None or not facts.reachable:
        detail = f": {facts.detail}" if facts and facts.detail else ""
        return f"{UNREACHABLE} at preflight{detail}", None
    if facts.installed_release is None:
        return "its installed bundle is unknown: there would be nothing to roll back to", None
    return None, facts.installed_release  # one already on the target is reported so by the planner


def unhealthy_reason(facts: HostSnapshot) -> str:
    """Why a host does not count as serving."""
    return "unreachable" if not facts.reachable else f"load balancer: {facts.lb_state}"


def approved_plan_problems(plan: Plan, now: Survey, inventory: FleetInventory, bundle: Bundle, policy: Policy,
                           source: str) -> list[Problem]:
    """Why the approved plan in `source` may not run now (empty: it may); see the module docstring."""
    problems: list[Problem] = []

    def problem(field: str, value: Any, message: str) -> None:
        problems.append(Problem(source, field, value, message))

    if plan.release != bundle.release or (plan.bundle_digest and plan.bundle_digest != bundle.digest):
        problem("bundle_digest", plan.bundle_digest or plan.release,
                f"the plan is for {plan.release} ({plan.bundle_digest[:12] or 'no digest'}), --release is "
                f"{bundle.release} ({bundle.digest[:12]}): plan again with this bundle")
    if not plan.bundle_digest:
        problem("bundle_digest", None, "the plan does not say which bundle it is for: plan again")
    if plan.policy_digest != policy_digest(policy):
        problem("policy_digest", plan.policy_digest[:12] or None,
                "the policy is not the one that cut the plan's waves: plan again with this policy")
    if not plan.seen:
        problem("seen", None, "the plan was made without reading the hosts (--offline): plan again without it")
        return problems
    planned = set(plan.hosts) | set(plan.skipped)
    selected = set(inventory.selected)
    if added := sorted(selected - planned):
        problem("hosts", added, "selected now but not in the plan (inventory or --limit changed)")
    if gone := sorted(planned - selected):
        problem("hosts", gone, "in the plan but not selected now (inventory or --limit changed)")
    for name, before in sorted(plan.seen.items()):
        after = now.facts.get(name)
        was_serving = before.get("reachable") and before.get("lb_state") == "serving"
        if was_serving and (after is None or not after.healthy):
            problem(f"seen.{name}", after.lb_state if after and after.reachable else "unreachable",
                    f"{name} was serving when planned and is not now: its pool has less room than the waves assume")
    for name, host in sorted(plan.hosts.items()):
        after = now.facts.get(name)
        release = after.installed_release if after else None
        if after is not None and after.reachable and release != host.current:
            problem(f"hosts.{name}.current", release,
                    f"{name} ran {host.current or 'an unknown bundle'} when planned and runs "
                    f"{release or 'an unknown bundle'} now: the approved version change is not the one "
                    "a run would make")
    return problems


def plan_from(found: Survey, inventory: FleetInventory, policy: Policy, bundle: Bundle, *,
              known_bundles: Mapping[str, Bundle], history: Sequence[tuple[int, float]],
              calendar: MaintenanceCalendar | None, now: dt.datetime,
              policy_source: str = "<default policy>") -> Plan:
    """The plan cut from what the survey found (`fleet plan`, `fleet patch run`)."""
    return build_plan(inventory, policy, bundle, policy_source=policy_source, current=found.current,
                      unhealthy=found.unhealthy, skip=found.skip, history=history, known_bundles=known_bundles,
                      calendar=calendar, now=now, seen=found.seen())


def read_plan(path: Path) -> Plan:
    """An approved plan.json; InputError naming the file when it is not one."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise InputError.single(str(path), "", None, f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise InputError.single(str(path), "format", found, f"not a plan of format {PLAN_FORMAT} (`fleet plan -o`)")
    try:
        return Plan.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError.single(str(path), "", None, f"not a readable plan: {exc!r}") from None
