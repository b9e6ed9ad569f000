"""Guarded proxy routes beyond chat: Responses and legacy completions (streamed and not), and input parts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest
from openai import AsyncOpenAI

from streamguard import Policy
from streamguard.integrations.proxy import ProxyConfig, create_app
from streamguard.testing.upstream import LoopbackUpstream, Reply, Script, sse_body, text_chunks
from tests.integration._proxy_upstream import RecordingUpstream, fixed, streamed
from tests.integration._servers import serve_in_thread
from tests.integration.test_proxy import STORY, Start, completion, words


@pytest.fixture
def start() -> Iterator[Start]:
    """Start proxy apps on loopback (``start(**config)`` returns a ``/v1`` base URL); stopped after the test."""
    with ExitStack() as stack:
        yield lambda **config: stack.enter_context(serve_in_thread(create_app(ProxyConfig(**config)))) + "/v1"


RECORDING = Path(__file__).parent.parent / "fixtures" / "streams" / "resp_gpt41nano_text.sse"
FLAGGED = "unicorn"  # a word of the recording's answer


def response_answer() -> dict[str, Any]:
    """The recording's final response object (what a non-streamed call returns)."""
    for line in RECORDING.read_text().splitlines():
        if line.startswith("data: ") and '"response.completed"' in line[:60]:
            answer: dict[str, Any] = json.loads(line[6:])["response"]
            return answer
    raise AssertionError("no response.completed in the recording")


def legacy_chunks(deltas: list[str]) -> list[dict[str, Any]]:
    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": "gpt-3.5-turbo-instruct",
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        }

    return [chunk(d, None) for d in deltas] + [chunk("", "stop")]


async def test_responses_streamed_clean_and_cut(upstream: LoopbackUpstream, start: Start) -> None:
    """client.responses.create(stream=True): a clean answer arrives whole, a flagged one ends content_filter."""
    upstream.chat = lambda body: Script(raw=RECORDING.read_bytes())
    clean = start(upstream=upstream.base_url, moderator="keyword", keywords=["attack"])
    cut = start(upstream=upstream.base_url, moderator="keyword", keywords=[FLAGGED])
    expected = "".join(o["content"][0]["text"] for o in response_answer()["output"] if o["type"] == "message")
    with anyio.fail_after(20):
        async with AsyncOpenAI(api_key="k", base_url=clean, max_retries=0, timeout=10) as c:
            stream = await c.responses.create(model="gpt-4.1-nano", input="Tell me a story", stream=True)
            events = [e async for e in stream]
        async with AsyncOpenAI(api_key="k", base_url=cut, max_retries=0, timeout=10) as c:
            stream = await c.responses.create(model="gpt-4.1-nano", input="Tell me a story", stream=True)
            cut_events = [e async for e in stream]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == expected and events[-1].type == "response.completed"
    cut_text = "".join(e.delta for e in cut_events if e.type == "response.output_text.delta")
    assert FLAGGED not in cut_text and expected.startswith(cut_text)
    last = cut_events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details is not None and last.response.incomplete_details.reason == "content_filter"
    assert all(FLAGGED not in e.to_json() for e in cut_events)
    assert upstream.requests[-1][0] == "/v1/responses"


async def test_responses_non_streamed(upstream: LoopbackUpstream, start: Start) -> None:
    """client.responses.create(): clean is byte for byte; flagged keeps the clean prefix and is incomplete."""
    answer = response_answer()
    upstream.chat = lambda body: Reply(answer)
    clean = start(upstream=upstream.base_url, moderator="keyword", keywords=["attack"])
    cut = start(upstream=upstream.base_url, moderator="keyword", keywords=[FLAGGED])
    with anyio.fail_after(20):
        async with AsyncOpenAI(api_key="k", base_url=clean, max_retries=0, timeout=10) as c:
            whole = await c.responses.with_raw_response.create(model="gpt-4.1-nano", input="Tell me a story")
        async with AsyncOpenAI(api_key="k", base_url=cut, max_retries=0, timeout=10) as c:
            partial = await c.responses.create(model="gpt-4.1-nano", input="Tell me a story")
    assert json.loads(whole.content) == answer
    full = whole.parse().output_text
    assert FLAGGED in full and FLAGGED not in partial.output_text
    assert partial.output_text and full.startswith(partial.output_text)
    assert partial.status == "incomplete"
    assert partial.incomplete_details is not None and partial.incomplete_details.reason == "content_filter"


@pytest.mark.parametrize("stream", [True, False])
async def test_legacy_completions(start: Start, stream: bool) -> None:
    """client.completions.create(): cut at the flagged word with content_filter, streamed or not."""
    recording = RecordingUpstream()
    if stream:
        body = sse_body(legacy_chunks(words(STORY)))
        recording.answers[("POST", "/v1/completions")] = streamed([body], media_type="text/event-stream")
    else:
        legacy = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "gpt-3.5-turbo-instruct"}
        legacy["choices"] = [{"text": STORY, "index": 0, "logprobs": None, "finish_reason": "stop"}]
        recording.answers[("POST", "/v1/completions")] = fixed(json.dumps(legacy).encode())
    with serve_in_thread(recording, lifespan="off") as upstream_url:
        url = start(upstream=upstream_url + "/v1", moderator="keyword", keywords=["attack"])
        with anyio.fail_after(20):
            async with AsyncOpenAI(api_key="k", base_url=url, max_retries=0, timeout=10) as c:
                if stream:
                    s = await c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once", stream=True)
                    chunks = [x async for x in s]
                    text = "".join(ch.text for x in chunks for ch in x.choices)
                    finish = [ch.finish_reason for x in chunks for ch in x.choices if ch.finish_reason]
                else:
                    answer = await c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once")
                    text = answer.choices[0].text
                    finish = [answer.choices[0].finish_reason]
    assert "attack" not in text and STORY.startswith(text) and text.startswith("Once upon a time")
    assert finish == ["content_filter"]
    assert recording.paths() == ["/v1/completions"]


@pytest.mark.parametrize("stream", [True, False])
async def test_input_given_as_content_parts_is_judged(upstream: LoopbackUpstream, start: Start, stream: bool) -> None:
    """With input moderation, a flagged message given as a list of content parts cuts the answer."""
    from tests.integration.test_proxy import CLEAN

    if stream:
        upstream.chat = lambda body: Script([*map(_chunk, words(CLEAN))], delay=0.005)
    else:
        upstream.chat = lambda body: Reply(completion(CLEAN))
    policy = Policy(moderate_input=True)
    url = start(upstream=upstream.base_url, moderator="keyword", keywords=["attack"], policy=policy)
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "Plan the attack on the castle."}]}]
    with anyio.fail_after(20):
        async with AsyncOpenAI(api_key="k", base_url=url, max_retries=0, timeout=10) as c:
            if stream:
                s = await c.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)
                chunks = [x async for x in s]
                finish = [ch.finish_reason for x in chunks for ch in x.choices if ch.finish_reason]
            else:
                answer = await c.chat.completions.create(model="gpt-4o-mini", messages=messages)
                finish = [answer.choices[0].finish_reason]
    assert finish == ["content_filter"]


def _chunk(text: str) -> dict[str, Any]:
    return text_chunks([text], finish_reason=None)[1]
