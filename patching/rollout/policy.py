"""The rollout policy: canary, waves, budgets, gates, rollback, windows (docs/policy.md explains each field).

A policy file is YAML validated by `Policy`; every field has a default, so an empty file (or no file)
is the conservative policy: one canary per site, waves of 25% of a pool, no failure allowed, testinfra
and the SLO probe on, roll back the failed hosts, no window restriction.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from infra.model.amount import Amount, NonZeroAmount, _amount
from infra.model.amount import resolve as resolve  # re-exported: patching/rollout/budgets.py imports it from here
from infra.model.errors import load_yaml
from infra.model.strict import StrictModel, validate
from patching.rollout.windows import Duration, Freeze, MaintenanceCalendar, PositiveDuration, Window, build_calendar


class Canary(StrictModel):
    """The first wave: named hosts, or a few per site."""

    hosts: list[str] = Field(default=[], description="canary hosts by inventory name; if empty, `per_site` picks")
    per_site: int = Field(default=1, ge=0, description="hosts per site, lowest patch ring first; 0 = no canary")


class Waves(StrictModel):
    """How the hosts after the canary are cut into waves."""

    size: NonZeroAmount = Field(default="25%",
                                description="hosts per pool per wave: a count or a percentage of the pool")
    pools: dict[str, NonZeroAmount] = Field(default={}, description="per-pool override of `size`")
    site_order: list[str] = Field(default=[], description="sites patched first, in this order; others follow by name")
    estimate: Duration = Field(
        default=dt.timedelta(minutes=30), description="predicted wave duration until the journal has a history"
    )


class Budgets(StrictModel):
    """Failures tolerated before the run halts; failed and timed-out hosts count, skipped hosts do not."""

    canary: Amount = Field(default=0, description="failures tolerated in the canary wave")
    per_wave: Amount = Field(default=0, description="failures tolerated in any later wave (percentage of the wave)")
    global_: Amount = Field(default=0, alias="global", description="failures tolerated over the run (percentage of it)")


class SloProbe(StrictModel):
    """Requests sent straight to each drained host after the patch, judged against a baseline measured in the
    same interval (docs/policy.md "gates"); warm-up requests are not measured."""

    enabled: bool = True
    warmup_requests: int = Field(default=5, ge=0)
    requests: int | None = Field(
        default=None, ge=1, description="measured requests per host; default: enough for `quantile` at "
                                        "`confidence` (299 for a P99 at 95 %)")
    max_requests: int | None = Field(
        default=None, ge=1, description="an inconclusive comparison samples more, up to this many requests in all "
                                        "(default: twice the needed count)")
    quantile: float = Field(default=0.99, gt=0.5, lt=1, description="the latency quantile compared with the baseline")
    tolerance: float = Field(default=0.2, ge=0, le=10, description="tolerated regression of the quantile against the "
                                                                    "baseline, as a fraction (0.2: 20 % slower)")
    confidence: float = Field(default=0.95, ge=0.5, lt=1, description="confidence of the comparison")
    baseline_peers: int = Field(default=2, ge=0, description="hosts of the pool still on the previous bundle, "
                                                             "probed in the same interval as the baseline")
    on_inconclusive: Literal["fail", "pause"] = Field(
        default="fail", description="after `max_requests`, still not enough evidence either way: fail the host, "
                                    "or block the run for a person (`resume` measures again)")
    p99_ms: float = Field(default=200.0, gt=0, description="absolute ceiling: the P99 latency must be below this, "
                                                           "whatever the baseline")
    max_error_rate: float = Field(default=0.0, ge=0, le=1, description="fraction of failed requests tolerated")
    request_timeout: PositiveDuration = Field(default=dt.timedelta(seconds=30))

    def needed_requests(self) -> int:
        """Measured requests for the first probe: `requests`, else what the quantile at the confidence needs."""
        if self.requests is not None:
            return self.requests
        return math.ceil(math.log(1 - self.confidence) / math.log(self.quantile))

    def request_bound(self) -> int:
        """At most this many measured requests in all, sampling more included."""
        needed = math.ceil(math.log(1 - self.confidence) / math.log(self.quantile))
        return max(self.max_requests or 2 * needed, self.needed_requests())


class Soak(StrictModel):
    """After undrain: repeated probes under live traffic and the GPU-memory growth from /metrics."""

    duration: Duration = Field(default=dt.timedelta(minutes=10), description="0s turns the soak off")
    probe_interval: PositiveDuration = Field(default=dt.timedelta(minutes=1))
    max_gpu_memory_slope_mib_per_hour: float = Field(
        default=512.0, ge=0, description="GPU memory growth (least-squares slope over the soak) that fails the host"
    )


class Behaviour(StrictModel):
    """The bundle's behaviour probes (docs/bundle.md "probes") on each drained host after the patch."""

    enabled: bool = Field(default=True, description="run the bundle's golden and adversarial prompts on each patched "
                                                    "host; a bundle without probes has none to run")


# bundle fields whose change can break the GPUs or their interconnect: the hardware gate runs when one changes
HARDWARE_COMPONENTS = ("driver", "fabric_manager", "nscq", "cuda", "nccl", "ofed", "efa_installer")


class Hardware(StrictModel):
    """On each drained host, before and after a bundle that changes the driver, NCCL or the fabric: NVIDIA DCGM's
    diagnostic (`dcgmi diag -r <level> -j`) and nccl-tests' all-reduce bus bandwidth (`all_reduce_perf`), judged
    against the host's own figure from before the patch and its pool's."""

    enabled: bool = Field(default=True, description="run the hardware checks when the bundle changes a component "
                                                    "of `when_changed` on the host")
    when_changed: list[Literal[HARDWARE_COMPONENTS]] = Field(  # type: ignore[valid-type]
        default=list(HARDWARE_COMPONENTS), description="bundle fields whose change on a host makes the gate run")
    dcgm_level: Literal[1, 2, 3] = Field(default=1, description="`dcgmi diag -r`: 1 quick (deployment, seconds), "
                                                                "2 medium (adds PCIe and memory, about 2 minutes), "
                                                                "3 long (stress, about 30 minutes)")
    nccl: bool = Field(default=True, description="measure the all-reduce bus bandwidth over the host's GPUs")
    nccl_tests: str = Field(default="/opt/nccl-tests/build/all_reduce_perf", min_length=1,
                            description="where nccl-tests' all_reduce_perf is on the hosts (built from source)")
    busbw_tolerance: float = Field(default=0.10, ge=0, lt=1,
                                   description="how far the bus bandwidth may fall below the host's own figure "
                                               "before the patch, and below its pool's median, before it fails")


class Gates(StrictModel):
    """What a patched host must pass before it serves again: host checks, hardware, the SLO probe, behaviour,
    the soak."""

    testinfra: bool = Field(default=True, description="run the host checks for the bundle on the wave's hosts")
    hardware: Hardware = Hardware()
    slo: SloProbe = SloProbe()
    behaviour: Behaviour = Behaviour()
    soak: Soak = Soak()


class Preflight(StrictModel):
    """Checks before each wave: the UPS units feeding it and the InfiniBand ports of its hosts."""

    ups_min_charge_pct: int = Field(
        default=80, ge=0, le=100, description="every UPS feeding a wave on line power with at least this charge"
    )
    check_fabric: bool = Field(default=True, description="InfiniBand ports of the wave's hosts must be up")


class Timeouts(StrictModel):
    """Per-step limits handed to the host actions; a host over its limit counts as failed."""

    drain: PositiveDuration = Field(default=dt.timedelta(minutes=10),
                                    description="until in-flight requests are finished")
    apply: PositiveDuration = Field(default=dt.timedelta(minutes=45))
    reboot: PositiveDuration = Field(default=dt.timedelta(minutes=20))
    gate: PositiveDuration = Field(default=dt.timedelta(minutes=15))
    undrain: PositiveDuration = Field(default=dt.timedelta(minutes=5))
    lock_stale: PositiveDuration = Field(
        default=dt.timedelta(minutes=2), description="a journal lock without a heartbeat this long is stale"
    )


def _require(value: Any) -> Any:
    if value == "all":
        return value
    try:
        return _amount(value)
    except ValueError:
        raise ValueError("expected all, a count (1, 2, ...) or a percentage like '90%'") from None


Require = Annotated[Literal["all"] | int | str, BeforeValidator(_require)]


def required_hosts(require: int | str, selected: int) -> int:
    """How many of `selected` hosts must end on the bundle (`require`: all, N, or N% rounded up)."""
    if require == "all":
        return selected
    if isinstance(require, int):
        return min(require, selected)
    return min(math.ceil(selected * int(require.rstrip("%")) / 100), selected)


class Policy(StrictModel):
    """A rollout policy (docs/policy.md)."""

    canary: Canary = Canary()
    waves: Waves = Waves()
    budgets: Budgets = Budgets()
    gates: Gates = Gates()
    preflight: Preflight = Preflight()
    rollback: Literal["failed-hosts", "wave", "all"] = Field(
        default="failed-hosts",
        description="what is rolled back when the run halts; failed hosts are always rolled back",
    )
    require: Require = Field(
        default="all",
        description="how many selected hosts must end on the bundle for exit 0: all (the default), a count, "
                    "or a percentage (rounded up); the others may be skipped (unreachable, unknown bundle)",
    )
    windows: list[Window] = Field(default=[], description="maintenance windows; empty = no restriction")
    freeze: Freeze = Freeze()
    timeouts: Timeouts = Timeouts()


def parse_policy(data: Any, source: str) -> Policy:
    """Validate policy data; any problem is an InputError naming the file and the field path."""
    return validate(Policy, {} if data is None else data, source, "a rollout policy")


def load_policy(path: str | Path | None) -> tuple[Policy, MaintenanceCalendar]:
    """Read a policy file (None: the default policy) and build its calendar, reading any freeze iCalendar."""
    if path is None:
        policy = Policy()
        return policy, build_calendar(policy.windows, policy.freeze, "<default policy>")
    path = Path(path)
    policy = parse_policy(load_yaml(path), str(path))
    ical = policy.freeze.ical
    if ical is not None and not ical.is_absolute():
        # anchor it now: the journal keeps the policy, and a resume may run from another directory
        freeze = policy.freeze.model_copy(update={"ical": path.resolve().parent / ical})
        policy = policy.model_copy(update={"freeze": freeze})
    return policy, build_calendar(policy.windows, policy.freeze, str(path))


def schema() -> dict[str, Any]:
    """The policy's JSON schema, with the field names a policy file uses."""
    return Policy.model_json_schema(by_alias=True)
