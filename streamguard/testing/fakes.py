"""Fakes for testing code that uses streamguard: no network, no servers.

- :func:`chat_chunk` builds one ``ChatCompletionChunk``.
- :func:`scripted_chunks` is an in-process stand-in for ``AsyncStream[ChatCompletionChunk]`` that
  records whether it was closed.
- :class:`FakeModerator` flags texts containing given words, after a chosen latency, and
  records every call.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, Literal

import anyio
from openai.types.chat import ChatCompletionChunk

from ..moderation._base import Verdict

__all__ = ["FakeModerator", "ScriptedStream", "chat_chunk", "scripted_chunks"]

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


def chat_chunk(
    content: str | None = None,
    *,
    index: int = 0,
    role: str | None = None,
    finish_reason: FinishReason | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    refusal: str | None = None,
    id: str = "chatcmpl-test",
    model: str = "gpt-4o-mini",
) -> ChatCompletionChunk:
    """One chat-completion chunk with a single choice."""
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if refusal is not None:
        delta["refusal"] = refusal
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    return ChatCompletionChunk.model_validate(
        {
            "id": id,
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}],
        }
    )


class ScriptedStream:
    """An async iterator of chunks with ``close()``/``aclose()``, like ``openai.AsyncStream``."""

    def __init__(self, chunks: Sequence[ChatCompletionChunk], *, delay: float = 0.0) -> None:
        self._chunks = list(chunks)
        self._delay = delay
        self._iter = self._run()
        self.closed = False
        self.sent = 0

    async def _run(self) -> AsyncGenerator[ChatCompletionChunk]:
        for chunk in self._chunks:
            if self._delay:
                await anyio.sleep(self._delay)
            self.sent += 1
            yield chunk

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        if self.closed:
            raise StopAsyncIteration
        return await self._iter.__anext__()

    async def close(self) -> None:
        self.closed = True
        await self._iter.aclose()

    async def aclose(self) -> None:
        await self.close()


def scripted_chunks(
    deltas: Sequence[str], *, delay: float = 0.0, finish_reason: FinishReason | None = "stop", index: int = 0
) -> ScriptedStream:
    """A stream of one role chunk, one chunk per text delta, then a finish chunk."""
    chunks = [chat_chunk("", role="assistant", index=index)]
    chunks += [chat_chunk(d, index=index) for d in deltas]
    if finish_reason is not None:
        chunks.append(chat_chunk(index=index, finish_reason=finish_reason))
    return ScriptedStream(chunks, delay=delay)


class FakeModerator:
    """Flags texts that contain any of ``words`` (case-insensitive, whole words).

    Args:
        words: Words that flag, in category ``"violence"``.
        latency: Seconds each call takes (``float("inf")`` hangs).
        fail: An exception to raise from every call, or a callable deciding per call number.
        judge: A custom ``text -> bool`` instead of ``words``.
    """

    def __init__(
        self,
        words: Sequence[str] = (),
        *,
        latency: float = 0.0,
        fail: BaseException | Callable[[int], BaseException | None] | None = None,
        judge: Callable[[str], bool] | None = None,
    ) -> None:
        rule = re.compile("|".join(rf"\b{re.escape(w)}\b" for w in words), re.I) if words else None
        self._judge = judge or (lambda text: bool(rule and rule.search(text)))
        self.latency = latency
        self._fail = fail
        self.calls: list[list[str]] = []
        self.in_flight = 0
        self.cancelled = 0

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        self.calls.append(list(texts))
        call = len(self.calls)
        self.in_flight += 1
        try:
            if self.latency == float("inf"):
                await anyio.sleep_forever()
            elif self.latency:
                await anyio.sleep(self.latency)
            else:
                await anyio.lowlevel.checkpoint()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        error = self._fail(call) if callable(self._fail) else self._fail
        if error is not None:
            raise error
        out = []
        for text in texts:
            hit = self._judge(text)
            out.append(Verdict(hit, {"violence": hit}, {"violence": 0.99 if hit else 0.01}))
        return out
