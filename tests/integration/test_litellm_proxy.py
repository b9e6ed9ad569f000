"""StreamGuardrail inside a real LiteLLM proxy: the real ``openai`` client -> ``litellm --config`` -> loopback upstream.

One proxy for the module (it takes ~20 s to start). Its guardrails are chosen per request
(``extra_body={"guardrails": [...]}``): ``sg-env`` is configured by environment variables only
(the keyword moderator, hold-back, cut-off); the others override one option in ``litellm_params``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk

from streamguard.testing.upstream import LoopbackUpstream, Reply, Script, keyword_moderation, text_chunks
from tests.integration._litellm_proxy import LiteLLMProxy, run_litellm

FLAG = "forbidden"
CLEAN_TEXT = " ".join(f"calm{i} river{i} garden{i}" for i in range(15))
HEAD = "The plan was simple and the team was ready to begin the quiet work of the day"
TAIL = " ".join(f"more{i}" for i in range(300))
FLAGGED_TEXT = f"{HEAD} with the {FLAG} trick, and then {TAIL}"
ANSWER_CLEAN = "A calm answer about gardens and rivers, told slowly."
ANSWER_FLAGGED = (
    "First a long clean part about gardens and rivers and the long light of summer evenings over the hills, "
    f"and then the {FLAG} part appears in the middle, and after that a clean ending: "
    + " ".join(f"wave{i}" for i in range(80))
    + " about the sea and the sky."
)
CALM_ARGUMENTS = '{"q": "gardens and rivers"}'
CALM_THOUGHTS = "I should think about gardens and rivers first and then answer"
ENV = {
    "STREAMGUARD_MODERATOR": "keyword",
    "STREAMGUARD_KEYWORDS": f"{FLAG},secret sauce",
    "STREAMGUARD_MODE": "holdback",
    "STREAMGUARD_ACTION": "cutoff",
    "STREAMGUARD_MODERATE_INPUT": "true",
}


def words(text: str) -> list[str]:
    parts = text.split(" ")
    return [parts[0]] + [" " + p for p in parts[1:]]


def channel_chunks(field: str, deltas: list[Any], *, finish: str, then: str = "") -> list[dict[str, Any]]:
    """A stream whose text comes in another channel: ``tool_calls`` (a call named first, then its
    arguments in pieces) or ``reasoning_content``; ``then`` is content after it."""
    head = {"id": "chatcmpl-tool", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": "gpt-4o-mini"}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    out = [chunk({"role": "assistant", "content": None})]
    if field == "tool_calls":
        first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": ""}}
        out.append(chunk({"tool_calls": [first]}))
        out += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": d}}]}) for d in deltas]
    else:
        out += [chunk({field: d}) for d in deltas]
    out += [chunk({"content": w}) for w in words(then)] if then else []
    out.append(chunk({}, finish))
    return out


def completion(text: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    usage = {"prompt_tokens": 9, "completion_tokens": 30, "total_tokens": 39}
    head = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini"}
    return {**head, "choices": [choice], "usage": usage}


def tool_completion(arguments: str) -> dict[str, Any]:
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}
    body = completion("")
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    body["choices"][0].update(message=message, finish_reason="tool_calls")
    return body


def answer(body: dict[str, Any]) -> Script | Reply:
    """The upstream's reply, chosen by the last user message."""
    prompt = str(body["messages"][-1]["content"])
    if not body.get("stream"):
        if "tool" in prompt:
            return Reply(tool_completion(CALM_ARGUMENTS if "calm" in prompt else f'{{"q": "the {FLAG} plan"}}'))
        text = ANSWER_FLAGGED if "flagged" in prompt else ANSWER_CLEAN
        return Reply(completion(text))
    if "tool" in prompt:
        arguments = ['{"q": "the ', f"{FLAG} ", 'plan"}']
        return Script(channel_chunks("tool_calls", arguments, finish="tool_calls"), delay=0.005)
    if "reasoning" in prompt:
        thoughts = words(CALM_THOUGHTS if "calm" in prompt else f"I should think about the {FLAG} trick first")
        return Script(channel_chunks("reasoning_content", thoughts, finish="stop", then=CLEAN_TEXT), delay=0.005)
    text = FLAGGED_TEXT if "flagged" in prompt else CLEAN_TEXT
    return Script(text_chunks(words(text)), delay=0.005)


@dataclass(frozen=True)
class Setup:
    upstream: LoopbackUpstream
    proxy: LiteLLMProxy


CONFIG = """
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {base_url}
      api_key: upstream-key
guardrails:
  - guardrail_name: sg-env
    litellm_params:
      guardrail: streamguard.integrations.litellm.StreamGuardrail
      mode: [post_call, during_call]
  - guardrail_name: sg-redact
    litellm_params:
      guardrail: streamguard.integrations.litellm.StreamGuardrail
      mode: post_call
      streamguard_action: redact
      streamguard_redaction: "[removed]"
  - guardrail_name: sg-openai
    litellm_params:
      guardrail: streamguard.integrations.litellm.StreamGuardrail
      mode: [post_call, during_call]
      streamguard_moderator: openai
      streamguard_moderation_base_url: {base_url}
      streamguard_moderation_api_key: moderation-key
litellm_settings:
  telemetry: false
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir: Path = tmp_path_factory.mktemp("litellm")
    with LoopbackUpstream(chat=answer, moderation=keyword_moderation([FLAG])) as upstream:
        with run_litellm(CONFIG.format(base_url=upstream.base_url), workdir, ENV) as proxy:
            yield Setup(upstream, proxy)


@pytest.fixture
async def client(setup: Setup) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(api_key=setup.proxy.key, base_url=setup.proxy.base_url, max_retries=0, timeout=30) as c:
        yield c


@dataclass
class Received:
    chunks: list[ChatCompletionChunk]

    @property
    def text(self) -> str:
        return "".join(c.choices[0].delta.content or "" for c in self.chunks if c.choices)

    @property
    def finish_reason(self) -> str | None:
        reasons = [c.choices[0].finish_reason for c in self.chunks if c.choices and c.choices[0].finish_reason]
        return reasons[-1] if reasons else None


async def stream(client: AsyncOpenAI, prompt: str, guardrail: str = "sg-env") -> Received:
    chunks = []
    with anyio.fail_after(30):
        response = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            extra_body={"guardrails": [guardrail]},
        )
        async with response:
            async for chunk in response:
                chunks.append(chunk)
    return Received(chunks)


async def test_clean_stream_arrives_whole_and_unchanged(setup: Setup, client: AsyncOpenAI) -> None:
    """A clean stream comes through the guardrail with every word, in order, and upstream's finish."""
    got = await stream(client, "tell me something calm")
    assert got.text == CLEAN_TEXT
    assert got.finish_reason == "stop"
    assert all(c.id == "chatcmpl-loopback" for c in got.chunks)


async def test_flagged_stream_is_cut_with_content_filter_and_upstream_closed(setup: Setup, client: AsyncOpenAI) -> None:
    """Hold-back: the flagged word is never shown, the choice ends with content_filter, upstream stops early."""
    upstream = setup.upstream
    ended, aborted, sent = upstream.completed + upstream.aborted, upstream.aborted, upstream.events_sent
    got = await stream(client, "tell me the flagged plan")
    assert got.finish_reason == "content_filter"
    assert FLAG not in got.text
    assert FLAGGED_TEXT.startswith(got.text)
    assert got.text.startswith("The plan was simple")
    assert await upstream.await_ended(ended + 1, 10)
    assert upstream.aborted == aborted + 1
    total_events = len(text_chunks(words(FLAGGED_TEXT)))
    assert upstream.events_sent - sent < total_events // 2


async def test_redact_replaces_the_flagged_window_and_goes_on(setup: Setup, client: AsyncOpenAI) -> None:
    """Redact: the flagged window becomes the redaction text and the rest of the stream follows."""
    got = await stream(client, "tell me the flagged plan", guardrail="sg-redact")
    assert FLAG not in got.text
    assert "[removed]" in got.text
    assert got.finish_reason == "stop"
    before, _, after = got.text.partition("[removed]")
    assert FLAGGED_TEXT.startswith(before) and before.startswith("The plan was simple")
    assert FLAGGED_TEXT.endswith(after) and after.endswith("more298 more299")


async def test_flagged_tool_call_arguments_never_arrive(setup: Setup, client: AsyncOpenAI) -> None:
    """A tool call whose arguments hold the flagged word is never emitted, not even its name;
    the choice ends with content_filter."""
    got = await stream(client, "call the tool")
    calls = [t for c in got.chunks if c.choices for t in c.choices[0].delta.tool_calls or ()]
    arguments = "".join(t.function.arguments or "" for t in calls if t.function is not None)
    assert FLAG not in arguments
    assert calls == []
    assert got.finish_reason == "content_filter"


def reasoning_of(got: Received) -> str:
    return "".join(
        str((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "") for c in got.chunks if c.choices
    )


async def test_clean_reasoning_arrives_whole(setup: Setup, client: AsyncOpenAI) -> None:
    """Reasoning passes through LiteLLM and the guardrail whole when it is clean, then the answer."""
    got = await stream(client, "think in reasoning, calmly")
    assert reasoning_of(got) == CALM_THOUGHTS
    assert got.text == CLEAN_TEXT
    assert got.finish_reason == "stop"


async def test_flagged_reasoning_never_arrives(setup: Setup, client: AsyncOpenAI) -> None:
    """Reasoning (``reasoning_content``) is a moderated channel: the flagged thought is never shown and
    the choice ends with content_filter before any answer text."""
    got = await stream(client, "think in reasoning first")
    assert FLAG not in reasoning_of(got)
    assert got.text == ""
    assert got.finish_reason == "content_filter"


async def test_flagged_input_ends_the_stream_with_content_filter(setup: Setup, client: AsyncOpenAI) -> None:
    """Input moderation (STREAMGUARD_MODERATE_INPUT): a flagged prompt gets no text, only content_filter."""
    got = await stream(client, f"tell me something calm about the {FLAG} thing")
    assert got.text == ""
    assert got.finish_reason == "content_filter"


async def complete(client: AsyncOpenAI, prompt: str, guardrail: str = "sg-env") -> tuple[str | None, str]:
    with anyio.fail_after(30):
        response = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": prompt}],
            extra_body={"guardrails": [guardrail]},
        )
    return response.choices[0].message.content, response.choices[0].finish_reason


async def test_non_streamed_clean_answer_is_unchanged(setup: Setup, client: AsyncOpenAI) -> None:
    """A clean non-streamed answer comes back as upstream sent it."""
    assert await complete(client, "say something calm") == (ANSWER_CLEAN, "stop")


async def test_non_streamed_cutoff_keeps_the_clean_prefix(setup: Setup, client: AsyncOpenAI) -> None:
    """Non-streamed cut-off: the clean prefix stays, the rest goes, finish_reason is content_filter."""
    content, finish = await complete(client, "say the flagged thing")
    assert finish == "content_filter"
    assert content is not None and FLAG not in content
    assert ANSWER_FLAGGED.startswith(content)
    assert content.startswith("First a long clean part")


async def test_non_streamed_redact_replaces_only_the_flagged_window(setup: Setup, client: AsyncOpenAI) -> None:
    """Non-streamed redact: the flagged window is replaced, the text before and after it stays."""
    content, finish = await complete(client, "say the flagged thing", guardrail="sg-redact")
    assert content is not None and FLAG not in content
    before, _, after = content.partition("[removed]")
    assert ANSWER_FLAGGED.startswith(before) and before.startswith("First a long clean part")
    assert ANSWER_FLAGGED.endswith(after) and after.endswith("the sea and the sky.")
    assert finish == "stop"


async def test_non_streamed_tool_calls_are_judged(setup: Setup, client: AsyncOpenAI) -> None:
    """Non-streamed: a clean tool call comes back as sent; one whose arguments hold the flagged word is removed
    whole and the choice ends with content_filter."""
    with anyio.fail_after(30):
        clean = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "call the tool, calmly"}],
            extra_body={"guardrails": ["sg-env"]},
        )
        flagged = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "call the tool"}],
            extra_body={"guardrails": ["sg-env"]},
        )
    calls = clean.choices[0].message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls if c.type == "function"] == [
        ("lookup", CALM_ARGUMENTS)
    ]
    assert clean.choices[0].finish_reason == "tool_calls"
    assert not flagged.choices[0].message.tool_calls
    assert flagged.choices[0].finish_reason == "content_filter"


async def test_non_streamed_flagged_input_is_answered_with_content_filter(setup: Setup, client: AsyncOpenAI) -> None:
    """Input moderation during the upstream call (LiteLLM's during_call hook): no text, content_filter."""
    assert await complete(client, f"say something calm about the {FLAG} thing") == ("", "content_filter")


def moderated_texts(upstream: LoopbackUpstream) -> list[str]:
    """Every text the upstream's Moderation endpoint was asked about, in order."""
    inputs = [body.get("input", []) for path, body in upstream.requests if path == "/v1/moderations"]
    return [t for i in inputs for t in ([i] if isinstance(i, str) else i)]


async def test_non_streamed_input_is_moderated_beside_the_upstream_call(setup: Setup, client: AsyncOpenAI) -> None:
    """With ``during_call``, a flagged input is judged in LiteLLM's moderation hook while upstream answers:
    only the prompt goes to the Moderation endpoint, the answer is never sent there, and none of it is shown."""
    upstream = setup.upstream
    texts, chats = len(moderated_texts(upstream)), upstream.count("/v1/chat/completions")
    prompt = f"say something calm about the {FLAG} thing"
    assert await complete(client, prompt, guardrail="sg-openai") == ("", "content_filter")
    sent = moderated_texts(upstream)[texts:]
    assert len(sent) == 1 and prompt in sent[0]
    assert upstream.count("/v1/chat/completions") == chats + 1


async def test_openai_moderator_cuts_a_flagged_stream(setup: Setup, client: AsyncOpenAI) -> None:
    """The Moderation-endpoint moderator (batched, shared by the process) cuts a flagged stream like the keyword one."""
    got = await stream(client, "tell me the flagged plan", guardrail="sg-openai")
    assert got.finish_reason == "content_filter"
    assert FLAG not in got.text and FLAGGED_TEXT.startswith(got.text)


def test_a_bad_configuration_stops_the_proxy_instead_of_running_unguarded(tmp_path: Path) -> None:
    """LiteLLM skips a guardrail whose constructor raises ValueError and serves without it; StreamGuardrail's
    configuration errors stop the proxy at start instead, with the reason in its log."""
    config = CONFIG.format(base_url="http://127.0.0.1:9/v1").replace(
        "streamguard_redaction:", "streamguard_mode: later\n      streamguard_redaction:"
    )
    with pytest.raises(RuntimeError, match="litellm exited") as caught:
        with run_litellm(config, tmp_path, ENV):
            pass
    assert "mode must be one of 'holdback', 'stream_first', got 'later'" in str(caught.value)


def test_proxy_log_has_no_traceback(setup: Setup) -> None:
    """Nothing the guardrail did raised inside the proxy."""
    log = setup.proxy.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
