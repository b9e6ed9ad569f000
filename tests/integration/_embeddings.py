"""A deterministic Embeddings endpoint for the loopback upstream: hashed bag of words.

Each word (lower-cased, a trailing plural "s" dropped, common stop words skipped) adds 1 to one
of ``DIMS`` buckets chosen by a stable hash (BLAKE2b, not the salted ``hash()``); the vector is
L2-normalised. So texts sharing words are similar, texts sharing none are nearly orthogonal
(only bucket collisions), and all similarities are in [0, 1].

Like the real endpoint, it answers ``encoding_format="base64"`` (what the ``openai`` client asks
for by default) with little-endian float32 bytes, and ``"float"`` with JSON numbers.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
from collections.abc import Sequence
from typing import Any

from streamguard._upstream import Reply

__all__ = ["DIMS", "hashed_embeddings", "hashed_vector", "inputs"]

DIMS = 64
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an and are as at be but by do for from has have i in is it its of on or our so that the their them "
    "they this to was we were what when which will with you your".split()
)


def _words(text: str) -> list[str]:
    out = []
    for word in _WORD.findall(text.lower()):
        if word in _STOP:
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        out.append(word)
    return out


def hashed_vector(text: str, dims: int = DIMS) -> list[float]:
    """The L2-normalised hashed bag of words of ``text`` (all zeros if it has no words)."""
    counts = [0.0] * dims
    for word in _words(text):
        bucket = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") % dims
        counts[bucket] += 1.0
    norm = math.sqrt(sum(c * c for c in counts))
    return [c / norm for c in counts] if norm else counts


def inputs(body: dict[str, Any]) -> list[str]:
    """The input texts of an embeddings request body."""
    value = body.get("input", [])
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _encode(vector: Sequence[float], encoding_format: object) -> str | list[float]:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return list(vector)


def hashed_embeddings(body: dict[str, Any]) -> Reply:
    """Handle a ``/v1/embeddings`` request body with :func:`hashed_vector` per input."""
    texts = inputs(body)
    if not texts or any(not t for t in texts):
        return Reply({"error": {"message": "'input' cannot be empty", "type": "invalid_request_error"}}, status=400)
    dims = body.get("dimensions")
    size = dims if isinstance(dims, int) and dims > 0 else DIMS
    encoding_format = body.get("encoding_format", "float")
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(hashed_vector(t, size), encoding_format)}
        for i, t in enumerate(texts)
    ]
    tokens = sum(len(t.split()) for t in texts)
    return Reply(
        {
            "object": "list",
            "data": data,
            "model": body.get("model", "text-embedding-3-small"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
