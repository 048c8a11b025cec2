"""Failure budgets and serving capacity: how many hosts may fail, and how many may be out at once.

Pure functions over counts, so every rule reads (and is tested) on its own; the runner journals the
figures they return beside its decision.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from patching.inventory.reader import InventoryHost
from patching.rollout.plan import PoolBudget
from patching.rollout.policy import Policy, resolve


@dataclass(frozen=True)
class BudgetCheck:
    """A wave's failures against its own budget and the run's global one."""

    wave_failed: int
    wave_allowed: int
    run_failed: int
    run_allowed: int
    failed_hosts: tuple[str, ...]

    @property
    def exceeded(self) -> bool:
        """More failures than either budget allows: the run halts."""
        return self.wave_failed > self.wave_allowed or self.run_failed > self.run_allowed

    def figures(self) -> dict[str, Any]:
        """As journaled with the `budget` event."""
        return {"wave_failed": self.wave_failed, "wave_allowed": self.wave_allowed, "run_failed": self.run_failed,
                "run_allowed": self.run_allowed, "failed_hosts": list(self.failed_hosts), "exceeded": self.exceeded}


def check_budgets(
    policy: Policy, *, canary: bool, wave_hosts: int, wave_failed: Sequence[str], run_hosts: int, run_failed: int
) -> BudgetCheck:
    """The canary or per-wave budget over the wave's planned hosts, the global budget over the run's planned
    hosts. Both bases are fixed when the run is planned (like SSM's target count): a host skipped later,
    unreachable or already on the bundle, changes neither; percentages round down."""
    amount = policy.budgets.canary if canary else policy.budgets.per_wave
    return BudgetCheck(len(wave_failed), resolve(amount, wave_hosts), run_failed,
                       resolve(policy.budgets.global_, run_hosts), tuple(sorted(wave_failed)))


def capacity_problems(
    leaving: Sequence[str], members: Sequence[InventoryHost], healthy: Mapping[str, bool],
    pools: Mapping[str, PoolBudget],
) -> tuple[list[str], dict[str, Any]]:
    """Hosts out of each pool with `leaving` drained, against its max_unavailable and min_serving.

    `healthy` says which members serve now; unhealthy members count as out already.
    """
    problems = []
    figures = {}
    by_pool: dict[str, list[InventoryHost]] = defaultdict(list)
    for host in members:
        by_pool[host.pool].append(host)
    out_now = set(leaving)
    for pool, hosts in sorted(by_pool.items()):
        budget = pools[pool]
        serving = [h.name for h in hosts if healthy.get(h.name, False)]
        serving_after = len([n for n in serving if n not in out_now])
        out_after = len(hosts) - serving_after
        figures[pool] = {"size": len(hosts), "serving": len(serving), "serving_after": serving_after,
                         "max_unavailable": budget.max_unavailable, "min_serving": budget.min_serving}
        if out_after > budget.max_unavailable:
            problems.append(f"pool {pool}: {out_after} host(s) would be out, max_unavailable is "
                            f"{budget.max_unavailable}")
        if serving_after < budget.min_serving:
            problems.append(f"pool {pool}: {serving_after} host(s) would serve, min_serving is "
                            f"{budget.min_serving}")
    return problems, figures
