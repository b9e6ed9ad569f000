"""The shared shell of a guarded stream whose items are not chat chunks (SSE bytes, Responses events).

An adapter feeds the engine (a :class:`~streamguard.guard.GuardedStream`) chunks made from its own
input, and turns each chunk the engine releases into zero or more output items (``_convert``);
at the end of the engine's stream it may add a last few (``_finish``). Items come out in order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Generic, Self, TypeVar

from openai.types.chat import ChatCompletionChunk

from .guard import GuardedStream
from .report import GuardReport

__all__ = ["AdaptedStream"]

T = TypeVar("T")


class AdaptedStream(ABC, Generic[T]):
    """An async iterator of ``T`` over a guarded stream; also an async context manager."""

    def __init__(self, guarded: GuardedStream) -> None:
        self._guarded = guarded
        self._ready: list[T] = []
        self._ended = False

    @abstractmethod
    def _convert(self, chunk: ChatCompletionChunk) -> list[T]:
        """The items for one chunk the engine released (maybe none)."""

    @abstractmethod
    def _finish(self) -> list[T]:
        """The items that end the output, once the engine's stream has ended (maybe none)."""

    @property
    def report(self) -> GuardReport:
        """The stream's report so far (final once the stream has ended)."""
        return self._guarded.report

    async def __aenter__(self) -> Self:
        await self._guarded.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return await self._guarded.__aexit__(exc_type, exc, tb)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        while not self._ready:
            if self._ended:
                raise StopAsyncIteration
            try:
                chunk = await self._guarded.__anext__()
            except StopAsyncIteration:
                self._ended = True
                self._ready = self._finish()
                continue
            self._ready = self._convert(chunk)
        return self._ready.pop(0)

    async def aclose(self) -> None:
        """Stop: cancel moderation, close upstream. Safe to call more than once."""
        await self._guarded.aclose()
