"""The UPS units feeding the host answer, are on line power with charge above the threshold, and
upsmon watches them."""

from __future__ import annotations

from tests.hosts.checks import expect, only_where, unit_state_command


def _units(name, hostvars):
    units = hostvars.get("fleet_ups") or []
    only_where(bool(units), name, "no UPS feeds this host")
    return {u["name"]: u for u in units}.values()


def test_ups_reachable(name, facts, hostvars):
    bad = [f"{u['name']}@{u['host']}:{u['port']}: {s.error}"
           for u in _units(name, hostvars) if (s := facts.upsc(u)).error or not s.variables]
    expect(not bad, name, "UPS units (upsc)", "every unit answering", "; ".join(bad))


def test_ups_on_line(name, facts, hostvars):
    found = {u["name"]: facts.upsc(u) for u in _units(name, hostvars)}
    bad = [f"{n}: {' '.join(s.status) or s.error or 'no status'}" for n, s in found.items() if not s.on_line]
    expect(not bad, name, "UPS status", "OL (on line power) on every unit", "; ".join(bad))


def test_ups_charge(name, facts, hostvars, pytestconfig):
    floor = pytestconfig.getoption("--ups-min-charge")
    found = {u["name"]: facts.upsc(u).number("battery.charge") for u in _units(name, hostvars)}
    bad = [f"{n}: {'unknown' if c is None else f'{c:g}%'}" for n, c in found.items() if c is None or c < floor]
    expect(not bad, name, "UPS battery charge", f">= {floor:g}% on every unit", "; ".join(bad))


def test_upsmon_active(name, facts, hostvars):
    _units(name, hostvars)
    found = facts.run(unit_state_command("nut-monitor")).stdout.strip() or "unknown"
    expect(found == "active", name, "nut-monitor.service (upsmon)", "active", found)
