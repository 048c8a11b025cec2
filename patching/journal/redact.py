"""Secrets out of everything the journal stores and every report it writes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# whole words of a key ('access_token', 'auth', 'client-secret'), not substrings ('max_tokens', 'passed')
_SECRET_KEY = re.compile(
    r"(^|[_\-.])(password|passwd|pass|secret|token|api[_-]?key|credentials?|authori[sz]ation|auth|cookie"
    r"|private[_-]?key|bearer)($|[_\-.])",
    re.IGNORECASE,
)
_SECRET_TEXT = (
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}"), r"\1 ***"),
    (re.compile(r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key)(\s*[=:]\s*)[^\s,;&\"']+"), r"\1\2***"),
    (re.compile(r"(://)[^/\s:@]+:[^/\s@]+@"), r"\1***@"),
)


def redact(value: Any) -> Any:
    """Mask secrets in event data before it is stored: keys that name one, and tokens/passwords in text."""
    if isinstance(value, Mapping):
        return {k: "***" if _SECRET_KEY.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        for pattern, replacement in _SECRET_TEXT:
            value = pattern.sub(replacement, value)
    return value
