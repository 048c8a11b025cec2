"""The real host actions behind `patching.rollout.actions.Actions`.

Playbooks do the configuration (drain.yml, patch.yml, undrain.yml through ansible-runner); reads go
over the same SSH settings with ad-hoc Ansible modules (no fact gathering); the load balancer is read
through HAProxy's runtime API (or the AWS target group); UPS units through NUT's network protocol;
the serving gates are plain HTTP straight to each host. Nothing here decides: the runner does.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from patching.hosts import facts as hostfacts
from patching.hosts import nut, probe
from patching.hosts.ansible_env import describe_ssh_failure, run_ansible
from patching.hosts.toolpath import put_our_bin_first
from patching.inventory.reader import FleetInventory, InventoryHost
from patching.release.bundle import Bundle
from patching.rollout.actions import Actions, ActionsUnavailable, HostSnapshot, LbState, Outcome, Results
from patching.rollout.policy import SloProbe, Soak

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOKS = ROOT / "playbooks"
ANSIBLE_CFG = ROOT / "ansible.cfg"
MANIFEST = "/etc/fleet/bundle.json"
SSH_TIMEOUT_S = 10

# HAProxy srv_admin_state bits: FMAINT, IMAINT, CMAINT, FDRAIN, IDRAIN, RMAINT, HMAINT
_HAPROXY_OUT_OF_SERVICE = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x20 | 0x40


def _parallel(hosts: Sequence[InventoryHost], work: Callable[[InventoryHost], Outcome]) -> dict[str, Outcome]:
    if not hosts:
        return {}
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return dict(zip([h.name for h in hosts], pool.map(work, hosts), strict=True))


def haproxy_command(api: str, command: str, timeout: float = 5) -> str:
    """One HAProxy runtime API command over TCP (host:port), its answer."""
    host, _, port = api.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode()


def haproxy_states(api: str, backend: str) -> dict[str, LbState]:
    """server -> serving | drained | down, from `show servers state BACKEND`."""
    states: dict[str, LbState] = {}
    for line in haproxy_command(api, f"show servers state {backend}").splitlines():
        fields = line.split()
        if len(fields) < 7 or not fields[0].isdigit():
            continue  # version line, header comment, blank
        op_state, admin_state = int(fields[5]), int(fields[6])
        if admin_state & _HAPROXY_OUT_OF_SERVICE:
            states[fields[3]] = "drained"
        else:
            states[fields[3]] = "serving" if op_state == 2 else "down"
    return states


def make_actions(inventory: FleetInventory, *, work_dir: Path) -> Actions:
    """The host actions for a run. `work_dir` is where they keep their files (Ansible artifacts, bundles).

    Called only after every input was validated and the journal lock is held, never for `fleet plan`
    or `--dry-run`.
    """
    return FleetActions(inventory, work_dir)


class FleetActions:
    """Actions on real hosts (or the lab's, which look the same)."""

    def __init__(self, inventory: FleetInventory, work_dir: Path):
        put_our_bin_first()  # ansible-runner finds `ansible` and `ansible-playbook` on PATH
        self.inventory = inventory
        self.work_dir = work_dir
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._counter = 0
        self._lock = threading.Lock()

    # --- plumbing --------------------------------------------------------------------------------

    def _write_bundle(self, bundle: Bundle) -> Path:
        """The bundle as a file for `-e bundle_file=` (the runner holds bundles, not their paths)."""
        path = self.work_dir / "bundles" / f"{bundle.release}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(bundle.model_dump(mode="json", by_alias=True), sort_keys=False)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        return path

    def _private_dir(self, name: str) -> Path:
        with self._lock:
            self._counter += 1
            # the pid keeps a resumed run's Ansible runs apart from the crashed one's
            path = self.work_dir / "ansible" / f"{os.getpid()}-{self._counter:04d}-{name}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _ansible(self, name: str, hosts: Sequence[InventoryHost], timeout_s: float, **kwargs: Any) -> Any:
        return run_ansible(
            self._private_dir(name),
            inventory=list(self.inventory.sources),
            limit=",".join(h.name for h in hosts),
            envvars={"ANSIBLE_CONFIG": str(ANSIBLE_CFG), "ANSIBLE_TIMEOUT": str(SSH_TIMEOUT_S),
                     "ANSIBLE_ROLES_PATH": str(PLAYBOOKS / "roles")},
            timeout=int(timeout_s),
            quiet=True,
            **kwargs,
        )

    def _playbook(self, playbook: str, hosts: Sequence[InventoryHost], timeout_s: float,
                  extravars: Mapping[str, Any] | None = None) -> dict[str, Outcome]:
        if not hosts:
            return {}
        run = self._ansible(playbook.removesuffix(".yml"), hosts, timeout_s, playbook=str(PLAYBOOKS / playbook),
                            extravars=dict(extravars or {}))
        timed_out = run.status == "timeout"
        failures = _failures(run)
        stats = run.stats or {}
        failed_hosts = set(stats.get("failures", {})) | set(stats.get("dark", {}))
        out = {}
        for h in hosts:
            if timed_out:
                out[h.name] = Outcome(False, f"{playbook} ran past {timeout_s:.0f}s", timed_out=True)
            elif h.name in failed_hosts or h.name in failures:
                out[h.name] = Outcome(False, failures.get(h.name, f"{playbook} failed"))
            elif run.status != "successful" and not stats:
                out[h.name] = Outcome(False, f"{playbook}: ansible-runner {run.status} (rc {run.rc})")
            else:
                out[h.name] = Outcome(True, f"{playbook} ok")
        return out

    def _command(self, hosts: Sequence[InventoryHost], command: str, timeout_s: float = 60
                 ) -> dict[str, tuple[bool, int | None, str]]:
        """Run a command on hosts: (reachable, rc, stdout) per host, one ad-hoc Ansible run."""
        if not hosts:
            return {}
        run = self._ansible("command", hosts, timeout_s, host_pattern="all", module="ansible.builtin.command",
                            module_args=command)
        out: dict[str, tuple[bool, int | None, str]] = {h.name: (False, None, "no answer") for h in hosts}
        events = list(run.events)
        if run.status == "failed" and not any(e.get("event_data", {}).get("host") in out for e in events):
            # Ansible itself did not run (not installed, bad config): not a fact about the hosts
            raise ActionsUnavailable(f"ansible could not run (rc {run.rc}): {_runner_output(run)}")
        for event in events:
            data = event.get("event_data", {})
            host, res = data.get("host"), data.get("res", {})
            if host not in out:
                continue
            if event["event"] == "runner_on_unreachable":
                out[host] = (False, None, describe_ssh_failure(str(res.get("msg", "unreachable"))))
            elif event["event"] in ("runner_on_ok", "runner_on_failed"):
                out[host] = (True, res.get("rc"), res.get("stdout", "") or res.get("msg", ""))
        return out

    # --- reads -----------------------------------------------------------------------------------

    def read_hosts(self, hosts: Sequence[InventoryHost]) -> Mapping[str, HostSnapshot]:
        """The bundle manifest each host wrote (/etc/fleet/bundle.json) and its load-balancer state."""
        answers = self._command(hosts, f"cat {MANIFEST}", timeout_s=60)
        lb = self._lb_states(hosts)
        facts = {}
        for h in hosts:
            reachable, rc, stdout = answers[h.name]
            release = None
            if reachable and rc == 0:
                try:
                    release = json.loads(stdout).get("release")
                except json.JSONDecodeError:
                    release = None
            detail = "" if reachable else stdout
            facts[h.name] = HostSnapshot(reachable, release, lb.get(h.name, "unknown"), detail)
        return facts

    def _lb_states(self, hosts: Sequence[InventoryHost]) -> dict[str, LbState]:
        states: dict[str, LbState] = {}
        backends: dict[tuple[str, str], list[InventoryHost]] = {}
        for h in hosts:
            if h.lb.get("kind") == "haproxy" and h.lb.get("api"):
                backends.setdefault((h.lb["api"], h.lb["backend"]), []).append(h)
            elif h.lb.get("kind") == "nlb":
                states[h.name] = _nlb_state(h)
        for (api, backend), members in backends.items():
            try:
                known = haproxy_states(api, backend)
            except OSError:
                known = {}
            for h in members:
                states[h.name] = known.get(h.lb.get("server", h.name), "unknown")
        return states

    def check_power(self, hosts: Sequence[InventoryHost], min_charge_pct: int) -> Results:
        """Each UPS feeding the host, read from upsd (NUT's network protocol)."""
        def one(h: InventoryHost) -> Outcome:
            units, problems = [], []
            for ups in h.ups:
                try:
                    variables = nut.ups_variables(ups["name"], ups["host"], int(ups.get("port", 3493)))
                except nut.NutError as exc:
                    problems.append(str(exc))
                    continue
                status = variables.get("ups.status", "").split()
                charge = float(variables.get("battery.charge", "0"))
                units.append({"name": ups["name"], "status": " ".join(status), "charge_pct": charge})
                if "OL" not in status or "OB" in status or "LB" in status:
                    problems.append(f"UPS {ups['name']} is not on line power (ups.status {' '.join(status)})")
                elif charge < min_charge_pct:
                    problems.append(f"UPS {ups['name']} charge {charge:.0f}% < {min_charge_pct}%")
            return Outcome(not problems, "; ".join(problems) or "UPS on line power", measurements={"ups": units})

        return _parallel(hosts, one)

    def check_fabric(self, hosts: Sequence[InventoryHost]) -> Results:
        """Every port `ibstat` lists, Active/LinkUp."""
        ib = [h for h in hosts if h.ib_hcas]
        out: dict[str, Outcome] = {h.name: Outcome(True, "no InfiniBand") for h in hosts if not h.ib_hcas}
        for name, (reachable, rc, stdout) in self._command(ib, "ibstat").items():
            if not reachable or rc != 0:
                out[name] = Outcome(False, f"ibstat failed: {stdout[:200]}")
                continue
            down = [f"{ca.name} port {p.number}: {p.state}/{p.physical_state}"
                    for ca in hostfacts.parse_ibstat(stdout) for p in ca.ports
                    if (p.state, p.physical_state) != ("Active", "LinkUp")]
            out[name] = Outcome(not down, "; ".join(down) or "all IB ports Active/LinkUp")
        return out

    # --- changes -----------------------------------------------------------------------------------

    def drain(self, hosts: Sequence[InventoryHost], timeout_s: float) -> Results:
        """drain.yml, then wait until the serving endpoint runs no request."""
        started = time.monotonic()
        out = self._playbook("drain.yml", hosts, timeout_s)
        drained = [h for h in hosts if out[h.name].ok]
        # the LB sends no new requests; wait until the ones in flight have finished
        for h, outcome in _parallel(drained, lambda h: _wait_idle(h, timeout_s - (time.monotonic() - started))).items():
            out[h] = outcome
        return out

    def apply(self, hosts: Sequence[InventoryHost], bundle: Bundle, timeout_s: float) -> Results:
        """patch.yml with the bundle."""
        return self._playbook("patch.yml", hosts, timeout_s, {"bundle_file": str(self._write_bundle(bundle))})

    def reboot_if_needed(self, hosts: Sequence[InventoryHost], bundle: Bundle, timeout_s: float) -> Results:
        """Ansible's reboot module on the hosts whose loaded driver (nvidia-smi) is not the bundle's."""
        query = "nvidia-smi --query-gpu=driver_version --format=csv,noheader"
        answers = self._command(hosts, query, timeout_s=60)
        needs = [h for h in hosts if answers[h.name][1] != 0 or
                 set(answers[h.name][2].split()) != {bundle.driver.version}]
        out: dict[str, Outcome] = {h.name: Outcome(True, "driver loaded, no reboot needed") for h in hosts
                                   if h not in needs}
        if needs:
            run = self._ansible("reboot", needs, timeout_s, host_pattern="all", module="ansible.builtin.reboot",
                                module_args=f"reboot_timeout={max(60, int(timeout_s) - 30)}")
            rebooted = {e["event_data"]["host"] for e in run.events if e["event"] == "runner_on_ok"}
            after = self._command([h for h in needs if h.name in rebooted], query, timeout_s=60)
            for h in needs:
                reachable, rc, stdout = after.get(h.name, (False, None, "did not come back"))
                found = set(stdout.split())
                ok = reachable and rc == 0 and found == {bundle.driver.version}
                out[h.name] = Outcome(ok, f"rebooted; driver {', '.join(sorted(found)) or stdout[:120]}",
                                      timed_out=run.status == "timeout")
        return out

    def gate_testinfra(self, hosts: Sequence[InventoryHost], bundle: Bundle, timeout_s: float) -> Results:
        """The host checks (tests/hosts) for the bundle, the same suite `fleet verify` runs."""
        from patching.hosts.verify import run_verify

        if not hosts:
            return {}
        junit = self._private_dir("testinfra") / "junit.xml"
        result = run_verify(self._write_bundle(bundle), Path(self.inventory.sources[0]), [h.name for h in hosts],
                            workers=min(8, len(hosts)), junit=junit)
        out = {}
        for h in hosts:
            checks = [c for c in result.checks if c.host == h.name]
            failed = [c for c in checks if c.outcome == "failed"]
            if not checks:
                out[h.name] = Outcome(False, f"no host check ran for this host (pytest exit {result.rc}; "
                                             f"log {result.log})", measured=False)
                continue
            detail = "; ".join(f"{c.check}: {c.message.splitlines()[0][:200]}" for c in failed[:5])
            out[h.name] = Outcome(not failed, detail or f"{len(checks)} host checks passed",
                                  measurements={"checks": len(checks), "failed": len(failed)})
        return out

    def probe_slo(self, hosts: Sequence[InventoryHost], slo: SloProbe, timeout_s: float) -> Results:
        """The SLO probe's figures, straight at each host's serving port."""
        def one(h: InventoryHost) -> Outcome:
            figures = probe.slo_probe(f"http://{h.serving_address}", h.model, slo.warmup_requests, slo.requests,
                                      slo.request_timeout.total_seconds())
            return Outcome(True, figures.first_error, measurements=figures.as_dict())

        return _parallel(hosts, one)

    def undrain(self, hosts: Sequence[InventoryHost], timeout_s: float) -> Results:
        """undrain.yml (it waits for the LB's health check)."""
        return self._playbook("undrain.yml", hosts, timeout_s)

    def soak(self, hosts: Sequence[InventoryHost], soak: Soak) -> Results:
        """The soak's figures; could not measure when the host stops answering."""
        def one(h: InventoryHost) -> Outcome:
            try:
                figures = probe.soak(f"http://{h.serving_address}", h.model, soak.duration.total_seconds(),
                                     soak.probe_interval.total_seconds(), requests_per_probe=5, timeout=30)
            except (OSError, ValueError) as exc:
                return Outcome(False, f"could not measure: {exc}", measured=False)
            return Outcome(True, "", measurements=figures.as_dict())

        return _parallel(hosts, one)


def _wait_idle(h: InventoryHost, timeout_s: float) -> Outcome:
    """Until the host's serving endpoint has no request running (or it is not serving at all)."""
    deadline = time.monotonic() + max(timeout_s, 1)
    while True:
        try:
            with urllib.request.urlopen(f"http://{h.serving_address}/metrics", timeout=5) as resp:
                running = sum(s.value for s in hostfacts.parse_prometheus(resp.read().decode())
                              .find("vllm:num_requests_running"))
        except OSError:
            return Outcome(True, "drained (serving endpoint not answering)")
        if running == 0:
            return Outcome(True, "drained, no request in flight")
        if time.monotonic() > deadline:
            return Outcome(False, f"{running:.0f} request(s) still in flight", timed_out=True)
        time.sleep(0.2)


def _failures(run: Any) -> dict[str, str]:
    """host -> 'task: message' of its first failed or unreachable task."""
    out: dict[str, str] = {}
    for event in run.events:
        if event.get("event") in ("runner_on_failed", "runner_on_unreachable"):
            data = event.get("event_data", {})
            if data.get("ignore_errors"):
                continue
            host = data.get("host")
            msg = data.get("res", {}).get("msg") or data.get("res", {}).get("stderr") or "failed"
            if event.get("event") == "runner_on_unreachable":
                msg = describe_ssh_failure(str(msg))
            out.setdefault(host, f"{data.get('task', '?')}: {str(msg)[:300]}")
    return out


def _nlb_state(h: InventoryHost) -> LbState:
    """An AWS target's health in its NLB target group (boto3, credentials from the environment)."""
    try:
        import boto3  # type: ignore[import-untyped]
    except ImportError:
        return "unknown"
    tg, target = h.lb.get("target_group"), h.lb.get("target_id")
    if not tg or not str(tg).startswith("arn:") or not target:
        return "unknown"
    client = boto3.client("elbv2", region_name=h.lb.get("region"))
    found = client.describe_target_health(TargetGroupArn=tg, Targets=[{"Id": target}])["TargetHealthDescriptions"]
    state = found[0]["TargetHealth"]["State"] if found else "unused"
    known: dict[str, LbState] = {"healthy": "serving", "draining": "drained", "unused": "drained"}
    return known.get(state, "down")


def _runner_output(run: Any, limit: int = 500) -> str:
    """The last lines ansible-runner captured (what Ansible printed before it gave up)."""
    try:
        text = run.stdout.read()
    except (OSError, ValueError, AttributeError):
        return "no output"
    return " ".join(text.split())[-limit:] or "no output"
