"""The seam between the patch pipeline and the hosts: the `Actions` protocol.

The runner (patching/rollout/runner.py) decides *what* happens and in which order; an `Actions`
implementation does it to hosts (ansible-runner for playbooks and reads, HAProxy's runtime API or an
NLB for drain/undrain, NUT for UPS, testinfra, HTTP probes). Every method takes a batch of hosts and
answers per host; a host missing from the answer counts as failed. Methods must be idempotent: after
a crash the runner calls them again for the same hosts (drain an already drained host, apply a
bundle already installed, ...). Each is given its time limit; a host that runs over it is answered
`Outcome(ok=False, timed_out=True)`.

Actions measure; they never judge a gate. Every verdict is made in patching/rollout/gates.py from
the `Outcome` (so the decision and its figures are journaled together). The SLO probe and the soak
put their figures in `measurements`; an action that could not measure says so with
`measured=False`. The real implementation is patching/hosts/actions.py (`make_actions`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from patching.inventory.reader import InventoryHost
from patching.release.bundle import Bundle, Probes
from patching.rollout.policy import Hardware, SloProbe, Soak

LbState = Literal["serving", "drained", "down", "unknown"]


@dataclass(frozen=True)
class HostSnapshot:
    """What a host is now, read fresh (at preflight, and at resume: the runner is level-triggered)."""

    reachable: bool
    installed_release: str | None = None  # release of the bundle manifest the playbooks wrote on the host
    lb_state: LbState = "unknown"  # the host's membership in its load balancer
    detail: str = ""
    # the content digest stamped beside the release (Bundle.digest); None on a host converged before digests
    installed_digest: str | None = None
    # the host's bundle manifest as read (/etc/fleet/bundle.json: release, digest, each component's recorded
    # packages and facts), None when absent or unreadable; what identity.py names differing fields from
    installed_manifest: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def healthy(self) -> bool:
        """Reachable and taking traffic; anything else counts against the pool's disruption budget."""
        return self.reachable and self.lb_state == "serving"


@dataclass(frozen=True)
class Outcome:
    """One host's result of one action. `measured=False`: the action could not get its figures."""

    ok: bool
    detail: str = ""
    timed_out: bool = False
    measurements: Mapping[str, Any] = field(default_factory=dict)
    measured: bool = True


Results = Mapping[str, Outcome]  # host name -> outcome


class Actions(Protocol):
    """Everything the runner does to hosts. See the module docstring for the rules every method follows."""

    def read_hosts(self, hosts: Sequence[InventoryHost]) -> Mapping[str, HostSnapshot]:
        """Installed bundle release, load-balancer state and reachability of each host."""
        ...

    def check_power(self, hosts: Sequence[InventoryHost], min_charge_pct: int) -> Results:
        """Every UPS feeding the host (its `fleet_ups`) on line power with charge >= min_charge_pct.

        measurements: {"ups": [{"name", "status", "charge_pct"}]}. Hosts without UPS feeds: ok. A UPS
        that cannot be read (upsd unreachable or answering ERR, a variable missing or `n/a`) is not ok,
        `measured=False`, the detail naming the UPS and what was missing.
        """
        ...

    def check_fabric(self, hosts: Sequence[InventoryHost]) -> Results:
        """Every port of each HCA the inventory lists for the host (its `fleet_ib_hcas`) up. Hosts without IB: ok.

        An inventory HCA the host does not show is a problem naming it; devices the inventory does not
        list (an unused Ethernet port) are not judged, only listed: measurements {"hcas": [...],
        "missing": [...], "ignored": [...]}.
        """
        ...

    def drain(self, hosts: Sequence[InventoryHost], timeout_s: float) -> Results:
        """Take the hosts out of their load balancer and wait until their in-flight requests finished.

        A host whose load balancer cannot be asked (its API unreachable, no AWS credentials) is not
        touched: it fails, the detail saying why.
        """
        ...

    def apply(self, hosts: Sequence[InventoryHost], bundle: Bundle, timeout_s: float,
              components: Mapping[str, frozenset[str]] | None = None) -> Results:
        """Converge the hosts to the bundle (the patch playbook); the Ansible result is the first gate.

        `components`: host -> the components (patching.release.components) to apply, the ones the bundle
        change touches; a host not in it gets every component. measurements: {"roles": the roles that ran
        a task on the host}.
        """
        ...

    def reboot_if_needed(self, hosts: Sequence[InventoryHost], bundle: Bundle, timeout_s: float) -> Results:
        """Reboot the hosts whose loaded driver differs from the bundle's, and wait until they are back."""
        ...

    def gate_testinfra(self, hosts: Sequence[InventoryHost], bundle: Bundle, timeout_s: float) -> Results:
        """The testinfra host checks for the bundle; detail names the failed checks."""
        ...

    def probe_slo(self, hosts: Sequence[InventoryHost], probe: SloProbe, timeout_s: float) -> Results:
        """`probe.requests` streaming requests (default: `probe.needed_requests()`) straight to each host's
        serving port, warm-up first and not measured. The runner also probes hosts still serving (peers on
        the previous bundle, and each host before its drain) as the gate's baseline.

        measurements: {"requests": int, "errors": int, "error_rate": float, "p50_ms", "p99_ms",
        "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms": float, and the per-request samples the
        gate compares with a baseline: "latencies_ms", "ttft_ms", "itl_ms" (mean gap per request): lists}.
        """
        ...

    def undrain(self, hosts: Sequence[InventoryHost], timeout_s: float) -> Results:
        """Put the hosts back into their load balancer, once they answer its health check (as `drain`, a host
        whose load balancer cannot be asked fails, saying why)."""
        ...

    def soak(self, hosts: Sequence[InventoryHost], soak: Soak, timeout_s: float) -> Results:
        """Probe every `soak.probe_interval` for `soak.duration` under live traffic and sample GPU memory.

        `timeout_s` (the runner gives the duration plus the gate timeout) bounds the whole soak.
        measurements: {"p99_ms": worst P99, "error_rate": worst error rate, "samples": int,
        "gpu_memory_slopes": {GPU: least-squares slope of its used memory, MiB/h},
        "gpu_memory_slope_mib_per_hour": the worst of them, "gpu_memory_unmeasured": [GPUs seen in
        fewer than two samples]}.
        """
        ...

    def check_hardware(self, hosts: Sequence[InventoryHost], hardware: Hardware, timeout_s: float) -> Results:
        """On drained hosts: DCGM's diagnostic at `hardware.dcgm_level` and, when `hardware.nccl`, nccl-tests'
        all-reduce over every GPU of the host (patching/hosts/hardware.py), within `timeout_s`.

        measurements: {"dcgm": {"level", "version", "exit", "tests": results read, "failures": [{"test",
        "category", "gpu", "status", "info"}], "warnings": [...]}} or {"dcgm_error": why}, and
        {"nccl": {"gpus", "devices", "busbw_gbps" (the sweep's largest), "avg_busbw_gbps", "wrong",
        "out_of_bounds", "sizes"}} or {"nccl_error": why}. An unreachable host is `measured=False`.
        The judge (gates.py) also reads "baseline" ({"own": GB/s before the patch, "pool": {host: GB/s}}),
        which the runner adds.
        """
        ...

    def probe_behaviour(self, hosts: Sequence[InventoryHost], probes: Probes, timeout_s: float) -> Results:
        """The bundle's behaviour probes (`Bundle.probes`), each host's through its serving port, one at a time,
        temperature 0, all within `timeout_s`; only the probes for the host's model (`Probes.for_model`).

        measurements: {"model", "refusal_markers", "probes": [{"id", "kind" (golden|injection|jailbreak),
        "answer_sha256" (None: no answer), "answer_head" (first 200 characters), "refused", "error", and for
        golden probes "expect_sha256", "changed_in_this_bundle", for adversarial ones "canary", "canary_seen",
        "pass_when"}]}
        (patching/hosts/behaviour.py). A probe without an answer is recorded with its error; no answer at all
        is `measured=False`. The judge (gates.py) also reads "baseline" ({probe id: sha256 of the host's answer
        before the patch}) when the runner adds it.
        """
        ...


class ActionsUnavailable(NotImplementedError):
    """The host actions cannot be used here (e.g. ansible-runner missing): a real run cannot start."""
