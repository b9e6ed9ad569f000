"""The proxy's ``/metrics``: Prometheus text, fed by real traffic through the proxy, one registry per app."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import anyio
import httpx2
import openai
import prometheus_client
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from streamguard import Policy
from streamguard.integrations.proxy import ProxyConfig, create_app
from streamguard.testing.upstream import LoopbackUpstream, Reply, Script, keyword_moderation, text_chunks
from tests.integration._servers import serve_in_thread

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story."}]
CLEAN = "A calm answer about gardens and rivers and the long light of summer evenings, told slowly."
STORY = (
    "Once upon a time a careful engineer wrote a library that watched every word. "
    "Then one day the model said that it would attack the castle at dawn, "
    "and the library stopped it before anyone could read the plan. The end came quietly."
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def words(text: str) -> list[str]:
    parts = text.split(" ")
    return [parts[0]] + [" " + p for p in parts[1:]]


def completion(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` that carry ``labels`` (and any others, e.g. route and moderator); 0
    when there is none (yet)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


@pytest.fixture
def start_proxy() -> Iterator[Any]:
    """Start a proxy app on loopback; returns its origin. Stopped after the test."""
    with ExitStack() as stack:

        def start(**config: Any) -> str:
            return stack.enter_context(serve_in_thread(create_app(ProxyConfig(**config))))

        yield start


@pytest.fixture
def keyword_proxy(upstream: LoopbackUpstream, start_proxy: Any) -> str:
    return str(start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["attack"]))


async def scrape(origin: str) -> Samples:
    """GET /metrics, checked to be Prometheus' text format, as {(sample name, labels): value}."""
    async with httpx2.AsyncClient(timeout=10) as http:
        r = await http.get(origin + "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


async def stream_text(origin: str, **options: Any) -> str:
    async with AsyncOpenAI(api_key="k", base_url=origin + "/v1", max_retries=0, timeout=10) as c:
        stream = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True, **options)
        return "".join([ch.delta.content or "" async for x in stream for ch in x.choices])


async def test_fresh_app_exposes_zeroes(keyword_proxy: str) -> None:
    """Before any traffic the histogram and error counter exist at zero, with HELP text."""
    with anyio.fail_after(10):
        samples = await scrape(keyword_proxy)
    assert value(samples, "streamguard_moderation_latency_seconds_count") == 0
    assert value(samples, "streamguard_moderation_errors_total") == 0
    assert not any(name == "streamguard_streams_total" for name, _ in samples)


async def test_streams_flags_and_latency(upstream: LoopbackUpstream, keyword_proxy: str) -> None:
    """A clean and a cut stream are counted by outcome; the flag by category; every window's latency."""
    with anyio.fail_after(10):
        upstream.chat = lambda body: Script(text_chunks(words(CLEAN)), delay=0.001)
        assert await stream_text(keyword_proxy) == CLEAN
        upstream.chat = lambda body: Script(text_chunks(words(STORY)), delay=0.001)
        assert "attack" not in await stream_text(keyword_proxy)
        samples = await scrape(keyword_proxy)
    assert value(samples, "streamguard_streams_total", outcome="completed") == 1
    assert value(samples, "streamguard_streams_total", outcome="content_filter") == 1
    flags = {"category": "keyword", "action": "cutoff", "source": "output"}
    assert value(samples, "streamguard_flags_total", **flags) == 1
    windows = value(samples, "streamguard_moderation_latency_seconds_count")
    assert windows >= 3  # the clean answer alone spans several windows
    assert value(samples, "streamguard_moderation_latency_seconds_bucket", le="+Inf") == windows
    assert value(samples, "streamguard_moderation_latency_seconds_sum") > 0
    assert value(samples, "streamguard_upstream_errors_total", kind="status", status="429") == 0


async def test_redact_and_non_streamed_flags(upstream: LoopbackUpstream, start_proxy: Any) -> None:
    """Redacted windows and flagged non-streamed answers count as flags with their action."""
    policy = Policy(action="redact", window_chars=48, first_window_chars=16)
    origin = start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["attack"], policy=policy)
    with anyio.fail_after(10):
        upstream.chat = lambda body: Script(text_chunks(words(STORY)), delay=0.001)
        assert "[redacted]" in await stream_text(origin)
        upstream.chat = lambda body: Reply(completion(STORY))
        async with AsyncOpenAI(api_key="k", base_url=origin + "/v1", max_retries=0, timeout=10) as c:
            answer = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        samples = await scrape(origin)
    assert answer.choices[0].finish_reason == "stop"  # redaction keeps upstream's, streamed or not
    assert "[redacted]" in (answer.choices[0].message.content or "")
    assert value(samples, "streamguard_flags_total", category="keyword", action="redact", source="output") == 2
    assert value(samples, "streamguard_streams_total", outcome="completed") == 1  # redaction is no cut-off


async def test_upstream_errors(upstream: LoopbackUpstream, keyword_proxy: str) -> None:
    """An upstream HTTP error, before a stream or for a plain request, and a mid-stream drop are counted."""
    error = {"error": {"message": "Slow down.", "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
    with anyio.fail_after(10):
        upstream.chat = lambda body: Reply(error, status=429)
        with pytest.raises(openai.RateLimitError):
            await stream_text(keyword_proxy)
        async with httpx2.AsyncClient(timeout=10) as http:
            r = await http.post(keyword_proxy + "/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
        assert r.status_code == 429
        upstream.chat = lambda body: Script(text_chunks(words(CLEAN)), delay=0.001, drop_after=6)
        with pytest.raises(openai.APIError, match="Could not reach the upstream server"):
            await stream_text(keyword_proxy)
        samples = await scrape(keyword_proxy)
    assert value(samples, "streamguard_upstream_errors_total", kind="status", status="429") == 2
    assert value(samples, "streamguard_upstream_errors_total", kind="connection", status="") == 1
    assert value(samples, "streamguard_streams_total", outcome="error") == 2  # the plain request is no stream
    assert value(samples, "streamguard_moderation_errors_total") == 0


async def test_moderation_error_is_not_an_upstream_error(upstream: LoopbackUpstream, start_proxy: Any) -> None:
    """A failing Moderation endpoint (fail closed) counts as a moderation error."""
    down = {"error": {"message": "down", "type": "server_error", "param": None, "code": None}}
    upstream.moderation = lambda body: Reply(down, status=500)
    upstream.chat = lambda body: Script(text_chunks(words(CLEAN)), delay=0.001)
    origin = start_proxy(upstream=upstream.base_url, moderator="openai")
    with anyio.fail_after(10):
        with pytest.raises(openai.APIError, match="Moderation failed"):
            await stream_text(origin)
        samples = await scrape(origin)
    assert value(samples, "streamguard_moderation_errors_total") == 1
    assert value(samples, "streamguard_streams_total", outcome="error") == 1
    assert not any(name == "streamguard_upstream_errors_total" for name, _ in samples)


async def test_client_disconnect_is_counted(upstream: LoopbackUpstream, keyword_proxy: str) -> None:
    """A client that leaves early is counted as a disconnected stream once the proxy has closed it."""
    upstream.chat = lambda body: Script(text_chunks(words(CLEAN * 200)), delay=0.005)
    with anyio.fail_after(10):
        async with AsyncOpenAI(api_key="k", base_url=keyword_proxy + "/v1", max_retries=0, timeout=10) as c:
            stream = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
            async for _ in stream:
                break
            await stream.close()
        assert await upstream.await_ended(1)
        for _ in range(500):  # on_end runs in the server thread just after upstream is closed: poll
            samples = await scrape(keyword_proxy)
            if value(samples, "streamguard_streams_total", outcome="disconnected"):
                break
            await anyio.sleep(0.01)
    assert value(samples, "streamguard_streams_total", outcome="disconnected") == 1
    assert value(samples, "streamguard_streams_total", outcome="completed") == 0


async def test_openai_moderator_latency_is_observed(upstream: LoopbackUpstream, start_proxy: Any) -> None:
    """Moderation calls over HTTP land in the histogram's buckets: none faster than the endpoint's delay."""
    flagging = keyword_moderation(["attack"])
    upstream.moderation = lambda body: dataclasses.replace(flagging(body), delay=0.03)
    upstream.chat = lambda body: Script(text_chunks(words(STORY)), delay=0.001)
    origin = start_proxy(upstream=upstream.base_url, moderator="openai")
    with anyio.fail_after(10):
        assert "attack" not in await stream_text(origin)
        samples = await scrape(origin)
    calls = value(samples, "streamguard_moderation_latency_seconds_count")
    assert calls >= 1
    assert value(samples, "streamguard_moderation_latency_seconds_bucket", le="0.025") == 0
    assert value(samples, "streamguard_flags_total", category="violence", action="cutoff", source="output") == 1


async def test_registries_are_per_app(upstream: LoopbackUpstream, start_proxy: Any) -> None:
    """Two apps count separately, and nothing lands in prometheus_client's global registry."""
    first = start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["attack"])
    second = start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["attack"])
    with anyio.fail_after(10):
        assert await stream_text(first) == "Hello world."
        one, two = await scrape(first), await scrape(second)
    assert value(one, "streamguard_streams_total", outcome="completed") == 1
    assert value(two, "streamguard_streams_total", outcome="completed") == 0
    assert value(two, "streamguard_moderation_latency_seconds_count") == 0
    assert prometheus_client.REGISTRY.get_sample_value("streamguard_moderation_latency_seconds_count") is None
