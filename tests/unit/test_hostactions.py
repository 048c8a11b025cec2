"""patching.hosts.actions where it needs no host: Ansible missing is an error of ours, not unreachable hosts;
time limits against slow fakes on 127.0.0.1; UPS, fabric and load-balancer reads that come back degraded."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socketserver
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest

import patching.hosts.actions as hostactions
import patching.hosts.verify as hostverify
from patching.hosts.toolpath import BIN, path_with_our_bin
from patching.inventory.reader import FleetInventory, InventoryHost, load_inventory
from patching.release.bundle import load_bundle
from patching.rollout.actions import ActionsUnavailable, HostSnapshot
from patching.rollout.policy import Hardware, SloProbe, Soak
from tests.conftest import ROOT, write_yaml
from tests.unit.test_probe import SLOW_S, fake_serving  # noqa: F401 - fixture


def test_our_bin_goes_first_once():
    assert path_with_our_bin(f"/usr/bin{os.pathsep}{BIN}{os.pathsep}/bin") == os.pathsep.join([BIN, "/usr/bin", "/bin"])
    assert path_with_our_bin("") == BIN


def test_ansible_missing_is_not_hosts_unreachable(tmp_path, monkeypatch):
    host = {"ansible_host": "127.0.0.1", "fleet_pool": "a", "fleet_site": "s1", "fleet_site_kind": "onprem",
            "fleet_patch_ring": 0, "fleet_serving_port": 8000, "fleet_max_unavailable": 1, "fleet_min_serving": 0,
            "fleet_lb": {"kind": "haproxy", "api": "127.0.0.1:1", "backend": "a", "server": "a1"}}
    inventory = load_inventory([str(write_yaml(tmp_path / "inventory.yml", {"all": {"hosts": {"a1": host}}}))], None)
    monkeypatch.setattr(hostactions, "put_our_bin_first", lambda: None)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no `ansible` here (it is in the venv only)
    actions = hostactions.FleetActions(inventory, tmp_path / "work")
    with pytest.raises(ActionsUnavailable, match=r"ansible could not run \(rc 127\).*not found"):
        actions.read_hosts([inventory.hosts["a1"]])


def test_read_hosts_takes_release_digest_and_manifest_from_the_bundle_manifest(tmp_path, monkeypatch):
    host = {"ansible_host": "127.0.0.1", "fleet_pool": "a", "fleet_site": "s1", "fleet_site_kind": "onprem",
            "fleet_patch_ring": 0, "fleet_serving_port": 8000, "fleet_max_unavailable": 1, "fleet_min_serving": 0,
            "fleet_lb": {"kind": "haproxy", "api": "127.0.0.1:1", "backend": "a", "server": "a1"}}
    names = ["new", "old", "odd", "list", "garbage", "absent", "down"]
    inventory = load_inventory([str(write_yaml(tmp_path / "inventory.yml",
                                               {"all": {"hosts": {n: dict(host) for n in names}}}))], None)
    monkeypatch.setattr(hostactions, "put_our_bin_first", lambda: None)
    actions = hostactions.FleetActions(inventory, tmp_path / "work")
    digest = "ab" * 32
    new = {"format": 1, "release": "2026-11", "digest": digest, "components": {"gpu_driver": {"version": "1"}}}
    answers = {
        "new": (True, 0, json.dumps(new)),
        "old": (True, 0, json.dumps({"format": 1, "release": "2026-10", "components": {}})),  # before digests
        "odd": (True, 0, json.dumps({"release": 7, "digest": "sha256:" + digest})),
        "list": (True, 0, "[1, 2]"),
        "garbage": (True, 0, "{not json"),
        "absent": (True, 1, "cat: /etc/fleet/bundle.json: No such file or directory"),
        "down": (False, None, "ssh: connection refused"),
    }
    monkeypatch.setattr(actions, "_command", lambda hosts, command, timeout_s=60: answers)
    monkeypatch.setattr(actions, "_lb_states", lambda hosts: ({"new": "serving"}, {}))  # (states, why unknown)
    facts = actions.read_hosts([inventory.hosts[n] for n in names])
    assert facts["new"] == HostSnapshot(True, "2026-11", "serving", installed_digest=digest)
    assert facts["new"].installed_manifest == new
    assert facts["old"].installed_release == "2026-10" and facts["old"].installed_digest is None
    assert facts["odd"].installed_release is None and facts["odd"].installed_digest is None
    for name in ("list", "garbage", "absent"):
        assert facts[name] == HostSnapshot(True, None, "unknown") and facts[name].installed_manifest is None
    assert facts["down"] == HostSnapshot(False, None, "unknown", "ssh: connection refused")


# ---- helpers: hosts and actions without an Ansible run ---------------------------------------------

HAPROXY_LB = {"kind": "haproxy", "api": "127.0.0.1:1", "backend": "v3-hall"}
STATE_HEADER = ("# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight "
                "srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state "
                "srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord")


def make_host(name: str, **kw) -> InventoryHost:
    fields = {"pool": "v3-hall", "site": "s1", "site_kind": "onprem", "ring": 0, "address": "127.0.0.1",
              "serving_port": 8000, "max_unavailable": 1, "min_serving": 0, "lb": {**HAPROXY_LB, "server": name}}
    return InventoryHost(name=name, **(fields | kw))


def make_actions(tmp_path: Path, monkeypatch, *hosts: InventoryHost, source: str = "inventory.yml"):
    monkeypatch.setattr(hostactions, "put_our_bin_first", lambda: None)
    inventory = FleetInventory((str(tmp_path / source),), {h.name: h for h in hosts}, tuple(h.name for h in hosts))
    return hostactions.FleetActions(inventory, tmp_path / "work")


def no_ansible(*args, **kwargs):
    raise AssertionError("no Ansible run was expected")


# ---- time limits: the SLO probe, the soak and testinfra stop at theirs -----------------------------

def test_the_slo_probe_over_its_limit_is_a_timed_out_outcome(tmp_path, monkeypatch, fake_serving):  # noqa: F811
    server = fake_serving(delay=SLOW_S)
    h = make_host("a1", serving_port=server.server_address[1])
    actions = make_actions(tmp_path, monkeypatch, h)
    slo = SloProbe(warmup_requests=0, requests=5, request_timeout=dt.timedelta(seconds=SLOW_S * 2))
    started = time.monotonic()
    (outcome,) = actions.probe_slo([h], slo, 1.0).values()
    assert time.monotonic() - started < SLOW_S / 2
    assert not outcome.ok and outcome.timed_out and outcome.detail.startswith("SLO probe ran past 1s")
    assert outcome.measurements["requests"] == 0


def test_the_slo_probe_within_its_limit_is_not_timed_out(tmp_path, monkeypatch, fake_serving):  # noqa: F811
    server = fake_serving()
    h = make_host("a1", serving_port=server.server_address[1])
    (outcome,) = make_actions(tmp_path, monkeypatch, h).probe_slo([h], SloProbe(warmup_requests=1, requests=3),
                                                                   60.0).values()
    assert outcome.ok and not outcome.timed_out and outcome.measurements["requests"] == 3


def test_the_soak_over_its_limit_is_a_timed_out_outcome(tmp_path, monkeypatch, fake_serving):  # noqa: F811
    server = fake_serving(delay=SLOW_S)
    h = make_host("a1", serving_port=server.server_address[1])
    soak = Soak(duration=dt.timedelta(seconds=0.2), probe_interval=dt.timedelta(seconds=0.1))
    started = time.monotonic()
    (outcome,) = make_actions(tmp_path, monkeypatch, h).soak([h], soak, 1.0).values()
    assert time.monotonic() - started < SLOW_S / 2
    assert not outcome.ok and outcome.timed_out and outcome.detail.startswith("soak ran past 1s")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie is dead, only not reaped yet


def test_testinfra_over_its_limit_is_killed_with_all_it_started(tmp_path, monkeypatch):
    checks, pids = tmp_path / "checks", tmp_path / "pids"
    checks.mkdir()
    (checks / "conftest.py").write_text(
        "def pytest_addoption(parser):\n    parser.addoption('--bundle')\n")
    (checks / "test_slow.py").write_text(  # a check that hangs, with a child of its own (as an SSH session is)
        "import os, pathlib, subprocess, time\n\n"
        "def test_slow():\n"
        f"    child = subprocess.Popen(['sleep', '{SLOW_S * 4}'])\n"
        f"    pathlib.Path({str(pids)!r}).write_text(f'{{child.pid}} {{os.getpid()}}')\n"
        f"    time.sleep({SLOW_S * 4})\n")
    monkeypatch.setattr(hostverify, "HOST_CHECKS", checks)  # the suite: one check that hangs
    write_yaml(tmp_path / "inventory.yml", {"all": {"hosts": {"a1": {"ansible_host": "127.0.0.1"}}}})
    h = make_host("a1")
    actions = make_actions(tmp_path, monkeypatch, h)
    bundle = load_bundle(ROOT / "releases/2026-11.yaml")
    limit = 10.0  # time for pytest to start, well below the check's sleep
    started = time.monotonic()
    (outcome,) = actions.gate_testinfra([h], bundle, limit).values()
    assert time.monotonic() - started < SLOW_S * 2
    assert not outcome.ok and outcome.timed_out and outcome.detail.startswith("host checks ran past 10s")
    child, pytest_main = (int(p) for p in pids.read_text().split())
    deadline = time.monotonic() + 10
    while not (_gone(child) and _gone(pytest_main)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child) and _gone(pytest_main)


# ---- UPS: degraded reads are "could not measure", named --------------------------------------------

class FakeUpsd(socketserver.ThreadingTCPServer):
    """upsd's network protocol for LIST VAR: `units[name]` is {variable: value} or an `ERR ...` line."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, units: dict[str, dict[str, str] | str]):
        super().__init__(("127.0.0.1", 0), FakeUpsd.Handler)
        self.units = units

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            words = self.rfile.readline().decode().split()
            unit = self.server.units.get(words[-1], "ERR UNKNOWN-UPS")
            if isinstance(unit, str):
                self.wfile.write(unit.encode() + b"\n")
                return
            lines = [f"BEGIN LIST VAR {words[-1]}"] + [f'VAR {words[-1]} {k} "{v}"' for k, v in unit.items()]
            self.wfile.write(("\n".join([*lines, f"END LIST VAR {words[-1]}"]) + "\n").encode())
            if self.rfile.readline().strip() == b"LOGOUT":
                self.wfile.write(b"OK Goodbye\n")


@pytest.fixture
def upsd():
    server = FakeUpsd({
        "good": {"ups.status": "OL CHRG", "battery.charge": "95"},
        "na": {"ups.status": "OL", "battery.charge": "n/a"},
        "nocharge": {"ups.status": "OL"},
        "waiting": {"ups.status": "WAIT"},
        "onbattery": {"ups.status": "OB DISCHRG", "battery.charge": "64"},
        "stale": "ERR DATA-STALE",
    })
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_ups_reads_that_come_back_degraded_are_could_not_measure(tmp_path, monkeypatch, upsd):
    port = upsd.server_address[1]

    def fed_by(name: str, *units: str, at: int = port) -> InventoryHost:
        return make_host(name, ups=tuple({"name": u, "host": "127.0.0.1", "port": at} for u in units))

    hosts = [fed_by("ok", "good"), fed_by("na", "na"), fed_by("missing", "nocharge"), fed_by("wait", "waiting"),
             fed_by("stale", "stale"), fed_by("unknown", "nosuch"), fed_by("down", "good", at=1),
             fed_by("battery", "onbattery", "stale"), make_host("bad-inventory", ups=({"name": "ups-x"},))]
    out = make_actions(tmp_path, monkeypatch, *hosts).check_power(hosts, 80)
    assert out["ok"].ok and out["ok"].measured
    assert out["ok"].measurements["ups"] == [{"name": "good", "status": "OL CHRG", "charge_pct": 95.0}]
    expected = {
        "na": "UPS na: battery.charge is n/a",
        "missing": "UPS nocharge: battery.charge is missing",
        "wait": "UPS waiting: ups.status is WAIT (upsd has no data from the driver yet)",
        "stale": f"UPS stale: upsd 127.0.0.1:{port} answered ERR DATA-STALE "
                 "(the driver has no fresh data from the UPS)",
        "unknown": f"UPS nosuch: upsd 127.0.0.1:{port} answered ERR UNKNOWN-UPS (upsd serves no UPS of that name)",
        "bad-inventory": "UPS ups-x: fleet_ups gives no upsd host and port for it",
    }
    for name, detail in expected.items():
        assert (out[name].ok, out[name].measured, out[name].detail) == (False, False, detail), name
    assert not out["down"].ok and not out["down"].measured
    assert out["down"].detail.startswith("UPS good: upsd 127.0.0.1:1: ") and "refused" in out["down"].detail
    # one UPS measurably on battery: a measured failure, the unreadable one named beside it
    assert not out["battery"].ok and out["battery"].measured
    assert out["battery"].detail.startswith("UPS onbattery is not on line power (ups.status OB DISCHRG); UPS stale:")


# ---- InfiniBand: the inventory's HCAs only ---------------------------------------------------------

def _ca(name: str, state: str = "Active", physical: str = "LinkUp", layer: str = "InfiniBand") -> str:
    return (f"CA '{name}'\n\tCA type: MT4123\n\tNumber of ports: 1\n\tFirmware version: 20.31.1014\n"
            f"\tPort 1:\n\t\tState: {state}\n\t\tPhysical state: {physical}\n\t\tRate: 200\n\t\tBase lid: 12\n"
            f"\t\tSM lid: 1\n\t\tPort GUID: 0x0c42a10300a1b2c4\n\t\tLink layer: {layer}\n")


def _hcas(*names: str) -> tuple[dict, ...]:
    return tuple({"name": n, "guid": "0x0c42a10300010000", "switch": f"leaf-rail{n[-1]}", "port": 2, "rate": 200}
                 for n in names)


def test_fabric_judges_the_inventorys_hcas_and_lists_the_others(tmp_path, monkeypatch):
    ibstat = "".join(_ca(f"mlx5_{i}") for i in range(4)) + _ca("mlx5_4", "Down", "Disabled", "Ethernet")
    hosts = [make_host("ok", ib_hcas=_hcas("mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3")),
             make_host("missing", ib_hcas=_hcas("mlx5_0", "mlx5_7")),
             make_host("down", ib_hcas=_hcas("mlx5_3", "mlx5_4")),
             make_host("unreachable", ib_hcas=_hcas("mlx5_0")),
             make_host("no-ib")]
    actions = make_actions(tmp_path, monkeypatch, *hosts)
    answers = {"ok": (True, 0, ibstat), "missing": (True, 0, ibstat), "down": (True, 0, ibstat),
               "unreachable": (False, None, "ssh: connect to host 127.0.0.1 port 22: Connection refused")}
    monkeypatch.setattr(actions, "_command", lambda hosts, command, timeout_s=60: {
        h.name: answers[h.name] for h in hosts})
    out = actions.check_fabric(hosts)
    ok = out["ok"]
    assert ok.ok and ok.detail.startswith("4 IB port(s) of mlx5_0, mlx5_1, mlx5_2, mlx5_3 Active/LinkUp")
    assert [p["name"] for p in ok.measurements["hcas"]] == ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]
    assert ok.measurements["ignored"] == [{"name": "mlx5_4", "port": 1, "state": "Down", "physical_state": "Disabled",
                                           "rate": 200, "link_layer": "Ethernet"}]
    assert "not judged: mlx5_4" in ok.detail
    assert not out["missing"].ok and out["missing"].measured
    assert out["missing"].detail.startswith("mlx5_7 (cabled to leaf-rail7 port 2) missing from ibstat (not in")
    assert out["missing"].measurements["missing"] == ["mlx5_7"]
    assert not out["down"].ok
    assert out["down"].detail.startswith("mlx5_4 port 1 (cabled to leaf-rail4 port 2): Down/Disabled (not in")
    assert not out["unreachable"].ok and not out["unreachable"].measured
    assert out["no-ib"].ok


# ---- the reboot step: playbooks/reboot.yml read through its events -------------------------------

def _event(kind: str, host: str, task: str, **res) -> dict:
    """An ansible-runner event as it reads them: the kind, and the host, task name and result in event_data."""
    return {"event": f"runner_on_{kind}", "event_data": {"host": host, "task": task, "res": res}}


def test_the_reboot_steps_task_names_are_the_playbooks():
    import yaml

    play = yaml.safe_load((ROOT / "playbooks/reboot.yml").read_text())[0]
    assert [t["name"] for t in play["tasks"]] == [hostactions.REBOOT_READ, hostactions.REBOOT_TASK,
                                                  hostactions.REBOOT_READ_AFTER]


def test_reboot_reads_each_hosts_outcome_from_one_playbook_run(tmp_path, monkeypatch):
    """Left running (its driver loaded), rebooted into the bundle's driver and serving, rebooted into another,
    unreachable, and rebooted but its server not back: one Ansible run, each host's outcome from its events."""
    bundle = load_bundle(ROOT / "releases/2026-11.yaml")
    version, old = bundle.driver.version, "1.2.3"
    names = ["loaded", "rebooted", "wrong", "gone", "silent"]
    hosts = [make_host(n) for n in names]
    actions = make_actions(tmp_path, monkeypatch, *hosts)
    read, reboot, after = hostactions.REBOOT_READ, hostactions.REBOOT_TASK, hostactions.REBOOT_READ_AFTER
    events = [_event("ok", "loaded", read, rc=0, stdout=f"{version}\n{version}"),
              _event("skipped", "loaded", reboot), _event("skipped", "loaded", after)]
    for name in ("rebooted", "wrong", "silent"):
        events += [_event("ok", name, read, rc=18, stdout="Failed to initialize NVML: Driver/library version mismatch"),
                   _event("ok", name, reboot, changed=True, rebooted=True),
                   _event("ok", name, after, rc=0, stdout=f"{old if name == 'wrong' else version}\n" * 2)]
    events.append(_event("unreachable", "gone", read, msg="ssh: connect to host 127.0.0.1 port 22: Connection refused"))
    calls = []

    def ansible(name, run_hosts, timeout_s, **kwargs):
        calls.append((name, [h.name for h in run_hosts], kwargs))
        return types.SimpleNamespace(events=events, status="failed", rc=4, stats={})

    monkeypatch.setattr(actions, "_ansible", ansible)
    monkeypatch.setattr(hostactions, "_serving_after_boot", lambda h, timeout_s: hostactions.Outcome(
        h.name != "silent", "" if h.name != "silent" else "its server did not answer /health"))
    out = actions.reboot_if_needed(hosts, bundle, 600)

    assert [(c[0], c[1]) for c in calls] == [("reboot", names)]  # one run for every host
    assert calls[0][2]["playbook"].endswith("playbooks/reboot.yml")
    assert calls[0][2]["extravars"] == {"fleet_driver_version": version, "fleet_reboot_timeout": 570}
    assert out["loaded"] == hostactions.Outcome(True, "driver loaded, no reboot needed")
    assert out["rebooted"] == hostactions.Outcome(True, f"rebooted; driver {version}")
    assert not out["wrong"].ok and out["wrong"].detail == f"rebooted; driver {old}"
    assert not out["gone"].ok and out["gone"].detail.startswith(f"{read}: ")
    assert "Connection refused" in out["gone"].detail
    assert not out["silent"].ok and out["silent"].detail == f"rebooted; driver {version}; its server did not answer " \
                                                             "/health"


def test_the_hardware_steps_task_names_are_the_playbooks():
    import yaml

    play = yaml.safe_load((ROOT / "playbooks/hardware.yml").read_text())[0]
    assert [t["name"] for t in play["tasks"]] == [hostactions.HARDWARE_DCGM, hostactions.HARDWARE_NCCL]


def test_hardware_reads_both_tools_of_every_host_from_one_playbook_run(tmp_path, monkeypatch):
    """DCGM and the NCCL sweep over each host's own GPU count, hosts of 8 and 4 GPUs in one run; a host without
    a GPU count gets DCGM only and says why; a host that cannot be reached is not measured."""
    formats = ROOT / "tests/unit/formats"
    dcgm, sweep = (formats / "dcgmi-diag-r1.json").read_text(), (formats / "all_reduce_perf-8xA100.txt").read_text()
    hosts = [make_host("a100", gpu_count=8), make_host("t4", gpu_count=4), make_host("uncounted"),
             make_host("gone", gpu_count=8)]
    actions = make_actions(tmp_path, monkeypatch, *hosts)
    events = []
    for name in ("a100", "t4", "uncounted"):
        events.append(_event("ok", name, hostactions.HARDWARE_DCGM, rc=0, stdout=dcgm))
    events += [_event("ok", "a100", hostactions.HARDWARE_NCCL, rc=0, stdout=sweep),
               _event("ok", "t4", hostactions.HARDWARE_NCCL, rc=0, stdout=sweep),
               _event("skipped", "uncounted", hostactions.HARDWARE_NCCL),
               _event("unreachable", "gone", hostactions.HARDWARE_DCGM, msg="ssh: connect to host 127.0.0.1 port 22: "
                                                                           "Connection timed out")]
    calls = []

    def ansible(name, run_hosts, timeout_s, **kwargs):
        calls.append((name, [h.name for h in run_hosts], kwargs))
        return types.SimpleNamespace(events=events, status="failed", rc=4, stats={})

    monkeypatch.setattr(actions, "_ansible", ansible)
    hw = Hardware(dcgm_level=1, nccl_tests="/opt/nccl-tests/build/all_reduce_perf")
    out = actions.check_hardware(hosts, hw, 300)

    assert len(calls) == 1 and calls[0][1] == ["a100", "t4", "uncounted", "gone"]
    assert calls[0][2]["extravars"] == {
        "fleet_dcgm_command": "dcgmi diag -r 1 -j",
        "fleet_nccl_commands": {"a100": "/opt/nccl-tests/build/all_reduce_perf -b 8 -e 8G -f 2 -g 8",
                                "t4": "/opt/nccl-tests/build/all_reduce_perf -b 8 -e 8G -f 2 -g 4",
                                "gone": "/opt/nccl-tests/build/all_reduce_perf -b 8 -e 8G -f 2 -g 8"}}
    a100 = out["a100"]
    assert a100.ok and a100.measured and a100.measurements["dcgm"]["level"] == 1
    assert a100.measurements["nccl"]["gpus"] == 8 and a100.measurements["nccl"]["busbw_gbps"] > 0
    # the 8-GPU table given to the 4-GPU host is read against that host's own sweep
    assert out["t4"].measurements["nccl_error"] == "`/opt/nccl-tests/build/all_reduce_perf -b 8 -e 8G -f 2 -g 4` " \
                                                   "ran over 8 GPU(s); the host has 4"
    assert out["uncounted"].measurements["nccl_error"] == "the inventory gives no fleet_gpu_count for the host"
    assert "dcgm" in out["uncounted"].measurements
    assert not out["gone"].ok and not out["gone"].measured
    assert out["gone"].detail.startswith(f"unreachable: {hostactions.HARDWARE_DCGM}: ")


def test_fabric_output_that_is_not_ibstats_is_not_measured():
    outcome = hostactions.fabric_outcome(_hcas("mlx5_0"), "ibwarn: [1234] umad_init: can't read ABI version\n")
    assert not outcome.ok and not outcome.measured and outcome.detail.startswith("could not read ibstat")


# ---- HAProxy's runtime API on a UNIX socket, and load balancers that cannot be asked --------------

class FakeHaproxyUnix(socketserver.ThreadingUnixStreamServer):
    """Answers `show servers state` and `set server ... state` like HAProxy 2.x, on a UNIX socket."""

    daemon_threads = True

    def __init__(self, path: str):
        super().__init__(path, FakeHaproxyUnix.Handler)
        self.admin = {"dgx-a1": 0, "dgx-a2": 8}
        self.commands: list[str] = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            srv = self.server
            line = self.rfile.readline().decode().strip()
            srv.commands.append(line)
            words = line.split()
            if line.startswith("show servers state"):
                if words[-1] != "v3-hall":
                    answer = f"Can't find backend '{words[-1]}'.\n"
                else:
                    rows = [f"3 v3-hall {i} {name} 127.0.0.1 2 {bits} 1 1 5 6 3 4 6 0 0 0 - 4410{i} -"
                            for i, (name, bits) in enumerate(srv.admin.items(), 1)]
                    answer = "1\n" + STATE_HEADER + "\n" + "\n".join(rows) + "\n\n"
            elif words[:2] == ["set", "server"]:
                srv.admin[words[2].split("/")[1]] = {"ready": 0, "drain": 8, "maint": 1}[words[-1]]
                answer = "\n"
            else:
                answer = "Unknown command.\n"
            self.wfile.write(answer.encode())


@pytest.fixture
def socket_dir():
    path = tempfile.mkdtemp(prefix="fleet-lb-", dir="/tmp")  # short: a UNIX socket path has ~100 bytes
    yield Path(path)
    shutil.rmtree(path)


@pytest.fixture
def haproxy_unix(socket_dir):
    server = FakeHaproxyUnix(str(socket_dir / "admin.sock"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_haproxy_runtime_api_on_a_unix_socket(haproxy_unix):
    path = haproxy_unix.server_address
    assert hostactions.haproxy_states(path, "v3-hall") == {"dgx-a1": "serving", "dgx-a2": "drained"}
    hostactions.haproxy_command(f"unix:{path}", "set server v3-hall/dgx-a1 state drain")
    assert hostactions.haproxy_states(f"unix:{path}", "v3-hall") == {"dgx-a1": "drained", "dgx-a2": "drained"}
    assert haproxy_unix.commands[1] == "set server v3-hall/dgx-a1 state drain"
    with pytest.raises(hostactions.LbUnreachable, match=r"show servers state nope: Can't find backend 'nope'"):
        hostactions.haproxy_states(path, "nope")


def test_lb_states_over_a_unix_socket_and_the_reasons_they_are_unknown(tmp_path, monkeypatch, haproxy_unix,
                                                                       socket_dir):
    path = haproxy_unix.server_address
    hosts = [make_host("dgx-a1", lb={**HAPROXY_LB, "api": path, "server": "dgx-a1"}),
             make_host("dgx-a2", lb={**HAPROXY_LB, "api": f"unix:{path}", "server": "dgx-a2"}),
             make_host("stranger", lb={**HAPROXY_LB, "api": path, "server": "stranger"}),
             make_host("nosocket", lb={**HAPROXY_LB, "api": str(socket_dir / "gone.sock")}),
             make_host("refused", lb={**HAPROXY_LB, "api": "127.0.0.1:1"}),
             make_host("garbled", lb={**HAPROXY_LB, "api": "haproxy.example"})]
    states, why = make_actions(tmp_path, monkeypatch, *hosts)._lb_states(hosts)
    assert states == {"dgx-a1": "serving", "dgx-a2": "drained", "stranger": "unknown", "nosocket": "unknown",
                      "refused": "unknown", "garbled": "unknown"}
    assert why["stranger"] == f"HAProxy API {path}: no server 'stranger' in backend 'v3-hall'"
    assert why["nosocket"] == f"HAProxy API {socket_dir / 'gone.sock'}: [Errno 2] No such file or directory"
    assert why["refused"].startswith("HAProxy API 127.0.0.1:1: ") and "refused" in why["refused"]
    assert why["garbled"] == "HAProxy API haproxy.example: not a UNIX socket path or host:port"
    assert set(why) == {"stranger", "nosocket", "refused", "garbled"}


def test_drain_and_undrain_fail_naming_a_load_balancer_that_cannot_be_asked(tmp_path, monkeypatch, socket_dir):
    api = str(socket_dir / "gone.sock")
    h = make_host("dgx-a1", lb={**HAPROXY_LB, "api": api, "server": "dgx-a1"})
    actions = make_actions(tmp_path, monkeypatch, h)
    monkeypatch.setattr(actions, "_ansible", no_ansible)  # the host is not touched
    for step in (actions.drain, actions.undrain):
        (outcome,) = step([h], 60).values()
        assert not outcome.ok and outcome.detail == f"HAProxy API {api}: [Errno 2] No such file or directory"


def test_read_hosts_says_why_the_lb_state_is_unknown(tmp_path, monkeypatch, socket_dir):
    api = str(socket_dir / "gone.sock")
    hosts = [make_host("a1", lb={**HAPROXY_LB, "api": api}), make_host("a2", lb={**HAPROXY_LB, "api": api})]
    actions = make_actions(tmp_path, monkeypatch, *hosts)
    monkeypatch.setattr(actions, "_command", lambda hosts, command, timeout_s=60: {
        "a1": (True, 0, json.dumps({"release": "2026-11"})), "a2": (False, None, "ssh: connection refused")})
    facts = actions.read_hosts(hosts)
    why = f"load balancer: HAProxy API {api}: [Errno 2] No such file or directory"
    assert (facts["a1"].reachable, facts["a1"].lb_state, facts["a1"].detail) == (True, "unknown", why)
    assert facts["a2"].detail == f"ssh: connection refused; {why}"


NLB = {"kind": "nlb", "region": "us-east-1", "target_id": "i-0123456789abcdef0",
       "target_group": "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/v3/0123456789abcdef"}


@pytest.fixture
def no_aws_credentials(tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to find either
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # credentials are cached per session


def test_nlb_without_aws_credentials_is_unknown_and_drain_fails_saying_why(tmp_path, monkeypatch,
                                                                          no_aws_credentials):
    h = make_host("p4d-1", site_kind="aws", lb=NLB)
    actions = make_actions(tmp_path, monkeypatch, h)
    states, why = actions._lb_states([h])
    expected = f"AWS target group {NLB['target_group']}: NoCredentialsError: Unable to locate credentials"
    assert states == {"p4d-1": "unknown"} and why == {"p4d-1": expected}
    monkeypatch.setattr(actions, "_ansible", no_ansible)
    (outcome,) = actions.drain([h], 60).values()
    assert not outcome.ok and outcome.detail == expected
    # a target group not known yet (no ARN: the stack's outputs are not in the inventory) is not an error
    pending = make_host("p4d-2", site_kind="aws", lb={"kind": "nlb", "target_group": "v3"})
    assert actions._lb_states([pending]) == ({"p4d-2": "unknown"}, {})
