"""The proxy's JSON codec: orjson (chosen on measurement, see the README's proxy section).

Decoding one chat chunk takes ~0.8 µs with orjson against ~3.3 µs with the standard library;
encoding one ~0.5 µs against ~5.2 µs (msgspec: ~0.75 and ~0.65 µs).
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["JSONDecodeError", "dumps", "loads"]

JSONDecodeError = orjson.JSONDecodeError


def loads(data: bytes | str) -> Any:
    """Parse JSON (raises :data:`JSONDecodeError`, a ``ValueError``)."""
    return orjson.loads(data)


def dumps(value: Any) -> bytes:
    """Compact JSON as UTF-8 bytes."""
    return orjson.dumps(value)
