"""A direct reader for inventories in exactly the shape this tool renders; anything else -> None (Ansible reads it).

`fleet inventory` (infra/model/inventory.py `render_inventory`) writes one YAML document, its body JSON under a
comment header (read here as JSON, what YAML reads it as), `pulumi stack output ansible_inventory` the same
document as plain JSON:

    all: {vars: {...}, hosts: {name: {vars...}}, children: {group: {hosts: {name: null}}}}

and the lab (lab/inventory.py) writes the same shape into a folder: `hosts.yml` plus `group_vars/all/*.yml`.
For that shape Ansible's InventoryManager + VariableManager come down to a merge with a fixed precedence,
lowest first: `all.vars` of the inventory file, then `group_vars/all` next to it (all.yml, or the files of
all/ in name order), then the host's own vars. Children groups carry only host names. Reading it directly
with a C YAML loader takes well under a second at 10,000 hosts where Ansible's parse takes minutes.

The reader is strict on purpose: whatever it does not fully understand makes it return None, and the caller
goes through Ansible as before, never on a guess. That covers a file Ansible would read with another plugin
(INI, a script, `plugin:` configs), any top-level key besides `all`, group vars on children, nested children,
host_vars/ or other group_vars files (next to the inventory or in the working directory, where Ansible's
playbook-level vars plugin looks too), YAML tags (`!vault`, `!unsafe`), duplicate keys, merge keys, Jinja in
a value, `ansible_*` vars on a group, host names Ansible would expand (`web[1:3]`, `host:port`), Ansible
settings that change how vars merge, and a `FLEET_INVENTORY_PARSER=ansible` environment (forces Ansible).
"""

from __future__ import annotations

import copy
import json
import keyword
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PARSER_ENV = "FLEET_INVENTORY_PARSER"  # "ansible": always Ansible's parser; anything else: fast when it can

_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_GROUP = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_LIMIT = re.compile(r"[A-Za-z0-9_.,!&\s-]*\Z")
_LOCALHOST = frozenset({"localhost", "127.0.0.1", "::1"})
_VARS_EXTS = (".yml", ".yaml", ".json")
# settings (environment or ansible.cfg) that change which files Ansible reads or how it merges vars
_SETTINGS = ("HASH_BEHAVIOUR", "PRECEDENCE", "VARS_ENABLED", "VARS_PLUGIN", "INVENTORY_ENABLED", "INVENTORY_PLUGIN",
             "INVENTORY_IGNORE", "VARS_PLUGINS_ENABLED", "DUPLICATE_YAML_DICT_KEY", "INJECT_FACT")
_CFG_KEYS = re.compile(r"^\s*(hash_behaviour|precedence|vars_plugins_enabled|vars_plugins|enable_plugins|"
                       r"inventory_plugins|inventory_ignore_extensions|inventory_ignore_patterns|"
                       r"duplicate_dict_key|inject_facts_as_vars|vars_plugins_stage)\s*[=:]", re.M)


class _NotOurs(Exception):
    """The input is not exactly the rendered shape: Ansible reads it."""


@dataclass(frozen=True)
class Rendered:
    """What the direct read found: hosts in Ansible's order, each with its merged vars, and the groups."""

    hosts: dict[str, dict[str, Any]]  # plain values (str keys, no tags), no object shared between hosts
    groups: dict[str, set[str]]  # every group Ansible would know ('all', 'ungrouped' first), name -> hosts


class _Loader(yaml.CSafeLoader if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader):  # type: ignore[misc]
    """The safe loader, refusing what Ansible would read differently: tags, duplicate keys, merge keys."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        for key, _ in node.value:
            if key.tag != "tag:yaml.org,2002:str":
                raise _NotOurs("merge key or a key that is not a string")
        mapping = super().construct_mapping(node, deep=deep)
        if len(mapping) != len(node.value):
            raise _NotOurs("duplicate key")
        return mapping

    def construct_undefined(self, node: Any) -> Any:
        raise _NotOurs(f"tag {node.tag}")


_Loader.add_constructor(None, _Loader.construct_undefined)
# plain YAML types only: a timestamp or binary value is left to Ansible
for _tag in ("timestamp", "binary", "set", "omap", "pairs"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _Loader.construct_undefined)


def wanted() -> bool:
    """False when the environment asks for Ansible's parser."""
    return os.environ.get(PARSER_ENV, "").strip().lower() != "ansible"


def limit_supported(limit: str | None) -> bool:
    """Whether the direct selection handles this --limit: names of hosts and groups, `all`, `,`, `!x`, `&x`."""
    if not limit:
        return True
    if not _LIMIT.match(limit):
        return False  # wildcards, ~regex, @file, ':' lists, ranges: Ansible's pattern matching
    for part in limit.split(","):
        bare = part.strip().lstrip("!&")
        if part.strip() and (not bare or bare in _LOCALHOST or any(c.isspace() for c in part.strip())):
            return False
    return True


def read(sources: Sequence[str]) -> Rendered | None:
    """The inventory's hosts and vars, read directly, or None when Ansible must read it (see the module doc)."""
    if not wanted() or len(sources) != 1 or "," in sources[0] or _settings_changed():
        return None
    try:
        return _read(Path(sources[0]))
    except (_NotOurs, yaml.YAMLError, OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def _settings_changed() -> bool:
    if any(k.startswith("ANSIBLE_") and any(s in k for s in _SETTINGS) for k in os.environ):
        return True
    config = os.environ.get("ANSIBLE_CONFIG")
    candidates = [Path(config)] if config else []
    candidates += [Path("ansible.cfg"), Path.home() / ".ansible.cfg", Path("/etc/ansible/ansible.cfg")]
    for path in candidates:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        return bool(_CFG_KEYS.search(text))  # Ansible uses the first config file it finds
    return False


def _read(source: Path) -> Rendered:
    if source.is_dir():
        entries = {p.name for p in source.iterdir()}
        if "hosts.yml" not in entries or not entries <= {"hosts.yml", "group_vars"}:
            raise _NotOurs("a folder with more than hosts.yml and group_vars/")
        inventory_file, inventory_dir = source / "hosts.yml", source
    else:
        if source.suffix not in (".yml", ".yaml", ".json") or os.access(source, os.X_OK):
            raise _NotOurs("not a YAML/JSON file (or executable: Ansible's script plugin runs it)")
        inventory_file, inventory_dir = source, source.parent
    # Ansible's vars plugin reads group_vars/ and host_vars/ next to the inventory and in the working directory
    if (inventory_dir / "host_vars").exists() or Path("host_vars").exists():
        raise _NotOurs("host_vars/")
    if Path("group_vars").exists() and Path("group_vars").resolve() != (inventory_dir / "group_vars").resolve():
        raise _NotOurs("group_vars/ in the working directory")
    group_all, shared = _group_vars_all(inventory_dir / "group_vars")
    data, aliases = _load(inventory_file)
    if not isinstance(data, dict) or set(data) != {"all"} or not isinstance(data["all"], dict):
        raise _NotOurs("not a single `all` group")
    top = data["all"]
    if not set(top) <= {"vars", "hosts", "children"}:
        raise _NotOurs("unknown key under all")
    all_vars = _vars(top.get("vars"), group=True)
    hosts_in = top.get("hosts") or {}
    children = top.get("children") or {}
    if not isinstance(hosts_in, dict) or not isinstance(children, dict):
        raise _NotOurs("hosts/children not mappings")
    hosts: dict[str, dict[str, Any]] = {}
    base = {**all_vars, **group_all}
    # each host gets its own copy of what it shares (Ansible's vars are copies too)
    shared_values = [k for k, v in base.items() if isinstance(v, dict | list)]
    for name, own in hosts_in.items():
        if not isinstance(name, str) or not _HOST.match(name) or name in _LOCALHOST:
            raise _NotOurs("host name Ansible would expand or treat specially")
        merged = {**base, **_vars(own, group=False)}
        for key in shared_values if not (aliases or shared) else list(merged):
            merged[key] = copy.deepcopy(merged[key])
        hosts[name] = merged
    groups: dict[str, set[str]] = {"all": set(hosts), "ungrouped": set()}
    grouped: set[str] = set()
    for group, body in children.items():
        if not isinstance(group, str) or not _GROUP.match(group) or group in groups:
            raise _NotOurs("group name")
        if not isinstance(body, dict) or not set(body) <= {"hosts"}:
            raise _NotOurs("a child group with vars or children")
        members = body.get("hosts") or {}
        if not isinstance(members, dict) or any(v is not None or k not in hosts for k, v in members.items()):
            raise _NotOurs("a child group's host with vars, or not in all.hosts")
        groups[group] = set(members)
        grouped |= groups[group]
    groups["ungrouped"] = set(hosts) - grouped
    return Rendered(hosts, groups)


def _group_vars_all(folder: Path) -> tuple[dict[str, Any], bool]:
    """group_vars/all's vars, and whether a file had YAML aliases (objects shared within it)."""
    if not folder.exists():
        return {}, False
    entries = {p.name: p for p in folder.iterdir()}
    if not entries:
        return {}, False
    if set(entries) == {"all"} and entries["all"].is_dir():
        files = sorted(entries["all"].iterdir())
        if any(not f.is_file() or f.name.startswith(".") or f.suffix not in _VARS_EXTS for f in files):
            raise _NotOurs("group_vars/all/ with something other than YAML/JSON files")
    elif len(entries) == 1 and next(iter(entries)) in ("all.yml", "all.yaml", "all.json"):
        files = list(entries.values())
        if not files[0].is_file():
            raise _NotOurs("group_vars/all.yml not a file")
    else:
        raise _NotOurs("group_vars/ with more than all")
    merged: dict[str, Any] = {}
    aliases = False
    for path in files:
        data, has_aliases = _load(path)
        merged.update(_vars(data, group=True))
        aliases = aliases or has_aliases
    return merged, aliases


def _load(path: Path) -> tuple[Any, bool]:
    """The file's data (only plain types: the loader refuses tags), and whether YAML aliases may share objects."""
    text = path.read_text(encoding="utf-8")
    if "{{" in text or "{%" in text or "{#" in text:
        raise _NotOurs("Jinja")  # anywhere, even in a comment: Ansible decides
    # Ansible's loader tries JSON first, then YAML
    try:
        return json.loads(text, object_pairs_hook=_json_object), False
    except json.JSONDecodeError:
        pass
    if (body := _json_under_comments(text)) is not None:
        return body, False
    return yaml.load(text, Loader=_Loader), "*" in text


_COMMENTS = re.compile(r"(?:[ \t]*(?:#[^\n]*)?\n)*")
# JSON escapes that YAML 1.1 readers may take otherwise ("\/" is YAML 1.2's; escaped surrogate pairs): such a
# document is read as YAML. (A float in exponent form or NaN/Infinity, strings to YAML 1.1: see the hooks.)
_YAML_READS_OTHERWISE = re.compile(r"\\/|\\u[dD][89a-fA-F]")


def _json_under_comments(text: str) -> Any:
    """The data of a YAML document that is JSON under comment lines (`fleet inventory` writes it so), read as
    JSON (what YAML reads it as, ten times faster); None when it is not exactly that."""
    start = _COMMENTS.match(text)
    body = text[start.end() if start else 0:]
    if not body.startswith("{") or _YAML_READS_OTHERWISE.search(body):
        return None
    try:
        return json.loads(body, object_pairs_hook=_json_object, parse_float=_plain_float,
                          parse_constant=_not_yaml)
    except (json.JSONDecodeError, _YamlReadsOtherwise):
        return None


class _YamlReadsOtherwise(Exception):
    """JSON that YAML reads otherwise: the document is read as YAML."""


def _plain_float(literal: str) -> float:
    if "e" in literal or "E" in literal:
        raise _YamlReadsOtherwise("a float in exponent form: a string to YAML 1.1")
    return float(literal)


def _not_yaml(literal: str) -> Any:
    raise _YamlReadsOtherwise(f"{literal}: not JSON, a string to YAML")


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping = dict(pairs)
    if len(mapping) != len(pairs) or any(k.startswith("__ansible_") for k in mapping):
        raise _NotOurs("duplicate key or Ansible JSON tag")
    return mapping


_NAMES_SEEN: set[str] = set()  # variable names already found valid (the same few recur on every host)


def _vars(value: Any, *, group: bool) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _NotOurs("vars not a mapping")
    if group and any(key.startswith("ansible_") for key in value):
        raise _NotOurs("ansible_* var on a group")
    for key in value.keys() - _NAMES_SEEN:
        if not isinstance(key, str) or not _VAR.match(key) or keyword.iskeyword(key):
            raise _NotOurs("variable name")
        _NAMES_SEEN.add(key)
    return value


def select(rendered: Rendered, fleet: Mapping[str, Any], limit: str) -> tuple[list[str] | None, list[str]]:
    """Hosts a supported --limit selects, with Ansible's rules (see reader._select); the patterns matching nothing
    are returned second. Regular patterns are unioned, then `&x` intersected, then `!x` removed."""
    patterns = [p.strip() for p in limit.split(",") if p.strip()]
    unmatched = [p for p in patterns if not _match(rendered, p.lstrip("!&"))]
    if unmatched:
        return None, unmatched
    regular = [p for p in patterns if p[0] not in "!&"] or ["all"]
    chosen: set[str] = set()
    for p in regular:
        chosen |= _match(rendered, p)
    for p in patterns:
        if p[0] == "&":
            chosen &= _match(rendered, p[1:])
    for p in patterns:
        if p[0] == "!":
            chosen -= _match(rendered, p[1:])
    return sorted(chosen), []


def _match(rendered: Rendered, pattern: str) -> set[str]:
    found = set(rendered.groups.get(pattern, ()))
    if (pattern not in rendered.groups or "." in pattern) and pattern in rendered.hosts:
        found.add(pattern)
    return found
