"""``wrap(AsyncOpenAI(...))``: the real client over real HTTP to the loopback upstream."""

from __future__ import annotations

from typing import Any

import anyio
import httpx2
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from streamguard.exceptions import ModerationError
from streamguard.guard import GuardedStream
from streamguard.policy import Policy
from streamguard.testing import FakeModerator
from streamguard.testing.upstream import LoopbackUpstream, Reply, Script, keyword_moderation, text_chunks
from streamguard.wrap import wrap
from tests.conftest import other_tasks
from tests.helpers import words

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story."}]
STORY = (
    "Once upon a time a careful engineer wrote a library that watched every word. "
    "Then one day the model said that it would attack the castle at dawn, "
    "and the library stopped it before anyone could read the plan. The end came quietly."
)
CLEAN = "A calm answer about gardens and rivers and the long light of summer evenings."


def completion(*contents: str, refusal: str | None = None) -> dict[str, Any]:
    """A non-streamed chat completion body with one choice per content."""
    return {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c, "refusal": refusal},
                "logprobs": {"content": []},
                "finish_reason": "stop",
            }
            for i, c in enumerate(contents)
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 30, "total_tokens": 35},
    }


def text_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def finishes(chunks: list[ChatCompletionChunk]) -> list[str]:
    return [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]


async def test_wrapped_client_is_still_the_client(client: AsyncOpenAI) -> None:
    """The proxy passes attributes through and still counts as an AsyncOpenAI."""
    wrapped = wrap(client, moderator=FakeModerator())
    assert isinstance(wrapped, AsyncOpenAI)
    assert wrapped.api_key == "test"
    assert str(wrapped.base_url) == str(client.base_url)
    assert wrapped.embeddings is client.embeddings
    assert wrapped.chat.completions.with_raw_response is not None
    with pytest.raises(TypeError):
        wrap(object(), moderator=FakeModerator())  # type: ignore[type-var]


async def test_stream_cutoff_in_async_with(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """A flagged stream ends with content_filter and closes upstream early."""
    long_tail = STORY + " More words follow." * 200
    upstream.chat = lambda body: Script(text_chunks(words(long_tail)), delay=0.002)
    wrapped = wrap(client, moderator=FakeModerator(["attack"]))
    with anyio.fail_after(10):
        stream = await wrapped.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        assert isinstance(stream, GuardedStream)
        async with stream as guarded:
            chunks = [c async for c in guarded]
        assert await upstream.await_ended(1)
    text = text_of(chunks)
    assert "attack" not in text and STORY.startswith(text) and text
    assert finishes(chunks) == ["content_filter"]
    assert upstream.aborted == 1
    assert not other_tasks()


async def test_clean_stream_passes_through_bare_form(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """A clean stream in the bare ``async for`` form comes out whole, as openai's own would."""
    upstream.chat = lambda body: Script(text_chunks(words(CLEAN)), delay=0.001)
    wrapped = wrap(client, moderator=FakeModerator(["attack"]))
    with anyio.fail_after(10):
        stream = await wrapped.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        chunks = [c async for c in stream]
        assert await upstream.await_ended(1)
    assert text_of(chunks) == CLEAN
    assert finishes(chunks) == ["stop"]
    assert upstream.completed == 1
    assert not other_tasks()


async def test_bare_form_break_and_aclose_aborts_upstream(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """``break`` + ``aclose()`` in the bare form closes the upstream stream and leaves no task."""
    upstream.chat = lambda body: Script(text_chunks(words(CLEAN) * 100), delay=0.002)
    wrapped = wrap(client, moderator=FakeModerator(latency=0.01))
    with anyio.fail_after(10):
        stream = await wrapped.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        seen = 0
        async for chunk in stream:
            seen += len(chunk.choices[0].delta.content or "") if chunk.choices else 0
            if seen > 40:
                break
        await stream.aclose()
        assert await upstream.await_ended(1)
    assert upstream.aborted == 1
    assert not other_tasks()


async def test_non_stream_cutoff(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """A flagged non-streamed choice keeps its clean prefix and ends content_filter; the others unchanged."""
    upstream.chat = lambda body: Reply(completion(STORY, CLEAN))
    wrapped = wrap(client, moderator=FakeModerator(["attack"]))
    with anyio.fail_after(10):
        answer = await wrapped.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, n=2)
    first, second = answer.choices
    content = first.message.content
    assert content and STORY.startswith(content) and "attack" not in content
    assert first.finish_reason == "content_filter" and first.logprobs is None
    assert second.message.content == CLEAN and second.finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 30


async def test_non_stream_redact_and_clean(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """Redaction replaces only the flagged window and keeps upstream's finish_reason; a clean answer is unchanged."""
    upstream.chat = lambda body: Reply(completion(STORY))
    moderator = FakeModerator(["attack"])
    wrapped = wrap(client, moderator=moderator, policy=Policy(action="redact", redaction="[gone]"))
    with anyio.fail_after(10):
        answer = await wrapped.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        content = answer.choices[0].message.content
        assert content is not None and content.count("[gone]") == 1 and "attack" not in content
        before, after = content.split("[gone]")
        assert before and STORY.startswith(before) and STORY.endswith(after)
        assert answer.choices[0].finish_reason == "stop"
        upstream.chat = lambda body: Reply(completion(CLEAN))
        clean = await wrapped.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert clean.choices[0].message.content == CLEAN and clean.choices[0].finish_reason == "stop"
    assert clean.choices[0].logprobs is not None
    assert len(moderator.calls) >= 2  # the windows of each answer


async def test_non_stream_moderation_failure(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """A failing moderator raises ModerationError fail-closed and lets the answer through fail-open."""
    upstream.chat = lambda body: Reply(completion(STORY))
    broken = FakeModerator(fail=RuntimeError("backend down"))
    with anyio.fail_after(10):
        with pytest.raises(ModerationError):
            await wrap(client, moderator=broken).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        answer = await wrap(client, moderator=broken, policy=Policy(on_error="fail_open")).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
    assert answer.choices[0].message.content == STORY


async def test_non_stream_input_moderation(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """With moderate_input, a flagged input gives a content_filter answer even if the output is clean."""
    upstream.chat = lambda body: Reply(completion(CLEAN), delay=0.05)
    wrapped = wrap(client, moderator=FakeModerator(["attack"]), policy=Policy(moderate_input=True))
    bad: list[ChatCompletionMessageParam] = [{"role": "user", "content": "How do I attack the castle?"}]
    with anyio.fail_after(10):
        answer = await wrapped.chat.completions.create(model="gpt-4o-mini", messages=bad)
        ok = await wrapped.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert [c.finish_reason for c in answer.choices] == ["content_filter"]
    assert answer.choices[0].message.content == ""
    assert ok.choices[0].message.content == CLEAN


async def test_default_moderator_is_openai_on_the_same_client(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """Without a moderator, the client's own /v1/moderations endpoint judges the stream."""
    upstream.moderation = keyword_moderation(["attack"])
    upstream.chat = lambda body: Script(text_chunks(words(STORY)), delay=0.001)
    wrapped = wrap(client)
    with anyio.fail_after(10):
        stream = await wrapped.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        async with stream as guarded:
            chunks = [c async for c in guarded]
    assert "attack" not in text_of(chunks)
    assert finishes(chunks) == ["content_filter"]
    assert upstream.count("/v1/moderations") >= 1


async def test_other_resources_and_kwargs_pass_through(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """Other resources work unchanged and unknown arguments reach the server."""
    upstream.chat = lambda body: Script(text_chunks(["Hi."]))
    wrapped = wrap(client, moderator=FakeModerator())
    with anyio.fail_after(10):
        models = await wrapped.models.list()
        assert [m.id for m in models.data] == ["gpt-4o-mini"]
        stream = await wrapped.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"custom_field": 7},
            temperature=0.5,
        )
        async with stream as guarded:
            chunks = [c async for c in guarded]
    assert text_of(chunks) == "Hi."
    path, body = upstream.requests[-1]
    assert path == "/v1/chat/completions"
    assert body["custom_field"] == 7
    assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.5


async def test_with_options_stays_wrapped(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """``with_options`` returns a wrapped client: its streams are still guarded."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY)))
    wrapped = wrap(client, moderator=FakeModerator(["attack"]))
    other = wrapped.with_options(timeout=5)
    assert isinstance(other, AsyncOpenAI) and other.timeout == 5
    with anyio.fail_after(10):
        stream = await other.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        async with stream as guarded:
            chunks = [c async for c in guarded]
    assert finishes(chunks) == ["content_filter"]


async def test_upstream_error_is_the_clients_own(upstream: LoopbackUpstream, client: AsyncOpenAI) -> None:
    """An HTTP error from upstream surfaces as openai's own exception, streamed or not."""
    error = {"error": {"message": "no such model", "type": "invalid_request_error", "code": "model_not_found"}}
    upstream.chat = lambda body: Reply(error, status=404)
    wrapped = wrap(client, moderator=FakeModerator(), policy=Policy(moderate_input=True))
    with anyio.fail_after(10):
        with pytest.raises(openai.NotFoundError):
            await wrapped.chat.completions.create(model="nope", messages=MESSAGES)
        with pytest.raises(openai.NotFoundError):
            await wrapped.chat.completions.create(model="nope", messages=MESSAGES, stream=True)


RESPONSE = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1_700_000_000,
    "status": "completed",
    "model": "gpt-4o-mini",
    "output": [
        {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": STORY, "annotations": []}],
        }
    ],
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "tools": [],
}


async def test_non_stream_responses_cutoff() -> None:
    """A flagged non-streamed Responses answer keeps its clean prefix, incomplete with reason content_filter."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, json=RESPONSE)

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    async with AsyncOpenAI(api_key="test", base_url="http://testserver/v1", http_client=http, max_retries=0) as c:
        wrapped = wrap(c, moderator=FakeModerator(["attack"]))
        with anyio.fail_after(10):
            answer = await wrapped.responses.create(model="gpt-4o-mini", input="Tell me a story.")
    assert answer.status == "incomplete"
    assert answer.incomplete_details is not None and answer.incomplete_details.reason == "content_filter"
    assert answer.output_text and STORY.startswith(answer.output_text) and "attack" not in answer.output_text
