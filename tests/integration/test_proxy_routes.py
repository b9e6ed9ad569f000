"""The proxy's route table over real HTTP: the real ``openai`` client -> proxy (uvicorn) -> a recording upstream."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx2
import openai
import pytest
from openai import AsyncOpenAI

from streamguard.integrations.proxy import ProxyConfig, create_app
from streamguard.integrations.proxy.routes import ROUTES
from streamguard.testing.upstream import sse_body, text_chunks
from tests.integration._proxy_upstream import RecordingUpstream, fixed, slow_reply, streamed
from tests.integration._servers import serve_in_thread

SECRET = "sk-proxy-held-SECRET-42"
MODELS = json.dumps({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "owned_by": "x"}]}).encode()
HEADERS = {"x-request-id": "req_123", "x-ratelimit-remaining-requests": "99", "openai-processing-ms": "7"}


class Env:
    def __init__(self, stack: ExitStack) -> None:
        self.stack = stack
        self.upstream = RecordingUpstream()
        self.upstream_url = stack.enter_context(serve_in_thread(self.upstream, lifespan="off"))

    def proxy(self, **config: Any) -> str:
        config.setdefault("moderator", "keyword")
        config.setdefault("keywords", ["attack"])
        app = create_app(ProxyConfig(upstream=self.upstream_url + "/v1", **config))
        return self.stack.enter_context(serve_in_thread(app)) + "/v1"


@pytest.fixture
def env() -> Iterator[Env]:
    with ExitStack() as stack:
        yield Env(stack)


def client(url: str, timeout: float = 10) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="caller-key", base_url=url, max_retries=0, timeout=timeout)


async def test_text_free_routes_pass_through_the_openai_client(env: Env) -> None:
    """Models, embeddings, moderations, files, batches, images and audio speech reach upstream and come back whole."""
    up = env.upstream.answers
    embedding: dict[str, Any] = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
    }
    embedding |= {"model": "e", "usage": {"prompt_tokens": 1, "total_tokens": 1}}
    moderation: dict[str, Any] = {"id": "modr-1", "model": "omni", "results": [{"flagged": False, "categories": {}}]}
    file: dict[str, Any] = {"id": "file-abc", "object": "file", "bytes": 3, "created_at": 1, "filename": "a.jsonl"}
    file |= {"purpose": "batch", "status": "processed"}
    batch: dict[str, Any] = {
        "id": "batch_1",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    batch |= {"status": "validating", "created_at": 1, "input_file_id": "file-abc"}
    image: dict[str, Any] = {"created": 1, "data": [{"b64_json": "aGk="}]}
    up[("GET", "/v1/models")] = fixed(MODELS, headers=HEADERS)
    up[("GET", "/v1/models/gpt-4o-mini")] = fixed(json.dumps(json.loads(MODELS)["data"][0]).encode())
    up[("POST", "/v1/embeddings")] = fixed(json.dumps(embedding).encode())
    up[("POST", "/v1/moderations")] = fixed(json.dumps(moderation).encode())
    up[("POST", "/v1/files")] = fixed(json.dumps(file).encode())
    up[("GET", "/v1/files")] = fixed(json.dumps({"object": "list", "data": [file]}).encode())
    up[("GET", "/v1/files/file-abc")] = fixed(json.dumps(file).encode())
    up[("DELETE", "/v1/files/file-abc")] = fixed(b'{"id":"file-abc","object":"file","deleted":true}')
    up[("POST", "/v1/batches")] = fixed(json.dumps(batch).encode())
    up[("GET", "/v1/batches/batch_1")] = fixed(json.dumps(batch).encode())
    up[("POST", "/v1/batches/batch_1/cancel")] = fixed(json.dumps(batch | {"status": "cancelling"}).encode())
    up[("POST", "/v1/images/generations")] = fixed(json.dumps(image).encode())
    audio = [bytes(range(256)) * 40, b"\x00\xff" * 1000]
    up[("POST", "/v1/audio/speech")] = streamed(audio, media_type="audio/mpeg", headers={"x-request-id": "req_a"})
    url = env.proxy(upstream_api_key=SECRET, client_keys=frozenset({"caller-key"}))
    with anyio.fail_after(20):
        async with client(url) as c:
            models = await c.models.list()
            model = await c.models.retrieve("gpt-4o-mini")
            emb = await c.embeddings.create(model="e", input="hi", encoding_format="float")
            mod = await c.moderations.create(input="hi")
            created = await c.files.create(file=("a.jsonl", b'{"a":1}\n'), purpose="batch")
            files = await c.files.list()
            got = await c.files.retrieve("file-abc")
            deleted = await c.files.delete("file-abc")
            b = await c.batches.create(
                input_file_id="file-abc", endpoint="/v1/chat/completions", completion_window="24h"
            )
            b2 = await c.batches.retrieve("batch_1")
            b3 = await c.batches.cancel("batch_1")
            img = await c.images.generate(prompt="a cat", model="gpt-image-1")
            async with c.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input="Hi") as r:
                speech = await r.read()
                speech_id = r.headers.get("x-request-id")
            raw_models = await c.models.with_raw_response.list()
    assert [m.id for m in models.data] == ["gpt-4o-mini"] and model.id == "gpt-4o-mini"
    assert emb.data[0].embedding == [0.5, 0.25] and mod.results[0].flagged is False
    assert created.id == got.id == "file-abc" and [f.id for f in files.data] == ["file-abc"] and deleted.deleted
    assert b.id == b2.id == "batch_1" and b3.status == "cancelling"
    assert img.data is not None and img.data[0].b64_json == "aGk="
    assert speech == b"".join(audio) and speech_id == "req_a"
    assert raw_models.headers["x-request-id"] == "req_123"
    assert raw_models.headers["x-ratelimit-remaining-requests"] == "99"
    upload = next(s for s in env.upstream.seen if s.method == "POST" and s.path == "/v1/files")
    assert b'{"a":1}' in upload.body and upload.headers["content-type"].startswith("multipart/form-data")
    assert upload.headers.get("content-length") == str(len(upload.body))  # streamed on, with its length
    assert {s.headers["authorization"] for s in env.upstream.seen} == {f"Bearer {SECRET}"}


async def test_pass_through_is_byte_for_byte_with_status_and_query(env: Env) -> None:
    """Status, body bytes, upstream headers and the query string pass unchanged; hop-by-hop headers do not."""
    body = b'{ "odd"  :  "spacing",\n "kept": [1, 2] }'
    env.upstream.answers[("GET", "/v1/files")] = fixed(body, status=202, headers={**HEADERS, "x-custom": "yes"})
    url = env.proxy()
    with anyio.fail_after(10):
        async with httpx2.AsyncClient(timeout=10) as http:
            r = await http.get(url + "/files?purpose=batch&limit=2", headers={"authorization": "Bearer caller-key"})
    assert r.status_code == 202 and r.content == body
    assert r.headers["x-custom"] == "yes" and r.headers["x-request-id"] == "req_123"
    assert r.headers["x-streamguard-route"] == "passed"
    seen = env.upstream.seen[-1]
    assert seen.path == "/v1/files" and seen.query == b"purpose=batch&limit=2"
    assert seen.headers["authorization"] == "Bearer caller-key"  # the caller's own key passes by default


async def test_refused_route_is_an_openai_error_unless_allowed(env: Env) -> None:
    """A route whose answer holds model text the proxy cannot moderate is refused, and never reaches upstream."""
    env.upstream.answers[("GET", "/v1/files/file-abc/content")] = fixed(b'{"answer":"attack at dawn"}')
    url = env.proxy()
    with anyio.fail_after(10):
        async with client(url) as c:
            with pytest.raises(openai.PermissionDeniedError) as caught:
                await c.files.content("file-abc")
            with pytest.raises(openai.PermissionDeniedError):
                await c.responses.retrieve("resp_1")
    assert caught.value.code == "unguarded_route" and "--allow-unguarded files.content" in caught.value.message
    assert env.upstream.seen == []
    allowed = env.proxy(allow_unguarded=frozenset({"files.content"}))
    with anyio.fail_after(10):
        async with client(allowed) as c:
            content = await c.files.content("file-abc")
    assert content.content == b'{"answer":"attack at dawn"}'
    assert content.response.headers["x-streamguard-route"] == "unguarded"


def test_refused_route_names_are_checked() -> None:
    """allow_unguarded only takes names of refused routes."""
    from streamguard import ConfigError

    with pytest.raises(ConfigError, match="not a refused route"):
        ProxyConfig(upstream="http://x/v1", allow_unguarded=frozenset({"models"}))


async def raw_request(url: str, method: str, target: str) -> tuple[int, bytes]:
    """Send ``target`` as written (no client-side normalisation) and return the status and body."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    stream = await anyio.connect_tcp(parts.hostname, parts.port)
    async with stream:
        request = f"{method} {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
        await stream.send(request.encode())
        data = b""
        with anyio.move_on_after(5):
            while True:
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize(
    "target",
    [
        "/v1/models/..%2f..%2forganization%2fusage",
        "/v1/models/..%2F..%2Forganization%2Fusage",
        "/v1/models/%252e%252e%252f%252e%252e%252forganization%252fusage",
        "/v1/models/%2e%2e/%2e%2e/organization/usage",
        "/v1/../organization/usage",
        "/v1/files/file-abc%2f..%2f..%2forganization",
        "/v1/files/..%5c..%5corganization",
        "/v1/organization/usage",
        "/v1//files",
    ],
)
async def test_traversal_never_reaches_unnamed_paths(env: Env, target: str) -> None:
    """Encoded, double-encoded and dot-segment traversal get a 404; upstream sees nothing."""
    url = env.proxy(upstream_api_key=SECRET)
    with anyio.fail_after(10):
        status, body = await raw_request(url, "GET", target)
    assert status == 404
    error = json.loads(body)["error"]
    assert error["code"] == "unknown_url" and "/v1/chat/completions" in error["message"]
    assert env.upstream.seen == []


async def test_dot_segments_are_normalised_before_matching(env: Env) -> None:
    """``/v1/models/../files`` is the files route after normalisation: upstream is asked for /v1/files only."""
    env.upstream.answers[("GET", "/v1/files")] = fixed(b'{"object":"list","data":[]}')
    url = env.proxy(upstream_api_key=SECRET)
    with anyio.fail_after(10):
        status, body = await raw_request(url, "GET", "/v1/models/../files")
    assert status == 200 and json.loads(body) == {"object": "list", "data": []}
    assert [s.raw_path for s in env.upstream.seen] == [b"/v1/files"]


async def test_unknown_route_says_what_the_proxy_serves(env: Env) -> None:
    """An unknown route is a 404 in OpenAI's shape that lists the served routes."""
    url = env.proxy()
    with anyio.fail_after(10):
        async with client(url) as c:
            with pytest.raises(openai.NotFoundError) as caught:
                await c.post("/evals", cast_to=object, body={})
    assert caught.value.code == "unknown_url"
    assert "POST /v1/responses" in caught.value.message and "GET /v1/models" in caught.value.message
    assert env.upstream.seen == []


def test_every_route_pattern_matches_itself() -> None:
    """Each row of the table is reachable by its own pattern and method (a typo would make a dead row)."""
    from streamguard.integrations.proxy.routes import Match, match

    for route in ROUTES:
        path = "/v1" + route.pattern.replace("{id}", "x_1").replace("{rest}", "a/b")
        for method in route.methods:
            found = match(path, method)
            assert isinstance(found, Match) and found.route == route, (route.name, method)


@pytest.mark.parametrize("stream", [1, "true", "yes", 0, [], {}])
async def test_stream_must_be_a_json_boolean(env: Env, stream: Any) -> None:
    """A ``stream`` that is not a JSON boolean is a 400 naming the parameter, and never reaches upstream."""
    url = env.proxy()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    with anyio.fail_after(10):
        async with httpx2.AsyncClient(timeout=10) as http:
            for path in ("/chat/completions", "/completions", "/responses"):
                r = await http.post(url + path, json=body)
                assert r.status_code == 400
                error = r.json()["error"]
                assert error["param"] == "stream" and error["code"] == "invalid_type"
    assert env.upstream.seen == []


async def test_sse_to_a_non_streamed_request_is_never_forwarded(env: Env) -> None:
    """An upstream that streams although asked not to (a coerced ``stream``) gets a 502, not its text."""
    sse = sse_body(text_chunks(["We", " attack", " now."]))
    env.upstream.answers[("POST", "/v1/chat/completions")] = fixed(sse, media_type="text/event-stream")
    url = env.proxy()
    with anyio.fail_after(10):
        async with client(url) as c:
            with pytest.raises(openai.APIStatusError) as caught:
                await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502 and caught.value.code == "upstream_streamed"
    assert b"attack" not in caught.value.response.content


async def test_json_to_a_streamed_request_is_never_forwarded(env: Env) -> None:
    """A JSON answer to a streamed request gets a 502, not its text."""
    answer = {"id": "c", "object": "chat.completion", "choices": [{"message": {"content": "attack"}}]}
    env.upstream.answers[("POST", "/v1/chat/completions")] = fixed(json.dumps(answer).encode())
    url = env.proxy()
    with anyio.fail_after(10):
        async with client(url) as c:
            with pytest.raises(openai.APIStatusError) as caught:
                await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert caught.value.status_code == 502 and caught.value.code == "upstream_not_streamed"
    assert b"attack" not in caught.value.response.content


async def test_streamed_answers_keep_upstream_headers(env: Env) -> None:
    """A guarded stream carries upstream's request id, rate limits and processing time (openai-python sees them)."""
    sse = sse_body(text_chunks(["Hello", " there."]))
    env.upstream.answers[("POST", "/v1/chat/completions")] = streamed(
        [sse], media_type="text/event-stream", headers=HEADERS
    )
    url = env.proxy()
    with anyio.fail_after(10):
        async with client(url) as c:
            stream = await c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            text = "".join([x.choices[0].delta.content or "" async for x in stream if x.choices])
    assert text == "Hello there."
    assert stream.response.headers["x-request-id"] == "req_123"
    assert stream.response.headers["x-ratelimit-remaining-requests"] == "99"
    assert stream.response.headers["openai-processing-ms"] == "7"
    assert stream.response.headers["x-streamguard-route"] == "guarded"


async def test_guarded_streams_reuse_the_upstream_connection(env: Env) -> None:
    """After ``[DONE]`` the proxy reads the body's end, so the next stream goes over the same connection.

    (Closing the response with its last chunk unread would close the connection: a new TCP, and
    with a real provider TLS, handshake for every stream.)
    """
    sse = sse_body(text_chunks(["Hello", " there."]))
    env.upstream.answers[("POST", "/v1/chat/completions")] = streamed([sse], media_type="text/event-stream")
    url = env.proxy()
    with anyio.fail_after(10):
        async with client(url) as c:
            for _ in range(3):
                stream = await c.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                text = "".join([x.choices[0].delta.content or "" async for x in stream if x.choices])
                assert text == "Hello there."
    peers = [s.client for s in env.upstream.seen if s.path == "/v1/chat/completions"]
    assert len(peers) == 3 and None not in peers
    assert len(set(peers)) == 1, peers


async def test_non_streamed_caller_leaving_closes_upstream(env: Env) -> None:
    """A non-streamed request whose caller times out at 0.5 s closes the upstream request at once."""
    answer = {"id": "c", "object": "chat.completion", "choices": []}
    env.upstream.answers[("POST", "/v1/chat/completions")] = slow_reply(env.upstream, 5.0, json.dumps(answer).encode())
    url = env.proxy()
    with anyio.fail_after(10):
        async with client(url, timeout=0.5) as c:
            started = time.monotonic()
            with pytest.raises(openai.APITimeoutError):
                await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        closed = await anyio.to_thread.run_sync(env.upstream.cancelled.wait, 3.0)
    assert closed and time.monotonic() - started < 2.5  # not the 5 s the upstream would have taken


async def test_passed_request_caller_leaving_closes_upstream(env: Env) -> None:
    """A pass-through request whose caller leaves closes the upstream request too."""
    env.upstream.answers[("POST", "/v1/embeddings")] = slow_reply(env.upstream, 5.0, b"{}")
    url = env.proxy()
    with anyio.fail_after(10):
        async with client(url, timeout=0.5) as c:
            with pytest.raises(openai.APITimeoutError):
                await c.embeddings.create(model="e", input="hi")
        assert await anyio.to_thread.run_sync(env.upstream.cancelled.wait, 3.0)


@pytest.mark.parametrize("stream", [True, False])
async def test_moderation_unavailable_before_first_byte_is_503_with_retry_after(env: Env, stream: bool) -> None:
    """A moderation failure before any answer gets an HTTP 503 (with the backend's Retry-After), not a 200."""
    sse = sse_body(text_chunks(["Hello", " there."]))
    answer = {"id": "c", "object": "chat.completion", "created": 1, "model": "m"}
    answer["choices"] = [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}]
    if stream:
        chat = streamed([sse], media_type="text/event-stream")
    else:
        chat = fixed(json.dumps(answer).encode())
    env.upstream.answers[("POST", "/v1/chat/completions")] = chat
    limited = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
    env.upstream.answers[("POST", "/v1/moderations")] = fixed(
        json.dumps(limited).encode(), status=429, headers={"retry-after": "7", "retry-after-ms": "5"}
    )
    url = env.proxy(moderator="openai", keywords=())
    with anyio.fail_after(20):
        async with client(url) as c:
            with pytest.raises(openai.InternalServerError) as caught:
                messages: Any = [{"role": "user", "content": "hi"}]
                if stream:
                    s = await c.chat.completions.create(model="m", messages=messages, stream=True)
                    [x async for x in s]
                else:
                    await c.chat.completions.create(model="m", messages=messages)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code in ("moderation_failed", "moderation_timeout")
