"""The engine: read upstream, moderate windows concurrently, release text in order.

Shape of the concurrency (the only module that starts tasks):

- One *pump* owns all state. Inside its own task group it starts a *reader* (upstream chunks ->
  events) and one task per window (moderator -> events, bounded by a ``CapacityLimiter``). The
  pump consumes events, decides, and sends output chunks into a zero-buffer memory stream that
  the consumer reads. Only the pump mutates state, so there are no locks.
- ``async with guard(...)`` runs the pump in a task group that the context manager owns.
- Bare ``async for chunk in guard(...)`` (what ``wrap()`` users write) cannot own a task group
  (no task group may stay open across ``__anext__``), so on asyncio the pump is one tracked task,
  cancelled and awaited on ``aclose()``, on cancellation of ``__anext__`` and when the stream is
  dropped; it ends by itself on exhaustion and after a cut-off.
- Whatever ends the pump, its ``finally`` closes upstream, shielded and time-limited.

Invariant (hold-back): a character is released only once every window up to the one holding it
has a settled verdict; a flagged window's text is never released (cut-off) or is replaced
(redact). Non-text deltas (role, tool calls, finish) are released as soon as the text before
them is.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from openai.types.chat import ChatCompletionChunk
from openai.types.chat.chat_completion_chunk import Choice

from .exceptions import ModerationError, ModerationTimeout
from .moderation._base import Moderator, Verdict
from .policy import Policy
from .report import Flag, GuardReport, Span, VerdictEvent
from .sources import as_chunk, chunk_iterator, close_quietly, input_text
from .usage import UsageTracker
from .window import Window, WindowBuffer

__all__ = ["GuardedStream", "guard"]

logger = logging.getLogger(__name__)

Hook = Callable[[Any], object]

_OUT_BUFFER = 16


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
        stream: The upstream: an ``openai.AsyncStream[ChatCompletionChunk]``, or any async
            iterable of chunks or of chunk dicts.
        moderator: Judges windows of text (see :class:`~streamguard.Moderator`).
        policy: What to do; defaults to ``Policy()`` (hold back, cut off, fail closed).
        model: The model asked for (used for token counting; else the chunks' ``model``).
        messages: The request's messages (for prompt-token usage when upstream sends none).
        tools: The request's tool definitions (likewise).
        n: How many choices were asked for, if more than the stream shows at first: upstream
            is closed after a cut-off only once this many choices have ended.
        on_verdict: Called with a :class:`~streamguard.report.VerdictEvent` per settled window.
        on_flag: Called with a :class:`~streamguard.report.Flag` per flag. In stream-first
            mode this is where an app retracts text it has shown. Hooks may be async.

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
    )


class GuardedStream:
    """An async iterator of ``ChatCompletionChunk``; also an async context manager.

    Upstream errors surface unchanged (the ``openai`` client's own exceptions); moderation
    failures as :class:`~streamguard.ModerationError` under ``on_error="fail_closed"``.
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
    ) -> None:
        self._engine = _Engine(
            stream,
            moderator=moderator,
            policy=policy,
            usage=UsageTracker(model=model, messages=messages, tools=tools),
            model=model,
            messages=messages,
            n=n or 1,
            on_verdict=on_verdict,
            on_flag=on_flag,
        )
        self._receive: MemoryObjectReceiveStream[ChatCompletionChunk] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._task: Any = None  # asyncio.Task in the bare form
        self._closed = False

    @property
    def report(self) -> GuardReport:
        """The stream's report so far (final once the stream has ended)."""
        return self._engine.snapshot()

    @property
    def policy(self) -> Policy:
        return self._engine.policy

    async def __aenter__(self) -> GuardedStream:
        if self._receive is not None:
            raise RuntimeError("this guarded stream has already been started")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._receive = self._engine.start(tg.start_soon)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        tg, self._tg = self._tg, None
        self._engine.cancel()
        self._closed = True
        if self._receive is not None:
            self._receive.close()
        if tg is None:
            return None
        try:
            return await tg.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # Surface a single error as itself (the pump never raises, so this is rare).
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from group.exceptions[0].__cause__
            raise

    def __aiter__(self) -> GuardedStream:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def receive(self) -> ChatCompletionChunk:
        """The next chunk; raises ``anyio.EndOfStream`` at the end (``__anext__`` is nicer)."""
        if self._closed:
            raise anyio.EndOfStream
        if self._receive is None:
            self._start_bare()
        assert self._receive is not None
        try:
            try:
                return self._receive.receive_nowait()  # buffered chunks need no task switch
            except anyio.WouldBlock:
                return await self._receive.receive()
        except anyio.EndOfStream:
            self._closed = True
            self._receive.close()
            await self._engine.wait_finished(self._engine.policy.close_timeout)
            error = self._engine.error
            if error is not None:
                raise error from error.__cause__
            raise
        except anyio.get_cancelled_exc_class():
            # The consumer was cancelled (e.g. its client left): stop everything, then go on.
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop: cancel moderation, close upstream. Safe to call more than once."""
        if self._receive is None and not self._closed:
            self._closed = True
            await self._engine.close_unstarted()
            return
        self._closed = True
        self._engine.cancel()
        if self._receive is not None:
            self._receive.close()
        await self._engine.wait_finished(self._engine.policy.close_timeout)

    def _start_bare(self) -> None:
        import asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "iterating a guarded stream without `async with` needs asyncio; "
                "on trio write `async with guard(...) as guarded:`"
            ) from None
        holder: list[Any] = []

        def spawn(fn: Callable[..., Any], *args: Any) -> None:
            holder.append(loop.create_task(fn(*args), name="streamguard-pump"))

        self._receive = self._engine.start(spawn)
        self._task = holder[0]

    def __del__(self) -> None:
        # Dropped without aclose() (e.g. `break` in a bare loop): cancel the pump so it closes
        # upstream. Its `finally` does the closing; nothing here awaits.
        if self._receive is not None:
            self._receive.close()
        task = self._task
        if task is not None and not task.done():
            try:
                task.cancel()
            except RuntimeError:  # the loop is gone already
                pass


@dataclass
class _Item:
    """One output unit of a choice: a single-choice chunk and the text range it carries."""

    seq: int
    chunk: ChatCompletionChunk
    start: int
    end: int
    text_field: Literal["content", "refusal"] | None
    finish: bool


@dataclass
class _ChoiceState:
    index: int
    buffer: WindowBuffer
    template: ChatCompletionChunk
    items: deque[_Item] = field(default_factory=deque)
    pending: dict[int, Window] = field(default_factory=dict)
    results: dict[int, tuple[Verdict | BaseException, float]] = field(default_factory=dict)
    next_settle: int = 0
    settled: int = 0
    released: int = 0
    redactions: list[tuple[int, int]] = field(default_factory=list)
    finished: bool = False  # upstream sent its finish_reason (or ended)
    cut: bool = False
    finish_reason: str | None = None
    cut_sent: bool = False
    context_floor: int = 0  # end of the last redacted span: later context starts here
    last_text_at: float = 0.0


@dataclass
class _Event:
    kind: Literal["chunk", "end", "upstream_error", "verdict", "input_verdict"]
    chunk: ChatCompletionChunk | None = None
    error: BaseException | None = None
    choice: int = 0
    window: Window | None = None
    result: Verdict | BaseException | None = None
    latency: float = 0.0


class _Engine:
    def __init__(
        self,
        source: AsyncIterable[Any],
        *,
        moderator: Moderator,
        policy: Policy,
        usage: UsageTracker,
        model: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        n: int,
        on_verdict: Hook | None,
        on_flag: Hook | None,
    ) -> None:
        self.policy = policy
        self._source = source
        self._moderator = moderator
        self._usage = usage
        self._n = n
        self._model = model
        self._messages = messages
        self._input_pending = False
        self._input_flagged = False
        self._input_chars = 0
        self._input_truncated = False
        self._on_verdict = on_verdict
        self._on_flag = on_flag
        self._choices: dict[int, _ChoiceState] = {}
        self._loose: deque[_Item] = deque()  # chunks without choices (usage, annotations)
        self._seq = 0
        self._upstream_done = False
        self._upstream_closed = False
        self._upstream_error: BaseException | None = None
        self._template: ChatCompletionChunk | None = None
        self._scope: anyio.CancelScope | None = None
        self._cancelled = False
        self._finished: anyio.Event | None = None
        self.error: BaseException | None = None
        # report counters
        self._flags: list[Flag] = []
        self._calls = 0
        self._moderated_chars = 0
        self._leaked = 0
        self._unmoderated: list[Span] = []
        self._latencies: list[float] = []
        self._usage_emitted = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, spawn: Callable[..., object]) -> MemoryObjectReceiveStream[ChatCompletionChunk]:
        # A small buffer of released chunks lets the pump hand over several without a task switch
        # each; it bounds how far the pump runs ahead of a slow consumer.
        send, receive = anyio.create_memory_object_stream[ChatCompletionChunk](_OUT_BUFFER)
        self._finished = anyio.Event()
        spawn(self._run, send)
        return receive

    async def close_unstarted(self) -> None:
        """Close upstream of a stream that was never iterated."""
        with anyio.move_on_after(self.policy.close_timeout, shield=True):
            await self._close_upstream(chunk_iterator(self._source))

    def cancel(self) -> None:
        self._cancelled = True
        if self._scope is not None:
            self._scope.cancel()

    async def wait_finished(self, seconds: float) -> None:
        if self._finished is None:
            return
        # Shielded: we may be cancelled already (client left), but the close must finish.
        with anyio.move_on_after(seconds, shield=True):
            await self._finished.wait()

    async def _run(self, out: MemoryObjectSendStream[ChatCompletionChunk]) -> None:
        iterator = self._iterator = chunk_iterator(self._source)
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                if self._cancelled:
                    scope.cancel()
                # Bounded: a slow consumer holds back the reader, and so upstream.
                send, receive = anyio.create_memory_object_stream[_Event](64)
                async with out, send, receive, anyio.create_task_group() as tg:
                    self._tg = tg
                    self._events = send
                    self._limiter = anyio.CapacityLimiter(self.policy.max_in_flight)
                    reader = anyio.CancelScope()
                    self._reader_scope = reader
                    tg.start_soon(self._read, iterator, reader)
                    if not self._usage.ready:
                        tg.start_soon(self._warm_up_usage)
                    if self.policy.moderate_input and self._messages:
                        self._start_input_moderation()
                    try:
                        await self._loop(receive, out)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass  # the consumer went away
                    except Exception as exc:  # handed to the consumer
                        # Release what already had a clean verdict, then end with the error.
                        self.error = exc
                        with anyio.move_on_after(self.policy.close_timeout):
                            await self._release(out)
                    tg.cancel_scope.cancel()
        finally:
            # We may be cancelled already (consumer left): shield, but don't wait forever.
            with anyio.move_on_after(self.policy.close_timeout, shield=True):
                await self._close_upstream(iterator)
            if self._finished is not None:
                self._finished.set()

    async def _warm_up_usage(self) -> None:
        """Build the tokenizer in a worker thread (a first use takes ~0.3 s): never on the loop."""
        try:
            await anyio.to_thread.run_sync(self._usage.warm_up, abandon_on_cancel=True)
        except Exception:  # it is built (and any error raised) again where it is needed
            logger.debug("tokenizer warm-up failed", exc_info=True)

    async def _close_upstream(self, iterator: Any) -> None:
        if self._upstream_closed:
            return
        self._upstream_closed = True
        try:
            if iterator is not self._source:
                await close_quietly(iterator)
            await close_quietly(self._source)
        except Exception:  # closing must not mask how the stream ended
            logger.debug("closing upstream failed", exc_info=True)

    async def _read(self, iterator: Any, scope: anyio.CancelScope) -> None:
        events = self._events
        with scope:
            try:
                while True:
                    try:
                        raw = await iterator.__anext__()
                    except StopAsyncIteration:
                        break
                    event = _Event("chunk", chunk=as_chunk(raw))
                    try:
                        events.send_nowait(event)  # no task switch per chunk while the pump keeps up
                    except anyio.WouldBlock:
                        await events.send(event)
            except Exception as exc:  # forwarded, re-raised to the consumer
                await events.send(_Event("upstream_error", error=exc))
            else:
                await events.send(_Event("end"))

    # -- the pump ----------------------------------------------------------------------------

    async def _loop(
        self, events: MemoryObjectReceiveStream[_Event], out: MemoryObjectSendStream[ChatCompletionChunk]
    ) -> None:
        while True:
            event: _Event | None = None
            try:
                event = events.receive_nowait()  # under load: no timer, no task switch
            except anyio.WouldBlock:
                wait = self._flush_wait()
                if wait is None:
                    event = await events.receive()
                elif wait > 0:
                    with anyio.move_on_after(wait):
                        event = await events.receive()
            if event is None:
                self._flush_quiet()
            else:
                self._handle(event)
                # Take whatever else is ready without a checkpoint per event.
                while True:
                    try:
                        self._handle(events.receive_nowait())
                    except anyio.WouldBlock:
                        break
            await self._release(out)
            if self._all_choices_done() and not self._upstream_done:
                await self._stop_upstream()
                await self._release(out)
            if self._upstream_done and self._everything_released():
                if self._upstream_error is not None:
                    raise self._upstream_error
                await self._finish(out)
                return

    def _handle(self, event: _Event) -> None:
        if event.kind == "chunk":
            assert event.chunk is not None
            self._on_chunk(event.chunk)
        elif event.kind == "verdict":
            assert event.window is not None and event.result is not None
            self._on_verdict_event(event.choice, event.window, event.result, event.latency)
        elif event.kind == "input_verdict":
            assert event.window is not None and event.result is not None
            self._on_input_verdict(event.window, event.result, event.latency)
        elif event.kind == "end":
            self._on_upstream_end()
        else:
            # Upstream failed: judge what it did send (bounded by moderation_timeout), release
            # what is clean, then end with its error.
            assert event.error is not None
            self._upstream_error = event.error
            self._on_upstream_end()

    def _on_chunk(self, chunk: ChatCompletionChunk) -> None:
        self._usage.observe(chunk)
        if self._template is None:
            self._template = chunk
        if chunk.moderation is not None:
            self._on_upstream_moderation(chunk.moderation)
        if not chunk.choices:
            if chunk.usage is not None:
                self._usage_emitted = True
            self._loose.append(_Item(self._next_seq(), chunk, 0, 0, None, False))
            return
        single = len(chunk.choices) == 1
        for choice in chunk.choices:
            part = chunk if single else chunk.model_copy(update={"choices": [choice]})
            self._on_choice(part, choice)

    def _on_choice(self, chunk: ChatCompletionChunk, choice: Choice) -> None:
        state = self._choices.get(choice.index)
        if state is None:
            p = self.policy
            buffer = WindowBuffer(
                window_chars=p.window_chars,
                first_window_chars=p.first_window_chars,
                growth=p.window_growth,
                overlap_chars=p.overlap_chars,
            )
            state = self._choices[choice.index] = _ChoiceState(choice.index, buffer, chunk)
            if self._input_flagged:
                self._cut(state, at=0)
        if state.cut:
            return  # after a cut-off upstream text is counted for usage, never shown
        delta = getattr(choice, "delta", None)  # Azure annotation chunks carry none
        content = (getattr(delta, "content", None) or "") if delta is not None else ""
        refusal = (getattr(delta, "refusal", None) or "") if delta is not None else ""
        text = content + refusal
        text_field: Literal["content", "refusal"] | None = None
        if content and not refusal:
            text_field = "content"
        elif refusal and not content:
            text_field = "refusal"
        start = state.buffer.total
        if text:
            state.last_text_at = time.monotonic()
            for window in state.buffer.feed(text):
                self._submit(state, window)
        else:
            # A non-text delta ends a run of text: moderate what is buffered now, don't wait.
            self._flush(state)
        finish = choice.finish_reason is not None
        state.items.append(_Item(self._next_seq(), chunk, start, state.buffer.total, text_field, finish))
        if finish:
            state.finished = True
            state.finish_reason = choice.finish_reason
            self._flush(state)

    def _on_input_verdict(self, w: Window, outcome: Verdict | BaseException, took: float) -> None:
        self._calls += 1
        self._latencies.append(took)
        self._moderated_chars += len(w.text)
        self._input_pending = False
        flag: Flag | None = None
        if isinstance(outcome, BaseException):
            if self.policy.on_error == "fail_closed":
                if isinstance(outcome, ModerationError):
                    raise outcome
                raise ModerationError(f"input moderation failed: {outcome!r}") from outcome
            self._unmoderated.append(Span(-1, 0, w.end, repr(outcome)))
        else:
            decision = self.policy.judge(outcome)
            if decision is not None:
                flag = Flag(
                    choice=-1,
                    start=0,
                    end=w.end,
                    context_start=0,
                    category=decision.category,
                    score=decision.score,
                    categories=dict(decision.categories),
                    scores=dict(decision.scores),
                    action="cutoff",
                    source="input",
                )
                self._flags.append(flag)
                self._input_flagged = True
                for state in self._choices.values():
                    self._cut(state, at=state.released)
        self._call(self._on_verdict, _event(-1, w, flag, took, outcome if isinstance(outcome, BaseException) else None))
        if flag is not None:
            self._call(self._on_flag, flag)

    def _cut(self, state: _ChoiceState, *, at: int) -> None:
        """End ``state`` as content_filter: nothing past ``at`` is released."""
        state.cut = True
        state.finish_reason = "content_filter"
        state.settled = max(state.released, min(state.settled, at))
        state.pending.clear()
        state.results.clear()

    def _on_upstream_moderation(self, moderation: Any) -> None:
        """Honour the provider's own output moderation (``moderation=`` on the request) like a local flag."""
        output = moderation.model_dump().get("output") or {}
        for i, result in enumerate(output.get("results") or []):
            verdict = Verdict(
                bool(result.get("flagged")), result.get("categories") or {}, result.get("category_scores") or {}
            )
            decision = self.policy.judge(verdict)
            state = self._choices.get(i)
            if decision is None or state is None or state.cut:
                continue
            flag = Flag(
                choice=i,
                start=0,
                end=state.buffer.total,
                context_start=0,
                category=decision.category,
                score=decision.score,
                categories=dict(decision.categories),
                scores=dict(decision.scores),
                action=self.policy.action,
                source="upstream",
            )
            self._flags.append(flag)
            self._leaked += state.released  # shown before the provider's verdict arrived
            if self.policy.action == "cutoff" and state.items:
                # Whatever is still held is withheld; the choice ends as content_filter.
                self._cut(state, at=state.released)
            self._call(self._on_flag, flag)

    def _on_upstream_end(self) -> None:
        self._upstream_done = True
        for state in self._choices.values():
            if not state.cut:
                state.finished = True
                self._flush(state)

    def _flush(self, state: _ChoiceState) -> None:
        window = state.buffer.flush()
        if window is not None:
            self._submit(state, window)

    def _flush_wait(self) -> float | None:
        """Seconds until the next quiet-gap flush is due, or None if none is."""
        due = [
            s.last_text_at + self.policy.flush_after for s in self._choices.values() if s.buffer.pending and not s.cut
        ]
        if not due:
            return None
        return max(0.0, min(due) - time.monotonic())

    def _flush_quiet(self) -> None:
        now = time.monotonic()
        for state in self._choices.values():
            if state.buffer.pending and not state.cut and now - state.last_text_at >= self.policy.flush_after:
                self._flush(state)

    def _submit(self, state: _ChoiceState, window: Window) -> None:
        state.pending[window.seq] = window
        self._moderated_chars += len(window.text)
        self._tg.start_soon(self._moderate, state.index, window)

    def _start_input_moderation(self) -> None:
        assert self._messages is not None
        text, self._input_truncated = input_text(self._messages, self.policy.input_max_chars)
        if text:
            self._input_pending = True
            self._input_chars = len(text)
            self._tg.start_soon(self._moderate_input, text)

    async def _moderate_input(self, text: str) -> None:
        # Concurrent with upstream's generation, never before it: no limiter slot is taken.
        result, latency = await self._call_moderator(text)
        await self._events.send(
            _Event("input_verdict", window=Window(-1, 0, len(text), 0, text), result=result, latency=latency)
        )

    async def _moderate(self, choice: int, window: Window) -> None:
        async with self._limiter:
            result, latency = await self._call_moderator(window.text)
        await self._events.send(_Event("verdict", choice=choice, window=window, result=result, latency=latency))

    async def _call_moderator(self, text: str) -> tuple[Verdict | BaseException, float]:
        result: Verdict | BaseException
        started = time.perf_counter()
        try:
            with anyio.fail_after(self.policy.moderation_timeout):
                verdicts = await self._moderator.moderate([text])
            if len(verdicts) != 1:
                raise ModerationError(f"moderator returned {len(verdicts)} verdicts for 1 text")
            result = verdicts[0]
        except TimeoutError as exc:
            result = ModerationTimeout(f"moderation took longer than {self.policy.moderation_timeout}s")
            result.__cause__ = exc
        except Exception as exc:  # the policy decides (on_error)
            result = exc
        latency = time.perf_counter() - started
        return result, latency

    def _on_verdict_event(self, choice: int, window: Window, result: Verdict | BaseException, latency: float) -> None:
        state = self._choices[choice]
        self._calls += 1
        self._latencies.append(latency)
        if state.cut:
            state.pending.pop(window.seq, None)
            return
        state.results[window.seq] = (result, latency)
        while state.next_settle in state.results and not state.cut:
            w = state.pending.pop(state.next_settle)
            outcome, took = state.results.pop(state.next_settle)
            state.next_settle += 1
            self._settle(state, w, outcome, took)

    def _settle(self, state: _ChoiceState, w: Window, outcome: Verdict | BaseException, took: float) -> None:
        flag: Flag | None = None
        error: BaseException | None = None
        if isinstance(outcome, BaseException):
            error = outcome
            if self.policy.on_error == "fail_closed":
                self._call(self._on_verdict, _event(state.index, w, None, took, error))
                if isinstance(outcome, ModerationError):
                    raise outcome
                raise ModerationError(f"moderator failed: {outcome!r}") from outcome
            self._unmoderated.append(Span(state.index, w.start, w.end, repr(outcome)))
            state.settled = w.end
        else:
            decision = self.policy.judge(outcome)
            floor = state.context_floor
            if decision is not None and w.context_start < floor <= w.start:
                # Its context holds a span we already redacted: judge the window again without it.
                self._submit(state, Window(w.seq, w.start, w.end, floor, w.text[floor - w.context_start :]))
                state.next_settle -= 1
                return
            if decision is None:
                state.settled = w.end
            else:
                flag = Flag(
                    choice=state.index,
                    start=w.start,
                    end=w.end,
                    context_start=w.context_start,
                    category=decision.category,
                    score=decision.score,
                    categories=dict(decision.categories),
                    scores=dict(decision.scores),
                    action=self.policy.action,
                )
                self._flags.append(flag)
                if self.policy.action == "cutoff":
                    self._leaked += max(0, state.released - w.start)
                    self._cut(state, at=w.start)
                else:
                    self._leaked += max(0, min(state.released, w.end) - w.start)
                    state.redactions.append((w.start, w.end))
                    state.settled = w.end
                    state.context_floor = w.end
                    state.buffer.exclude_context_before(w.end)
        self._call(self._on_verdict, _event(state.index, w, flag, took, error))
        if flag is not None:
            self._call(self._on_flag, flag)

    def _call(self, hook: Hook | None, arg: Any) -> None:
        if hook is None:
            return
        result = hook(arg)
        if inspect.isawaitable(result):
            # Async hooks run in the task group: they must not delay the stream.
            async def run(awaitable: Any = result) -> None:
                await awaitable

            self._tg.start_soon(run)

    # -- releasing ---------------------------------------------------------------------------

    async def _release(self, out: MemoryObjectSendStream[ChatCompletionChunk]) -> None:
        if self._input_pending and self.policy.mode == "holdback":
            return  # no output before the input verdict
        progressed = True
        while progressed:
            progressed = False
            # A choice-less chunk keeps its place: nothing that came after it goes out before it.
            bound = self._loose[0].seq if self._loose else math.inf
            for state in list(self._choices.values()):
                for chunk in self._releasable(state, bound):
                    await self._emit(out, chunk)
                    progressed = True
            while self._loose and self._loose[0].seq < self._oldest_held():
                await self._emit(out, self._loose.popleft().chunk)
                progressed = True

    def _oldest_held(self) -> float:
        heads = [s.items[0].seq for s in self._choices.values() if s.items]
        return min(heads) if heads else math.inf

    async def _emit(self, out: MemoryObjectSendStream[ChatCompletionChunk], chunk: ChatCompletionChunk) -> None:
        self._usage.observe_shown(chunk)
        try:
            out.send_nowait(chunk)
        except anyio.WouldBlock:
            await out.send(chunk)

    def _releasable(self, state: _ChoiceState, bound: float) -> list[ChatCompletionChunk]:
        """Pop what may be released now from ``state`` (items before ``bound``), as output chunks."""
        out: list[ChatCompletionChunk] = []
        cut = state.cut
        limit = state.buffer.total if self.policy.mode == "stream_first" and not cut else state.settled
        while state.items:
            item = state.items[0]
            if item.seq > bound and not cut:
                break
            if item.finish and cut and item.start == item.end:
                state.items.popleft()  # replaced by the content_filter finish
                continue
            if item.finish and not cut and (item.start > state.settled or state.pending):
                break  # a finish waits for every verdict of its choice
            if item.start == item.end:
                if item.start > limit:
                    break
            elif item.end > limit:
                # A delta straddling the limit waits whole for the next verdict (chunks keep their
                # shape), unless it is longer than a window or the choice was cut.
                long_delta = item.end - item.start > self.policy.window_chars
                if (cut or long_delta) and max(item.start, state.released) < limit:
                    out.extend(self._part(state, item, limit, keep_finish=False))
                break
            state.items.popleft()
            out.extend(self._part(state, item, item.end, keep_finish=not cut))
        if cut:
            state.items.clear()
            if not state.cut_sent:
                state.cut_sent = True
                out.append(self._cut_chunk(state))
        return out

    def _part(self, state: _ChoiceState, item: _Item, upto: int, *, keep_finish: bool) -> list[ChatCompletionChunk]:
        """Release ``item``'s text from ``state.released`` up to ``upto``."""
        if item.start == item.end:
            return [item.chunk]
        start = max(item.start, state.released)
        state.released = max(state.released, upto)
        redactions = [r for r in state.redactions if r[0] < upto and r[1] > start]
        last_part = upto == item.end
        whole = start == item.start and last_part  # nothing of it was released before
        if whole and keep_finish and not redactions:
            return [item.chunk]
        choice = item.chunk.choices[0]
        original = (choice.delta.content or "") + (choice.delta.refusal or "")
        piece = original[start - item.start : upto - item.start]
        text = _redact(piece, start, redactions, self.policy.redaction)
        state.redactions = [r for r in state.redactions if r[1] > upto]
        if item.text_field is None:
            # Both content and refusal in one delta: one text, released in the content field.
            update: dict[str, Any] = {"content": text, "refusal": None}
        else:
            update = {item.text_field: text}
        # Log-probs name the tokens: they go out only with a whole, unredacted delta.
        logprobs = choice.logprobs if whole and not redactions else None
        finish = choice.finish_reason if last_part and keep_finish else None
        if not text and finish is None:
            return []
        new_choice = choice.model_copy(
            update={
                "delta": choice.delta.model_copy(update=update),
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        )
        return [item.chunk.model_copy(update={"choices": [new_choice]})]

    def _cut_chunk(self, state: _ChoiceState) -> ChatCompletionChunk:
        choice = {"index": state.index, "delta": {}, "finish_reason": "content_filter", "logprobs": None}
        return _fresh_chunk(state.template, choices=[choice])

    def _everything_released(self) -> bool:
        return not self._loose and all(s.cut or (not s.items and not s.pending) for s in self._choices.values())

    def _all_choices_done(self) -> bool:
        if self._input_flagged:
            self._end_unseen_choices()
            return True
        states = self._choices.values()
        return len(self._choices) >= self._n and any(s.cut for s in states) and all(s.cut or s.finished for s in states)

    def _end_unseen_choices(self) -> None:
        """After a flagged input, end choices upstream has not started yet, too."""
        for index in range(self._n):
            if index not in self._choices:
                template = self._template or _fresh_chunk_from(self._model)
                buffer = WindowBuffer(window_chars=1, first_window_chars=1)
                state = self._choices[index] = _ChoiceState(index, buffer, template)
                self._cut(state, at=0)

    async def _stop_upstream(self) -> None:
        """Every choice was cut: stop reading and close upstream now, so generation stops."""
        self._upstream_done = True
        self._reader_scope.cancel()
        # Shielded and bounded: closing the HTTP response must finish even if we are cancelled.
        with anyio.move_on_after(self.policy.close_timeout, shield=True):
            await self._close_upstream(self._iterator)

    async def _finish(self, out: MemoryObjectSendStream[ChatCompletionChunk]) -> None:
        if self.policy.include_usage and not self._usage_emitted and self._template is not None:
            template = next((s.template for s in self._choices.values()), self._template)
            usage = self._usage.usage()
            self._usage_emitted = True
            chunk = _fresh_chunk(template, choices=[], usage=usage.model_dump(exclude_unset=True))
            await self._emit(out, chunk)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # -- report ------------------------------------------------------------------------------

    def snapshot(self) -> GuardReport:
        ended = self._finished is not None and self._finished.is_set()
        generated = sum(s.buffer.total for s in self._choices.values())
        released = sum(s.released for s in self._choices.values())
        return GuardReport(
            flags=tuple(self._flags),
            moderation_calls=self._calls,
            moderated_chars=self._moderated_chars,
            generated_chars=generated,
            released_chars=released,
            leaked_chars=self._leaked,
            watermarks={i: s.settled for i, s in sorted(self._choices.items())},
            finish_reasons={i: s.finish_reason for i, s in sorted(self._choices.items())},
            unmoderated=tuple(self._unmoderated),
            latencies=tuple(self._latencies),
            usage=self._usage.usage() if ended or self._usage_emitted else None,
            usage_source=self._usage.source if ended or self._usage_emitted else None,
            shown_completion_tokens=self._usage.shown_completion_tokens,
            input_moderated_chars=self._input_chars,
            input_truncated=self._input_truncated,
            error=self.error,
        )


def _fresh_chunk_from(model: str | None) -> ChatCompletionChunk:
    """A template for chunks streamguard emits before upstream sent any."""
    return ChatCompletionChunk.model_validate(
        {
            "id": "chatcmpl-streamguard",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model or "",
            "choices": [],
        }
    )


def _event(choice: int, w: Window, flag: Flag | None, took: float, error: BaseException | None) -> VerdictEvent:
    return VerdictEvent(choice, w.seq, w.start, w.end, w.text, flag, took, error)


def _fresh_chunk(template: ChatCompletionChunk, **fields: Any) -> ChatCompletionChunk:
    """A chunk with ``template``'s identity (id, created, model, fingerprint) and ``fields``."""
    data: dict[str, Any] = {
        "id": template.id,
        "object": "chat.completion.chunk",
        "created": template.created,
        "model": template.model,
    }
    if template.system_fingerprint is not None:
        data["system_fingerprint"] = template.system_fingerprint
    data.update(fields)
    return ChatCompletionChunk.model_validate(data)


def _redact(text: str, offset: int, spans: list[tuple[int, int]], redaction: str) -> str:
    """Replace what of ``text`` (which starts at ``offset``) lies inside ``spans``.

    The redaction text goes where a span starts, so a span split over several deltas is
    replaced once.
    """
    if not spans:
        return text
    end = offset + len(text)
    out, pos = [], offset
    for s, e in sorted(spans):
        cs, ce = max(s, pos), min(e, end)
        if cs >= ce:
            continue
        out.append(text[pos - offset : cs - offset])
        if cs == s:
            out.append(redaction)
        pos = ce
    out.append(text[pos - offset :])
    return "".join(out)
