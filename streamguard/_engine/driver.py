"""The one async driver of the core: the only code in streamguard's engine that starts tasks.

Tasks of one guarded stream:

- a *reader* reads upstream, turns each chunk into units (the shape adapter), feeds the core and
  carries out its actions at once (it never hands a chunk to another task to decide on);
- a bounded pool of *moderation workers* (at most ``Policy.max_in_flight``), fed from a queue of
  windows, each feeding verdicts to the core;
- the consumer's own task takes released output from a small buffer; it waits (and ticks the
  core's timers) only when nothing is ready. So a chunk crosses at most one task hand-off, from
  the reader (or the worker whose verdict released it) to the consumer.

Backpressure: the reader stops when the core holds ``Policy.max_held_chars`` of unreleased text
or the output buffer is full, and goes on when verdicts or the consumer free room; meanwhile
upstream's TCP window fills and the provider slows down.

Every await in cleanup is shielded and time-limited (``Policy.close_timeout``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import anyio

from ..exceptions import ModerationError, ModerationTimeout, StreamTimeout
from ..moderation._base import Moderator, Verdict
from ..moderation.normalize import moderation_view
from ..policy import Policy
from ..report import GuardReport
from ..sources import chunk_iterator, close_quietly, input_text
from ..usage import UsageTracker
from .core import (
    CloseUpstream,
    Core,
    CutFinish,
    EmitUsage,
    Finished,
    Moderate,
    Notify,
    Release,
)
from .emit import ChatShape, channel_kind

__all__ = ["Driver", "Hook"]

logger = logging.getLogger("streamguard.guard")

Hook = Callable[[Any], object]

_OUT_HIGH = 64  # released items waiting for the consumer at which the reader pauses
_OUT_LOW = 16  # ... and resumes
_INPUT = -1
_BATCH_WINDOWS = 32  # windows sent in one moderation call at most ...
_BATCH_CHARS = 16_384  # ... and characters

clock = time.monotonic


class Driver:
    """Runs one :class:`~streamguard._engine.core.Core` against an upstream and a moderator."""

    def __init__(
        self,
        source: AsyncIterable[Any],
        *,
        moderator: Moderator,
        policy: Policy,
        model: str | None,
        messages: Sequence[Mapping[str, Any]] | None,
        tools: Sequence[Mapping[str, Any]] | None,
        n: int,
        on_verdict: Hook | None,
        on_flag: Hook | None,
        shape: ChatShape | None = None,
    ) -> None:
        self.policy = policy
        self.shape = shape or ChatShape(model)
        self.usage = UsageTracker(model=model, messages=messages, tools=tools)
        text: str | None = None
        truncated = False
        if policy.moderate_input and messages:
            text, truncated = input_text(messages, policy.input_max_chars)
        self.core = Core(
            policy, n=n, input_text=text or None, input_truncated=truncated, now=clock(), count=self.usage.count
        )
        self._kinds = None if policy.channels == _ALL_KINDS else policy.channels
        self._source = source
        self._moderator = moderator
        self._on_verdict = on_verdict
        self._on_flag = on_flag
        self.ready: deque[Any] = deque()
        self._queue: deque[Moderate] = deque()
        self._workers = 0
        self._idle = 0
        self._work: anyio.Event | None = None
        self._consumer: anyio.Event | None = None
        self._reader: anyio.Event | None = None
        self.reader_waiting = False
        self._done = False
        self._error: BaseException | None = None
        self._scopes: set[anyio.CancelScope] = set()
        self._reader_scope: anyio.CancelScope | None = None
        self._running = 0
        self._stopped: anyio.Event | None = None
        self._upstream_closed = False
        self._spawn: Callable[..., object] | None = None
        self._iterator: Any = None
        self._ended = False
        self._first: Any = None  # what peek() read: (item,), _EMPTY, or an exception
        self.batches = 0  # moderation calls made (a call may carry several windows)
        self._hooks = 0
        self._hooks_done: anyio.Event | None = None
        self._hook_error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set on asyncio: the core's timers are a loop timer
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    async def peek(self) -> Any:
        """Read the first upstream item before starting (None for an empty stream or an error,
        which the reader then meets again)."""
        self._iterator = chunk_iterator(self._source)
        p = self.policy
        limits = [t for t in (p.idle_timeout, p.max_duration) if t is not None]
        try:
            with anyio.move_on_after(min(limits) if limits else None) as scope:
                self._first = (await self._iterator.__anext__(),)
            if scope.cancelled_caught:
                self._first = StreamTimeout(f"upstream sent nothing for {min(limits)}s")
        except StopAsyncIteration:
            self._first = _EMPTY
        except Exception as exc:  # raised to the consumer by the reader, as any upstream failure
            self._first = exc
        return self._first[0] if isinstance(self._first, tuple) and self._first else None

    def replay(self) -> AsyncIterator[Any]:
        """The upstream again from its first item (for an adapter that takes over after peek)."""
        return _Replay(self._first, self._iterator, self._source)

    def start(self, spawn: Callable[..., object]) -> None:
        """Start the reader (and input moderation) with ``spawn(fn, *args)``."""
        self._spawn = spawn
        self._stopped = anyio.Event()
        try:
            self._loop = asyncio.get_running_loop()  # None on trio
        except RuntimeError:
            self._loop = None
        if self._iterator is None:
            self._iterator = chunk_iterator(self._source)
        scope = self._reader_scope = anyio.CancelScope()
        self._start(self._read, scope)
        if not self.usage.ready:
            self._start(self._warm_up_usage)
        self._pump()

    def _start(self, fn: Callable[[], Any], scope: anyio.CancelScope | None = None) -> None:
        assert self._spawn is not None
        scope = scope or anyio.CancelScope()
        self._scopes.add(scope)
        self._running += 1
        self._spawn(self._scoped, fn, scope)

    async def _scoped(self, fn: Callable[[], Any], scope: anyio.CancelScope) -> None:
        try:
            with scope:
                await fn()
        finally:
            self._scopes.discard(scope)
            self._running -= 1
            if self._running == 0 and self._stopped is not None:
                self._stopped.set()

    def cancel(self) -> None:
        """Stop every task (the reader still closes upstream, shielded)."""
        self._disarm()
        if not self.core.finished:
            self.core.gone()
            self._pump()
        for scope in list(self._scopes):
            scope.cancel()

    async def wait_stopped(self) -> None:
        """Wait (shielded, bounded) until every task has ended and upstream is closed."""
        if self._stopped is None:
            return
        with anyio.move_on_after(self.policy.close_timeout, shield=True):
            await self._stopped.wait()

    async def close_unstarted(self) -> None:
        """Close upstream of a stream that was never iterated."""
        self.core.gone()
        with anyio.move_on_after(self.policy.close_timeout, shield=True):
            await self._close_upstream(chunk_iterator(self._source))

    def report(self) -> GuardReport:
        self.core.flush_counts()
        ended = self.core.finished
        usage = self.usage.usage() if ended else None
        return self.core.report(
            usage=usage,
            usage_source=self.usage.source if ended else None,
            shown_tokens=self.usage.shown_completion_tokens,
        )

    # -- the consumer's side -----------------------------------------------------------------

    async def next(self) -> Any:
        """The next released item; ``anyio.EndOfStream`` at the end, or the stream's error."""
        ready = self.ready
        while True:
            if ready:
                item = ready.popleft()
                if self.reader_waiting and len(ready) <= _OUT_LOW:
                    self._wake_reader()
                return item
            if self._done:
                while self._hooks:
                    # The stream's hooks belong to it: its end waits for them (bounded), and a hook
                    # that failed is the stream's error.
                    done = self._hooks_done = self._hooks_done or anyio.Event()
                    with anyio.move_on_after(self.policy.close_timeout):
                        await done.wait()
                    break
                await self._end()
                error = self._error or self._hook_error
                if error is not None:
                    raise error
                raise anyio.EndOfStream
            event = self._consumer = anyio.Event()
            deadline = self.core.next_deadline()
            if deadline is None:
                await event.wait()
            elif self._loop is not None:
                # On asyncio the core's timers are one loop timer that wakes us only when a deadline
                # is due (not each time a flush deadline moves on), and no cancel scope a wait. The
                # core is ticked here, in a task: what it starts (moderation workers) needs one.
                self._arm(deadline)
                await event.wait()
                self.core.tick(clock())
                self._pump()
            else:
                with anyio.move_on_after(max(0.0, deadline - clock())):
                    await event.wait()
                self.core.tick(clock())
                self._pump()

    def _arm(self, deadline: float) -> None:
        """Have the loop timer fire at ``deadline`` (or earlier, if it is set for earlier already)."""
        timer = self._timer
        if timer is not None:
            if self._timer_at <= deadline:
                return
            timer.cancel()
        loop = self._loop
        assert loop is not None
        self._timer_at = deadline
        self._timer = loop.call_at(loop.time() + max(0.0, deadline - clock()), self._on_timer)

    def _on_timer(self) -> None:
        """The loop timer (a callback, not a task: it only looks, and wakes the waiting consumer)."""
        self._timer = None
        consumer = self._consumer
        if consumer is None or self._ended:
            return  # the consumer arms it again when it next waits
        deadline = self.core.next_deadline()
        if deadline is None:
            return
        if deadline <= clock():
            self._consumer = None
            consumer.set()
        else:
            self._arm(deadline)  # it moved on (new text came): wait for it

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._disarm()
        # Idle workers and hooks are not needed any more; the reader ends by itself (upstream closed).
        for scope in list(self._scopes):
            if scope is not self._reader_scope:
                scope.cancel()
        if self._reader_scope is not None:
            self._reader_scope.cancel()
        await self.wait_stopped()

    # -- carrying out the core's actions -----------------------------------------------------

    def _pump(self) -> None:
        actions = self.core.actions
        if not actions:
            return
        ready = self.ready
        shape = self.shape
        woke = False
        while actions:
            action = actions.popleft()
            kind = type(action)
            if kind is Release:
                assert isinstance(action, Release)
                ready.append(action.original if action.edit is None else shape.build(action.original, action.edit))
                woke = True
            elif kind is Moderate:
                assert isinstance(action, Moderate)
                if action.ticket == _INPUT:
                    # Concurrent with upstream's generation, never before it: no worker slot is taken.
                    self._start(lambda a=action: self._moderate([a]))  # type: ignore[misc]
                else:
                    self._queue.append(action)
                    self._feed_workers()
            elif kind is CutFinish:
                assert isinstance(action, CutFinish)
                ready.append(shape.cut_finish(action.choice, action.template))
                woke = True
            elif kind is EmitUsage:
                assert isinstance(action, EmitUsage)
                self.core.flush_counts()
                usage = self.usage.usage().model_dump(exclude_unset=True)
                ready.append(shape.usage_chunk(action.template, usage))
                woke = True
            elif kind is Notify:
                assert isinstance(action, Notify)
                self._notify(action)
            elif kind is CloseUpstream:
                if self._reader_scope is not None:
                    self._reader_scope.cancel()  # its cleanup closes upstream
            elif kind is Finished:
                assert isinstance(action, Finished)
                self._done = True
                self._error = action.error
                woke = True
                if self._work is not None:
                    self._work.set()
        if woke and self._consumer is not None:
            self._consumer.set()
            self._consumer = None
        if self.reader_waiting and (self.core.wants_input or self._done) and len(ready) < _OUT_HIGH:
            self._wake_reader()

    def resume_reader(self) -> None:
        """The consumer took an item: let a reader paused on a full output buffer go on."""
        if len(self.ready) <= _OUT_LOW:
            self._wake_reader()

    def _wake_reader(self) -> None:
        if self._reader is not None:
            self._reader.set()
            self._reader = None

    def _notify(self, action: Notify) -> None:
        hook = self._on_verdict if action.hook == "verdict" else self._on_flag
        if hook is None:
            return
        try:
            result = hook(action.arg)
        except Exception as exc:  # a hook that raises ends the stream with its error
            if self._hook_error is None:
                self._hook_error = exc
            self.core.error(exc)
            return
        if inspect.isawaitable(result):

            async def run(awaitable: Any = result) -> None:
                try:
                    await awaitable
                except Exception as exc:
                    if self._hook_error is None:
                        self._hook_error = exc
                    self.core.error(exc)
                    self._pump()
                finally:
                    self._hooks -= 1
                    if self._hooks == 0 and self._hooks_done is not None:
                        self._hooks_done.set()
                        self._hooks_done = None

            self._hooks += 1
            self._start(run)

    # -- upstream ----------------------------------------------------------------------------

    async def _read(self) -> None:
        core = self.core
        shape = self.shape
        iterator = self._iterator
        try:
            while True:
                if not core.wants_input or len(self.ready) >= _OUT_HIGH:
                    if core.finished:
                        break
                    if not core.wants_input and core.held_chars < core.max_held:
                        break  # upstream is done (every choice cut): nothing more to read
                    await self._paused()
                    continue
                try:
                    first, self._first = self._first, None
                    if first is None:
                        raw = await iterator.__anext__()
                    elif isinstance(first, BaseException):
                        raise first
                    elif not first:
                        raise StopAsyncIteration
                    else:
                        raw = first[0]
                except StopAsyncIteration:
                    core.end(now=clock())
                    self._pump()
                    break
                units = shape.units(raw)
                if shape.notice:
                    self._take_notice(shape)
                if len(units) == 1 and self._kinds is None:
                    original, choice, texts, finish, opens, names = units[0]
                    if names and choice is not None:
                        self._count_names(choice, names)
                    core.feed(original, choice, texts, finish=finish, opens=opens, now=clock())
                    if core.actions:
                        self._pump()
                else:
                    await self._feed_units(units)
                if shape.moderation is not None:
                    moderation, shape.moderation = shape.moderation, None
                    core.provider_moderation(_provider_verdicts(moderation))
                    self._pump()
        except Exception as exc:  # handed to the consumer, after what was clean is released
            core.fail(exc, now=clock())
            self._pump()
        finally:
            with anyio.move_on_after(self.policy.close_timeout, shield=True):
                await self._close_upstream(iterator)
            if not core.finished:
                # Cancelled from outside (the consumer left), or upstream closed after a cut.
                core.end(now=clock())
                self._pump()

    async def _paused(self) -> None:
        """Wait, reading nothing, until verdicts or the consumer free room (``_pump`` wakes us)."""
        self.reader_waiting = True
        event = self._reader = anyio.Event()
        try:
            await event.wait()
        finally:
            self.reader_waiting = False

    def _take_notice(self, shape: ChatShape) -> None:
        """Usage, a new model name or dropped fields came with the last chunk."""
        shape.notice = False
        core = self.core
        if shape.usage is not None:
            core.upstream_usage = True
            self.usage.upstream(shape.usage)
            shape.usage = None
        if shape.dropped:
            for name in shape.dropped:
                core.drop_field(name)
            shape.dropped.clear()
        if shape.new_model is not None:
            self.usage.see_model(shape.new_model)
            shape.new_model = None

    def _count_names(self, choice: int, names: tuple[str, ...]) -> None:
        for j, name in enumerate(names):
            self.usage.count(choice, f"tool_name:{j}", name, False)

    async def _feed_units(self, units: list[Any]) -> None:
        """Several units from one chunk (``n > 1``, or a long text in slices)."""
        core = self.core
        for i, (original, choice, texts, finish, opens, names) in enumerate(units):
            if i and texts:
                await anyio.lowlevel.checkpoint()  # a long text: let other tasks run between slices
                while not core.wants_input and not core.finished:
                    await self._paused()
            if names and choice is not None:
                self._count_names(choice, names)
            if texts and self._kinds is not None and choice is not None:
                # Kinds the policy leaves out pass unmoderated (still counted as generated).
                kept = []
                for part in texts:
                    if channel_kind(part[0]) in self._kinds:
                        kept.append(part)
                    else:
                        self.usage.count(choice, part[0], part[2], False)
                texts = kept
            core.feed(original, choice, texts, finish=finish, opens=opens, now=clock())
            self._pump()

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

    async def _warm_up_usage(self) -> None:
        """Build the tokenizer in a worker thread (a first use takes ~0.3 s): never on the loop."""
        try:
            await anyio.to_thread.run_sync(self.usage.warm_up, abandon_on_cancel=True)
        except Exception:  # it is built (and any error raised) again where it is needed
            logger.debug("tokenizer warm-up failed", exc_info=True)

    # -- moderation --------------------------------------------------------------------------

    def _feed_workers(self) -> None:
        if self._idle and self._work is not None:
            self._work.set()
            self._work = None
        elif self._workers < self.policy.max_in_flight:
            self._workers += 1
            self._start(self._worker)

    async def _worker(self) -> None:
        queue = self._queue
        try:
            while not self._done:
                if not queue:
                    self._idle += 1
                    event = self._work = self._work or anyio.Event()
                    try:
                        await event.wait()
                    finally:
                        self._idle -= 1
                    continue
                # Windows that queued up while every worker was busy go in one call (the
                # Moderator protocol takes a list): fewer calls, the same verdicts.
                batch = [queue.popleft()]
                size = len(batch[0].text)
                while queue and len(batch) < _BATCH_WINDOWS and size + len(queue[0].text) <= _BATCH_CHARS:
                    size += len(queue[0].text)
                    batch.append(queue.popleft())
                await self._moderate(batch)
        finally:
            self._workers -= 1

    async def _moderate(self, batch: list[Moderate]) -> None:
        results: list[Verdict | BaseException]
        started = time.perf_counter()
        try:
            with anyio.fail_after(self.policy.moderation_timeout):
                # Moderators judge the normalised view (NFKC, invisible and bidi controls removed,
                # confusables folded): disguised text is seen for what it is.
                verdicts = await self._moderator.moderate([moderation_view(action.text).text for action in batch])
            self.batches += 1
            if len(verdicts) != len(batch):
                raise ModerationError(f"moderator returned {len(verdicts)} verdicts for {len(batch)} texts")
            for verdict in verdicts:
                if not isinstance(verdict, Verdict):
                    raise ModerationError(f"moderator returned {type(verdict).__name__}, not a Verdict")
            results = list(verdicts)
        except TimeoutError as exc:
            error: BaseException = ModerationTimeout(f"moderation took longer than {self.policy.moderation_timeout}s")
            error.__cause__ = exc
            results = [error] * len(batch)
        except Exception as exc:  # the policy decides (on_error)
            results = [exc] * len(batch)
        took = time.perf_counter() - started
        self.core.verdicts([(a.ticket, r) for a, r in zip(batch, results, strict=True)], took, now=clock())
        self._pump()


_ALL_KINDS = Policy().channels


def _model_of(raw: Any) -> str | None:
    if isinstance(raw, Mapping):
        model = raw.get("model")
        return model if isinstance(model, str) else None
    model = getattr(raw, "model", None)
    return model if isinstance(model, str) else None


def _provider_verdicts(moderation: Any) -> list[Verdict]:
    data = moderation.model_dump() if hasattr(moderation, "model_dump") else moderation
    output = (data or {}).get("output") or {} if isinstance(data, Mapping) else {}
    verdicts = []
    for result in output.get("results") or []:
        verdicts.append(
            Verdict(bool(result.get("flagged")), result.get("categories") or {}, result.get("category_scores") or {})
        )
    return verdicts


_EMPTY: tuple[Any, ...] = ()


class _Replay:
    """An upstream whose first item was read already: that item, then the rest; closing closes it."""

    def __init__(self, first: Any, iterator: Any, source: Any) -> None:
        self._first = first
        self._iterator = iterator
        self._source = source

    def __aiter__(self) -> _Replay:
        return self

    async def __anext__(self) -> Any:
        first, self._first = self._first, None
        if first is None:
            return await self._iterator.__anext__()
        if isinstance(first, BaseException):
            raise first
        if not first:
            raise StopAsyncIteration
        return first[0]

    async def aclose(self) -> None:
        if self._iterator is not self._source:
            await close_quietly(self._iterator)
        await close_quietly(self._source)
