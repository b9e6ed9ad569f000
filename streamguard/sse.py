"""Guard a raw SSE body of a chat-completions stream: for code that calls a provider with httpx.

```python
async with httpx.AsyncClient() as http, http.stream("POST", url, json=body) as response:
    async with guard_sse(response.aiter_bytes(), moderator=moderator) as guarded:
        async for data in guarded:  # bytes: ``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``
            ...
```

The body is parsed incrementally (``_sse_parse``); each ``data:`` payload is decoded as JSON and
fed to the same engine as :func:`streamguard.guard`; ``data: [DONE]`` ends the stream. The output
is OpenAI's wire format: one ``data:`` event per released chunk, then ``data: [DONE]`` (not sent
when the stream ends with an error). Closing the guarded stream (a cut-off, ``aclose()``, leaving
the ``async with``) closes ``body`` (``aiter_bytes()`` of an httpx response closes the response).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from typing import Any

from ._adapted import AdaptedStream
from ._sse_parse import SSEEvent, SSEParser
from .exceptions import StreamFormatError
from .guard import GuardedStream, Hook
from .integrations._sse import DONE, chunk_event
from .moderation._base import Moderator
from .policy import Policy
from .sources import close_quietly

__all__ = ["GuardedSSE", "guard_sse"]


def guard_sse(
    body: AsyncIterable[bytes],
    *,
    moderator: Moderator,
    policy: Policy | None = None,
    model: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    n: int | None = None,
    on_verdict: Hook | None = None,
    on_flag: Hook | None = None,
) -> GuardedSSE:
    """Guard a raw SSE body of a streamed chat completion.

    Args:
        body: The response body as it arrives, e.g. ``response.aiter_bytes()`` of an httpx
            streaming response. Chunk boundaries may fall anywhere.
        moderator: Judges windows of text.
        policy: As for :func:`streamguard.guard`.
        model: The model asked for (token counting).
        messages: The request's messages (prompt-token usage, ``Policy(moderate_input=True)``).
        tools: The request's tool definitions (prompt-token usage).
        n: How many choices were asked for.
        on_verdict: As for :func:`streamguard.guard`.
        on_flag: As for :func:`streamguard.guard`.

    Returns:
        A :class:`GuardedSSE`: an async iterator of SSE-encoded ``bytes``.

    Raises:
        StreamFormatError: While iterating: the body is not a chat-completions SSE stream
            (invalid UTF-8 or JSON, a payload that is not an object), or it carried an
            ``{"error": ...}`` event.
    """
    return GuardedSSE(
        body,
        moderator=moderator,
        policy=policy or Policy(),
        model=model,
        messages=messages,
        tools=tools,
        n=n,
        on_verdict=on_verdict,
        on_flag=on_flag,
    )


class GuardedSSE(AdaptedStream[bytes]):
    """An async iterator of SSE ``bytes`` in OpenAI's wire format; also an async context manager."""

    def __init__(
        self,
        body: AsyncIterable[bytes],
        *,
        moderator: Moderator,
        policy: Policy,
        model: str | None,
        messages: Sequence[Mapping[str, Any]] | None,
        tools: Sequence[Mapping[str, Any]] | None,
        n: int | None,
        on_verdict: Hook | None,
        on_flag: Hook | None,
    ) -> None:
        guarded = GuardedStream(
            _SSEChunks(body),
            moderator=moderator,
            policy=policy,
            model=model,
            messages=messages,
            tools=tools,
            n=n,
            on_verdict=on_verdict,
            on_flag=on_flag,
        )
        super().__init__(guarded)

    def _convert(self, chunk: Any) -> list[bytes]:
        if isinstance(chunk, RawChunk):
            return [b"data: " + chunk.raw + b"\n\n"]  # released unchanged: its original bytes
        if isinstance(chunk, dict):
            return [b"data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"]
        return [chunk_event(chunk)]

    def _finish(self) -> list[bytes]:
        return [DONE]

    async def aclose(self) -> None:
        """Stop: cancel moderation, close the body. Safe to call more than once."""
        self._ended = True  # no ``data: [DONE]`` after a close
        await super().aclose()


class _SSEChunks:
    """Raw SSE bytes -> chunk dicts; closing it closes the body."""

    def __init__(self, body: AsyncIterable[bytes]) -> None:
        self._body = body
        self._iterator: AsyncIterator[bytes] | None = None
        self._parser = SSEParser()
        self._ready: list[dict[str, Any]] = []
        self._ended = False
        self._error: StreamFormatError | None = None

    def __aiter__(self) -> _SSEChunks:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while not self._ready:
            if self._error is not None:
                raise self._error
            if self._ended:
                raise StopAsyncIteration
            if self._iterator is None:
                self._iterator = aiter(self._body)
            try:
                data = await anext(self._iterator)
            except StopAsyncIteration:
                self._ended = True
                self._take(self._parser.finish())
                continue
            self._take(self._parser.feed(bytes(data)))
        return self._ready.pop(0)

    def _take(self, events: Sequence[SSEEvent]) -> None:
        # Events before a malformed one still go out first, in order.
        for event in events:
            data = event.data
            if data.strip() == "[DONE]":
                self._ended = True
                return
            try:
                self._ready.append(_payload(data, event.event))
            except StreamFormatError as exc:
                self._ended = True
                self._error = exc
                return

    async def aclose(self) -> None:
        self._ended = True
        await close_quietly(self._iterator if self._iterator is not None else self._body)


class RawChunk(dict[str, Any]):
    """A chunk dict that remembers the bytes it was decoded from."""

    __slots__ = ("raw",)

    def __init__(self, value: dict[str, Any], raw: bytes) -> None:
        super().__init__(value)
        self.raw = raw


def _payload(data: str, event: str | None) -> dict[str, Any]:
    """One ``data:`` payload as a chunk dict, or a :class:`StreamFormatError`."""
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise StreamFormatError(f"SSE data is not valid JSON: {data[:200]!r}") from exc
    if not isinstance(value, dict):
        raise StreamFormatError(f"SSE data is not a JSON object: {data[:200]!r}")
    error = value.get("error")
    if error is not None or event == "error":
        message = error.get("message") if isinstance(error, dict) else error
        raise StreamFormatError(f"the stream carried an error event: {message or data[:200]!r}")
    return RawChunk(value, data.encode())
