"""The cross-caller micro-batcher, on asyncio and trio."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from streamguard.exceptions import ConfigError, ModerationError
from streamguard.moderation._batcher import Batcher


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Recorder:
    """An ``fn`` that records each batch and returns ``item * 10``, after an optional gate."""

    def __init__(self, *, gate: anyio.Event | None = None, fail: Exception | None = None) -> None:
        self.batches: list[list[int]] = []
        self.started = 0
        self.first_call = anyio.Event()
        self.cancelled = 0
        self.gate = gate
        self.fail = fail

    async def __call__(self, items: list[int]) -> list[int]:
        self.started += 1
        self.first_call.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await anyio.lowlevel.checkpoint()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        self.batches.append(list(items))
        if self.fail is not None:
            raise self.fail
        return [i * 10 for i in items]


async def gather(batcher: Batcher[int, int], calls: list[list[int]]) -> list[list[int] | BaseException]:
    """Submit every call concurrently; collect results or errors by caller."""
    out: list[list[int] | BaseException] = [[] for _ in calls]

    async def one(i: int) -> None:
        try:
            out[i] = await batcher.submit(calls[i])
        except Exception as exc:
            out[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(one, i)
    return out


async def test_concurrent_callers_share_one_call() -> None:
    """Callers arriving within max_wait are sent together and each gets its own results."""
    fn = Recorder()
    batcher: Batcher[int, int] = Batcher(fn, max_batch=100, max_wait=0.05)
    with anyio.fail_after(10):
        results = await gather(batcher, [[i] for i in range(20)])
    assert results == [[i * 10] for i in range(20)]
    assert len(fn.batches) == 1
    assert sorted(fn.batches[0]) == list(range(20))
    assert batcher.pending == 0


async def test_multi_item_callers_map_back_in_order() -> None:
    """A caller with several items gets exactly its results, in its order."""
    fn = Recorder()
    batcher: Batcher[int, int] = Batcher(fn, max_batch=100, max_wait=0.05)
    calls = [[1, 2, 3], [4], [5, 6], [], [7, 8, 9, 10]]
    with anyio.fail_after(10):
        results = await gather(batcher, calls)
    assert results == [[i * 10 for i in call] for call in calls]
    assert len(fn.batches) == 1


async def test_max_batch_splits_batches() -> None:
    """No call carries more than max_batch items, and a full batch does not wait for max_wait."""
    fn = Recorder()
    # max_wait is far longer than fail_after: only full batches can be sent in time.
    batcher: Batcher[int, int] = Batcher(fn, max_batch=4, max_wait=60)
    with anyio.fail_after(10):
        results = await gather(batcher, [[i] for i in range(12)])
    assert results == [[i * 10] for i in range(12)]
    assert [len(b) for b in fn.batches] == [4, 4, 4]


async def test_oversized_caller_is_split() -> None:
    """One caller with more than max_batch items is sent in several calls, results in order."""
    fn = Recorder()
    batcher: Batcher[int, int] = Batcher(fn, max_batch=3, max_wait=0)
    with anyio.fail_after(10):
        assert await batcher.submit(list(range(8))) == [i * 10 for i in range(8)]
    assert [len(b) for b in fn.batches] == [3, 3, 2]


async def test_error_fans_out_to_every_caller() -> None:
    """If the batch call fails, every caller in that batch gets the error."""
    boom = RuntimeError("boom")
    fn = Recorder(fail=boom)
    batcher: Batcher[int, int] = Batcher(fn, max_batch=100, max_wait=0.05)
    with anyio.fail_after(10):
        results = await gather(batcher, [[i] for i in range(5)])
    assert results == [boom] * 5
    assert len(fn.batches) == 1


async def test_wrong_result_count_is_an_error() -> None:
    """An fn returning the wrong number of results raises ModerationError for everyone."""

    async def short(items: list[int]) -> list[int]:
        await anyio.lowlevel.checkpoint()
        return items[:-1]

    batcher: Batcher[int, int] = Batcher(short, max_batch=10, max_wait=0.01)
    with anyio.fail_after(10):
        results = await gather(batcher, [[1], [2]])
    assert all(isinstance(r, ModerationError) for r in results)


async def test_cancelled_follower_is_not_sent_and_others_are_fine() -> None:
    """A caller cancelled while waiting leaves the batch; the others still get results."""
    fn = Recorder()
    batcher: Batcher[int, int] = Batcher(fn, max_batch=100, max_wait=0.2)
    results: dict[int, list[int]] = {}

    async def call(i: int) -> None:
        results[i] = await batcher.submit([i])

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 1)
            await anyio.wait_all_tasks_blocked()  # 1 leads
            async with anyio.create_task_group() as victim:
                victim.start_soon(call, 2)
                await anyio.wait_all_tasks_blocked()
                victim.cancel_scope.cancel()
            tg.start_soon(call, 3)
    assert results == {1: [10], 3: [30]}
    assert [sorted(b) for b in fn.batches] == [[1, 3]]
    assert batcher.pending == 0


async def test_cancelled_leader_hands_over_while_waiting() -> None:
    """Cancelling the first caller of a batch before it is sent lets the others go on."""
    fn = Recorder()
    batcher: Batcher[int, int] = Batcher(fn, max_batch=100, max_wait=0.2)
    results: dict[int, list[int]] = {}

    async def call(i: int) -> None:
        results[i] = await batcher.submit([i])

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            async with anyio.create_task_group() as victim:
                victim.start_soon(call, 1)  # the leader
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(call, 2)
                tg.start_soon(call, 3)
                await anyio.wait_all_tasks_blocked()
                victim.cancel_scope.cancel()
    assert results == {2: [20], 3: [30]}
    assert [sorted(b) for b in fn.batches] == [[2, 3]]
    assert batcher.pending == 0


async def test_cancelled_leader_in_flight_resends_for_the_others() -> None:
    """Cancelling the caller that runs the batch call aborts it; the others are sent again."""
    gate = anyio.Event()
    fn = Recorder(gate=gate)
    batcher: Batcher[int, int] = Batcher(fn, max_batch=100, max_wait=0.01)
    results: dict[int, list[int]] = {}

    async def call(i: int) -> None:
        results[i] = await batcher.submit([i])

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            async with anyio.create_task_group() as victim:
                victim.start_soon(call, 1)  # the leader
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(call, 2)
                tg.start_soon(call, 3)
                await fn.first_call.wait()
                await anyio.wait_all_tasks_blocked()
                victim.cancel_scope.cancel()  # the first call is in flight, held by the gate
            await anyio.wait_all_tasks_blocked()
            gate.set()
    assert fn.cancelled == 1
    assert results == {2: [20], 3: [30]}
    assert [sorted(b) for b in fn.batches] == [[2, 3]]


async def test_follower_cancelled_in_flight_does_not_block_the_batch() -> None:
    """A caller cancelled while its batch is in flight stops waiting; the others get results."""
    gate = anyio.Event()
    fn = Recorder(gate=gate)
    batcher: Batcher[int, int] = Batcher(fn, max_batch=100, max_wait=0.01)
    results: dict[int, list[int]] = {}

    async def call(i: int) -> None:
        results[i] = await batcher.submit([i])

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 1)
            await anyio.wait_all_tasks_blocked()  # 1 leads
            async with anyio.create_task_group() as victim:
                victim.start_soon(call, 2)
                await fn.first_call.wait()
                victim.cancel_scope.cancel()
            gate.set()
    assert results == {1: [10]}
    assert [sorted(b) for b in fn.batches] == [[1, 2]]


async def test_follower_and_leader_cancelled_in_flight_never_resend_the_follower() -> None:
    """An abandoned caller is not sent again when its leader is cancelled later."""
    gate = anyio.Event()
    fn = Recorder(gate=gate)
    batcher: Batcher[int, int] = Batcher(fn, max_batch=100, max_wait=0.01)
    results: dict[int, list[int]] = {}

    async def call(i: int) -> None:
        results[i] = await batcher.submit([i])

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            async with anyio.create_task_group() as leader:
                leader.start_soon(call, 1)
                await anyio.wait_all_tasks_blocked()
                async with anyio.create_task_group() as follower:
                    follower.start_soon(call, 2)
                    tg.start_soon(call, 3)
                    await fn.first_call.wait()
                    follower.cancel_scope.cancel()
                leader.cancel_scope.cancel()
            await anyio.wait_all_tasks_blocked()
            gate.set()
    assert results == {3: [30]}
    assert fn.batches == [[3]]


async def test_sequential_use_after_cancellations_still_works() -> None:
    """The batcher keeps no stale state after cancellations: later calls are served."""
    fn = Recorder()
    batcher: Batcher[int, int] = Batcher(fn, max_batch=100, max_wait=0.05)
    with anyio.fail_after(10):
        with anyio.move_on_after(0.01):
            await batcher.submit([1])
        assert await batcher.submit([2]) == [20]
    assert fn.batches == [[2]]


@pytest.mark.parametrize(
    "make",
    [
        lambda fn: Batcher(fn, max_batch=0),
        lambda fn: Batcher(fn, max_wait=-1),
        lambda fn: Batcher(fn, max_wait=float("inf")),
    ],
)
def test_bad_options_raise_config_error(make: Callable[[Recorder], object]) -> None:
    """Out-of-range options are rejected at construction."""
    with pytest.raises(ConfigError):
        make(Recorder())


async def warm_up(batcher: Batcher[int, int], fn: Recorder) -> None:
    """Send the first batch (a full one, so it never waits): the batcher is adaptive from then on."""
    await batcher.submit([-1] * batcher.max_batch)
    fn.batches.clear()
    fn.started = 0
    fn.first_call = anyio.Event()


async def test_lone_caller_is_sent_without_waiting_max_wait() -> None:
    """With no call in flight, a lone caller is sent at once, however long max_wait is."""
    fn = Recorder()
    batcher: Batcher[int, int] = Batcher(fn, max_batch=4, max_wait=10)
    with anyio.fail_after(1):
        await warm_up(batcher, fn)
        for i in range(5):
            assert await batcher.submit([i]) == [i * 10]
    assert fn.batches == [[0], [1], [2], [3], [4]]


async def test_callers_of_the_same_tick_still_coalesce_when_idle() -> None:
    """Callers started together join the lone caller's batch (one checkpoint before sending)."""
    fn = Recorder()
    batcher: Batcher[int, int] = Batcher(fn, max_batch=100, max_wait=10)
    with anyio.fail_after(1):
        await warm_up(batcher, fn)
        results = await gather(batcher, [[i] for i in range(20)])
    assert results == [[i * 10] for i in range(20)]
    assert len(fn.batches) == 1
    assert sorted(fn.batches[0]) == list(range(20))


async def test_callers_gather_while_a_call_is_in_flight_and_go_when_it_returns() -> None:
    """Callers arriving during a call wait for it (not max_wait), then go in one batch."""
    fn = Recorder()
    batcher: Batcher[int, int] = Batcher(fn, max_batch=100, max_wait=10)
    results: dict[int, list[int]] = {}

    async def call(i: int) -> None:
        results[i] = await batcher.submit([i])

    with anyio.fail_after(1):
        await warm_up(batcher, fn)
        fn.gate = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 1)
            await fn.first_call.wait()  # 1 is in flight, held by the gate
            for i in (2, 3, 4):
                tg.start_soon(call, i)
            await anyio.wait_all_tasks_blocked()
            assert fn.started == 1
            assert batcher.pending == 3
            fn.gate.set()
    assert results == {i: [i * 10] for i in (1, 2, 3, 4)}
    assert [sorted(b) for b in fn.batches] == [[1], [2, 3, 4]]


async def test_max_wait_bounds_the_wait_behind_a_slow_call() -> None:
    """Callers behind a call that does not return are sent after max_wait."""
    batches: list[list[int]] = []

    async def fn(items: list[int]) -> list[int]:
        batches.append(list(items))
        if 0 in items:
            await anyio.sleep_forever()
        await anyio.lowlevel.checkpoint()
        return [i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(fn, max_batch=2, max_wait=0.05)
    results: dict[int, list[int]] = {}

    async def call(i: int) -> None:
        results[i] = await batcher.submit([i])

    with anyio.fail_after(5):
        assert await batcher.submit([-1, -2]) == [-10, -20]  # a full first batch: sent at once
        async with anyio.create_task_group() as tg:
            async with anyio.create_task_group() as slow:
                slow.start_soon(call, 0)
                await anyio.wait_all_tasks_blocked()  # 0 is in flight, forever
                tg.start_soon(call, 1)
                await anyio.sleep(0.2)
                assert results == {1: [10]}
                slow.cancel_scope.cancel()
    assert batches == [[-1, -2], [0], [1]]
    assert batcher.pending == 0


async def test_a_failed_call_releases_the_callers_waiting_behind_it() -> None:
    """A call that raises wakes the batch gathered behind it, which is sent and may succeed."""
    boom = RuntimeError("boom")
    gate = anyio.Event()
    calls = 0

    async def fn(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 2:
            await gate.wait()
            raise boom
        await anyio.lowlevel.checkpoint()
        return [i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(fn, max_batch=2, max_wait=10)
    with anyio.fail_after(1):
        assert await batcher.submit([7, 8]) == [70, 80]
        out: list[list[int] | BaseException] = []

        async def failing() -> None:
            with pytest.raises(RuntimeError):
                await batcher.submit([1])

        async with anyio.create_task_group() as tg:
            tg.start_soon(failing)
            await anyio.wait_all_tasks_blocked()

            async def waiting() -> None:
                out.append(await batcher.submit([2]))

            tg.start_soon(waiting)
            await anyio.wait_all_tasks_blocked()
            assert batcher.pending == 1
            gate.set()
    assert out == [[20]]
    assert calls == 3


async def test_max_in_flight_gathers_callers_into_the_next_batch() -> None:
    """With max_in_flight=1, callers arriving during a call wait for it (not for max_wait) and go as one batch."""
    gate = anyio.Event()
    fn = Recorder(gate=gate)
    batcher: Batcher[int, int] = Batcher(fn, max_batch=100, max_wait=0.0, max_in_flight=1)
    results: dict[int, list[int]] = {}

    async def call(i: int) -> None:
        results[i] = await batcher.submit([i])

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 0)
            await fn.first_call.wait()
            for i in range(1, 6):
                tg.start_soon(call, i)
            await anyio.wait_all_tasks_blocked()
            await anyio.sleep(0.02)  # far past max_wait: still nobody else may start a call
            assert fn.started == 1
            gate.set()
    assert [sorted(b) for b in fn.batches] == [[0], [1, 2, 3, 4, 5]]  # trio starts tasks in any order
    assert results == {i: [i * 10] for i in range(6)}
    with pytest.raises(ConfigError):
        Batcher(fn, max_in_flight=0)
