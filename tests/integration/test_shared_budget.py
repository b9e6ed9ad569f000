"""The moderation budget shared through a real Redis (Debian's redis-server on loopback)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from openai import AsyncOpenAI

from streamguard.exceptions import ConfigError
from streamguard.moderation import ModerationBudget, OpenAIModerator
from streamguard.testing.upstream import LoopbackUpstream, RateLimitedModeration
from tests.integration._redis import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.anyio


async def _take(budget: ModerationBudget, n: int, tokens: int = 1) -> None:
    for _ in range(n):
        await budget.acquire(tokens)


async def test_one_bucket_paces_every_holder_together(redis_server: RedisServer) -> None:
    """Two budgets on one key share 6000 requests/min (100/s): 40 requests take ~0.4 s, not ~0.2 s."""
    a = ModerationBudget(redis_server.url, key="t:shared", requests_per_minute=6000, headroom=0.0, burst=0.01)
    b = ModerationBudget(redis_server.url, key="t:shared", requests_per_minute=6000, headroom=0.0, burst=0.01)
    with anyio.fail_after(10):
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_take, a, 20)
            tg.start_soon(_take, b, 20)
        shared = time.monotonic() - started
    # The same load on separate keys: each budget has the whole rate.
    c = ModerationBudget(redis_server.url, key="t:c", requests_per_minute=6000, headroom=0.0, burst=0.01)
    d = ModerationBudget(redis_server.url, key="t:d", requests_per_minute=6000, headroom=0.0, burst=0.01)
    with anyio.fail_after(10):
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_take, c, 20)
            tg.start_soon(_take, d, 20)
        separate = time.monotonic() - started
    for budget in (a, b, c, d):
        await budget.aclose()
    assert shared >= 0.37, shared  # 39 refills of 10 ms after the first request
    assert separate < shared * 0.75, (separate, shared)
    assert a.stats.acquired == b.stats.acquired == 20
    assert a.stats.waits + b.stats.waits > 0
    assert a.stats.redis_errors == 0


async def test_token_limit_paces_by_estimated_tokens(redis_server: RedisServer) -> None:
    """60,000 tokens/min is 1,000/s: five 100-token requests after the first take ~0.4 s."""
    budget = ModerationBudget(redis_server.url, key="t:tokens", tokens_per_minute=60_000, headroom=0.0, burst=0.01)
    with anyio.fail_after(10):
        started = time.monotonic()
        await _take(budget, 5, tokens=100)
        elapsed = time.monotonic() - started
    await budget.aclose()
    assert 0.35 <= elapsed < 2.0, elapsed


async def test_limits_learned_from_headers_are_shared(redis_server: RedisServer) -> None:
    """One process learns x-ratelimit-limit-requests; another, fresh, paces by it at once."""
    teacher = ModerationBudget(redis_server.url, key="t:learn", headroom=0.0, burst=0.01)
    await teacher.observe({"x-ratelimit-limit-requests": "3000", "x-ratelimit-remaining-requests": "2999"}, 200)
    pupil = ModerationBudget(redis_server.url, key="t:learn", headroom=0.0, burst=0.01)
    with anyio.fail_after(10):
        started = time.monotonic()
        await _take(pupil, 6)  # 50/s: 5 refills of 20 ms
        elapsed = time.monotonic() - started
    await teacher.aclose()
    await pupil.aclose()
    assert elapsed >= 0.09, elapsed


async def test_unknown_limits_probe_one_request_at_a_time(redis_server: RedisServer) -> None:
    """Nothing known yet: the second request waits for the first response, then goes at once."""
    a = ModerationBudget(redis_server.url, key="t:probe")
    b = ModerationBudget(redis_server.url, key="t:probe")
    with anyio.fail_after(10):
        assert await a.acquire(1) == 0.0
        async with anyio.create_task_group() as tg:
            waited: list[float] = []

            async def second() -> None:
                waited.append(await b.acquire(1))

            tg.start_soon(second)
            await anyio.sleep(0.2)
            assert not waited  # still waiting: the probe has not answered
            await a.observe({}, 200)  # the endpoint sends no limit: nothing to pace
        assert waited and waited[0] > 0
        assert await b.acquire(1) == 0.0
    await a.aclose()
    await b.aclose()


async def test_a_429_pauses_every_holder(redis_server: RedisServer) -> None:
    """A 429 with retry-after-ms seen by one process pauses the others."""
    a = ModerationBudget(redis_server.url, key="t:pause", requests_per_minute=60_000)
    b = ModerationBudget(redis_server.url, key="t:pause", requests_per_minute=60_000)
    await a.observe({"retry-after-ms": "300"}, 429)
    with anyio.fail_after(10):
        started = time.monotonic()
        await b.acquire(1)
        elapsed = time.monotonic() - started
    await a.aclose()
    await b.aclose()
    assert 0.25 <= elapsed < 2.0, elapsed


async def test_unreachable_redis_paces_locally_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listens: every request goes through at once (local pacing), one warning, errors counted."""
    budget = ModerationBudget(f"redis://127.0.0.1:{free_port()}/0", key="t:none", requests_per_minute=600_000)
    with caplog.at_level(logging.WARNING, logger="streamguard.moderation._budget"), anyio.fail_after(5):
        await _take(budget, 20)
    await budget.aclose()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pacing locally" in warnings[0].getMessage()
    assert budget.stats.redis_errors >= 1
    assert budget.stats.local_acquires == 20
    assert budget.stats.outages == 1


async def test_blackholed_redis_is_bounded_by_the_timeout() -> None:
    """A Redis that accepts but never answers costs at most the timeout, then local pacing."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        budget = ModerationBudget(f"redis://127.0.0.1:{port}/0", key="t:hole", timeout=0.2, recheck=60)
        with anyio.fail_after(5):
            started = time.monotonic()
            await _take(budget, 5)
            elapsed = time.monotonic() - started
        await budget.aclose()
    assert elapsed < 1.0, elapsed
    assert budget.stats.local_acquires == 5
    assert budget.stats.redis_errors == 1  # one attempt, then local until the recheck


@pytest.mark.parametrize(
    "options",
    [
        {"requests_per_minute": 0},
        {"tokens_per_minute": float("inf")},
        {"headroom": 1.0},
        {"burst": 0},
        {"timeout": -1},
        {"key": ""},
    ],
)
def test_bad_options_raise_config_error(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ModerationBudget("redis://127.0.0.1:1/0", **options)  # type: ignore[arg-type]


def _workers(base_url: str, redis_url: str | None, *, processes: int, calls: int) -> list[dict[str, object]]:
    """Run ``processes`` moderating processes at once against ``base_url``; their counters."""
    options = {"base_url": base_url, "redis_url": redis_url, "calls": calls, "concurrency": 4}
    running = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.integration._budget_worker", json.dumps(options)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    results = []
    for process in running:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        results.append(json.loads(out))
    return results


def test_two_processes_share_one_budget_and_stay_under_the_limit(redis_server: RedisServer) -> None:
    """20 requests/s allowed: two processes pacing through Redis get no 429; pacing apart, they get 429s."""
    limit = RateLimitedModeration(requests=20, window=1.0)
    with LoopbackUpstream(moderation=limit) as upstream:
        shared = _workers(upstream.base_url, redis_server.url, processes=2, calls=40)
        shared_429, shared_ok = limit.rejected, limit.accepted
        limit.accepted = limit.rejected = 0
        time.sleep(1.0)  # a fresh window
        apart = _workers(upstream.base_url, None, processes=2, calls=40)
        apart_429 = limit.rejected
    assert all(r["errors"] == 0 for r in shared), shared
    assert shared_ok == 80
    assert shared_429 <= 0.01 * (shared_ok + shared_429), (shared_429, shared)
    assert all(r["budget"]["redis_errors"] == 0 for r in shared)  # type: ignore[index]
    assert apart_429 > 0, apart


async def test_redis_stopped_mid_run_moderation_goes_on(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis dies while two moderators share it: every call still gets its verdict, with one warning each."""
    limit = RateLimitedModeration(requests=200, window=1.0)
    with LoopbackUpstream(moderation=limit) as upstream:
        async with AsyncOpenAI(api_key="test", base_url=upstream.base_url, max_retries=0) as client:
            moderators = [
                OpenAIModerator(client, max_batch=1, max_wait=0.0, redis_url=redis_server.url) for _ in range(2)
            ]
            verdicts = 0

            async def work(moderator: OpenAIModerator, n: int) -> None:
                nonlocal verdicts
                for i in range(n):
                    answer = await moderator.moderate([f"text {i}"])
                    verdicts += len(answer)
                    await anyio.sleep(0.01)

            with caplog.at_level(logging.WARNING, logger="streamguard.moderation._budget"), anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for moderator in moderators:
                        tg.start_soon(work, moderator, 60)
                    await anyio.sleep(0.2)
                    await anyio.to_thread.run_sync(redis_server.stop)
            for moderator in moderators:
                assert moderator.budget is not None
                await moderator.budget.aclose()
    assert verdicts == 120
    stats = [m.budget.stats for m in moderators if m.budget is not None]
    assert all(s.acquired == 60 and s.redis_errors >= 1 and s.local_acquires > 0 for s in stats), stats
    assert all(s.outages == 1 for s in stats), stats
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("pacing locally" in w for w in warnings), warnings


async def test_windows_waiting_for_the_budget_go_out_as_one_batch(
    redis_server: RedisServer, upstream: LoopbackUpstream
) -> None:
    """30 windows arriving while the budget is spent wait as groups: a few requests, not 30."""
    async with AsyncOpenAI(api_key="test", base_url=upstream.base_url, max_retries=0) as client:
        moderator = OpenAIModerator(client, redis_url=redis_server.url, requests_per_minute=120)  # 1.8/s
        verdicts: list[int] = []

        async def window(i: int) -> None:
            verdicts.append(len(await moderator.moderate([f"window {i}"])))

        with anyio.fail_after(20):
            await moderator.moderate(["first"])  # takes the bucket's only request
            async with anyio.create_task_group() as tg:
                for i in range(30):
                    tg.start_soon(window, i)
        assert moderator.budget is not None
        await moderator.budget.aclose()
    assert verdicts == [1] * 30
    assert 2 <= moderator.stats.requests <= 4, moderator.stats
    assert upstream.count("/v1/moderations") == moderator.stats.requests
