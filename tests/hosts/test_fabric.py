"""NVSwitch boards run fabric manager at the loaded driver's version; InfiniBand ports are up at the
inventory's rate; EFA hosts run the bundle's EFA installer release (what the installer recorded in
/opt/amazon/efa_installed_packages), hold the packages it installed, and see their EFA devices."""

from __future__ import annotations

import re

from patching.hosts import facts as hostfacts
from patching.release.pins import EFA_RECORD_PATH, efa_differences, efa_read_command, split_efa_answer
from tests.hosts.checks import FABRIC_MANAGER_VERSION, FI_INFO, expect, gpus_or_fail, only_where, unit_state_command


def test_fabric_manager_active(name, facts, hostvars):
    only_where(hostvars.get("fleet_nvswitch"), name, "no NVSwitch: fabric manager does not apply")
    found = facts.run(unit_state_command("nvidia-fabricmanager")).stdout.strip() or "unknown"
    expect(found == "active", name, "nvidia-fabricmanager.service", "active", found)


def test_fabric_manager_equals_driver(name, facts, hostvars, bundle):
    only_where(hostvars.get("fleet_nvswitch"), name, "no NVSwitch: fabric manager does not apply")
    gpus = gpus_or_fail(facts, name, "fabric manager version", f"the loaded driver's ({bundle.driver.version})")
    loaded = sorted({g.driver_version or "N/A" for g in gpus})
    result = facts.run(FABRIC_MANAGER_VERSION)
    match = re.search(r"Fabric Manager version is\s*:\s*(\S+)", result.stdout)
    found = match.group(1) if match else f"exit {result.rc}: {(result.stderr or result.stdout).strip()}"
    expect(loaded == [found], name, "fabric manager version", f"the loaded driver's ({', '.join(loaded)})", found)


def _ib_ports(name, facts, hostvars, what, want):
    only_where(hostvars.get("fleet_ib"), name, "no InfiniBand HCA")
    cas = facts.ibstat
    if isinstance(cas, str):
        expect(False, name, what, want, cas)
    by_name = {ca.name: ca for ca in cas}
    missing = [h["name"] for h in hostvars["fleet_ib_hcas"] if h["name"] not in by_name]
    expect(not missing, name, what, want, f"HCA {', '.join(missing)} missing from ibstat")
    return [(h, port) for h in hostvars["fleet_ib_hcas"] for port in by_name[h["name"]].ports]


def test_ib_ports_active(name, facts, hostvars):
    want = "every HCA port Active/LinkUp"
    bad = [f"{h['name']} port {p.number} {p.state}/{p.physical_state}"
           for h, p in _ib_ports(name, facts, hostvars, "InfiniBand ports", want) if not p.up]
    expect(not bad, name, "InfiniBand ports", want, "; ".join(bad))


def test_ib_port_rate(name, facts, hostvars):
    rates = sorted({h["rate"] for h in hostvars.get("fleet_ib_hcas") or []})
    want = f"{'/'.join(map(str, rates))} Gb/s on every port (the inventory's fleet_ib_hcas)"
    bad = [f"{h['name']} port {p.number} rate {p.rate}"
           for h, p in _ib_ports(name, facts, hostvars, "InfiniBand port rate", want) if p.rate != h["rate"]]
    expect(not bad, name, "InfiniBand port rate", want, "; ".join(bad))


def test_efa_devices(name, facts, hostvars):
    only_where(hostvars.get("fleet_efa"), name, "not an EFA host")
    result = facts.run(FI_INFO)
    count = hostfacts.efa_device_count(hostfacts.parse_fi_info(result.stdout))
    found = f"{count}" if count else (result.stderr or result.stdout).strip() or f"exit {result.rc}"
    wanted = hostvars.get("fleet_efa_devices")  # what the instance type gets (pulumi up exports it)
    if wanted is None:
        expect(count >= 1, name, "EFA devices (fi_info -p efa)", "at least 1 (fleet_efa_devices not given)", found)
    else:
        expect(count == int(wanted), name, "EFA devices (fi_info -p efa)",
               f"{wanted} (fleet_efa_devices: the instance type's EFA interfaces)", found)


def _efa_record(name, facts, hostvars):
    only_where(hostvars.get("fleet_efa"), name, "not an EFA host")
    return split_efa_answer(facts.run(efa_read_command()).stdout)


def test_efa_installer_release(name, facts, hostvars, bundle):
    record, _ = _efa_record(name, facts, hostvars)
    found = "no record" if record is None else record.installer_version
    expect(record is not None and record.installer_version == bundle.efa_installer, name,
           f"EFA installer ({EFA_RECORD_PATH})", bundle.efa_installer, found)


def test_efa_packages_installed_and_held(name, facts, hostvars, bundle):
    record, installed = _efa_record(name, facts, hostvars)
    expect(record is not None and bool(record.packages), name, "EFA installer's packages",
           f"the packages {EFA_RECORD_PATH} names", "no record" if record is None else "none named")
    bad = [f"{what}: {found}" for what, _, found in efa_differences(bundle, record, installed)
           if not what.startswith("EFA installer (")]
    expect(not bad, name, "EFA installer's packages", "installed at the versions the installer recorded, held",
           "; ".join(bad))
