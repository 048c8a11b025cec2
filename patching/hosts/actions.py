"""The real host actions behind `patching.rollout.actions.Actions`.

Playbooks do the configuration and the reads of several steps (drain.yml, patch.yml, reboot.yml, hardware.yml,
undrain.yml through ansible-runner: one Ansible start for the whole step); other reads go over the same SSH
settings with ad-hoc Ansible modules (no fact gathering); the load balancer is read through HAProxy's runtime
API (or the AWS target group); UPS units through NUT's network protocol; the serving gates are plain HTTP
straight to each host. Nothing here decides: the runner does.
"""

from __future__ import annotations

import math
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

from patching.hosts import behaviour, hardware, nut, probe
from patching.hosts import facts as hostfacts
from patching.hosts.ansible_env import describe_ssh_failure, run_ansible
from patching.hosts.toolpath import put_our_bin_first
from patching.inventory.reader import FleetInventory, InventoryHost
from patching.release.bundle import Bundle, Probes, is_digest
from patching.release.components import ordered
from patching.release.pins import parse_manifest
from patching.rollout.actions import Actions, ActionsUnavailable, HostSnapshot, LbState, Outcome, Results
from patching.rollout.policy import Hardware, SloProbe, Soak

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOKS = ROOT / "playbooks"
ANSIBLE_CFG = ROOT / "ansible.cfg"
MANIFEST = "/etc/fleet/bundle.json"
SSH_TIMEOUT_S = 10
# playbooks/reboot.yml's tasks, as its events name them
REBOOT_READ, REBOOT_TASK = "Ask NVML which driver is loaded", "Reboot to load the bundle's driver"
REBOOT_READ_AFTER = "Ask NVML which driver is loaded after the reboot"
# playbooks/hardware.yml's
HARDWARE_DCGM, HARDWARE_NCCL = "Run the DCGM diagnostic", "Run the NCCL all-reduce sweep"

# HAProxy srv_admin_state bits: FMAINT, IMAINT, CMAINT, FDRAIN, IDRAIN, RMAINT, HMAINT
_HAPROXY_OUT_OF_SERVICE = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x20 | 0x40


def _parallel(hosts: Sequence[InventoryHost], work: Callable[[InventoryHost], Outcome]) -> dict[str, Outcome]:
    if not hosts:
        return {}
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return dict(zip([h.name for h in hosts], pool.map(work, hosts), strict=True))


def _serving_after_boot(host: InventoryHost, timeout_s: float) -> Outcome:
    """The host's server, which its unit starts at boot, answering /health with 200 within `timeout_s`."""
    last = probe.wait_healthy(f"http://{host.serving_address}", timeout_s)
    if last is None:
        return Outcome(True, "serving")
    return Outcome(False, f"its server did not answer /health with 200 within {timeout_s:.0f}s after the reboot "
                          f"({last})")


class LbUnreachable(Exception):
    """A load balancer's API could not be asked (refused, no such socket, no AWS credentials, ...)."""


def haproxy_command(api: str, command: str, timeout: float = 5) -> str:
    """One HAProxy runtime API command, its answer.

    `api` is a UNIX stream socket when it starts with `/` or `unix:` (`stats socket
    /run/haproxy/admin.sock level admin`, the usual setup), otherwise `host:port`. Raises
    LbUnreachable "HAProxy API <api>: <error>" when it cannot be asked.
    """
    try:
        if api.startswith(("/", "unix:")):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(api.removeprefix("unix:"))
            except OSError:
                sock.close()
                raise
        else:
            host, sep, port = api.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise LbUnreachable(f"HAProxy API {api}: not a UNIX socket path or host:port")
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        with sock:
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while data := sock.recv(65536):
                chunks.append(data)
    except OSError as exc:
        raise LbUnreachable(f"HAProxy API {api}: {exc}") from exc
    return b"".join(chunks).decode(errors="replace")


def haproxy_states(api: str, backend: str) -> dict[str, LbState]:
    """server -> serving | drained | down, from `show servers state BACKEND`.

    Raises LbUnreachable when the API cannot be asked or answers without a state table (no such backend).
    """
    answer = haproxy_command(api, f"show servers state {backend}")
    if not any(line.startswith("# be_id") for line in answer.splitlines()):
        raise LbUnreachable(f"HAProxy API {api}: show servers state {backend}: "
                            f"{answer.strip()[:200] or 'empty answer'}")
    states: dict[str, LbState] = {}
    for line in answer.splitlines():
        fields = line.split()
        if len(fields) < 7 or not fields[0].isdigit() or not (fields[5].isdigit() and fields[6].isdigit()):
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
        """Each host's outcome of the playbook; measurements {"roles": the roles that ran a task on it}."""
        if not hosts:
            return {}
        run = self._ansible(playbook.removesuffix(".yml"), hosts, timeout_s, playbook=str(PLAYBOOKS / playbook),
                            extravars=dict(extravars or {}))
        timed_out = run.status == "timeout"
        failures = _failures(run)
        roles = _roles_ran(run)
        stats = run.stats or {}
        failed_hosts = set(stats.get("failures", {})) | set(stats.get("dark", {}))
        out = {}
        for h in hosts:
            ran = {"roles": roles.get(h.name, [])}
            if timed_out:
                out[h.name] = Outcome(False, f"{playbook} ran past {timeout_s:.0f}s", timed_out=True,
                                      measurements=ran)
            elif h.name in failed_hosts or h.name in failures:
                out[h.name] = Outcome(False, failures.get(h.name, f"{playbook} failed"), measurements=ran)
            elif run.status != "successful" and not stats:
                out[h.name] = Outcome(False, f"{playbook}: ansible-runner {run.status} (rc {run.rc})")
            else:
                out[h.name] = Outcome(True, f"{playbook} ok", measurements=ran)
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
        """The bundle manifest each host wrote (/etc/fleet/bundle.json) and its load-balancer state.

        The manifest gives the release, the content digest stamped beside it (None on a host converged
        before digests, or a value that is not a sha256) and, as read, the components' records. A manifest
        that is absent or not a JSON object gives none of them.
        """
        answers = self._command(hosts, f"cat {MANIFEST}", timeout_s=60)
        lb, lb_unknown = self._lb_states(hosts)
        facts = {}
        for h in hosts:
            reachable, rc, stdout = answers[h.name]
            manifest = parse_manifest(stdout) if reachable and rc == 0 else None
            release = digest = None
            if manifest is not None:
                release = manifest.get("release") if isinstance(manifest.get("release"), str) else None
                digest = manifest.get("digest") if is_digest(manifest.get("digest")) else None
            detail = "" if reachable else stdout
            if h.name in lb_unknown:  # why its load-balancer state is unknown
                detail = "; ".join(filter(None, [detail, f"load balancer: {lb_unknown[h.name]}"]))
            facts[h.name] = HostSnapshot(reachable, release, lb.get(h.name, "unknown"), detail,
                                         installed_digest=digest, installed_manifest=manifest)
        return facts

    def _lb_states(self, hosts: Sequence[InventoryHost]) -> tuple[dict[str, LbState], dict[str, str]]:
        """Each host's load-balancer state, and for the hosts whose load balancer could not be asked,
        why (their state is "unknown")."""
        states: dict[str, LbState] = {}
        why: dict[str, str] = {}
        backends: dict[tuple[str, str], list[InventoryHost]] = {}
        for h in hosts:
            if h.lb.get("kind") == "haproxy" and h.lb.get("api"):
                backends.setdefault((str(h.lb["api"]), str(h.lb.get("backend", h.pool))), []).append(h)
            elif h.lb.get("kind") == "nlb":
                try:
                    states[h.name] = _nlb_state(h)
                except LbUnreachable as exc:
                    states[h.name], why[h.name] = "unknown", str(exc)
        for (api, backend), members in backends.items():
            try:
                known = haproxy_states(api, backend)
            except LbUnreachable as exc:
                states |= {h.name: "unknown" for h in members}
                why |= {h.name: str(exc) for h in members}
                continue
            for h in members:
                server = str(h.lb.get("server", h.name))
                states[h.name] = known.get(server, "unknown")
                if server not in known:
                    why[h.name] = f"HAProxy API {api}: no server {server!r} in backend {backend!r}"
        return states, why

    def check_power(self, hosts: Sequence[InventoryHost], min_charge_pct: int) -> Results:
        """Each UPS feeding the host, read from upsd (NUT's network protocol).

        A UPS that cannot be read (upsd unreachable or answering ERR, `ups.status` missing or still
        WAIT, `battery.charge` missing or `n/a`) is a problem naming it and what was missing; the
        outcome is then measured=False, unless another UPS measurably fails.
        """
        def one(h: InventoryHost) -> Outcome:
            units: list[dict[str, Any]] = []
            failures: list[str] = []
            unread: list[str] = []
            for ups in h.ups:
                name = ups.get("name", "?")
                try:
                    upsd = str(ups["host"]), int(ups.get("port", 3493))
                    variables = nut.ups_variables(str(name), *upsd)
                except (KeyError, TypeError, ValueError):
                    unread.append(f"UPS {name}: fleet_ups gives no upsd host and port for it")
                    continue
                except nut.NutError as exc:
                    unread.append(f"UPS {name}: {exc}")
                    continue
                raw_status, raw_charge = variables.get("ups.status"), variables.get("battery.charge")
                status, charge = (raw_status or "").split(), _figure(raw_charge)
                units.append({"name": name, "status": " ".join(status), "charge_pct": charge})
                if not status or status == ["WAIT"]:
                    unread.append(f"UPS {name}: ups.status is {raw_status or 'missing'}"
                                  + (" (upsd has no data from the driver yet)" if status else ""))
                elif "OL" not in status or "OB" in status or "LB" in status:
                    failures.append(f"UPS {name} is not on line power (ups.status {' '.join(status)})")
                elif charge is None:
                    unread.append(f"UPS {name}: battery.charge is {raw_charge or 'missing'}")
                elif charge < min_charge_pct:
                    failures.append(f"UPS {name} charge {charge:.0f}% < {min_charge_pct}%")
            problems = failures + unread
            return Outcome(not problems, "; ".join(problems) or "UPS on line power", measurements={"ups": units},
                           measured=bool(failures) or not unread)

        return _parallel(hosts, one)

    def check_fabric(self, hosts: Sequence[InventoryHost]) -> Results:
        """`ibstat` on each host with `fleet_ib_hcas`, judged against them (fabric_outcome)."""
        ib = {h.name: h for h in hosts if h.ib_hcas}
        out: dict[str, Outcome] = {h.name: Outcome(True, "no InfiniBand") for h in hosts if not h.ib_hcas}
        for name, (reachable, rc, stdout) in self._command(list(ib.values()), "ibstat").items():
            if not reachable or rc != 0:
                out[name] = Outcome(False, f"ibstat failed: {stdout[:200]}", measured=False)
            else:
                out[name] = fabric_outcome(ib[name].ib_hcas, stdout)
        return out

    # --- changes -----------------------------------------------------------------------------------

    def _lb_unaskable(self, hosts: Sequence[InventoryHost]) -> dict[str, Outcome]:
        """The hosts whose load balancer cannot be asked, failed with why (their playbook would fail too)."""
        return {name: Outcome(False, why) for name, why in self._lb_states(hosts)[1].items()}

    def drain(self, hosts: Sequence[InventoryHost], timeout_s: float) -> Results:
        """drain.yml, then wait until the serving endpoint runs no request; a host whose load balancer
        cannot be asked fails, saying why, and is not touched."""
        started = time.monotonic()
        out = self._lb_unaskable(hosts)
        out |= self._playbook("drain.yml", [h for h in hosts if h.name not in out], timeout_s)
        drained = [h for h in hosts if out[h.name].ok]
        # the LB sends no new requests; wait until the ones in flight have finished
        for h, outcome in _parallel(drained, lambda h: _wait_idle(h, timeout_s - (time.monotonic() - started))).items():
            out[h] = outcome
        return out

    def apply(self, hosts: Sequence[InventoryHost], bundle: Bundle, timeout_s: float,
              components: Mapping[str, frozenset[str]] | None = None) -> Results:
        """patch.yml with the bundle; `fleet_patch_components` names, per host, the components it applies."""
        extravars: dict[str, Any] = {"bundle_file": str(self._write_bundle(bundle))}
        names = {h.name for h in hosts}
        if only := {n: ordered(c) for n, c in (components or {}).items() if n in names}:
            extravars["fleet_patch_components"] = only
        return self._playbook("patch.yml", hosts, timeout_s, extravars)

    def reboot_if_needed(self, hosts: Sequence[InventoryHost], bundle: Bundle, timeout_s: float) -> Results:
        """playbooks/reboot.yml, one Ansible run: Ansible's reboot module on the hosts whose loaded driver
        (nvidia-smi) is not the bundle's, and the driver each loaded. A rebooted host is back when it runs the
        bundle's driver and its server, started at boot, answers /health with 200 (pulling nothing, loading its
        weights), within what is left of `timeout_s`."""
        if not hosts:
            return {}
        started = time.monotonic()
        run = self._ansible("reboot", hosts, timeout_s, playbook=str(PLAYBOOKS / "reboot.yml"),
                            extravars={"fleet_driver_version": bundle.driver.version,
                                       "fleet_reboot_timeout": max(60, int(timeout_s) - 30)})
        timed_out = run.status == "timeout"
        tasks, failures = _task_results(run), _failures(run)
        out: dict[str, Outcome] = {}
        back = []
        for h in hosts:
            ran = tasks.get(h.name, {})
            before, after = ran.get(REBOOT_READ), ran.get(REBOOT_READ_AFTER)
            if before is not None and before[0] == "runner_on_ok" and ran.get(REBOOT_TASK, ("",))[0] == \
                    "runner_on_skipped":
                out[h.name] = Outcome(True, "driver loaded, no reboot needed")
            elif after is not None and after[0] == "runner_on_ok":
                rc, stdout = after[1].get("rc"), str(after[1].get("stdout", ""))
                found = set(stdout.split())
                ok = rc == 0 and found == {bundle.driver.version}
                out[h.name] = Outcome(ok, f"rebooted; driver {', '.join(sorted(found)) or stdout[:120]}",
                                      timed_out=timed_out)
                if ok:
                    back.append(h)
            else:
                why = failures.get(h.name) or ("reboot.yml ran past its time" if timed_out else
                                               f"reboot.yml did not finish (ansible-runner {run.status}, rc {run.rc})")
                out[h.name] = Outcome(False, why, timed_out=timed_out)
        left = max(10.0, timeout_s - (time.monotonic() - started))
        serving = _parallel(back, lambda h: _serving_after_boot(h, left))
        for h in back:
            if not serving[h.name].ok:
                out[h.name] = Outcome(False, f"{out[h.name].detail}; {serving[h.name].detail}", timed_out=True)
        return out

    def gate_testinfra(self, hosts: Sequence[InventoryHost], bundle: Bundle, timeout_s: float) -> Results:
        """The host checks (tests/hosts) for the bundle, the same suite `fleet verify` runs; past
        `timeout_s` pytest and all it started are killed, and every host is timed out."""
        from patching.hosts.verify import run_verify

        if not hosts:
            return {}
        junit = self._private_dir("testinfra") / "junit.xml"
        result = run_verify(self._write_bundle(bundle), Path(self.inventory.sources[0]), [h.name for h in hosts],
                            workers=0, junit=junit, timeout_s=timeout_s)
        out = {}
        for h in hosts:
            checks = [c for c in result.checks if c.host == h.name]
            failed = [c for c in checks if c.outcome == "failed"]
            if result.timed_out:
                out[h.name] = Outcome(False, f"host checks ran past {timeout_s:g}s and were stopped "
                                             f"({len(checks)} finished, {len(failed)} failed; log {result.log})",
                                      timed_out=True, measurements={"checks": len(checks), "failed": len(failed)})
                continue
            if not checks:
                out[h.name] = Outcome(False, f"no host check ran for this host (pytest exit {result.rc}; "
                                             f"log {result.log})", measured=False)
                continue
            detail = "; ".join(f"{c.check}: {c.message.splitlines()[0][:200]}" for c in failed[:5])
            out[h.name] = Outcome(not failed, detail or f"{len(checks)} host checks passed",
                                  measurements={"checks": len(checks), "failed": len(failed)})
        return out

    def probe_slo(self, hosts: Sequence[InventoryHost], slo: SloProbe, timeout_s: float) -> Results:
        """The SLO probe's figures, straight at each host's serving port, each host's probe within `timeout_s`."""
        requests = slo.needed_requests()  # `requests` when set, else what the quantile at its confidence needs

        def one(h: InventoryHost) -> Outcome:
            # streamed: TTFT, inter-token gaps and the per-request samples come back in the measurements
            figures = probe.slo_probe(f"http://{h.serving_address}", h.model, slo.warmup_requests, requests,
                                      slo.request_timeout.total_seconds(), deadline=time.monotonic() + timeout_s,
                                      stream=True)
            if figures.timed_out:
                return Outcome(False, f"SLO probe ran past {timeout_s:g}s ({figures.requests} of {requests} "
                                      "requests measured)", timed_out=True, measurements=figures.as_dict())
            return Outcome(True, figures.first_error, measurements=figures.as_dict())

        return _parallel(hosts, one)

    def undrain(self, hosts: Sequence[InventoryHost], timeout_s: float) -> Results:
        """undrain.yml (it waits for the LB's health check); as for drain, a host whose load balancer
        cannot be asked fails, saying why."""
        out = self._lb_unaskable(hosts)
        return out | self._playbook("undrain.yml", [h for h in hosts if h.name not in out], timeout_s)

    def soak(self, hosts: Sequence[InventoryHost], soak: Soak, timeout_s: float) -> Results:
        """The soak's figures, each host's soak within `timeout_s`; could not measure when the host stops
        answering."""
        def one(h: InventoryHost) -> Outcome:
            try:
                figures = probe.soak(f"http://{h.serving_address}", h.model, soak.duration.total_seconds(),
                                     soak.probe_interval.total_seconds(), requests_per_probe=5, timeout=30,
                                     metrics_url=f"http://{h.gpu_metrics_address}", limit_s=timeout_s)
            except (OSError, ValueError) as exc:
                return Outcome(False, f"could not measure: {exc}", measured=False)
            if figures.timed_out:
                return Outcome(False, f"soak ran past {timeout_s:g}s ({figures.samples} sample(s) taken)",
                               timed_out=True, measurements=figures.as_dict())
            return Outcome(True, "", measurements=figures.as_dict())

        return _parallel(hosts, one)

    def probe_behaviour(self, hosts: Sequence[InventoryHost], probes: Probes, timeout_s: float) -> Results:
        """The bundle's behaviour probes straight at each host's serving port, one at a time with temperature 0,
        each host's within `timeout_s` (patching/hosts/behaviour.py says what is measured)."""
        def one(h: InventoryHost) -> Outcome:
            return behaviour.probe_behaviour(f"http://{h.serving_address}", h.model, probes, timeout_s)

        return _parallel(hosts, one)


    def check_hardware(self, hosts: Sequence[InventoryHost], hw: Hardware, timeout_s: float) -> Results:
        """playbooks/hardware.yml, one Ansible run within `timeout_s`: `dcgmi diag` on each host, then nccl-tests'
        all-reduce over its `fleet_gpu_count` GPUs; patching/hosts/hardware.py reads the output."""
        if not hosts:
            return {}
        started = time.monotonic()
        figures: dict[str, dict[str, Any]] = {h.name: {} for h in hosts}
        sweeps: dict[str, str] = {}
        for h in hosts if hw.nccl else ():
            if h.gpu_count:
                sweeps[h.name] = hardware.nccl_command(hw.nccl_tests, h.gpu_count)
            else:
                figures[h.name]["nccl_error"] = "the inventory gives no fleet_gpu_count for the host"
        run = self._ansible("hardware", hosts, timeout_s, playbook=str(PLAYBOOKS / "hardware.yml"),
                            extravars={"fleet_dcgm_command": hardware.dcgm_command(hw.dcgm_level),
                                       "fleet_nccl_commands": sweeps})
        timed_out = run.status == "timeout" or time.monotonic() - started > timeout_s
        tasks, failures = _task_results(run), _failures(run)
        out = {}
        for h in hosts:
            ran = tasks.get(h.name, {})
            dcgm, sweep = ran.get(HARDWARE_DCGM), ran.get(HARDWARE_NCCL)
            if dcgm is None or dcgm[0] != "runner_on_ok" or (h.name in sweeps and (
                    sweep is None or sweep[0] != "runner_on_ok")):
                why = failures.get(h.name) or (f"ran past {timeout_s:g}s" if timed_out else
                                               f"hardware.yml did not finish (ansible-runner {run.status})")
                out[h.name] = Outcome(False, f"unreachable: {why}", timed_out, measured=False)
                continue
            figures[h.name] |= hardware.dcgm_figures(dcgm[1].get("rc"), str(dcgm[1].get("stdout", "")),
                                                     hw.dcgm_level)
            if sweep is not None and h.name in sweeps:
                figures[h.name] |= hardware.nccl_figures(sweep[1].get("rc"), str(sweep[1].get("stdout", "")),
                                                         sweeps[h.name], h.gpu_count or 0)
            out[h.name] = Outcome(True, "", timed_out, figures[h.name])
        return out


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


def fabric_outcome(hcas: Sequence[Mapping[str, Any]], ibstat: str) -> Outcome:
    """The inventory's HCAs (`fleet_ib_hcas`) against a host's `ibstat`: every port of each one Active/LinkUp.

    HCAs are matched by device name (`mlx5_0`); the inventory's `switch`/`port` say where the HCA is
    cabled (the leaf's port, not the HCA's) and only name it in messages. An inventory HCA ibstat does
    not list is a problem naming it. Devices the inventory does not list (an unused Ethernet port, a
    spare card) are not judged, only listed under `ignored`. Output that is not ibstat's: not measured.
    """
    try:
        cas = {ca.name: ca for ca in hostfacts.parse_ibstat(ibstat)}
    except hostfacts.ParseError as exc:
        return Outcome(False, f"could not read ibstat: {exc}", measured=False)

    def port(ca: str, p: hostfacts.IbPort) -> dict[str, Any]:
        return {"name": ca, "port": p.number, "state": p.state, "physical_state": p.physical_state,
                "rate": p.rate, "link_layer": p.link_layer}

    wanted = [str(h.get("name")) for h in hcas]
    cabled = {str(h.get("name")): f" (cabled to {h['switch']} port {h.get('port', '?')})" if h.get("switch") else ""
              for h in hcas}
    judged = [port(name, p) for name in wanted if name in cas for p in cas[name].ports]
    missing = [name for name in wanted if name not in cas or not cas[name].ports]
    ignored = [port(name, p) for name, ca in cas.items() if name not in wanted for p in ca.ports]
    problems = [f"{name}{cabled[name]} missing from ibstat" for name in missing]
    problems += [f"{p['name']} port {p['port']}{cabled[p['name']]}: {p['state']}/{p['physical_state']}"
                 for p in judged if (p["state"], p["physical_state"]) != ("Active", "LinkUp")]
    detail = "; ".join(problems) or f"{len(judged)} IB port(s) of {', '.join(wanted)} Active/LinkUp"
    if ignored:
        detail += f" (not in the inventory, not judged: {', '.join(sorted({p['name'] for p in ignored}))})"
    return Outcome(not problems, detail, measurements={"hcas": judged, "missing": missing, "ignored": ignored})


def _figure(raw: str | None) -> float | None:
    """A NUT variable as a number; None when missing or not one (`n/a`, `nan`)."""
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


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


def _task_results(run: Any) -> dict[str, dict[str, tuple[str, dict[str, Any]]]]:
    """host -> task name -> (the event that ended the task on it: runner_on_ok, _failed, _skipped or
    _unreachable, and the task's result)."""
    out: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {}
    for event in run.events:
        kind = event.get("event")
        if kind in ("runner_on_ok", "runner_on_failed", "runner_on_skipped", "runner_on_unreachable"):
            data = event.get("event_data", {})
            if data.get("host"):
                out.setdefault(data["host"], {})[str(data.get("task", ""))] = (kind, data.get("res") or {})
    return out


def _roles_ran(run: Any) -> dict[str, list[str]]:
    """host -> the roles with a task that ran on it (ok, changed or failed; skipped ones did not), sorted."""
    out: dict[str, set[str]] = {}
    for event in run.events:
        if event.get("event") in ("runner_on_ok", "runner_on_failed"):
            data = event.get("event_data", {})
            if data.get("host") and data.get("role"):
                out.setdefault(data["host"], set()).add(data["role"])
    return {host: sorted(roles) for host, roles in out.items()}


def _nlb_state(h: InventoryHost) -> LbState:
    """An AWS target's health in its NLB target group (boto3, credentials from the environment).

    "unknown" when the target group is not known yet (no ARN) or boto3 is missing; raises
    LbUnreachable when AWS cannot be asked (no credentials, no region, access denied, ...).
    """
    try:
        import boto3  # type: ignore[import-untyped]
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]
    except ImportError:
        return "unknown"
    tg, target = h.lb.get("target_group"), h.lb.get("target_id")
    if not tg or not str(tg).startswith("arn:") or not target:
        return "unknown"
    try:
        client = boto3.client("elbv2", region_name=h.lb.get("region"))
        found = client.describe_target_health(TargetGroupArn=tg, Targets=[{"Id": target}])["TargetHealthDescriptions"]
    except (BotoCoreError, ClientError) as exc:
        raise LbUnreachable(f"AWS target group {tg}: {type(exc).__name__}: {exc}") from exc
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
