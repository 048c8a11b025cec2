"""Synthetic model-weights files for the lab's artifact store.

A weights file in the lab is a stand-in for hundreds of gigabytes: its bytes are a deterministic
function of its path and size, so the sha256 a release manifest names can be reproduced here.
"""

from __future__ import annotations

import hashlib


def synthetic_weights(path: str, size: int) -> bytes:
    """The stand-in weights file at `path`: `size` bytes, the same every time."""
    block = hashlib.sha256(path.encode()).digest()
    out = bytearray()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])
