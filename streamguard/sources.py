"""Adapters from upstream shapes to ``ChatCompletionChunk`` objects the engine reads.

Today: ``openai.AsyncStream[ChatCompletionChunk]`` (or any async iterable of chunks) and async
iterables of plain dict chunks, validated into ``ChatCompletionChunk``.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from typing import Any

from openai.types.chat import ChatCompletionChunk
from pydantic import ValidationError

__all__ = ["as_chunk", "chunk_iterator", "close_quietly", "input_text"]

# Roles whose text is the app's own, not the user's: not sent to input moderation.
_APP_ROLES = frozenset({"system", "developer"})


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


def input_text(messages: Sequence[Mapping[str, Any]], max_chars: int) -> tuple[str, bool]:
    """The text of a request's messages to moderate, newest first within ``max_chars``.

    System and developer messages (the app's own) are left out; content parts of type ``text``
    count. Returns the text (in conversation order) and whether older text was left out.
    """
    parts: list[str] = []
    size = 0
    truncated = False
    for message in reversed(messages):
        if message.get("role") in _APP_ROLES:
            continue
        text = _message_text(message.get("content"))
        if not text:
            continue
        if size + len(text) > max_chars:
            room = max_chars - size
            if room > 0:
                parts.append(text[-room:])
            truncated = True
            break
        parts.append(text)
        size += len(text) + 1
    return "\n".join(reversed(parts)), truncated


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "\n".join(
            str(part.get("text", "")) for part in content if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""
