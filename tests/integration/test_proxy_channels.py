"""Every text channel of a non-streamed chat answer is judged by the proxy: content, refusal, reasoning, tool calls."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import anyio
import pytest
from openai import AsyncOpenAI

from streamguard import Policy
from streamguard.integrations.proxy import ProxyConfig, create_app
from streamguard.testing.upstream import LoopbackUpstream, Reply
from tests.integration._servers import serve_in_thread
from tests.integration.test_proxy import MESSAGES, STORY, Start, completion

CLEAN_ARGS = '{"city": "Paris", "days": 3}'
FLAGGED_ARGS = '{"plan": "attack the castle at dawn", "days": 3}'


@pytest.fixture
def start() -> Iterator[Start]:
    """Start proxy apps on loopback (``start(**config)`` returns a ``/v1`` base URL); stopped after the test."""
    with ExitStack() as stack:
        yield lambda **config: stack.enter_context(serve_in_thread(create_app(ProxyConfig(**config)))) + "/v1"


def answer_with(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    body = completion("")
    body["choices"][0]["message"] = {"role": "assistant", "content": None, "refusal": None, **message}
    body["choices"][0]["finish_reason"] = finish
    return body


async def ask(url: str) -> Any:
    async with AsyncOpenAI(api_key="k", base_url=url, max_retries=0, timeout=10) as c:
        return await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


@pytest.mark.parametrize("field", ["refusal", "reasoning_content"])
async def test_flagged_text_outside_content_is_withheld(upstream: LoopbackUpstream, start: Start, field: str) -> None:
    """A flagged refusal or reasoning text never reaches the caller; the choice ends content_filter."""
    upstream.chat = lambda body: Reply(answer_with({field: STORY, "content": "Fine."}))
    url = start(upstream=upstream.base_url, moderator="keyword", keywords=["attack"])
    with anyio.fail_after(10):
        answer = await ask(url)
    dumped = answer.to_json()
    assert "attack" not in dumped
    assert answer.choices[0].finish_reason == "content_filter"


async def test_flagged_tool_call_is_never_emitted(upstream: LoopbackUpstream, start: Start) -> None:
    """A tool call with flagged arguments is removed whole (not even its name); a clean one is kept as it came."""
    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": CLEAN_ARGS}},
        {"id": "call_2", "type": "function", "function": {"name": "siege", "arguments": FLAGGED_ARGS}},
    ]
    upstream.chat = lambda body: Reply(answer_with({"tool_calls": calls}, finish="tool_calls"))
    url = start(upstream=upstream.base_url, moderator="keyword", keywords=["attack"])
    with anyio.fail_after(10):
        answer = await ask(url)
    dumped = answer.to_json()
    assert "attack" not in dumped and "siege" not in dumped
    assert answer.choices[0].finish_reason == "content_filter"


async def test_clean_tool_calls_pass_unchanged(upstream: LoopbackUpstream, start: Start) -> None:
    """Clean tool calls come back exactly as upstream sent them, with upstream's finish_reason."""
    calls = [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": CLEAN_ARGS}}]
    body = answer_with({"tool_calls": calls}, finish="tool_calls")
    upstream.chat = lambda request: Reply(body)
    url = start(upstream=upstream.base_url, moderator="keyword", keywords=["attack"])
    with anyio.fail_after(10):
        answer = await ask(url)
    assert answer.choices[0].finish_reason == "tool_calls"
    message = answer.choices[0].message
    assert message.tool_calls is not None and message.tool_calls[0].function.arguments == CLEAN_ARGS


async def test_redact_in_reasoning_keeps_the_rest(upstream: LoopbackUpstream, start: Start) -> None:
    """Redaction in a reasoning text replaces only the flagged window and keeps upstream's finish_reason."""
    upstream.chat = lambda body: Reply(answer_with({"reasoning_content": STORY, "content": "Fine."}))
    policy = Policy(action="redact", window_chars=48, first_window_chars=16)
    url = start(upstream=upstream.base_url, moderator="keyword", keywords=["attack"], policy=policy)
    with anyio.fail_after(10):
        answer = await ask(url)
    extra = answer.choices[0].message.model_extra or {}
    reasoning = extra.get("reasoning_content", "")
    assert "attack" not in reasoning and "[redacted]" in reasoning and reasoning.endswith("The end came quietly.")
    assert answer.choices[0].message.content == "Fine." and answer.choices[0].finish_reason == "stop"
