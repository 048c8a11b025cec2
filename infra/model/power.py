"""Power and InfiniBand cabling checks for an on-prem hall: pure functions, run before anything is touched.

Power: every host hangs its PSUs on both feeds, A and B, and the two feeds come from different UPS
units, so one UPS failing leaves every host powered. Each UPS is planned at a derated capacity
(`ups_derating`, 80% by default: a UPS run near its nameplate has no headroom for inrush or battery
ageing). A host's maximum draw is shared by its PSUs; with one UPS failed, the PSUs on the other units
carry the whole draw. The N+1 report says, for each UPS failing, what every other unit would carry;
it fails the preview only when the hall sets `require_n_plus_one`.

Fabric: every HCA is cabled to its own switch port; in a rail-aligned hall each leaf switch is one
rail, declared in the site's `ib_rails` (leaf -> HCA name), so `mlx5_3` of every host lands on a leaf
that carries only `mlx5_3`s (hence no host puts two HCAs on one leaf, and several scalable units may
each have their own rail leaves); all HCAs of a pool run at one rate (a slower link drags every
collective down to its speed).

Every violation names the host, the UPS or the switch port, and the config field to fix.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Literal

from infra.model.errors import InputError, Problem
from infra.model.fleet import Fleet, Host, OnpremSite


@dataclass(frozen=True)
class UpsLoad:
    """One UPS unit's planned load, normally and with another unit failed."""

    ups: str
    capacity_w: int
    derated_w: float
    normal_w: float
    # failed UPS name -> the load this unit carries while that one is down
    failover_w: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PowerReport:
    """What validate_hall found: the per-UPS loads and the N+1 verdict, as lines for the preview log."""

    site: str
    loads: list[UpsLoad]
    n_plus_one: bool
    lines: list[str]


def validate_hall(fleet: Fleet, site: OnpremSite) -> PowerReport:
    """Check the hall's power and fabric; raise InputError listing every violation, else return the report."""
    hosts = [h for h in fleet.hosts.values() if fleet.site_of(h).name == site.name]
    problems = list(_feeds(fleet, site, hosts))
    loads: list[UpsLoad] = []
    if not problems:  # loads are only meaningful once every host's feeds are known
        loads = _loads(site, hosts)
        problems += _capacity(fleet, site, loads)
        if site.require_n_plus_one:
            problems += _n_plus_one(fleet, site, loads)
    report = _report(site, loads)
    problems += _cabling(fleet, site, hosts)
    if problems:
        raise InputError(problems)
    return report


def _p(fleet: Fleet, kind: Literal["sites", "hosts"], name: str, parts: tuple, value: object, message: str) -> Problem:
    return Problem(fleet.source, fleet.field(kind, name, *parts), value, message)


def _feeds(fleet: Fleet, site: OnpremSite, hosts: list[Host]):
    if not site.ups:
        return  # no UPS declared: nothing to plan against (a lab hall, or power managed elsewhere)
    for host in hosts:
        if not host.psus:
            yield _p(fleet, "hosts", host.name, ("psus",), None,
                     f"host {host.name!r} declares no PSUs, so its power at site {site.name!r} cannot be checked")
            continue
        if host.max_draw_w is None:
            yield _p(fleet, "hosts", host.name, ("max_draw_w",), None,
                     f"host {host.name!r}: max_draw_w is needed to check UPS capacity")
        by_feed: dict[str, set[str]] = defaultdict(set)
        for psu in host.psus:
            by_feed[psu.feed].add(psu.ups)
        missing = [f for f in ("A", "B") if f not in by_feed]
        if missing:
            yield _p(fleet, "hosts", host.name, ("psus",), sorted(by_feed),
                     f"host {host.name!r} has no PSU on feed {' or '.join(missing)}: both feeds A and B are required")
            continue
        shared = by_feed["A"] & by_feed["B"]
        if shared:
            yield _p(fleet, "hosts", host.name, ("psus",), sorted(shared),
                     f"host {host.name!r}: feeds A and B both come from UPS {', '.join(sorted(shared))}; "
                     "the feeds must be on different UPS units")


def _loads(site: OnpremSite, hosts: list[Host]) -> list[UpsLoad]:
    units = [u.name for u in site.ups]
    normal: dict[str, float] = dict.fromkeys(units, 0.0)
    failover: dict[str, dict[str, float]] = {u: dict.fromkeys(units, 0.0) for u in units}
    for host in hosts:
        if not host.psus or host.max_draw_w is None:
            continue
        per_ups = Counter(p.ups for p in host.psus)
        total = sum(per_ups.values())
        for ups, n in per_ups.items():
            normal[ups] += host.max_draw_w * n / total
        for failed in units:
            left = {u: n for u, n in per_ups.items() if u != failed}
            if not left:
                continue  # the host goes dark; _feeds already refused a host on a single UPS
            for ups, n in left.items():
                failover[ups][failed] += host.max_draw_w * n / sum(left.values())
    out = []
    for unit in site.ups:
        fo = {f: w for f, w in failover[unit.name].items() if f != unit.name}
        out.append(UpsLoad(unit.name, unit.capacity_w, unit.capacity_w * site.ups_derating, normal[unit.name], fo))
    return out


def _capacity(fleet: Fleet, site: OnpremSite, loads: list[UpsLoad]):
    for load in loads:
        if load.normal_w > load.derated_w:
            yield _p(fleet, "sites", site.name, ("ups",), load.ups,
                     f"UPS {load.ups!r} carries {load.normal_w:.0f} W of host maximum draw, over its derated capacity "
                     f"{load.derated_w:.0f} W ({load.capacity_w} W x {site.ups_derating:g})")


def _n_plus_one(fleet: Fleet, site: OnpremSite, loads: list[UpsLoad]):
    if len(loads) < 2:
        yield _p(fleet, "sites", site.name, ("ups",), len(loads),
                 f"site {site.name!r} requires N+1 but has {len(loads)} UPS unit(s)")
        return
    for load in loads:
        for failed, watts in sorted(load.failover_w.items()):
            if watts > load.derated_w:
                yield _p(fleet, "sites", site.name, ("require_n_plus_one",), True,
                         f"N+1: with UPS {failed!r} failed, UPS {load.ups!r} would carry {watts:.0f} W, over its "
                         f"derated capacity {load.derated_w:.0f} W")


def _report(site: OnpremSite, loads: list[UpsLoad]) -> PowerReport:
    lines = []
    ok = len(loads) >= 2
    for load in loads:
        lines.append(f"{site.name}: UPS {load.ups} normal {load.normal_w:.0f} W of {load.derated_w:.0f} W derated")
        for failed, watts in sorted(load.failover_w.items()):
            fits = watts <= load.derated_w
            ok = ok and fits
            lines.append(f"{site.name}: UPS {failed} failed -> UPS {load.ups} carries {watts:.0f} W of "
                         f"{load.derated_w:.0f} W derated ({'ok' if fits else 'OVER'})")
    if loads:
        lines.append(f"{site.name}: N+1 {'holds' if ok else 'does NOT hold'}"
                     + ("" if site.require_n_plus_one else " (report only: require_n_plus_one is off)"))
    return PowerReport(site.name, loads, ok, lines)


def _cabling(fleet: Fleet, site: OnpremSite, hosts: list[Host]):
    ports: dict[tuple[str, int], tuple[str, str]] = {}
    guids: dict[str, tuple[str, str]] = {}
    for host in hosts:
        names: set[str] = set()
        for i, hca in enumerate(host.ib_hcas):
            if hca.name in names:
                yield _p(fleet, "hosts", host.name, ("ib_hcas", i, "name"), hca.name,
                         f"host {host.name!r} declares HCA {hca.name} twice")
            names.add(hca.name)
            where = f"{hca.switch} port {hca.port}"
            key = (hca.switch, hca.port)
            if key in ports:
                other_host, other_hca = ports[key]
                yield _p(fleet, "hosts", host.name, ("ib_hcas", i, "port"), where,
                         f"switch port {where} is cabled to both {other_host} {other_hca} and {host.name} {hca.name}")
            ports.setdefault(key, (host.name, hca.name))
            if hca.guid in guids:
                yield _p(fleet, "hosts", host.name, ("ib_hcas", i, "guid"), hca.guid,
                         f"GUID {hca.guid} of {host.name} {hca.name} is already used by "
                         f"{guids[hca.guid][0]} {guids[hca.guid][1]}")
            guids.setdefault(hca.guid, (host.name, hca.name))
    if site.ib_rail_aligned:
        yield from _rails(fleet, site, hosts)
    yield from _rates(fleet, hosts)


def _rails(fleet: Fleet, site: OnpremSite, hosts: list[Host]):
    # Each leaf is one rail, as the hall declares it (ib_rails): inferring a leaf's rail from what most hosts put
    # there would blame the one correctly cabled host when most are miscabled.
    for host in hosts:
        for i, hca in enumerate(host.ib_hcas):
            where = f"{hca.switch} port {hca.port}"
            rail = site.ib_rails.get(hca.switch)
            if rail is None:
                yield _p(fleet, "hosts", host.name, ("ib_hcas", i, "switch"), hca.switch,
                         f"{host.name} {hca.name} is cabled to {where}, a leaf site {site.name}'s ib_rails does not "
                         f"declare (it declares {', '.join(sorted(site.ib_rails)) or 'none'})")
            elif rail != hca.name:
                yield _p(fleet, "hosts", host.name, ("ib_hcas", i, "switch"), where,
                         f"not rail-aligned: {host.name} {hca.name} is cabled to {where}, the rail of {rail} "
                         f"(ib_rails of site {site.name})")


def _rates(fleet: Fleet, hosts: list[Host]):
    by_pool: dict[str, list[Host]] = defaultdict(list)
    for host in hosts:
        by_pool[host.pool].append(host)
    for pool, members in by_pool.items():
        rates = Counter(hca.rate for h in members for hca in h.ib_hcas)
        if len(rates) < 2:
            continue
        usual = rates.most_common(1)[0][0]
        for host in members:
            for i, hca in enumerate(host.ib_hcas):
                if hca.rate != usual:
                    yield _p(fleet, "hosts", host.name, ("ib_hcas", i, "rate"), hca.rate,
                             f"{host.name} {hca.name} ({hca.switch} port {hca.port}) runs at {hca.rate} Gb/s; "
                             f"pool {pool!r} runs at {usual} Gb/s")
