"""Any Ansible inventory -> typed host records for the patch pipeline (docs/inventory.md is the contract).

The inventory is read in-process through Ansible's own `InventoryManager`, not by running
`ansible-inventory --list`:
- host patterns (`--limit 'pool_v3_hall:&ring_1:!dgx-a2'`, wildcards, `~regex`, `@file`) are
  resolved by Ansible itself, pattern by pattern, so an unknown one is named in the error instead of
  Ansible's "Could not match ... ignoring" warning;
- parse failures arrive as structured messages per source and plugin (captured from Ansible's
  display) instead of text scraped off a subprocess's stderr;
- no second interpreter start and no JSON round trip of every host's vars.
Group vars and vars plugins (`group_vars/`, `host_vars/` next to the inventory) are merged the way
Ansible's inventory stage does. A host is a fleet host when it has at least one `fleet_*` variable;
others (a bastion, localhost) are ignored unless `--limit` names them.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from infra.model.amount import Amount
from infra.model.errors import InputError, Problem, check_yaml_aliases, collect, nearest
from patching.inventory import fast


@dataclass(frozen=True, slots=True)
class InventoryHost:
    """One fleet host as the patch pipeline sees it."""

    name: str
    pool: str
    site: str
    site_kind: str
    ring: int
    address: str
    serving_port: int
    max_unavailable: int | str
    min_serving: int
    lb: Mapping[str, Any]
    ups: tuple[Mapping[str, Any], ...] = ()
    ib_hcas: tuple[Mapping[str, Any], ...] = ()
    model: str | None = None
    gpu_model: str | None = None
    gpu_count: int | None = None
    gpu_metrics_port: int = 9400

    @property
    def serving_address(self) -> str:
        """host:port of the serving endpoint, for probes that go straight to the host."""
        return f"{self.address}:{self.serving_port}"

    @property
    def gpu_metrics_address(self) -> str:
        """host:port of the host's DCGM exporter (GPU memory, utilisation), 9400 unless the inventory says."""
        return f"{self.address}:{self.gpu_metrics_port}"


# what VariableManager adds to every host that is not inventory data
MAGIC_VARS = frozenset({
    "ansible_config_file", "ansible_facts", "ansible_playbook_python", "ansible_version", "group_names",
    "groups", "hostvars", "inventory_dir", "inventory_file", "inventory_hostname", "inventory_hostname_short",
    "omit", "playbook_dir", "play_hosts", "ansible_play_hosts", "ansible_play_hosts_all", "role_names",
})


@dataclass(frozen=True)
class FleetInventory:
    """All fleet hosts of an inventory, and the ones selected by `--limit` (all of them without one)."""

    sources: tuple[str, ...]
    hosts: Mapping[str, InventoryHost]
    selected: tuple[str, ...]
    limit: str | None = None
    # every inventory var of each fleet host as a play sees it (SSH settings, flags, secrets: never printed)
    vars: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, repr=False, compare=False)

    def selected_vars(self) -> dict[str, Mapping[str, Any]]:
        """Every inventory var of each selected host (SSH settings, flags, secrets: never printed)."""
        return {name: self.vars.get(name, {}) for name in self.selected}

    def pool_members(self, pool: str) -> list[InventoryHost]:
        """Every host of a pool, selected or not: disruption budgets are per whole pool."""
        return list(self._by_pool.get(pool, ()))

    @functools.cached_property
    def _by_pool(self) -> dict[str, list[InventoryHost]]:
        """The hosts grouped by pool, once (a plan asks for every pool: one scan, not one per pool)."""
        by_pool: dict[str, list[InventoryHost]] = defaultdict(list)
        for host in self.hosts.values():
            by_pool[host.pool].append(host)
        return dict(by_pool)


class _HostVars(BaseModel):
    # open-ended: inventories carry many variables that are none of the patch pipeline's business
    model_config = ConfigDict(extra="ignore")

    ansible_host: str | None = None
    fleet_pool: str = Field(min_length=1)
    fleet_site: str = Field(min_length=1)
    fleet_site_kind: Literal["aws", "outpost", "onprem"]
    fleet_patch_ring: int = Field(ge=0)
    fleet_serving_port: int = Field(ge=1, le=65535)
    fleet_max_unavailable: Amount
    fleet_min_serving: int = Field(ge=0)
    fleet_lb: dict[str, Any]
    fleet_ups: list[dict[str, Any]] = []
    fleet_ib_hcas: list[dict[str, Any]] = []
    fleet_model: str | None = None
    fleet_gpu_model: str | None = None
    fleet_gpu_count: int | None = Field(default=None, ge=0)
    fleet_gpu_metrics_port: int = Field(default=9400, ge=1, le=65535)

    @field_validator("fleet_lb")
    @classmethod
    def _lb_kind(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("kind") not in ("haproxy", "nlb"):
            raise ValueError("expected a mapping with kind: haproxy or kind: nlb")
        return value


# a host with any of these is a fleet host (fleet-wide vars such as fleet_ups_monitor_password in
# group_vars/all reach every host of the inventory and do not make one)
_HOST_KEYS = frozenset(k for k in _HostVars.model_fields if k.startswith("fleet_"))


MAX_INVENTORY_FILE_BYTES = 512 << 20  # a rendered 10,000-host inventory is tens of MiB


def load_inventory(sources: Sequence[str | Path], limit: Sequence[str] | str | None = None) -> FleetInventory:
    """Parse inventory sources with Ansible and select hosts with `--limit` patterns.

    Every problem (a source Ansible cannot parse, a host var missing or of the wrong type, pools whose
    hosts disagree on their budget, a limit pattern matching nothing) is collected into one InputError.
    """
    source_list = [str(s) for s in sources]
    label = ", ".join(source_list)
    problems = [
        Problem(s, "", None, "no such inventory file or directory")
        for s in source_list
        if "," not in s and not Path(s).exists()
    ]
    for source in source_list:  # Ansible's loader expands aliases: a bomb in a var would hang what reads it
        if "," in source:
            continue
        root = Path(source)
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file() and path.suffix in (".yml", ".yaml", ".json"):
                collect(problems, check_yaml_aliases, path, MAX_INVENTORY_FILE_BYTES)
    if problems:
        raise InputError(problems)
    # anchored to the caller's working directory now: ansible-runner and the host checks run elsewhere
    source_list = [s if "," in s else str(Path(s).absolute()) for s in source_list]
    limit_text = limit if isinstance(limit, str) or limit is None else ",".join(limit)
    # the shape `fleet inventory` renders is read directly (fast.py); anything else goes through Ansible
    rendered = fast.read(source_list) if fast.limit_supported(limit_text) else None
    manager: Any = None
    if rendered is not None:
        every_host: Iterator[tuple[str, Mapping[str, Any]]] = iter(rendered.hosts.items())
    else:
        manager, every_host = _ansible_hosts(source_list, label)
    hosts: dict[str, InventoryHost] = {}
    all_vars: dict[str, dict[str, Any]] = {}
    for name, every in every_host:
        if not any(k in _HOST_KEYS for k in every):
            continue  # not a fleet host (a bastion, say), even when fleet-wide group vars reach it
        # the inventory's vars, not the magic ones (`groups` lists every host: copying it is quadratic)
        own = {k: v for k, v in every.items() if k not in MAGIC_VARS}
        all_vars[name] = own if rendered is not None else plain(own)  # read directly: plain values already
        hostvars = {k: v for k, v in all_vars[name].items() if k.startswith("fleet_") or k == "ansible_host"}
        try:
            record = _record(name, _HostVars.model_validate(hostvars))
        except ValidationError as exc:
            problems += [
                Problem(label, f"{name}.{'.'.join(str(p) for p in err['loc'])}", _value(err), err["msg"])
                for err in exc.errors()
            ]
            continue
        hosts[name] = record
    problems += _pool_disagreements(label, hosts)

    selected = sorted(hosts)
    if limit_text and rendered is not None:
        matched, limit_problems = _select_rendered(rendered, hosts, limit_text, label)
        problems += limit_problems
        selected = matched
    elif limit_text:
        matched, limit_problems = _select(manager, hosts, limit_text, label)
        problems += limit_problems
        selected = matched
    if problems:
        raise InputError(problems)
    return FleetInventory(tuple(source_list), hosts, tuple(selected), limit_text or None, all_vars)


def _ansible_hosts(sources: list[str], label: str) -> tuple[Any, Iterator[tuple[str, Mapping[str, Any]]]]:
    """Ansible's inventory manager and every host with its vars as a play sees them (any inventory)."""
    manager, loader, warnings = _parse(sources)
    failed = [w for w in warnings if w.startswith("Unable to parse")]
    if failed:
        details = [w for w in warnings if w not in failed and not w.startswith("No inventory was parsed")]
        raise InputError(Problem(label, "", None, line) for line in failed + details)

    from ansible.vars.manager import VariableManager

    # what a play would see, as `ansible-inventory --list` computes it: inventory vars, group vars by
    # depth and priority, and vars plugins (group_vars/ and host_vars/ next to the inventory)
    variables = VariableManager(loader=loader, inventory=manager)
    every = ((host.name, variables.get_vars(host=host, include_hostvars=False, stage="all"))
             for host in manager.get_hosts("all"))
    return manager, every


def _select_rendered(
    rendered: fast.Rendered, hosts: Mapping[str, InventoryHost], limit: str, label: str
) -> tuple[list[str], list[Problem]]:
    """_select for an inventory read directly, with a limit fast.limit_supported() accepts: same answers."""
    matched, unmatched = fast.select(rendered, hosts, limit)
    if matched is None:
        return [], [_no_match(pattern, [*hosts, *rendered.groups], label) for pattern in unmatched]
    named = {p.strip().lstrip("&") for p in limit.split(",") if p.strip() and not p.strip().startswith("!")}
    return _fleet_selection(matched, named, hosts, limit)


def _no_match(pattern: str, names: list[str], label: str) -> Problem:
    """A --limit pattern that matches nothing, with the nearest host or group name as a hint."""
    guess = nearest(pattern.lstrip("!&"), names)
    hint = f"; did you mean {guess!r}?" if guess else ""
    return Problem("--limit", "", pattern, f"matches no host or group in {label}{hint}")


def _fleet_selection(matched: list[str], named: set[str], hosts: Mapping[str, InventoryHost],
                     limit: str) -> tuple[list[str], list[Problem]]:
    """The fleet hosts among those a limit matched. A pattern naming a non-fleet host is a mistake; a group or
    wildcard that also covers one is not. Nothing of the fleet selected is a mistake too."""
    problems = [Problem("--limit", "", name, "is not a fleet host (it has no fleet_* variables)")
                for name in matched if name not in hosts and name in named]
    fleet = [name for name in matched if name in hosts]
    if not fleet and not problems:
        problems.append(Problem("--limit", "", limit, "selects no fleet host"))
    return fleet, problems


def _select(
    manager: Any, hosts: Mapping[str, InventoryHost], limit: str, label: str
) -> tuple[list[str], list[Problem]]:
    """Hosts matching `--limit`, with Ansible's pattern rules; every pattern must match something."""
    from ansible.inventory.manager import split_host_pattern

    problems = []
    # Ansible compiles a ~regex only when matching, and its splitting can turn a broken one into '~',
    # the empty regex that selects every host: '~[' would plan the whole fleet
    for pattern in {*split_host_pattern(limit), *re.split(r"[,:]", limit)}:
        regex = pattern.strip().lstrip("!&")
        if not regex.startswith("~"):
            continue
        if regex == "~":
            problems.append(Problem("--limit", "", limit, "an empty ~regex would select every host"))
            continue
        try:
            re.compile(regex[1:])
        except re.error as exc:
            problems.append(Problem("--limit", "", pattern, f"not a valid regular expression: {exc}"))
    if problems:
        return [], problems
    with _captured_display():
        for pattern in split_host_pattern(limit):
            bare = pattern.lstrip("!&")
            if bare and not bare.startswith("@") and not manager.get_hosts(bare):
                problems.append(_no_match(pattern, [*hosts, *manager.groups], label))
        if problems:
            return [], problems
        try:
            manager.subset(limit)
            matched = sorted(h.name for h in manager.get_hosts("all"))
        except Exception as exc:  # Ansible raises AnsibleError for a missing @file or a malformed pattern
            return [], [Problem("--limit", "", limit, str(exc))]
    named = {p.lstrip("&") for p in split_host_pattern(limit) if not p.startswith("!")}
    return _fleet_selection(matched, named, hosts, limit)


def _parse(sources: list[str]) -> tuple[Any, Any, list[str]]:
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader

    loader = DataLoader()
    with _captured_display() as warnings:
        manager = InventoryManager(loader=loader, sources=sources)
    return manager, loader, warnings


@contextlib.contextmanager
def _captured_display() -> Iterator[list[str]]:
    """Collect what Ansible would print as warnings, so it can be reported as our own error (or dropped)."""
    from ansible.utils.display import Display

    display = Display()  # a singleton
    lines: list[str] = []

    def warning(msg: str, *args: Any, **kwargs: Any) -> None:
        lines.append(str(msg))

    def error_as_warning(msg: str | None, exception: BaseException, *args: Any, **kwargs: Any) -> None:
        lines.append(f"{msg} {exception}".strip())

    saved = display.__dict__.get("warning"), display.__dict__.get("error_as_warning")
    display.warning, display.error_as_warning = warning, error_as_warning
    try:
        yield lines
    finally:
        for name, value in zip(("warning", "error_as_warning"), saved, strict=True):
            if value is None:
                del display.__dict__[name]
            else:
                setattr(display, name, value)




def plain(value: Any) -> Any:
    """Ansible's tagged str/dict/list subclasses -> plain Python values (JSON- and pydantic-friendly)."""
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, Mapping):
        return {str.__str__(str(k)): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return value


def _value(err: Any) -> Any:
    value = err.get("input")
    return None if isinstance(value, dict | list) or err["type"] == "missing" else value


def _record(name: str, v: _HostVars) -> InventoryHost:
    return InventoryHost(
        name=name,
        pool=v.fleet_pool,
        site=v.fleet_site,
        site_kind=v.fleet_site_kind,
        ring=v.fleet_patch_ring,
        address=v.ansible_host or name,
        serving_port=v.fleet_serving_port,
        gpu_metrics_port=v.fleet_gpu_metrics_port,
        max_unavailable=v.fleet_max_unavailable,
        min_serving=v.fleet_min_serving,
        lb=v.fleet_lb,
        ups=tuple(v.fleet_ups),
        ib_hcas=tuple(v.fleet_ib_hcas),
        model=v.fleet_model,
        gpu_model=v.fleet_gpu_model,
        gpu_count=v.fleet_gpu_count,
    )


def _pool_disagreements(label: str, hosts: Mapping[str, InventoryHost]) -> list[Problem]:
    # budgets are per pool: hosts of one pool that disagree would make the plan depend on host order
    first: dict[str, InventoryHost] = {}
    problems = []
    for host in hosts.values():
        ref = first.setdefault(host.pool, host)
        for attr in ("max_unavailable", "min_serving"):
            if getattr(host, attr) != getattr(ref, attr):
                problems.append(Problem(
                    label, f"{host.name}.fleet_{attr}", getattr(host, attr),
                    f"pool {host.pool!r} has fleet_{attr} {getattr(ref, attr)!r} on {ref.name}; one pool, one budget",
                ))
    return problems
