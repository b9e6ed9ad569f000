"""Adapters from upstream shapes to ``ChatCompletionChunk`` objects the engine reads.

Today: ``openai.AsyncStream[ChatCompletionChunk]`` (or any async iterable of chunks) and async
iterables of plain dict chunks, validated into ``ChatCompletionChunk``.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

from openai.types.chat import ChatCompletionChunk
from pydantic import ValidationError

__all__ = ["as_chunk", "chunk_iterator", "close_quietly"]


def as_chunk(obj: ChatCompletionChunk | Mapping[str, Any]) -> ChatCompletionChunk:
    """Return ``obj`` as a chunk, validating a plain dict (as a JSON-decoded SSE event)."""
    if isinstance(obj, ChatCompletionChunk):
        return obj
    if isinstance(obj, Mapping):
        try:
            return ChatCompletionChunk.model_validate(dict(obj))
        except ValidationError:
            # Be as lenient as the openai client is with what providers really send (e.g. Azure's
            # filter annotations: ``object: ""``, choices without a delta).
            return ChatCompletionChunk.construct(**dict(obj))
    raise TypeError(f"expected a ChatCompletionChunk or a dict, got {type(obj).__name__}")


def chunk_iterator(source: AsyncIterable[Any]) -> AsyncIterator[Any]:
    """The iterator to read ``source`` with (``openai.AsyncStream`` is its own iterator)."""
    if isinstance(source, AsyncIterator):
        return source
    if isinstance(source, AsyncIterable):
        return source.__aiter__()
    raise TypeError(f"guard() needs an async iterable of chunks, got {type(source).__name__}")


async def close_quietly(obj: object) -> None:
    """Call ``obj.aclose()`` or ``obj.close()`` if it has one (awaiting it if async)."""
    for name in ("aclose", "close"):
        method = getattr(obj, name, None)
        if callable(method):
            result = method()
            if inspect.isawaitable(result):
                await result
            return
