"""The moderating proxy over real HTTP: the real ``openai`` client -> proxy (uvicorn) -> loopback upstream."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from typing import Any

import anyio
import httpx2
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from streamguard import Policy
from streamguard.integrations.proxy import ProxyConfig, create_app
from streamguard.testing.upstream import LoopbackUpstream, Reply, Script, keyword_moderation, text_chunks
from tests.integration._servers import recording_upstream, serve_in_thread

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story."}]
CLEAN = "A calm answer about gardens and rivers and the long light of summer evenings, told slowly."
STORY = (
    "Once upon a time a careful engineer wrote a library that watched every word. "
    "Then one day the model said that it would attack the castle at dawn, "
    "and the library stopped it before anyone could read the plan. The end came quietly."
)
USAGE = {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52}
SECRET = "sk-upstream-SECRET-0123456789"

Start = Callable[..., str]


def words(text: str) -> list[str]:
    parts = text.split(" ")
    return [parts[0]] + [" " + p for p in parts[1:]]


def completion(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
        "provider_field": {"kept": True},
    }


@pytest.fixture
def start_proxy() -> Iterator[Start]:
    """Start a proxy app on loopback; returns its ``/v1`` base URL. Stopped after the test."""
    with ExitStack() as stack:

        def start(**config: Any) -> str:
            return stack.enter_context(serve_in_thread(create_app(ProxyConfig(**config)))) + "/v1"

        yield start


@pytest.fixture
def keyword_proxy(upstream: LoopbackUpstream, start_proxy: Start) -> str:
    return start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["attack"])


@pytest.fixture
async def proxied(keyword_proxy: str) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(api_key="client-key", base_url=keyword_proxy, max_retries=0, timeout=10) as c:
        yield c


async def test_clean_stream_passes_through_with_unknown_fields(
    upstream: LoopbackUpstream, proxied: AsyncOpenAI
) -> None:
    """A clean stream arrives unchanged, usage included; the request body reaches upstream intact."""
    events = text_chunks(words(CLEAN), usage=USAGE)
    upstream.chat = lambda body: Script(events, delay=0.001)
    with anyio.fail_after(10):
        stream = await proxied.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"provider_option": {"depth": 3}},
        )
        chunks = [c async for c in stream]
    assert [json.loads(c.to_json(indent=None)) for c in chunks] == events
    path, body = upstream.requests[-1]
    assert path == "/v1/chat/completions"
    assert body["provider_option"] == {"depth": 3} and body["stream_options"] == {"include_usage": True}


async def test_stream_cutoff_ends_with_content_filter(upstream: LoopbackUpstream, proxied: AsyncOpenAI) -> None:
    """A flagged stream is cut with content_filter, the flagged text never arrives, upstream is closed."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY + " More words follow." * 300)), delay=0.002)
    with anyio.fail_after(10):
        stream = await proxied.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        assert await upstream.await_ended(1)
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert "attack" not in text and STORY.startswith(text) and text.startswith("Once upon a time")
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["content_filter"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # asked for, so estimated after the cut
    assert upstream.aborted == 1


async def test_stream_without_usage_request_sends_no_usage_chunk(
    upstream: LoopbackUpstream, proxied: AsyncOpenAI
) -> None:
    """Without stream_options.include_usage no usage chunk is added, as with OpenAI."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY)), delay=0.001)
    with anyio.fail_after(10):
        stream = await proxied.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "content_filter"


async def test_stream_redact(upstream: LoopbackUpstream, start_proxy: Start) -> None:
    """In redact mode the flagged window is replaced and the rest of the answer still arrives."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY)), delay=0.001)
    policy = Policy(action="redact", redaction="[…]", window_chars=48, first_window_chars=16)
    url = start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["attack"], policy=policy)
    with anyio.fail_after(10):
        async with AsyncOpenAI(api_key="k", base_url=url, max_retries=0, timeout=10) as c:
            stream = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
            chunks = [x async for x in stream]
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert "[…]" in text and "attack" not in text
    assert text.startswith("Once upon a time") and text.endswith("The end came quietly.")
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_openai_moderator_uses_upstream_moderations(upstream: LoopbackUpstream, start_proxy: Start) -> None:
    """The openai moderator calls the upstream's /moderations with the caller's key and cuts on its flag."""
    upstream.moderation = keyword_moderation(["attack"])
    upstream.chat = lambda body: Script(text_chunks(words(STORY)), delay=0.001)
    url = start_proxy(upstream=upstream.base_url, moderator="openai")
    with anyio.fail_after(10):
        async with AsyncOpenAI(api_key="k", base_url=url, max_retries=0, timeout=10) as c:
            stream = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
            chunks = [x async for x in stream]
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert "attack" not in text and chunks[-1].choices[0].finish_reason == "content_filter"
    assert upstream.count("/v1/moderations") >= 1


async def test_non_stream_clean_is_passed_on_byte_for_byte(upstream: LoopbackUpstream, keyword_proxy: str) -> None:
    """A clean non-streamed answer comes back exactly as upstream sent it."""
    upstream.chat = lambda body: Reply(completion(CLEAN))
    with anyio.fail_after(10):
        async with httpx2.AsyncClient(timeout=10) as http:
            r = await http.post(keyword_proxy + "/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert r.status_code == 200
    assert r.json() == completion(CLEAN)


@pytest.mark.parametrize("action", ["cutoff", "redact"])
async def test_non_stream_flagged(upstream: LoopbackUpstream, start_proxy: Start, action: str) -> None:
    """A flagged non-streamed answer is judged as its stream would be: cut-off keeps the prefix, redact one window."""
    upstream.chat = lambda body: Reply(completion(STORY))
    policy = Policy(action="cutoff" if action == "cutoff" else "redact", window_chars=48, first_window_chars=16)
    url = start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["attack"], policy=policy)
    with anyio.fail_after(10):
        async with AsyncOpenAI(api_key="k", base_url=url, max_retries=0, timeout=10) as c:
            answer = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    content = answer.choices[0].message.content
    assert content is not None and "attack" not in content and content.startswith("Once upon a time")
    if action == "cutoff":
        assert STORY.startswith(content) and len(content) < len(STORY)
        assert answer.choices[0].finish_reason == "content_filter"
    else:
        assert "[redacted]" in content and content.endswith("The end came quietly.")
        assert answer.choices[0].finish_reason == "stop"  # upstream's, as in a redacted stream
    assert answer.usage is not None and answer.usage.completion_tokens == USAGE["completion_tokens"]
    assert answer.model_extra is not None and answer.model_extra["provider_field"] == {"kept": True}


async def test_client_disconnect_closes_upstream(upstream: LoopbackUpstream, proxied: AsyncOpenAI) -> None:
    """Closing the client's stream early makes the proxy close its upstream stream."""
    upstream.chat = lambda body: Script(text_chunks(words(CLEAN * 200)), delay=0.005)
    with anyio.fail_after(10):
        stream = await proxied.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        async for _ in stream:
            break
        await stream.close()
        assert await upstream.await_ended(1)
    assert upstream.aborted == 1 and upstream.completed == 0


async def test_upstream_http_error_is_passed_on(upstream: LoopbackUpstream, proxied: AsyncOpenAI) -> None:
    """An upstream error status and body reach the caller unchanged, as the client's own exception."""
    error = {"error": {"message": "Slow down.", "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
    upstream.chat = lambda body: Reply(error, status=429, headers={"retry-after": "7"})
    with anyio.fail_after(10), pytest.raises(openai.RateLimitError) as caught:
        await proxied.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert caught.value.body == error["error"]
    assert caught.value.response.headers["retry-after"] == "7"


async def test_models_and_healthz(keyword_proxy: str, proxied: AsyncOpenAI) -> None:
    """/v1/models is passed through; /healthz answers."""
    with anyio.fail_after(10):
        models = await proxied.models.list()
        async with httpx2.AsyncClient(timeout=10) as http:
            health = await http.get(keyword_proxy.removesuffix("/v1") + "/healthz")
    assert [m.id for m in models.data] == ["gpt-4o-mini"]
    assert health.status_code == 200 and health.json() == {"status": "ok"}


async def test_authorization_passes_through(start_proxy: Start) -> None:
    """By default the caller's Authorization header is what upstream sees."""
    app, seen = recording_upstream(["Hello", " there."])
    with serve_in_thread(app, lifespan="off") as upstream_url:
        url = start_proxy(upstream=upstream_url + "/v1", moderator="keyword", keywords=["attack"])
        with anyio.fail_after(10):
            async with AsyncOpenAI(api_key="caller-key-42", base_url=url, max_retries=0, timeout=10) as c:
                stream = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
                text = "".join([x.choices[0].delta.content or "" async for x in stream if x.choices])
                await c.models.list()
    assert text == "Hello there."
    assert [h["authorization"] for h in seen] == ["Bearer caller-key-42"] * 2


async def test_proxy_held_key_and_client_keys(start_proxy: Start, caplog: pytest.LogCaptureFixture) -> None:
    """With a proxy-held key, callers need a client key; upstream sees only the proxy's key, callers and logs never."""
    caplog.set_level(logging.DEBUG)
    app, seen = recording_upstream(["Hello", " there."])
    responses: list[httpx2.Response] = []
    with serve_in_thread(app, lifespan="off") as upstream_url:
        url = start_proxy(
            upstream=upstream_url + "/v1",
            moderator="openai",
            moderation_base_url=upstream_url + "/v1",
            upstream_api_key=SECRET,
            client_keys=frozenset({"proxy-key-1", "proxy-key-2"}),
        )
        with anyio.fail_after(10):
            async with AsyncOpenAI(api_key="wrong", base_url=url, max_retries=0, timeout=10) as c:
                with pytest.raises(openai.AuthenticationError) as caught:
                    await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
            assert caught.value.status_code == 401
            assert caught.value.body == {
                "message": "Incorrect API key provided.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
            body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
            async with httpx2.AsyncClient(timeout=10) as http:
                for key in ("wrong", "proxy-key-2"):
                    headers = {"authorization": f"Bearer {key}"}
                    responses.append(await http.post(url + "/chat/completions", json=body, headers=headers))
                    responses.append(await http.get(url + "/models", headers=headers))
    assert [r.status_code for r in responses] == [401, 401, 200, 200]
    assert "Hello" in responses[2].text and responses[2].text.endswith("data: [DONE]\n\n")
    assert seen and {h["authorization"] for h in seen} == {f"Bearer {SECRET}"}  # chat, models and moderations
    for r in responses:
        assert SECRET not in r.text
        assert all(SECRET not in v for v in r.headers.values())
    assert caplog.records and SECRET not in caplog.text


async def test_upstream_refusing_proxy_key_hides_it(upstream: LoopbackUpstream, start_proxy: Start) -> None:
    """An upstream 401 that echoes the proxy-held key becomes a 502 that does not."""
    error = {"error": {"message": f"Incorrect API key provided: {SECRET}", "type": "invalid_request_error"}}
    upstream.chat = lambda body: Reply(error, status=401)
    url = start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["x"], upstream_api_key=SECRET)
    with anyio.fail_after(10):
        async with httpx2.AsyncClient(timeout=10) as http:
            for stream in (True, False):
                r = await http.post(url + "/chat/completions", json={"model": "m", "messages": [], "stream": stream})
                assert r.status_code == 502
                assert SECRET not in r.text
                assert r.json()["error"]["code"] == "upstream_auth_failed"


async def test_cors_preflight(upstream: LoopbackUpstream, start_proxy: Start) -> None:
    """A preflight from an allowed origin is answered (no key needed); another origin is refused."""
    url = start_proxy(
        upstream=upstream.base_url,
        moderator="keyword",
        keywords=["x"],
        cors_origins=["https://app.example"],
        client_keys=frozenset({"proxy-key-1"}),
    )
    preflight = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type",
    }
    with anyio.fail_after(10):
        async with httpx2.AsyncClient(timeout=10) as http:
            ok = await http.options(url + "/chat/completions", headers={"origin": "https://app.example", **preflight})
            bad = await http.options(url + "/chat/completions", headers={"origin": "https://evil.example", **preflight})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b""])
async def test_malformed_json_is_400(keyword_proxy: str, upstream: LoopbackUpstream, content: bytes) -> None:
    """A body that is not a JSON object gets a 400 in OpenAI's error shape and never reaches upstream."""
    with anyio.fail_after(10):
        async with httpx2.AsyncClient(timeout=10) as http:
            r = await http.post(
                keyword_proxy + "/chat/completions", content=content, headers={"content-type": "application/json"}
            )
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] is None and error["code"] is None
    assert upstream.requests == []


@pytest.mark.parametrize("chunked", [False, True])
async def test_oversize_body_is_413(upstream: LoopbackUpstream, start_proxy: Start, chunked: bool) -> None:
    """A body over the limit gets a 413, whether it declares its length or not."""
    url = start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["x"], max_body_bytes=1024)
    payload = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()

    async def parts() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 512):
            yield payload[i : i + 512]

    with anyio.fail_after(10):
        async with httpx2.AsyncClient(timeout=10) as http:
            content: Any = parts() if chunked else payload
            r = await http.post(
                url + "/chat/completions", content=content, headers={"content-type": "application/json"}
            )
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert upstream.requests == []
