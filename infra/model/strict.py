"""A pydantic base model that refuses unknown keys and says which known key was probably meant."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from infra.model.errors import InputError, from_validation_error, nearest

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of the config models: frozen, and an unknown key is an error that names the key probably meant."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields)
        known |= {f.alias for f in cls.model_fields.values() if f.alias}
        unknown = [k for k in data if k not in known]
        if unknown:
            parts = []
            for key in unknown:
                guess = nearest(str(key), known)
                parts.append(f"{key!r}" + (f" (did you mean {guess!r}?)" if guess else ""))
            raise PydanticCustomError("unknown_key", "unknown key " + ", ".join(parts))
        return data


def validate(model: type[M], data: Any, source: str, what: str, prefix: str = "") -> M:
    """`data` (parsed YAML) as `model`; anything wrong is one InputError naming file, field path and value.

    `what` says what the file should hold ("a release manifest") for the message when it is not a mapping.
    """
    if not isinstance(data, dict):
        raise InputError.single(source, prefix.rstrip(".:"), None, f"expected a mapping ({what})")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(source, exc, data, prefix) from exc
