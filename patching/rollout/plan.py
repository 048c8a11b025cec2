"""The rollout plan: canary, then waves per pool in site order, within every pool's disruption budget.

The plan is an artifact (plan.json + a table) a human or CI approves before a run, and the run
executes exactly the plan it stored in the journal. Rules (DESIGN.md section 5, docs/policy.md):

- the canary wave comes first: the policy's named hosts, or `per_site` hosts of every site (lowest
  patch ring first);
- then, site by site in the policy's `site_order` (other sites after, by name), waves that take the
  next `waves.size` hosts of every pool of the site (lowest patch ring first);
- a pool never has more hosts out at once than its `max_unavailable`, hosts already unhealthy
  included, nor fewer serving than its `min_serving`; a pool with no room left is not planned;
- each wave's duration is predicted from the journal's history (median of past waves of the same
  size, else of all past waves, else the policy's estimate) and fitted into the windows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from rich.console import Group
from rich.table import Table

from infra.model.amount import resolve
from infra.model.errors import InputError, Problem, nearest
from patching.inventory.reader import FleetInventory, InventoryHost
from patching.release.bundle import Bundle
from patching.release.compat import diff_bundles
from patching.release.components import changed_components, ordered
from patching.rollout.policy import Policy
from patching.rollout.windows import MaintenanceCalendar, format_duration
from patching.states import ALREADY_ON

PLAN_FORMAT = 1


@dataclass(frozen=True)
class PoolBudget:
    """A pool's disruption budget as the plan applies it."""

    name: str
    size: int
    max_unavailable: int
    min_serving: int
    unhealthy: int
    wave_size: int
    room: int  # hosts of this pool one wave may take out: the smallest of the limits above


@dataclass(frozen=True)
class PlannedWave:
    """One wave of a plan: canary or not, its hosts, predicted duration and when it fits a window."""

    index: int
    kind: Literal["canary", "wave"]
    hosts: tuple[str, ...]
    predicted_s: float
    window_start: str | None = None  # ISO time the wave fits from; None when it fits no window


@dataclass(frozen=True)
class PlannedHost:
    """A host in a plan: site, pool, ring, the wave that patches it and the bundle it runs now."""

    name: str
    pool: str
    site: str
    ring: int
    wave: int
    current: str | None  # the bundle the host runs, when known


@dataclass(frozen=True)
class Plan:
    """A rollout plan: the waves in order, skipped hosts, pool budgets and what changes per current release."""

    release: str
    created_at: str
    waves: tuple[PlannedWave, ...]
    hosts: Mapping[str, PlannedHost]
    skipped: Mapping[str, str]
    pools: Mapping[str, PoolBudget]
    # current release -> pinned values that change (field, old, new); None when its manifest is unknown
    diffs: Mapping[str, list[tuple[str, Any, Any]] | None] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    # hosts out of service when planned (they count against their pool's budget), with why
    unhealthy: Mapping[str, str] = field(default_factory=dict)
    # what the hosts of the selected pools were when planned (read from them; empty for an offline plan):
    # host -> {"reachable", "release", "lb_state"}; `fleet patch run --plan` compares it with the fleet now
    seen: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    bundle_digest: str = ""  # Bundle.digest of the bundle planned
    policy_digest: str = ""  # policy_digest() of the policy that cut the waves

    def pool_counts(self, wave: PlannedWave) -> dict[str, int]:
        """Hosts per pool in a wave."""
        counts: dict[str, int] = defaultdict(int)
        for name in wave.hosts:
            counts[self.hosts[name].pool] += 1
        return dict(counts)

    def components_from(self, release: str | None) -> frozenset[str] | None:
        """The components a host on `release` gets applied (those its bundle change touches; the same ones put
        back on a rollback to it); None: every component (its bundle or the change is unknown)."""
        return changed_components(self.diffs.get(release)) if release else None

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON data (plan.json); `Plan.from_dict` reads it back."""
        return {
            "format": PLAN_FORMAT,
            "release": self.release,
            "created_at": self.created_at,
            "waves": [asdict(w) | {"hosts": list(w.hosts)} for w in self.waves],
            "hosts": {n: {k: v for k, v in asdict(h).items() if k != "name"} for n, h in self.hosts.items()},
            "skipped": dict(self.skipped),
            "pools": {n: asdict(p) for n, p in self.pools.items()},
            "diffs": {k: None if v is None else [list(c) for c in v] for k, v in self.diffs.items()},
            "notes": list(self.notes),
            "unhealthy": dict(self.unhealthy),
            "seen": {n: dict(v) for n, v in self.seen.items()},
            "bundle_digest": self.bundle_digest,
            "policy_digest": self.policy_digest,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Read a plan back from its `to_dict` data (plan.json)."""
        return cls(
            release=data["release"],
            created_at=data["created_at"],
            waves=tuple(PlannedWave(**(w | {"hosts": tuple(w["hosts"])})) for w in data["waves"]),
            hosts={n: PlannedHost(name=n, **h) for n, h in data["hosts"].items()},
            skipped=dict(data["skipped"]),
            pools={n: PoolBudget(**p) for n, p in data["pools"].items()},
            diffs={k: None if v is None else [tuple(c) for c in v] for k, v in data["diffs"].items()},
            notes=tuple(data["notes"]),
            unhealthy=dict(data.get("unhealthy", {})),  # plans of earlier versions lack the last four
            seen={n: dict(v) for n, v in data.get("seen", {}).items()},
            bundle_digest=data.get("bundle_digest", ""),
            policy_digest=data.get("policy_digest", ""),
        )


def predict_wave_seconds(hosts: int, history: Sequence[tuple[int, float]], default_s: float) -> float:
    """Median duration of past waves with as many hosts, else of all past waves, else `default_s`."""
    same = [seconds for count, seconds in history if count == hosts]
    if same:
        return statistics.median(same)
    if history:
        return statistics.median(seconds for _, seconds in history)
    return default_s


def check_policy_against(inventory: FleetInventory, policy: Policy, source: str) -> None:
    """Names in the policy (canary hosts, sites, pools) must exist in the inventory; InputError otherwise."""
    sites = {h.site for h in inventory.hosts.values()}
    pools = {h.pool for h in inventory.hosts.values()}
    problems: list[Problem] = []

    def unknown(field_name: str, value: str, known: Iterable[str], what: str) -> None:
        guess = nearest(value, known)
        problems.append(Problem(source, field_name, value, f"no such {what} in the inventory"
                                + (f"; did you mean {guess!r}?" if guess else "")))

    for i, name in enumerate(policy.canary.hosts):
        if name not in inventory.hosts:
            unknown(f"canary.hosts[{i}]", name, inventory.hosts, "host")
    for i, name in enumerate(policy.waves.site_order):
        if name not in sites:
            unknown(f"waves.site_order[{i}]", name, sites, "site")
    for name in policy.waves.pools:
        if name not in pools:
            unknown(f"waves.pools.{name}", name, pools, "pool")
    if problems:
        raise InputError(problems)


def build_plan(
    inventory: FleetInventory,
    policy: Policy,
    bundle: Bundle,
    *,
    policy_source: str = "<default policy>",
    current: Mapping[str, str | None] | None = None,
    unhealthy: Mapping[str, str] | None = None,
    skip: Mapping[str, str] | None = None,
    history: Sequence[tuple[int, float]] = (),
    known_bundles: Mapping[str, Bundle] | None = None,
    calendar: MaintenanceCalendar | None = None,
    now: dt.datetime | None = None,
    seen: Mapping[str, Mapping[str, Any]] | None = None,
) -> Plan:
    """Cut the selected hosts into waves.

    `current` maps hosts to the bundle they run (from the hosts or the journal), `unhealthy` names
    hosts already out of service (they count against their pool's budget), `skip` hosts not to plan
    (unreachable ones), each with the reason. `history` is (hosts, seconds) of past waves.
    """
    check_policy_against(inventory, policy, policy_source)
    current = current or {}
    unhealthy = unhealthy or {}
    skipped: dict[str, str] = dict(skip or {})
    notes: list[str] = []
    now = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)

    selected = [inventory.hosts[n] for n in inventory.selected if n not in skipped]
    on_target = [h.name for h in selected if current.get(h.name) == bundle.release]
    skipped |= {n: f"{ALREADY_ON}{bundle.release}" for n in on_target}
    budgets = _pool_budgets(inventory, policy, {h.pool for h in selected}, unhealthy)
    candidates: list[InventoryHost] = []
    for host in selected:
        budget = budgets[host.pool]
        if host.name in skipped:
            continue
        if budget.room <= 0:
            skipped[host.name] = (
                f"pool {host.pool} has no room: {budget.unhealthy} of {budget.size} already unhealthy, "
                f"max_unavailable {budget.max_unavailable}, min_serving {budget.min_serving}"
            )
            continue
        candidates.append(host)

    site_rank = _site_ranks(policy.waves.site_order, {h.site for h in candidates})
    canary = _canary(policy, candidates, site_rank, notes)
    chosen = set(canary)
    by_host = {h.name: h for h in candidates}
    rooms = {name: b.room for name, b in budgets.items()}
    groups: list[tuple[Literal["canary", "wave"], list[str]]] = [
        ("canary", wave) for wave in _fit(canary, by_host, rooms)
    ]
    for site in sorted(site_rank, key=site_rank.__getitem__):
        per_pool: dict[str, list[InventoryHost]] = defaultdict(list)
        for host in candidates:
            if host.site == site and host.name not in chosen:
                per_pool[host.pool].append(host)
        chunks = {
            pool: _chunks(sorted(hosts, key=lambda h: (h.ring, h.name)), rooms[pool])
            for pool, hosts in sorted(per_pool.items())
        }
        for k in range(max((len(c) for c in chunks.values()), default=0)):
            groups.append(("wave", [name for c in chunks.values() if k < len(c) for name in c[k]]))

    default_s = policy.waves.estimate.total_seconds()
    waves: list[PlannedWave] = []
    clock = now
    for index, (kind, names) in enumerate(groups):
        predicted = predict_wave_seconds(len(names), history, default_s)
        start = _fit_window(calendar, clock, dt.timedelta(seconds=predicted))
        if start is not None:
            clock = start + dt.timedelta(seconds=predicted)
        elif calendar is not None:
            notes.append(f"wave {index} ({format_duration(dt.timedelta(seconds=predicted))} predicted) fits no "
                         "window: widen a window or use --ignore-window")
        waves.append(PlannedWave(index, kind, tuple(names), predicted, start.isoformat() if start else None))

    planned = {
        name: PlannedHost(name, by_host[name].pool, by_host[name].site, by_host[name].ring, wave.index,
                          current.get(name))
        for wave in waves
        for name in wave.hosts
    }
    known_bundles = known_bundles or {}
    diffs: dict[str, list[tuple[str, Any, Any]] | None] = {}
    for release in sorted({h.current for h in planned.values() if h.current}):
        old = known_bundles.get(release)
        diffs[release] = diff_bundles(old, bundle) if old else None
    return Plan(
        release=bundle.release,
        created_at=now.isoformat(),
        waves=tuple(waves),
        hosts=planned,
        skipped=dict(sorted(skipped.items())),
        pools=budgets,
        diffs=diffs,
        notes=tuple(notes),
        unhealthy=dict(sorted(unhealthy.items())),
        seen=dict(sorted((seen or {}).items())),
        bundle_digest=bundle.digest,
        policy_digest=policy_digest(policy),
    )


def policy_digest(policy: Policy) -> str:
    """sha256 of the policy's canonical JSON: a plan is run only with the policy that cut it."""
    text = json.dumps(policy.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _pool_budgets(
    inventory: FleetInventory, policy: Policy, pools: Iterable[str], unhealthy: Mapping[str, str]
) -> dict[str, PoolBudget]:
    budgets = {}
    for pool in sorted(pools):
        members = inventory.pool_members(pool)
        size = len(members)
        ref = members[0]
        max_unavailable = resolve(ref.max_unavailable, size, at_least_one=True)
        down = sum(1 for h in members if h.name in unhealthy)
        wave_size = resolve(policy.waves.pools.get(pool, policy.waves.size), size, at_least_one=True)
        room = min(wave_size, max_unavailable - down, size - down - ref.min_serving)
        budgets[pool] = PoolBudget(pool, size, max_unavailable, ref.min_serving, down, wave_size, max(room, 0))
    return budgets


def _site_ranks(order: Sequence[str], sites: Iterable[str]) -> dict[str, tuple[int, str]]:
    return {site: (order.index(site) if site in order else len(order), site) for site in sites}


def _canary(
    policy: Policy, candidates: Sequence[InventoryHost], site_rank: Mapping[str, tuple[int, str]], notes: list[str]
) -> list[str]:
    names = {h.name for h in candidates}
    if policy.canary.hosts:
        missing = [n for n in policy.canary.hosts if n not in names]
        if missing:
            notes.append(f"canary host(s) {', '.join(missing)} not planned (outside --limit, skipped or on target)")
        return [n for n in policy.canary.hosts if n in names]
    picked: list[str] = []
    by_site: dict[str, list[InventoryHost]] = defaultdict(list)
    for host in candidates:
        by_site[host.site].append(host)
    for site in sorted(by_site, key=site_rank.__getitem__):
        hosts = sorted(by_site[site], key=lambda h: (h.ring, h.name))
        picked += [h.name for h in hosts[: policy.canary.per_site]]
    return picked


def _fit(names: Sequence[str], hosts: Mapping[str, InventoryHost], rooms: Mapping[str, int]) -> list[list[str]]:
    """First-fit the hosts, in order, into as few waves as the pools' rooms allow."""
    waves: list[list[str]] = []
    counts: list[dict[str, int]] = []
    for name in names:
        pool = hosts[name].pool
        for wave, count in zip(waves, counts, strict=True):
            if count.get(pool, 0) < rooms[pool]:
                wave.append(name)
                count[pool] = count.get(pool, 0) + 1
                break
        else:
            waves.append([name])
            counts.append({pool: 1})
    return waves


def _chunks(hosts: Sequence[InventoryHost], size: int) -> list[list[str]]:
    return [[h.name for h in hosts[i : i + size]] for i in range(0, len(hosts), size)]


def _fit_window(
    calendar: MaintenanceCalendar | None, at: dt.datetime, duration: dt.timedelta
) -> dt.datetime | None:
    if calendar is None:
        return at
    return at if calendar.fits(at, duration) else calendar.next_opening(at, duration)


def render_plan(plan: Plan, *, max_names: int = 6) -> Group:
    """The plan as rich tables: waves, then the version change per current bundle, then skipped hosts."""
    waves = Table(title=f"Plan: release {plan.release}, {len(plan.hosts)} host(s) in {len(plan.waves)} wave(s)")
    for column in ("wave", "kind", "hosts", "pools", "predicted", "fits from", "members"):
        waves.add_column(column, overflow="fold")
    for wave in plan.waves:
        counts = ", ".join(f"{p}:{n}" for p, n in sorted(plan.pool_counts(wave).items()))
        members = ", ".join(wave.hosts[:max_names]) + (" ..." if len(wave.hosts) > max_names else "")
        waves.add_row(str(wave.index), wave.kind, str(len(wave.hosts)), counts,
                      format_duration(dt.timedelta(seconds=round(wave.predicted_s))),
                      _when(wave.window_start), members)
    parts: list[Any] = [waves]
    by_current: dict[str | None, int] = defaultdict(int)
    for host in plan.hosts.values():
        by_current[host.current] += 1
    changes = Table(title="Version change per host")
    for column in ("from", "to", "hosts", "pinned values that change", "applied"):
        changes.add_column(column, overflow="fold")
    for release, count in sorted(by_current.items(), key=lambda kv: kv[0] or ""):
        diff = plan.diffs.get(release) if release else None
        what = "manifest unknown" if diff is None else "; ".join(_change(*c) for c in diff) or "nothing"
        applied = plan.components_from(release)
        changes.add_row(release or "unknown", plan.release, str(count), what,
                        "every component" if applied is None else ", ".join(ordered(applied)) or "none")
    parts.append(changes)
    if plan.unhealthy:
        parts.append(_why_table(f"Out of service now: {len(plan.unhealthy)} host(s), counted against their pool's "
                                "budget", plan.unhealthy, max_names * 4))
    if plan.skipped:
        parts.append(_why_table(f"Not planned: {len(plan.skipped)} host(s)", plan.skipped, max_names * 4))
    return Group(*parts)


def _why_table(title: str, reasons: Mapping[str, str], limit: int) -> Table:
    """Hosts and why, the first `limit` of them."""
    table = Table(title=title)
    table.add_column("host")
    table.add_column("why", overflow="fold")
    for name, why in list(reasons.items())[:limit]:
        table.add_row(name, why)
    return table


def _when(iso: str | None) -> str:
    if iso is None:
        return "no window"
    return dt.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M %Z").strip()


def _change(name: str, old: Any, new: Any) -> str:
    # digests and checksums are long: name the field, the values are in plan.json
    return f"{name} {old} -> {new}" if len(f"{old}{new}") <= 40 else name
