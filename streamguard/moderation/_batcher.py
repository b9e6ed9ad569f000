"""A cross-caller micro-batcher with no background task.

Many concurrent callers (one per guarded stream) call :meth:`Batcher.submit`; their items are
coalesced into calls of ``fn(list[T]) -> list[R]``, and each caller gets its own results back.

When to send is adaptive, like Nagle's algorithm inverted: the batch call itself is the timer.

- While no call is in flight, a batch is sent at once, after one checkpoint (so callers arriving
  in the same event-loop tick still join): a lone stream never waits for company.
- While a call is in flight, later callers accumulate; they are sent when a call returns or after
  ``max_wait``, whichever comes first, or as soon as ``max_batch`` items are pending.
- A batcher's first batch (nothing has been sent yet, so no call can clock it) waits ``max_wait``
  or ``max_batch`` items, as a fixed-delay batcher would.
- With ``max_in_flight`` set (for a CPU-bound ``fn``, e.g. a local model), a batch is not sent
  while that many calls run, unless it is full: callers keep accumulating into one bigger batch
  instead of starting calls that would only compete for the same cores.

There is no long-lived task: the first caller of a batch becomes its *leader*. The leader waits
as above, takes the batch, and runs ``fn`` in its own task for everyone; the other callers wait
on an event. So nothing can outlive its callers or the event loop, and it works the same on
asyncio and trio. Invariants:

- The pending queue is FIFO and, whenever it is not empty, its first entry is the leader.
- A follower cancelled while pending removes its entry; cancelled while its batch is in flight
  it simply stops waiting (its result is dropped).
- A leader cancelled while waiting hands leadership to the next pending entry. A leader
  cancelled while ``fn`` runs aborts that call (cancellation is never delayed), and puts the
  other callers of the batch back in the queue, where a new leader sends them again.
- If ``fn`` raises, every caller of that batch gets the same exception (as with a shared future).
- Every call that ends (returns, raises or is cancelled) wakes the waiting leader, if any.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio

from ..exceptions import ConfigError, ModerationError

__all__ = ["Batcher"]

T = TypeVar("T")
R = TypeVar("R")


class _State(enum.Enum):
    PENDING = "pending"
    LEADER = "leader"
    SENDING = "sending"
    DONE = "done"


class _Entry(Generic[T, R]):
    """One caller's items, and where its outcome lands."""

    __slots__ = ("error", "items", "results", "state", "wakeup")

    def __init__(self, items: list[T]) -> None:
        self.items = items
        self.state = _State.PENDING
        self.results: list[R] = []
        self.error: BaseException | None = None
        # Set exactly once: on promotion to leader, or when the outcome is known.
        self.wakeup = anyio.Event()


class Batcher(Generic[T, R]):
    """Coalesce concurrent :meth:`submit` calls into batched calls of ``fn``.

    Args:
        fn: Async function taking a list of items and returning one result per item, in order.
        max_batch: Most items in one call of ``fn``. A single caller with more items is split
            into several batches.
        max_wait: Most seconds a caller waits for others to join: while another call is in
            flight (a call returning sends sooner), and for the batcher's first batch. With no
            call in flight, later batches are sent at once.
        max_in_flight: Calls of ``fn`` at once beyond which a batch that is not full waits for
            one to end (``None``: no limit, ``max_wait`` alone decides).

    Raises:
        ConfigError: ``max_batch < 1``, ``max_in_flight < 1``, or ``max_wait`` negative or not
            finite.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_batch: int = 32,
        max_wait: float = 0.005,
        max_in_flight: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch!r}")
        if max_in_flight is not None and max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be >= 1, got {max_in_flight!r}")
        if not (max_wait >= 0 and math.isfinite(max_wait)):
            raise ConfigError(f"max_wait must be a non-negative number of seconds, got {max_wait!r}")
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_in_flight = max_in_flight
        self._pending: list[_Entry[T, R]] = []
        self._pending_items = 0
        self._deadline = 0.0
        # Set to wake the waiting leader: the batch is full, a call ended, or entries were requeued.
        self._wake: anyio.Event | None = None
        self._in_flight = 0  # calls of fn running now
        self._ended = 0  # calls of fn ended so far (returned, raised or cancelled)
        self.batches = 0

    @property
    def pending(self) -> int:
        """Items waiting for a batch (not yet sent)."""
        return self._pending_items

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Process ``items`` in a shared batch; return their results, in order.

        Args:
            items: The items of one caller; may be empty.

        Returns:
            ``fn``'s result for each item.

        Raises:
            Exception: Whatever ``fn`` raised for the batch these items were in.
            ModerationError: ``fn`` returned a different number of results than items.
        """
        items = list(items)
        if not items:
            return []
        out: list[R] = []
        for i in range(0, len(items), self.max_batch):
            out += await self._submit_one(items[i : i + self.max_batch])
        return out

    async def _submit_one(self, items: list[T]) -> list[R]:
        entry: _Entry[T, R] = _Entry(items)
        self._enqueue(entry)
        if entry.state is _State.PENDING:
            try:
                await entry.wakeup.wait()
            except BaseException:
                # Cancelled (or interrupted) while waiting: leave the queue cleanly.
                if entry.state in (_State.PENDING, _State.LEADER):
                    self._withdraw(entry)
                else:
                    entry.state = _State.DONE  # in flight: abandon it, so it is never re-sent
                raise
        if entry.state is _State.LEADER:
            await self._lead(entry)
        if entry.error is not None:
            raise entry.error
        return entry.results

    def _enqueue(self, entry: _Entry[T, R]) -> None:
        self._pending.append(entry)
        self._pending_items += len(entry.items)
        if len(self._pending) == 1:
            entry.state = _State.LEADER
            self._deadline = anyio.current_time() + self.max_wait
        elif self._pending_items >= self.max_batch:
            self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _withdraw(self, entry: _Entry[T, R]) -> None:
        """Remove a pending entry; hand leadership on if it was the leader."""
        self._pending.remove(entry)
        self._pending_items -= len(entry.items)
        was_leader = entry.state is _State.LEADER
        entry.state = _State.DONE
        if was_leader:
            self._promote_front()

    def _promote_front(self) -> None:
        if self._pending and self._pending[0].state is _State.PENDING:
            head = self._pending[0]
            head.state = _State.LEADER
            head.wakeup.set()

    async def _lead(self, entry: _Entry[T, R]) -> None:
        """Wait until the batch is due (see the module docstring), then send it for everyone."""
        try:
            await self._until_due()
        except BaseException:
            self._withdraw(entry)
            raise
        batch = self._take()
        items = [item for e in batch for item in e.items]
        self._in_flight += 1
        try:
            results = await self._fn(items)
        except anyio.get_cancelled_exc_class():
            # Only the leader was cancelled: the others go back in the queue, to be sent again.
            entry.state = _State.DONE
            self._requeue([e for e in batch if e is not entry and e.state is _State.SENDING])
            raise
        except BaseException as exc:
            self._settle(batch, error=exc)
            raise
        finally:
            self._in_flight -= 1
            self._ended += 1
            self._poke()  # the callers that gathered meanwhile are due now
        if len(results) != len(items):
            error = ModerationError(f"batched call returned {len(results)} results for {len(items)} inputs")
            self._settle(batch, error=error)
            raise error
        self._settle(batch, results=results)

    async def _until_due(self) -> None:
        """Return when the pending batch should be sent: full, idle, a call ended, or max_wait."""
        ended = self._ended
        checkpointed = False
        while self._pending_items < self.max_batch and self._ended == ended:
            if self.batches and not self._in_flight:
                # Idle: nothing in flight will clock this batch, so waiting only adds latency.
                # One checkpoint first, so callers arriving in this event-loop tick still join.
                # (Not for the first batch, ``batches == 0``: it waits max_wait, as it always did.)
                if checkpointed:
                    return
                await anyio.lowlevel.checkpoint()
                checkpointed = True
                continue
            remaining = self._deadline - anyio.current_time()
            if self.max_in_flight is not None and self._in_flight >= self.max_in_flight:
                remaining = math.inf  # busy: only a call ending (or a full batch) sends this one
            elif remaining <= 0:
                return
            self._wake = anyio.Event()
            with anyio.move_on_after(remaining):
                await self._wake.wait()

    def _take(self) -> list[_Entry[T, R]]:
        """Pop the leading entries (at most ``max_batch`` items, at least one entry) to send."""
        batch: list[_Entry[T, R]] = []
        count = 0
        while self._pending and (not batch or count + len(self._pending[0].items) <= self.max_batch):
            e = self._pending.pop(0)
            count += len(e.items)
            e.state = _State.SENDING
            batch.append(e)
        self._pending_items -= count
        self.batches += 1
        # The rest waited already; they get a fresh, full wait under a new leader.
        self._deadline = anyio.current_time() + self.max_wait
        self._promote_front()
        return batch

    def _requeue(self, entries: list[_Entry[T, R]]) -> None:
        was_empty = not self._pending
        for e in entries:
            e.state = _State.PENDING
            self._pending.append(e)
            self._pending_items += len(e.items)
        if was_empty and self._pending:
            self._deadline = anyio.current_time()  # they waited already: send at once
            self._promote_front()
        elif self._pending_items >= self.max_batch:
            self._poke()

    def _settle(
        self, batch: list[_Entry[T, R]], *, results: list[R] | None = None, error: BaseException | None = None
    ) -> None:
        offset = 0
        for e in batch:
            n = len(e.items)
            if error is not None:
                e.error = error
            elif results is not None:
                e.results = results[offset : offset + n]
            offset += n
            e.state = _State.DONE
            e.wakeup.set()
