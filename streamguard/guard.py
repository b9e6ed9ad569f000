"""``guard()``: the public lifecycle of a guarded stream. The work is in ``_engine``.

- ``async with guard(...) as guarded:`` is the structured form: the driver's tasks (the reader and
  the moderation workers) run in a task group the context manager owns.
- Bare ``async for chunk in guard(...)`` (what ``wrap()`` users write) cannot own a task group (no
  task group may stay open across ``__anext__``), so on asyncio the driver's tasks are tracked
  tasks, cancelled and awaited on ``aclose()``, on cancellation of ``__anext__`` and when the
  stream is dropped; they end by themselves on exhaustion and after a cut-off.
- Whatever ends the stream, the reader's cleanup closes upstream, shielded and time-limited.

The output has the input's shape: ``ChatCompletionChunk`` objects in, objects out; dicts in, dicts
out. A chunk released unchanged is the very object that came in.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from ._engine.driver import Driver, Hook
from .moderation._base import Moderator
from .policy import Policy
from .report import GuardReport

__all__ = ["GuardedStream", "Hook", "guard"]

logger = logging.getLogger(__name__)

_NOTHING: Any = object()  # no released chunk is waiting


def guard(
    stream: AsyncIterable[Any],
    *,
    moderator: Moderator,
    policy: Policy | None = None,
    model: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    n: int | None = None,
    on_verdict: Hook | None = None,
    on_flag: Hook | None = None,
) -> GuardedStream:
    """Guard a streamed chat completion.

    Args:
        stream: The upstream: an ``openai.AsyncStream[ChatCompletionChunk]``, any async iterable
            of chunks or of chunk dicts (then dicts come out), or a Responses API stream (then
            Responses events come out, as from :func:`streamguard.guard_responses`). The shape is
            read off the first item; one the guard cannot read raises ``StreamFormatError``.
        moderator: Judges windows of text (see :class:`~streamguard.Moderator`).
        policy: What to do; defaults to ``Policy()`` (hold back, cut off, fail closed).
        model: The model asked for (used for token counting; else the chunks' ``model``).
        messages: The request's messages (for prompt-token usage when upstream sends none).
        tools: The request's tool definitions (likewise).
        n: How many choices were asked for, if more than the stream shows at first: upstream
            is closed after a cut-off only once this many choices have ended.
        on_verdict: Called with a :class:`~streamguard.report.VerdictEvent` per settled window.
        on_flag: Called with a :class:`~streamguard.report.Flag` per flag. In stream-first
            mode this is where an app retracts text it has shown. Hooks may be async; a hook
            that raises ends the stream with its error.

    Returns:
        A :class:`GuardedStream`: use ``async with guard(...) as guarded: async for ...``, or
        iterate it directly and call ``aclose()`` when you stop early.
    """
    return GuardedStream(
        stream,
        moderator=moderator,
        policy=policy or Policy(),
        model=model,
        messages=messages,
        tools=tools,
        n=n,
        on_verdict=on_verdict,
        on_flag=on_flag,
        detect=True,
    )


class GuardedStream:
    """An async iterator of chunks (the input's shape); also an async context manager.

    Upstream errors surface unchanged (the ``openai`` client's own exceptions); moderation
    failures as :class:`~streamguard.ModerationError` under ``on_error="fail_closed"``; a shape
    the guard cannot read as :class:`~streamguard.StreamFormatError`; deadlines as
    :class:`~streamguard.StreamTimeout`.
    """

    def __init__(
        self,
        stream: AsyncIterable[Any],
        *,
        moderator: Moderator,
        policy: Policy,
        model: str | None,
        messages: Sequence[Mapping[str, Any]] | None,
        tools: Sequence[Mapping[str, Any]] | None,
        n: int | None,
        on_verdict: Hook | None,
        on_flag: Hook | None,
        shape: Any = None,
        detect: bool = False,
    ) -> None:
        # ``detect``: the shape is read off the stream's declared type (an openai stream says what
        # it carries) or else off its first item (chat chunks, or Responses events).
        declared = _declared_shape(stream) if detect else None
        self._detect = detect and declared is None
        self._args: dict[str, Any] = {
            "moderator": moderator,
            "policy": policy,
            "model": model,
            "messages": messages,
            "on_verdict": on_verdict,
            "on_flag": on_flag,
        }
        self._delegate: Any = None  # a GuardedResponseStream, when the stream turned out to be one
        if declared == "responses":
            from .responses import GuardedResponseStream

            self._delegate = GuardedResponseStream(
                stream,
                moderator=moderator,
                policy=policy,
                model=model,
                messages=None if messages is None else list(messages),
                on_verdict=on_verdict,
                on_flag=on_flag,
            )
        self._driver = Driver(
            stream,
            moderator=moderator,
            policy=policy,
            model=model,
            messages=messages,
            tools=tools,
            n=n or 1,
            on_verdict=on_verdict,
            on_flag=on_flag,
            shape=shape,
        )
        self._started = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._tasks: set[Any] = set()  # asyncio tasks in the bare form
        self._closed = False

    @property
    def report(self) -> GuardReport:
        """The stream's report so far (final once the stream has ended)."""
        if self._delegate is not None:
            report: GuardReport = self._delegate.report
            return report
        return self._driver.report()

    async def _detect_shape(self) -> None:
        """Read the first item; a Responses stream is handed to the Responses adapter."""
        self._detect = False
        first = await self._driver.peek()
        if first is not None and _is_responses_event(first):
            from .responses import GuardedResponseStream

            args = self._args
            messages = args["messages"]
            self._delegate = GuardedResponseStream(
                self._driver.replay(),
                moderator=args["moderator"],
                policy=args["policy"],
                model=args["model"],
                messages=messages if messages is None or isinstance(messages, list) else list(messages),
                on_verdict=args["on_verdict"],
                on_flag=args["on_flag"],
            )

    @property
    def policy(self) -> Policy:
        return self._driver.policy

    async def __aenter__(self) -> GuardedStream:
        if self._started:
            raise RuntimeError("this guarded stream has already been started")
        if self._detect:
            await self._detect_shape()
        self._started = True
        if self._delegate is not None:
            await self._delegate.__aenter__()
            return self
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._driver.start(tg.start_soon)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if self._delegate is not None:
            self._closed = True
            result: bool | None = await self._delegate.__aexit__(exc_type, exc, tb)
            return result
        tg, self._tg = self._tg, None
        self._closed = True
        self._driver.cancel()
        if tg is None:
            return None
        try:
            return await tg.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # Surface a single error as itself (the driver's tasks never raise, so this is rare).
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from group.exceptions[0].__cause__
            raise

    def __aiter__(self) -> GuardedStream:
        return self

    async def __anext__(self) -> Any:
        # The hot path: a released chunk is waiting; no more awaits than raw iteration has.
        item = self._take_ready()
        if item is not _NOTHING:
            return item
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def receive_nowait(self) -> Any:
        """A released chunk that is ready now, without waiting (as anyio's memory streams have).

        Raises ``anyio.WouldBlock`` when none is ready, and also at the end, before the stream has
        started, and for a Responses stream (delegated): ``receive()`` tells those apart. A writer
        uses it to send every chunk released at the same moment in one write.
        """
        item = self._take_ready()
        if item is _NOTHING:
            raise anyio.WouldBlock
        return item

    def _take_ready(self) -> Any:
        """A released chunk waiting in the driver's buffer, or ``_NOTHING``."""
        driver = self._driver
        ready = driver.ready
        if ready and self._started and not self._closed and self._delegate is None:
            item = ready.popleft()
            if driver.reader_waiting:
                driver.resume_reader()
            return item
        return _NOTHING

    async def receive(self) -> Any:
        """The next chunk; raises ``anyio.EndOfStream`` at the end (``__anext__`` is nicer)."""
        if self._closed:
            raise anyio.EndOfStream
        if self._detect:
            if not self._started:
                _running_asyncio_loop()  # the bare form needs asyncio: say so before reading anything
            await self._detect_shape()
        if self._delegate is not None:
            self._started = True
            try:
                return await self._delegate.__anext__()
            except StopAsyncIteration:
                self._closed = True
                raise anyio.EndOfStream from None
        if not self._started:
            self._start_bare()
        try:
            return await self._driver.next()
        except anyio.EndOfStream:
            self._closed = True
            raise
        except anyio.get_cancelled_exc_class():
            # The consumer was cancelled (e.g. its client left): stop everything, then go on.
            await self.aclose()
            raise
        except BaseException:
            self._closed = True
            raise

    async def aclose(self) -> None:
        """Stop: cancel moderation, close upstream. Safe to call more than once."""
        if self._delegate is not None:
            self._closed = True
            await self._delegate.aclose()
            return
        if not self._started:
            self._started = self._closed = True
            await self._driver.close_unstarted()
            return
        self._closed = True
        self._driver.cancel()
        await self._driver.wait_stopped()

    def _start_bare(self) -> None:
        loop = _running_asyncio_loop()
        tasks = self._tasks

        def spawn(fn: Callable[..., Any], *args: Any) -> None:
            task = loop.create_task(fn(*args), name="streamguard")
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        self._started = True
        self._driver.start(spawn)

    def __del__(self) -> None:
        # Dropped without aclose() (e.g. `break` in a bare loop): cancel the tasks, so the reader's
        # cleanup closes upstream. Nothing here awaits.
        for task in list(getattr(self, "_tasks", ())):
            if not task.done():
                try:
                    task.cancel()
                except RuntimeError:  # the loop is gone already
                    pass


def _declared_shape(stream: Any) -> str | None:
    """``"chat"`` or ``"responses"`` when the stream declares what it carries (an ``openai`` stream
    does, by its ``cast_to``), else None (then the first item tells)."""
    cast = getattr(stream, "_cast_to", None)
    if cast is None:
        return None
    name = getattr(cast, "__name__", None) or repr(cast)
    if "ChatCompletionChunk" in name:
        return "chat"
    if "Response" in name:
        return "responses"
    return None


def _running_asyncio_loop() -> Any:
    """The running asyncio loop; a clear error on any other event loop (e.g. trio)."""
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "iterating a guarded stream without `async with` needs asyncio; "
            "on trio write `async with guard(...) as guarded:`"
        ) from None


def _is_responses_event(item: Any) -> bool:
    """Whether ``item`` is a Responses stream event (an object or a dict with a ``type``)."""
    from openai.types.chat import ChatCompletionChunk

    if isinstance(item, ChatCompletionChunk):
        return False
    if isinstance(item, Mapping):
        kind = item.get("type")
        return isinstance(kind, str) and "choices" not in item
    kind = getattr(item, "type", None)
    return isinstance(kind, str) and (kind.startswith("response.") or kind == "error")
