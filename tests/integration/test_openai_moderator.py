"""OpenAIModerator through the real openai client, over real HTTP to a loopback server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import anyio
import openai
import pytest

from streamguard.exceptions import ConfigError, ModerationError
from streamguard.moderation import OpenAIModerator, Verdict
from streamguard.policy import Policy
from streamguard.testing.upstream import LoopbackUpstream, Reply, keyword_moderation

PATH = "/v1/moderations"


@pytest.fixture
def upstream() -> Iterator[LoopbackUpstream]:
    with LoopbackUpstream(moderation=keyword_moderation(["kill"])) as server:
        yield server


@pytest.fixture
async def client(upstream: LoopbackUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(api_key="test", base_url=upstream.base_url) as c:
        yield c


def result(categories: Mapping[str, bool], scores: Mapping[str, float]) -> dict[str, Any]:
    return {
        "flagged": any(categories.values()),
        "categories": dict(categories),
        "category_scores": dict(scores),
        "category_applied_input_types": {k: ["text"] for k in categories},
    }


def ok_body(n: int) -> dict[str, Any]:
    return {"id": "modr-1", "model": "m", "results": [result({"hate": False}, {"hate": 0.0})] * n}


def inputs(body: dict[str, Any]) -> list[str]:
    value = body.get("input", [])
    return [value] if isinstance(value, str) else list(value)


class Scripted:
    """A moderation handler that plays replies in turn (the last one repeats), timing requests."""

    def __init__(self, *replies: Reply | None) -> None:
        self.replies = replies
        self.times: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.times.append(time.monotonic())
            reply = self.replies[min(len(self.times), len(self.replies)) - 1]
        return reply or Reply(ok_body(len(inputs(body))))


async def test_concurrent_calls_share_requests_and_map_back(
    upstream: LoopbackUpstream, client: openai.AsyncOpenAI
) -> None:
    """100 concurrent callers make far fewer requests, and each gets the verdict of its own text."""
    moderator = OpenAIModerator(client, max_batch=32, max_wait=0.02)
    texts = [f"window {i}: " + ("they will kill" if i % 7 in (0, 3) else "all calm") for i in range(100)]
    verdicts: dict[int, list[Verdict]] = {}

    async def call(i: int) -> None:
        verdicts[i] = await moderator.moderate([texts[i]])

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(call, i)
    for i, text in enumerate(texts):
        assert [v.flagged for v in verdicts[i]] == ["kill" in text], i
        assert verdicts[i][0].categories["violence"] is ("kill" in text)
    requests = upstream.count(PATH)
    assert requests <= 10
    sent = [text for path, body in upstream.requests if path == PATH for text in inputs(body)]
    assert sorted(sent) == sorted(texts)
    stats = moderator.stats
    assert (stats.calls, stats.texts, stats.requests) == (100, 100, requests)
    assert stats.moderated_chars == sum(map(len, texts))


async def test_one_caller_with_many_texts_keeps_order(client: openai.AsyncOpenAI) -> None:
    """A single call with several texts gets its verdicts in input order."""
    moderator = OpenAIModerator(client)
    with anyio.fail_after(10):
        verdicts = await moderator.moderate(["calm", "kill", "calm again", "Kill it"])
    assert [v.flagged for v in verdicts] == [False, True, False, True]


async def test_category_names_with_slashes_are_kept(upstream: LoopbackUpstream, client: openai.AsyncOpenAI) -> None:
    """The endpoint's category names reach the verdict and the policy unchanged."""
    categories = {"self-harm/intent": True, "illicit/violent": False, "harassment/threatening": False}
    scores = {"self-harm/intent": 0.91, "illicit/violent": 0.2, "harassment/threatening": 0.01}
    upstream.moderation = lambda body: Reply(
        {"id": "modr-1", "model": "m", "results": [result(categories, scores)] * len(inputs(body))}
    )
    with anyio.fail_after(10):
        [verdict] = await OpenAIModerator(client).moderate(["text"])
    assert verdict == Verdict(flagged=True, categories=categories, scores=scores)
    decision = Policy().judge(verdict)
    assert decision is not None and decision.category == "self-harm/intent"
    tuned = Policy(thresholds={"illicit/violent": 0.1}, ignore_categories=frozenset({"self-harm/intent"}))
    decision = tuned.judge(verdict)
    assert decision is not None and (decision.category, decision.score) == ("illicit/violent", 0.2)


@pytest.mark.parametrize(
    ("headers", "min_gap"),
    [({"retry-after": "1"}, 0.9), ({"retry-after-ms": "300"}, 0.25)],
)
async def test_429_is_retried_after_the_requested_delay(
    upstream: LoopbackUpstream, client: openai.AsyncOpenAI, headers: dict[str, str], min_gap: float
) -> None:
    """A 429 with Retry-After is retried once the server's delay has passed, then succeeds."""
    handler = Scripted(Reply({"error": {"message": "slow down"}}, status=429, headers=headers), None)
    upstream.moderation = handler
    moderator = OpenAIModerator(client, backoff=0.0)
    with anyio.fail_after(10):
        verdicts = await moderator.moderate(["hello"])
    assert [v.flagged for v in verdicts] == [False]
    assert upstream.count(PATH) == 2
    assert handler.times[1] - handler.times[0] >= min_gap
    assert moderator.stats.retries == 1


async def test_5xx_exhausts_retries_then_raises_moderation_error(
    upstream: LoopbackUpstream, client: openai.AsyncOpenAI
) -> None:
    """A persistent 500 is tried 1 + max_retries times (the client's own retries are off)."""
    upstream.moderation = Scripted(Reply({"error": {"message": "down"}}, status=500))
    moderator = OpenAIModerator(client, max_retries=2, backoff=0.01)
    with anyio.fail_after(10), pytest.raises(ModerationError) as info:
        await moderator.moderate(["hello"])
    assert isinstance(info.value.__cause__, openai.InternalServerError)
    assert upstream.count(PATH) == 3


async def test_client_error_is_not_retried(upstream: LoopbackUpstream, client: openai.AsyncOpenAI) -> None:
    """A 400 fails at once with ModerationError from the client's error."""
    upstream.moderation = Scripted(Reply({"error": {"message": "bad"}}, status=400))
    with anyio.fail_after(10), pytest.raises(ModerationError) as info:
        await OpenAIModerator(client, backoff=0.01).moderate(["hello"])
    assert isinstance(info.value.__cause__, openai.BadRequestError)
    assert upstream.count(PATH) == 1


async def test_failure_reaches_every_caller_of_the_batch(
    upstream: LoopbackUpstream, client: openai.AsyncOpenAI
) -> None:
    """When a batched request fails, each concurrent caller gets ModerationError."""
    upstream.moderation = Scripted(Reply({"error": {"message": "down"}}, status=503))
    moderator = OpenAIModerator(client, max_retries=0, max_wait=0.05)
    errors: list[BaseException] = []

    async def call(i: int) -> None:
        try:
            await moderator.moderate([f"text {i}"])
        except ModerationError as exc:
            errors.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(call, i)
    assert len(errors) == 5
    assert upstream.count(PATH) == 1


async def test_wrong_result_count_raises(upstream: LoopbackUpstream, client: openai.AsyncOpenAI) -> None:
    """A response with fewer results than inputs is a ModerationError, not a misattributed verdict."""
    upstream.moderation = lambda body: Reply(ok_body(len(inputs(body)) - 1))
    with anyio.fail_after(10), pytest.raises(ModerationError, match="1 results for 2 inputs"):
        await OpenAIModerator(client).moderate(["a", "b"])
    assert upstream.count(PATH) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"id": "modr-1", "model": "m", "results": [{"flagged": True, "categories": "yes"}]},
        {"id": "modr-1", "model": "m", "results": None},
        {"id": "modr-1", "model": "m", "results": [{**result({"hate": True}, {"hate": 0.9}), "flagged": None}]},
        {"id": "modr-1", "model": "m", "results": [result({"hate": "true"}, {"hate": 0.9})]},  # type: ignore[dict-item]
        {"id": "modr-1", "model": "m", "results": [result({"hate": True}, {"hate": "high"})]},  # type: ignore[dict-item]
    ],
)
async def test_malformed_response_raises(
    upstream: LoopbackUpstream, client: openai.AsyncOpenAI, body: dict[str, Any]
) -> None:
    """A 200 whose results cannot be read is a ModerationError, not a crash elsewhere."""
    upstream.moderation = lambda _: Reply(body)
    with anyio.fail_after(10), pytest.raises(ModerationError, match="malformed"):
        await OpenAIModerator(client).moderate(["a"])


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "0.2s"},
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "200ms"},
    ],
)
async def test_exhausted_rate_limit_delays_the_next_request(
    upstream: LoopbackUpstream, client: openai.AsyncOpenAI, headers: dict[str, str]
) -> None:
    """Headers saying the budget is used up until a reset make the next request wait for it."""
    handler = Scripted(Reply(ok_body(1), headers=headers), Reply(ok_body(1)))
    upstream.moderation = handler
    moderator = OpenAIModerator(client)
    with anyio.fail_after(10):
        await moderator.moderate(["first"])
        await moderator.moderate(["second"])
    assert len(handler.times) == 2
    assert handler.times[1] - handler.times[0] >= 0.15
    assert moderator.stats.paced_seconds > 0
    assert moderator.stats.retries == 0


async def test_plenty_of_budget_does_not_pace(upstream: LoopbackUpstream, client: openai.AsyncOpenAI) -> None:
    """With budget left, consecutive requests are sent without waiting for the reset."""
    headers = {
        "x-ratelimit-remaining-tokens": "100000",
        "x-ratelimit-reset-tokens": "6m0s",
        "x-ratelimit-remaining-requests": "500",
        "x-ratelimit-reset-requests": "1m",
    }
    upstream.moderation = Scripted(Reply(ok_body(1), headers=headers))
    moderator = OpenAIModerator(client)
    with anyio.fail_after(10):
        for _ in range(3):
            await moderator.moderate(["hello"])
    assert moderator.stats.paced_seconds == 0
    assert upstream.count(PATH) == 3


async def test_hanging_endpoint_is_bounded_by_the_timeout(
    upstream: LoopbackUpstream, client: openai.AsyncOpenAI
) -> None:
    """A request that never answers ends in ModerationError from the client's timeout."""
    upstream.moderation = Scripted(Reply(ok_body(1), delay=2.0))
    moderator = OpenAIModerator(client, timeout=0.2, max_retries=1, backoff=0.01)
    start = time.monotonic()
    with anyio.fail_after(10), pytest.raises(ModerationError, match="timed out") as info:
        await moderator.moderate(["hello"])
    assert isinstance(info.value.__cause__, openai.APITimeoutError)
    assert time.monotonic() - start < 2.0
    assert upstream.count(PATH) == 2


async def test_unreachable_endpoint_raises_after_retries() -> None:
    """Connection errors are retried, then raised as ModerationError."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    async with openai.AsyncOpenAI(api_key="test", base_url=f"http://127.0.0.1:{port}/v1") as client:
        moderator = OpenAIModerator(client, max_retries=2, backoff=0.01)
        with anyio.fail_after(10), pytest.raises(ModerationError, match="could not connect") as info:
            await moderator.moderate(["hello"])
    assert isinstance(info.value.__cause__, openai.APIConnectionError)
    assert moderator.stats.requests == 3


@pytest.mark.parametrize("options", [{"max_retries": -1}, {"timeout": 0}, {"max_batch": 0}])
def test_bad_options_raise_config_error(options: dict[str, Any]) -> None:
    """Out-of-range options are rejected at construction."""
    client = openai.AsyncOpenAI(api_key="test", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError):
        OpenAIModerator(client, **options)
