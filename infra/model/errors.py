"""Bad input: one error type, with the file, the field path and the value that were wrong.

Every command validates all of its input before it touches a host; what it finds wrong is
collected into one `InputError` and reported at once (exit code 2, DESIGN.md section 6).
"""

from __future__ import annotations

import difflib
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


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""


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


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file; malformed YAML or a duplicate key becomes an InputError naming the line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError.single(path, "", None, f"cannot read file: {exc.strerror}") from exc
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InputError.single(path, line, None, f"malformed YAML: {exc.problem or exc.context}") from exc
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
