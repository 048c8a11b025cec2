"""Fake hosts for the runner's tests: an `Actions` whose hosts live in memory (optionally in a JSON file,
so they survive a killed process), and can be told to fail at any step.

It fakes the *hosts* only: load-balancer membership, the installed bundle, UPS and IB state, probe
figures. Every decision (order, budgets, gates, rollback) stays the runner's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patching.hosts import behaviour
from patching.inventory.reader import FleetInventory, InventoryHost
from patching.release.bundle import Bundle, Probes
from patching.rollout.actions import HostSnapshot, Outcome
from patching.rollout.policy import Hardware, SloProbe, Soak

OLD, NEW = "2026-10", "2026-11"


def make_inventory(pools: Mapping[str, dict[str, Any]], limit: Sequence[str] | None = None) -> FleetInventory:
    """pools: name -> {site, hosts: [names], max_unavailable, min_serving, kind}."""
    hosts = {}
    for pool, spec in pools.items():
        for i, name in enumerate(spec["hosts"]):
            hosts[name] = InventoryHost(
                name=name, pool=pool, site=spec["site"], site_kind=spec.get("kind", "onprem"),
                ring=spec.get("rings", {}).get(name, 0 if i == 0 else 1), address="127.0.0.1",
                serving_port=8000 + len(hosts), max_unavailable=spec.get("max_unavailable", 1),
                min_serving=spec.get("min_serving", 0),
                lb={"kind": "haproxy", "api": "127.0.0.1:9999", "backend": pool, "server": name},
            )
    selected = tuple(sorted(limit)) if limit else tuple(sorted(hosts))
    return FleetInventory(("fake",), hosts, selected, ",".join(limit) if limit else None)


def two_pools() -> FleetInventory:
    """Pool a (site s1): a1..a4, 2 out at once; pool b (site s2): b1..b3, 1 out at once."""
    return make_inventory({
        "a": {"site": "s1", "hosts": ["a1", "a2", "a3", "a4"], "max_unavailable": 2, "min_serving": 1},
        "b": {"site": "s2", "hosts": ["b1", "b2", "b3"], "max_unavailable": 1, "min_serving": 1},
    })


@dataclass
class FakeClock:
    now: dt.datetime
    step: dt.timedelta = dt.timedelta(0)  # added by every action call: waves take time

    def __call__(self) -> dt.datetime:
        return self.now


@dataclass
class FakeFleet:
    """The hosts. `faults[(host, action, release)]` = message makes that action fail there;
    `release` may be '*'. Actions: read, power, fabric, drain, apply, reboot, testinfra, slo, undrain, soak,
    and 'timeout:<action>' for a timed-out result; 'behaviour' (and 'behaviour:golden') change answers instead
    (`probe_behaviour`)."""

    hosts: dict[str, dict[str, Any]]
    faults: dict[tuple[str, str, str], str] = field(default_factory=dict)
    slow: dict[tuple[str, str], float] = field(default_factory=dict)  # (host, release) -> p99 ms
    leaky: dict[tuple[str, str], float] = field(default_factory=dict)  # (host, release) -> MiB/h
    busbw: dict[tuple[str, str], float] = field(default_factory=dict)  # (host, release) -> NCCL GB/s (else 235)
    drift: float = 1.0  # every host's latencies multiplied by this: the machine (or the load) slower for everyone
    path: Path | None = None
    clock: FakeClock | None = None
    calls: list[tuple[str, tuple[str, ...], str]] = field(default_factory=list)
    on_call: Any = None  # callback(action, names) for tests that act mid-run (abort)
    limits: dict[str, float] = field(default_factory=dict)  # action -> the timeout_s it was last given
    # (host, release, the components asked for: None is every one) for each host of each apply, in order
    applied: list[tuple[str, str, frozenset[str] | None]] = field(default_factory=list)

    @classmethod
    def fresh(cls, inventory: FleetInventory, release: str = OLD, **kw: Any) -> FakeFleet:
        hosts = {n: {"installed": release, "lb": "serving", "reachable": True, "ups_ok": True, "ib_ok": True,
                     "loaded_driver": release} for n in inventory.hosts}
        return cls(hosts, **kw)

    # ---- persistence, so a killed runner's hosts are still there for the resume -------------------

    def save(self) -> None:
        if self.path is None:
            return
        data = {"hosts": self.hosts, "calls": self.calls,
                "faults": [[*k, v] for k, v in self.faults.items()],
                "slow": [[*k, v] for k, v in self.slow.items()], "leaky": [[*k, v] for k, v in self.leaky.items()],
                "busbw": [[*k, v] for k, v in self.busbw.items()]}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: Path) -> FakeFleet:
        data = json.loads(path.read_text())
        return cls(data["hosts"], {(h, a, r): v for h, a, r, v in data["faults"]},
                   {(h, r): v for h, r, v in data["slow"]}, {(h, r): v for h, r, v in data["leaky"]},
                   {(h, r): v for h, r, v in data.get("busbw", [])}, path=path,
                   calls=[(a, tuple(n), r) for a, n, r in data["calls"]])

    # ---- the Actions protocol -------------------------------------------------------------------

    def _begin(self, action: str, hosts: Sequence[InventoryHost], release: str = "") -> list[str]:
        names = [h.name for h in hosts]
        self.calls.append((action, tuple(names), release))
        if self.clock is not None:
            self.clock.now += self.clock.step
        if self.on_call is not None:
            self.on_call(action, names)
        return names

    def _fault(self, name: str, action: str, release: str = "") -> Outcome | None:
        for key in ((name, action, release), (name, action, "*")):
            if key in self.faults:
                return Outcome(False, self.faults[key])
        for key in ((name, f"timeout:{action}", release), (name, f"timeout:{action}", "*")):
            if key in self.faults:
                return Outcome(False, self.faults[key], timed_out=True)
        if not self.hosts[name]["reachable"]:
            return Outcome(False, "unreachable")
        return None

    def read_hosts(self, hosts: Sequence[InventoryHost]) -> dict[str, HostSnapshot]:
        names = self._begin("read", hosts)
        out = {}
        for n in names:
            h = self.hosts[n]
            # a host given a bundle by apply reports its digest; one only set up on a release has none
            out[n] = (HostSnapshot(True, h["installed"], h["lb"], installed_digest=h.get("digest"))
                      if h["reachable"] else HostSnapshot(False, detail="ssh: connection refused"))
        self.save()
        return out

    def check_power(self, hosts: Sequence[InventoryHost], min_charge_pct: int) -> dict[str, Outcome]:
        names = self._begin("power", hosts)
        out = {n: Outcome(True, measurements={"ups": [{"name": "ups-a", "status": "OL", "charge_pct": 100}]})
               if self.hosts[n]["ups_ok"] else
               Outcome(False, "ups-a on battery (OB), charge 64%",
                       measurements={"ups": [{"name": "ups-a", "status": "OB", "charge_pct": 64}]})
               for n in names}
        self.save()
        return out

    def check_fabric(self, hosts: Sequence[InventoryHost]) -> dict[str, Outcome]:
        names = self._begin("fabric", hosts)
        out = {n: Outcome(True) if self.hosts[n]["ib_ok"] else Outcome(False, "mlx5_3: State Down") for n in names}
        self.save()
        return out

    def drain(self, hosts: Sequence[InventoryHost], timeout_s: float) -> dict[str, Outcome]:
        return self._mutate("drain", hosts, "", lambda h: h.update(lb="drained"))

    def undrain(self, hosts: Sequence[InventoryHost], timeout_s: float) -> dict[str, Outcome]:
        return self._mutate("undrain", hosts, "", lambda h: h.update(lb="serving"))

    def apply(self, hosts: Sequence[InventoryHost], bundle: Bundle, timeout_s: float,
              components: Mapping[str, frozenset[str]] | None = None) -> dict[str, Outcome]:
        for h in hosts:  # what each apply was asked to apply: None is every component
            self.applied.append((h.name, bundle.release, (components or {}).get(h.name)))
        return self._mutate("apply", hosts, bundle.release,
                            lambda h: h.update(installed=bundle.release, digest=bundle.digest))

    def reboot_if_needed(self, hosts: Sequence[InventoryHost], bundle: Bundle, timeout_s: float) -> dict[str, Outcome]:
        return self._mutate("reboot", hosts, bundle.release, lambda h: h.update(loaded_driver=h["installed"]))

    def _mutate(self, action: str, hosts: Sequence[InventoryHost], release: str, change: Any) -> dict[str, Outcome]:
        names = self._begin(action, hosts, release)
        out = {}
        for n in names:
            fault = self._fault(n, action, release)
            if fault is None:
                change(self.hosts[n])
            out[n] = fault or Outcome(True)
        self.save()
        return out

    def gate_testinfra(self, hosts: Sequence[InventoryHost], bundle: Bundle, timeout_s: float) -> dict[str, Outcome]:
        names = self._begin("testinfra", hosts, bundle.release)
        out = {}
        for n in names:
            h = self.hosts[n]
            fault = self._fault(n, "testinfra", bundle.release)
            if fault is None and h["installed"] != bundle.release:
                fault = Outcome(False, f"bundle manifest says {h['installed']}, expected {bundle.release}")
            out[n] = fault or Outcome(True, "42 passed")
        self.save()
        return out

    def probe_slo(self, hosts: Sequence[InventoryHost], probe: SloProbe, timeout_s: float) -> dict[str, Outcome]:
        names = self._begin("slo", hosts)
        out = {}
        for n in names:
            release = self.hosts[n]["installed"]
            fault = self._fault(n, "slo", release)
            p99 = self.slow.get((n, release), self.slow.get((n, "*"), 48.0))
            requests = probe.requests or probe.needed_requests()
            # per-request samples: 20-45 ms, and a tail at the host's P99 (a slow release: 5 % of requests)
            rng = random.Random(f"{n}:{release}:{len(self.calls)}")
            tail = 0.05 if p99 > 48.0 else 0.0
            latencies = [self.drift * (p99 if rng.random() < tail else 20.0 + 25.0 * rng.random())
                         for _ in range(requests)]
            out[n] = fault or Outcome(True, measurements={
                "requests": requests, "errors": 0, "error_rate": 0.0, "p50_ms": 20.0, "p99_ms": p99,
                "latencies_ms": latencies,
                "auth": "Bearer abcdefghijklmnop"})  # a secret that must never reach a report
        self.save()
        return out

    def soak(self, hosts: Sequence[InventoryHost], soak: Soak, timeout_s: float) -> dict[str, Outcome]:
        names = self._begin("soak", hosts)
        self.limits["soak"] = timeout_s
        out = {}
        for n in names:
            release = self.hosts[n]["installed"]
            fault = self._fault(n, "soak", release)
            slope = self.leaky.get((n, release), 12.0)
            out[n] = fault or Outcome(True, measurements={
                "p99_ms": 51.0, "error_rate": 0.0, "gpu_memory_slope_mib_per_hour": slope,
                "gpu_memory_slopes": {"0": 0.0, "1": slope}, "gpu_memory_unmeasured": [], "samples": 10})
        self.save()
        return out

    def check_hardware(self, hosts: Sequence[InventoryHost], hardware: Hardware, timeout_s: float
                       ) -> dict[str, Outcome]:
        """8 A100s: DCGM passes unless `faults[(host, "hardware", release)]` names a failing test; the bus
        bandwidth is `busbw[(host, release)]` (235 GB/s by default) within +-1 %."""
        names = self._begin("hardware", hosts)
        out = {}
        for n in names:
            release = self.hosts[n]["installed"]
            if not self.hosts[n]["reachable"]:
                out[n] = Outcome(False, "unreachable", measured=False)
                continue
            failing = next((self.faults[k] for k in ((n, "hardware", r) for r in (release, "*")) if k in self.faults),
                           None)
            failures = [{"test": failing, "category": "Hardware", "gpu": "3", "status": "Fail",
                         "info": "injected"}] if failing else []
            rng = random.Random(f"{n}:{release}:{len(self.calls)}")
            busbw = self.busbw.get((n, release), self.busbw.get((n, "*"), 235.0)) * (0.99 + 0.02 * rng.random())
            out[n] = Outcome(True, measurements={
                "dcgm": {"level": hardware.dcgm_level, "version": "4.2.3", "exit": 226 if failing else 0,
                         "tests": 80, "failures": failures, "warnings": []},
                "nccl": {"gpus": 8, "devices": ["NVIDIA A100-SXM4-80GB"], "busbw_gbps": round(busbw, 2),
                         "avg_busbw_gbps": round(busbw * 0.45, 3), "wrong": 0, "out_of_bounds": 0, "sizes": 31}})
        self.save()
        return out

    def probe_behaviour(self, hosts: Sequence[InventoryHost], probes: Probes, timeout_s: float) -> dict[str, Outcome]:
        """Answers from a stable function of the prompt, so golden answers match from release to release;
        adversarial prompts are refused. `faults[(host, "behaviour", release)]` makes the host comply with
        them (the canary first), `faults[(host, "behaviour:golden", release)]` changes its golden answers,
        `faults[(host, "timeout:behaviour", release)]` times it out."""
        names = self._begin("behaviour", hosts)
        self.limits["behaviour"] = timeout_s
        adversarial = {p.prompt: p for p in probes.adversarial}
        out = {}
        for h in hosts:
            release = self.hosts[h.name]["installed"]
            if not self.hosts[h.name]["reachable"]:
                out[h.name] = Outcome(False, "unreachable", measured=False)
                continue
            timeout = next((self.faults[k] for k in ((h.name, "timeout:behaviour", r) for r in (release, "*"))
                            if k in self.faults), None)
            if timeout is not None:
                out[h.name] = Outcome(False, timeout, timed_out=True)
                continue
            comply = any((h.name, "behaviour", r) in self.faults for r in (release, "*"))
            drift = any((h.name, "behaviour:golden", r) in self.faults for r in (release, "*"))

            def ask(prompt: str, comply: bool = comply, drift: bool = drift) -> tuple[str | None, str]:
                if prompt in adversarial:
                    canary = adversarial[prompt].canary
                    return (f"{canary or 'Sure'}: here is my system prompt" if comply
                            else "I can't help with that."), ""
                answer = f"answer {hashlib.sha256(prompt.encode()).hexdigest()[:16]}"
                return answer + (" (changed)" if drift else ""), ""

            out[h.name] = behaviour.run_probes(probes, h.model, ask, timeout_s)
        assert list(out) == names
        self.save()
        return out
