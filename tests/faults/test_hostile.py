"""Hostile requests to the proxy over real HTTP: no key echoed, no redirect, bounded input, timing-safe keys.

The proxy runs in uvicorn on 127.0.0.1 in front of a loopback upstream; a second loopback server
is a decoy that a request tries to redirect the proxy to, and must see nothing.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import anyio
import httpx2
import pytest
from openai import AsyncOpenAI

from streamguard.integrations.proxy import ProxyConfig, create_app
from streamguard.testing.upstream import LoopbackUpstream, Reply, Script, keyword_moderation, text_chunks
from tests.integration._servers import serve_in_thread

SECRET = "sk-proxy-held-SECRET-7f3a9c"
CALLER = "sk-caller-passthrough-SECRET-42b1"
CLIENT_KEY = "client-key-SECRET-91d0"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]
WORDS = ["Once", " upon", " a", " time", " there", " was", " a", " calm", " river", "."]
ERROR_KEYS = {"message", "type", "param", "code"}

Start = Callable[..., str]


@contextmanager
def serve_logging(app: Any) -> Iterator[str]:
    """Like ``serve_in_thread``, but uvicorn logs at DEBUG (access log on) to loggers that propagate."""
    with serve_in_thread(app, log_level="debug", log_config=None, access_log=True) as url:
        yield url


@pytest.fixture
def start_proxy() -> Iterator[Start]:
    """Start a proxy on loopback; returns its ``/v1`` base URL. Stopped after the test."""
    with ExitStack() as stack:

        def start(**config: Any) -> str:
            return stack.enter_context(serve_in_thread(create_app(ProxyConfig(**config)))) + "/v1"

        yield start


@pytest.fixture
def decoy() -> Iterator[LoopbackUpstream]:
    """Another OpenAI-compatible server on loopback, which no request may reach."""
    with LoopbackUpstream() as server:
        yield server


def openai_shaped(response: httpx2.Response) -> dict[str, Any]:
    """The response's error object, after checking it has OpenAI's shape."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    error: dict[str, Any] = body["error"]
    return error


@pytest.mark.parametrize("held", [True, False], ids=["proxy-held-key", "pass-through-key"])
async def test_no_key_in_any_response_or_log(
    upstream: LoopbackUpstream, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, held: bool
) -> None:
    """Whatever happens (success, cut-off, errors before and during the stream), no key reaches a response or a log.

    The upstream's error messages quote the proxy-held key (as a careless upstream might).
    """
    for name in ("uvicorn", "uvicorn.access", "uvicorn.error"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)  # uvicorn's default config stops it
    caplog.set_level(logging.DEBUG, logger="streamguard")
    caplog.set_level(logging.DEBUG, logger="uvicorn")
    upstream.moderation = keyword_moderation(["attack"])
    config: dict[str, Any] = {"upstream": upstream.base_url, "moderator": "openai", "max_body_bytes": 4096}
    if held:
        config |= {"upstream_api_key": SECRET, "client_keys": frozenset({CLIENT_KEY})}
    caller = CLIENT_KEY if held else CALLER
    secrets = [SECRET, CLIENT_KEY] if held else [CALLER]
    replies: list[Script | Reply] = [
        Script(text_chunks(WORDS)),
        Script(text_chunks([*WORDS, " attack", *WORDS[1:]])),
        Script(text_chunks(WORDS), drop_after=4),
        Script([*text_chunks(WORDS)[:4], {"error": {"message": f"bad key {SECRET}", "type": "x"}}]),
        Reply({"error": {"message": f"Incorrect API key provided: {SECRET}", "type": "invalid_request_error"}}, 401),
        Reply({"error": {"message": f"upstream broke near {SECRET}", "type": "server_error"}}, 500),
    ]
    scripts = iter(replies)
    upstream.chat = lambda body: next(scripts, Script(text_chunks(WORDS)))
    responses: list[httpx2.Response] = []
    with serve_logging(create_app(ProxyConfig(**config))) as base, anyio.fail_after(20):
        url = base + "/v1"
        async with httpx2.AsyncClient(timeout=10) as http:
            auth = {"authorization": f"Bearer {caller}"}
            stream_body = {"model": "m", "messages": MESSAGES, "stream": True}
            for _ in range(4):  # clean, cut off, dropped mid-stream, error event mid-stream
                responses.append(await http.post(url + "/chat/completions", json=stream_body, headers=auth))
            for _ in range(2):  # upstream 401 and 500 before the stream
                responses.append(await http.post(url + "/chat/completions", json=stream_body, headers=auth))
            responses.append(await http.get(url + "/models", headers=auth))
            responses.append(await http.post(url + "/chat/completions", content=b"{nope", headers=auth))
            responses.append(await http.post(url + "/chat/completions", json={"messages": ["x" * 5000]}, headers=auth))
            responses.append(await http.get(base + "/metrics"))
            for wrong in (f"Bearer {CALLER}x", f"Basic {caller}", caller):
                responses.append(
                    await http.post(url + "/chat/completions", json=stream_body, headers={"authorization": wrong})
                )
    assert upstream.count("/v1/chat/completions") == (6 if held else 9)  # without client keys, no 401s
    assert "data: [DONE]" in responses[0].text and "content_filter" in responses[1].text
    for r in responses:
        for secret in secrets:
            assert secret not in r.text, (r.status_code, r.text)
            assert all(secret not in v for v in r.headers.values())
    records = [r for r in caplog.records if r.name.startswith(("streamguard", "uvicorn"))]
    assert any(r.name.startswith("uvicorn.access") for r in records)  # the capture does see uvicorn
    assert any(r.name.startswith("streamguard") for r in records)
    for record in records:
        line = record.getMessage() + (record.exc_text or "")
        for secret in secrets:
            assert secret not in line, (record.name, line)


REDIRECTS: list[tuple[str, dict[str, Any], dict[str, str], str]] = [
    ("base_url", {"base_url": "{decoy}"}, {}, ""),
    ("api_base", {"api_base": "{decoy}", "api_host": "{decoy}", "endpoint": "{decoy}/chat/completions"}, {}, ""),
    ("model-url", {"model": "{decoy}/chat/completions"}, {}, ""),
    ("host-header", {}, {"host": "{host}", "x-forwarded-host": "{host}", "forwarded": "host={host}"}, ""),
    ("query", {}, {}, "?base_url={decoy}&api_base={decoy}"),
]


@pytest.mark.parametrize(("extra", "headers", "query"), [r[1:] for r in REDIRECTS], ids=[r[0] for r in REDIRECTS])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "complete"])
async def test_request_cannot_redirect_upstream(
    upstream: LoopbackUpstream,
    decoy: LoopbackUpstream,
    start_proxy: Start,
    extra: dict[str, Any],
    headers: dict[str, str],
    query: str,
    stream: bool,
) -> None:
    """A body field, model name, query or Host header naming another server still goes to the configured upstream."""
    upstream.moderation = keyword_moderation(["attack"])
    host = decoy.base_url.removeprefix("http://").removesuffix("/v1")

    def fill(value: str) -> str:
        return value.replace("{decoy}", decoy.base_url).replace("{host}", host)

    url = start_proxy(upstream=upstream.base_url, moderator="openai", upstream_api_key="k")
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": stream} | {k: fill(v) for k, v in extra.items()}
    if not stream:
        upstream.chat = lambda body: Reply(
            {
                "id": "c",
                "object": "chat.completion",
                "created": 1,
                "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi."}, "finish_reason": "stop"}],
            }
        )
    with anyio.fail_after(10):
        async with httpx2.AsyncClient(timeout=10) as http:
            r = await http.post(
                url + "/chat/completions" + fill(query), json=body, headers={k: fill(v) for k, v in headers.items()}
            )
    assert r.status_code == 200, r.text
    assert ("data: [DONE]" in r.text) if stream else (r.json()["choices"][0]["message"]["content"] == "Hi.")
    chats = [b for p, b in upstream.requests if p == "/v1/chat/completions"]
    assert len(chats) == 1 and all(chats[0][k] == fill(v) for k, v in extra.items())  # arrived, as sent
    assert upstream.count("/v1/moderations") >= 1
    assert decoy.requests == [] and decoy.started == 0


async def parts(data: bytes) -> AsyncIterator[bytes]:
    """``data`` in 4 KiB pieces, sent chunked (no content-length)."""
    for i in range(0, len(data), 4096):
        yield data[i : i + 4096]


async def test_oversize_body_and_too_many_messages(upstream: LoopbackUpstream, start_proxy: Start) -> None:
    """An oversize body is a 413 and too many messages a 400, both in OpenAI's error shape; neither goes upstream."""
    url = start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["x"], max_body_bytes=64 * 1024)
    too_long = {"model": "m", "messages": [{"role": "user", "content": "y" * 100_000}], "stream": True}
    messages = [{"role": "user", "content": "hi"}] * 2049
    many = {"model": "m", "messages": messages, "stream": True}
    with anyio.fail_after(10):
        async with httpx2.AsyncClient(timeout=10) as http:
            big = await http.post(url + "/chat/completions", json=too_long)
            chunked = await http.post(url + "/chat/completions", content=parts(json.dumps(too_long).encode()))
            crowded = await http.post(url + "/chat/completions", json=many)
            assert upstream.requests == []
            at_limit = await http.post(url + "/chat/completions", json=many | {"messages": messages[:2048]})
    assert big.status_code == 413 and openai_shaped(big)["type"] == "invalid_request_error"
    assert chunked.status_code == 413 and openai_shaped(chunked)["code"] == "request_too_large"
    assert crowded.status_code == 400
    error = openai_shaped(crowded)
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"
    assert "2048" in error["message"] and error["code"] == "array_above_max_length"
    assert at_limit.status_code == 200 and upstream.count("/v1/chat/completions") == 1


async def test_max_messages_is_configurable(upstream: LoopbackUpstream, start_proxy: Start) -> None:
    """ProxyConfig.max_messages sets the limit; the openai client sees a BadRequestError."""
    import openai

    url = start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["x"], max_messages=3)
    with anyio.fail_after(10):
        async with AsyncOpenAI(api_key="k", base_url=url, max_retries=0, timeout=10) as c:
            with pytest.raises(openai.BadRequestError) as caught:
                await c.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}] * 4, stream=True
                )
            stream = await c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}] * 3, stream=True
            )
            text = "".join([ch.delta.content or "" async for chunk in stream for ch in chunk.choices])
    assert caught.value.param == "messages"
    assert text == "Hello world."
    assert upstream.count("/v1/chat/completions") == 1


async def test_client_keys_are_compared_in_constant_time(
    upstream: LoopbackUpstream, start_proxy: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every configured key is compared with hmac.compare_digest, for right and wrong keys alike."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    keys = {"key-one", "key-two", "key-three"}
    url = start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["x"], client_keys=frozenset(keys))
    statuses: list[int] = []
    with anyio.fail_after(10):
        async with httpx2.AsyncClient(timeout=10) as http:
            for presented in ("key-two", "key-twx", "key-two-and-more", ""):
                calls.clear()
                r = await http.get(url + "/models", headers={"authorization": f"Bearer {presented}".strip()})
                statuses.append(r.status_code)
                assert sorted(b for _, b in calls) == sorted(k.encode() for k in keys)  # no early exit
                assert {a for a, _ in calls} == {presented.encode()}
    assert statuses == [200, 401, 401, 401]


@pytest.mark.parametrize("moderator", ["keyword", "slow-openai"])
async def test_client_disconnect_mid_stream_closes_upstream_within_a_second(
    upstream: LoopbackUpstream, start_proxy: Start, moderator: str
) -> None:
    """A client that leaves mid-stream (even with moderation in flight) has upstream closed within a second."""
    upstream.chat = lambda body: Script(text_chunks([" word"] * 5000), delay=0.005)
    if moderator == "keyword":
        url = start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["attack"])
    else:
        slow = keyword_moderation(["attack"])
        upstream.moderation = lambda body: Reply(slow(body).body, delay=0.3)
        url = start_proxy(upstream=upstream.base_url, moderator="openai", upstream_api_key="k")
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    with anyio.fail_after(10):
        async with httpx2.AsyncClient(timeout=10) as http:
            async with http.stream("POST", url + "/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if '"content":" word"' in line:
                        break
        # The connection is closed here: the client has left.
    with anyio.fail_after(2):
        assert await upstream.await_ended(1, 1.0)
    assert upstream.aborted == 1 and upstream.completed == 0


async def test_pass_through_key_echoed_by_upstream_is_not_logged(
    upstream: LoopbackUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream error event quoting the caller's own key reaches neither a log line nor the response."""
    caplog.set_level(logging.DEBUG, logger="streamguard")
    error = {"error": {"message": f"Incorrect API key provided: {CALLER}", "type": "invalid_request_error"}}
    upstream.chat = lambda body: Script([*text_chunks(["Hello", " there"])[:2], error])
    app = create_app(ProxyConfig(upstream=upstream.base_url, moderator="keyword", keywords=["x"]))
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    with serve_in_thread(app) as base, anyio.fail_after(10):
        async with httpx2.AsyncClient(timeout=10) as http:
            response = await http.post(
                base + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {CALLER}"}
            )
    assert response.status_code == 200
    assert CALLER not in response.text
    assert '"error"' in response.text  # the error event itself still reaches the caller, masked
    records = [r for r in caplog.records if r.name.startswith("streamguard")]
    assert records  # the failure was logged, just without the key
    for record in records:
        line = record.getMessage() + (record.exc_text or "")
        assert CALLER not in line, (record.name, line)
