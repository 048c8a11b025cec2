"""A number of hosts given as a count (`2`) or a percentage of a group (`"25%"`).

Pools' `max_unavailable` (the fleet file, the inventory's `fleet_max_unavailable`) and the rollout
policy's wave sizes and failure budgets are all such amounts; `resolve` turns one into hosts.
"""

from __future__ import annotations

import math
import re
from functools import partial
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

_PERCENT = re.compile(r"^(\d{1,3})%$")


def _amount(value: Any, minimum: int = 0) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a count cannot be negative")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value
    if isinstance(value, str):
        match = _PERCENT.match(value.strip())
        if match and minimum <= int(match.group(1)) <= 100:
            return value.strip()
    if minimum == 0:
        raise ValueError("expected a count (0, 1, 2, ...) or a percentage like '25%'")
    raise ValueError("must be a count or a percentage like '25%'")


def _schema(minimum: int) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [{"type": "integer", "minimum": minimum},
                                     {"type": "string", "pattern": r"^\d{1,3}%$"}]})


Amount = Annotated[int | str, BeforeValidator(_amount), _schema(0)]

# an amount that lets at least one host go: a pool's max_unavailable (0 or 0% would block every patch)
NonZeroAmount = Annotated[int | str, BeforeValidator(partial(_amount, minimum=1)), _schema(1)]


def resolve(amount: int | str, total: int, *, at_least_one: bool = False) -> int:
    """A count or percentage of `total` as a number of hosts.

    Percentages round down, like Kubernetes' maxUnavailable. `at_least_one` is for sizes that must
    make progress (wave size, disruption budget): they never round to 0 while there is a host.
    """
    count = amount if isinstance(amount, int) else math.floor(total * int(amount.rstrip("%")) / 100)
    if at_least_one and total > 0:
        count = max(count, 1)
    return min(count, total)
