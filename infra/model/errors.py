"""Bad input: one error type, with the file, the field path and the value that were wrong.

Every command validates all of its input before it touches a host; what it finds wrong is
collected into one `InputError` and reported at once (exit code 2, DESIGN.md section 6).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one input file."""

    file: str
    field: str
    value: Any
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.field}" if self.field else self.file
        value = _short(self.value)
        return f"{where}: {self.message}" + (f" (value: {value})" if value is not None else "")


def _short(value: Any) -> str | None:
    if value is None:
        return None
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class InputError(Exception):
    """One or more problems with the input; nothing was touched."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def single(cls, file: str | Path, field: str, value: Any, message: str) -> InputError:
        """An InputError with one problem: file, field path, the value found and what is wrong with it."""
        return cls([Problem(str(file), field, value, message)])


T = TypeVar("T")


def collect(problems: list[Problem], load: Callable[..., T], *args: Any) -> T | None:
    """`load(*args)`, or None with its problems added to `problems`: every input is checked, then all
    that is wrong is reported at once."""
    try:
        return load(*args)
    except InputError as exc:
        problems += exc.problems
        return None


def nearest(word: str, known: Iterable[str]) -> str | None:
    """The known name closest to `word`, for 'did you mean' hints."""
    match = difflib.get_close_matches(word, list(known), n=1, cutoff=0.5)
    return match[0] if match else None


MAX_FILE_BYTES = 1 << 20  # a bundle, policy or stack file is a few KiB; anything near this is not one
MAX_ALIASES = 100  # YAML aliases a file may use: enough for anchors, too few for an alias bomb


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys, impossible dates and alias bombs."""

    aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_ALIASES} aliases (an alias bomb?)",
                                                  event.start_mark)
        return super().compose_node(parent, index)  # type: ignore[misc]


def _construct_timestamp(loader: _StrictLoader, node: yaml.ScalarNode) -> Any:
    try:
        return yaml.constructor.SafeConstructor.construct_yaml_timestamp(loader, node)
    except (ValueError, OverflowError) as exc:
        raise yaml.constructor.ConstructorError(None, None, f"not a valid date or time {node.value!r}: {exc}",
                                                node.start_mark) from exc


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", _construct_timestamp)


def read_text(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> str:
    """A text file's content; too big, unreadable, binary or not UTF-8 is an InputError naming the file."""
    path = Path(path)
    try:
        if path.is_dir():
            raise InputError.single(path, "", None, "is a directory, not a file")
        with path.open("rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise InputError.single(path, "", None, f"cannot read file: {exc.strerror or exc}") from exc
    if len(raw) > max_bytes:
        raise InputError.single(path, "", None, f"larger than {max_bytes // 1024} KiB: not a file of this kind")
    if (nul := raw.find(b"\0")) >= 0:
        raise InputError.single(path, "", None, f"binary data (a NUL byte at offset {nul}), not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError.single(path, "", None, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                                                f"{exc.start})") from exc


def _malformed(path: str | Path, exc: yaml.MarkedYAMLError) -> InputError:
    mark = exc.problem_mark or exc.context_mark
    line = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return InputError.single(path, line, None, f"malformed YAML: {exc.problem or exc.context}")


_ALIAS_LIKE = re.compile(r"(?:^|[\s\[,{:-])\*[^\s,\]}]+")


def check_yaml_aliases(path: str | Path, max_bytes: int) -> None:
    """For YAML another parser reads (an Ansible inventory): too big, not UTF-8, or an alias bomb is an
    InputError. Cheap when the file has few aliases (a scan); composed with the strict loader otherwise."""
    text = read_text(path, max_bytes)
    if "*" not in text or len(_ALIAS_LIKE.findall(text)) <= MAX_ALIASES:  # no '*': no alias (a quick scan)
        return
    try:
        yaml.compose(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        raise _malformed(path, exc) from exc
    except yaml.YAMLError:
        return  # the inventory parser will say what is wrong with it


def load_yaml(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> Any:
    """Read a YAML file; too big, not UTF-8, malformed YAML, a duplicate key, an impossible date or an alias
    bomb becomes an InputError naming the line."""
    path = Path(path)
    text = read_text(path, max_bytes)
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        raise _malformed(path, exc) from exc
    except yaml.YAMLError as exc:
        raise InputError.single(path, "", None, f"malformed YAML: {exc}") from exc


def from_validation_error(file: str | Path, exc: Any, data: Any, prefix: str = "") -> InputError:
    """Turn a pydantic ValidationError into problems with dotted field paths and the offending value."""
    problems = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if not _is_union_tag(p)]
        field = prefix + field_path(loc)
        value = err.get("input")
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] in {"unknown_key", "extra_forbidden"}:
            value = None
        elif isinstance(value, dict | list):
            value = None  # the field path says where; a whole mapping is noise
        problems.append(Problem(str(file), field, value, message))
    return InputError(problems)


def field_path(parts: Iterable[Any]) -> str:
    """['pools', 0, 'serving_port'] -> 'pools[0].serving_port'."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the discriminator value or a validator name into loc for tagged unions
    return isinstance(part, str) and (part.startswith("function-") or part in {"aws", "outpost", "onprem"})
