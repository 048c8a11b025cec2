"""A pydantic base model that refuses unknown keys and says which known key was probably meant."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from infra.errors import nearest


class StrictModel(BaseModel):
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
