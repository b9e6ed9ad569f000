"""Legacy completions (``client.completions.create``) through the chat engine.

Each ``Completion`` chunk's ``choices[].text`` is carried as the ``content`` of a chat chunk, so
the same windows, verdicts and policy apply; what the guard releases is turned back into
``Completion`` chunks. A non-streamed ``Completion`` is replayed choice by choice (``_answers.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Any

from openai.types import Completion, CompletionChoice
from openai.types.chat import ChatCompletionChunk

from ._answers import replay_texts
from .moderation._base import Moderator
from .policy import Policy

__all__ = ["AsyncLegacyStream", "SyncLegacyStream", "AsyncChatChunks", "SyncChatChunks", "guard_legacy"]


def _as_chat(completion: Completion) -> ChatCompletionChunk:
    choices = [
        {"index": c.index, "delta": {"content": c.text} if c.text else {}, "finish_reason": c.finish_reason}
        for c in completion.choices
    ]
    return ChatCompletionChunk.model_validate(
        {
            "id": completion.id,
            "object": "chat.completion.chunk",
            "created": completion.created,
            "model": completion.model,
            "choices": choices,
            "usage": completion.usage.model_dump() if completion.usage is not None else None,
        }
    )


def _as_completion(chunk: ChatCompletionChunk) -> Completion:
    # model_construct: a streamed choice has no finish_reason until its last chunk (openai builds them so too).
    choices = [
        CompletionChoice.model_construct(
            index=c.index, text=c.delta.content or "", finish_reason=c.finish_reason, logprobs=None
        )
        for c in chunk.choices
    ]
    return Completion.model_construct(
        id=chunk.id,
        object="text_completion",
        created=chunk.created,
        model=chunk.model,
        choices=choices,
        usage=chunk.usage,
        system_fingerprint=chunk.system_fingerprint,
    )


class SyncChatChunks:
    """A sync ``Stream[Completion]`` as chat chunks; ``close()`` closes it."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._iterator: Iterator[Completion] = iter(stream)

    def __iter__(self) -> SyncChatChunks:
        return self

    def __next__(self) -> ChatCompletionChunk:
        return _as_chat(next(self._iterator))

    def close(self) -> None:
        self._stream.close()


class AsyncChatChunks:
    """An ``AsyncStream[Completion]`` as chat chunks; ``aclose()`` closes it."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __aiter__(self) -> AsyncChatChunks:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        return _as_chat(await self._stream.__anext__())

    async def aclose(self) -> None:
        await self._stream.close()


class AsyncLegacyStream:
    """A guarded legacy stream: ``Completion`` chunks, used like openai's ``AsyncStream``."""

    def __init__(self, guarded: Any) -> None:
        self._guarded = guarded

    @property
    def report(self) -> Any:
        """The guard's report."""
        return self._guarded.report

    def __aiter__(self) -> AsyncLegacyStream:
        return self

    async def __anext__(self) -> Completion:
        return _as_completion(await self._guarded.__anext__())

    async def close(self) -> None:
        """Stop: cancel moderation, close upstream."""
        await self._guarded.aclose()

    aclose = close

    async def __aenter__(self) -> AsyncLegacyStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class SyncLegacyStream:
    """A guarded legacy stream for a sync client: ``Completion`` chunks, used like openai's ``Stream``."""

    def __init__(self, guarded: Any) -> None:
        self._guarded = guarded

    @property
    def report(self) -> Any:
        """The guard's report."""
        return self._guarded.report

    def __iter__(self) -> SyncLegacyStream:
        return self

    def __next__(self) -> Completion:
        return _as_completion(next(self._guarded))

    def close(self) -> None:
        """Stop: cancel moderation, close upstream."""
        self._guarded.close()

    def __enter__(self) -> SyncLegacyStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


async def guard_legacy(completion: Completion, *, moderator: Moderator, policy: Policy) -> Completion:
    """Judge a non-streamed legacy ``Completion`` like a stream: each choice's text replayed.

    Returns:
        ``completion`` itself when every choice was released unchanged, else a copy: a cut choice
        keeps its clean prefix and ends ``content_filter``; a redacted one keeps its finish reason.
    """
    texts = [c.text for c in completion.choices]
    released = await replay_texts(texts, moderator, policy, completion.model)
    choices = []
    for choice, text, (got, cut) in zip(completion.choices, texts, released, strict=True):
        if got == text and not cut:
            choices.append(choice)
            continue
        update: dict[str, Any] = {"text": got, "logprobs": None}
        if cut:
            update["finish_reason"] = "content_filter"
        choices.append(choice.model_copy(update=update))
    if all(new is old for new, old in zip(choices, completion.choices, strict=True)):
        return completion
    return completion.model_copy(update={"choices": choices})
