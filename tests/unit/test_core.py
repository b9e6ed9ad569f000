"""The sans-IO core, driven synchronously: tables and hypothesis properties, no event loop."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamguard import Policy, Verdict
from streamguard._engine.core import (
    CloseUpstream,
    Core,
    CutFinish,
    EmitUsage,
    Finished,
    Moderate,
    Notify,
    Release,
)
from streamguard._engine.emit import ChatShape
from streamguard.exceptions import ModerationError, StreamTimeout

BAD = "attack"
CHANNELS = ("content", "reasoning_content", "refusal", "tool")


def chunk(delta: dict[str, Any], *, index: int = 0, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }


def delta_for(channel: str, text: str, *, first: bool) -> dict[str, Any]:
    if channel == "tool":
        call: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
        if first:
            call.update(id="call_1", type="function")
            call["function"]["name"] = "lookup"
        return {"tool_calls": [call]}
    return {channel: text}


@dataclass
class Run:
    """Everything that came out of one simulated stream."""

    out: list[Any] = field(default_factory=list)
    finished: Finished | None = None
    closed: bool = False
    moderated: list[str] = field(default_factory=list)
    flags: list[Any] = field(default_factory=list)
    snapshots: list[dict[str, str]] = field(default_factory=list)  # released text per channel after each release


def released(out: Iterable[Any]) -> dict[str, str]:
    """Concatenated released text per channel (tool: arguments of call 0)."""
    texts: dict[str, str] = {}
    for c in out:
        for ch in c.get("choices") or []:
            delta = ch.get("delta") or {}
            for name in ("content", "reasoning_content", "refusal"):
                if delta.get(name):
                    texts[name] = texts.get(name, "") + delta[name]
            for call in delta.get("tool_calls") or []:
                args = (call.get("function") or {}).get("arguments") or ""
                texts["tool"] = texts.get("tool", "") + args
    return texts


def simulate(
    chunks: Sequence[dict[str, Any]],
    policy: Policy,
    *,
    order: random.Random,
    judge: Any = lambda text: BAD in text.lower(),
    end: bool = True,
    n: int = 1,
) -> Run:
    """Feed ``chunks`` and answer moderation requests in a random interleaving."""
    core = Core(policy, n=n)
    shape = ChatShape()
    run = Run()
    waiting: list[Moderate] = []
    todo = list(chunks)
    now = 0.0

    def drain() -> None:
        while core.actions:
            action = core.actions.popleft()
            if isinstance(action, Moderate):
                waiting.append(action)
                run.moderated.append(action.text)
            elif isinstance(action, Release):
                run.out.append(action.original if action.edit is None else shape.build(action.original, action.edit))
                run.snapshots.append(released(run.out))
            elif isinstance(action, CutFinish):
                run.out.append(shape.cut_finish(action.choice, action.template))
            elif isinstance(action, EmitUsage):
                run.out.append(shape.usage_chunk(action.template, {"completion_tokens": 0}))
            elif isinstance(action, Notify):
                if action.hook == "flag":
                    run.flags.append(action.arg)
            elif isinstance(action, CloseUpstream):
                run.closed = True
                todo.clear()
            elif isinstance(action, Finished):
                run.finished = action

    steps = 0
    while (todo or waiting) and run.finished is None:
        steps += 1
        assert steps < 100_000, "the core made no progress"
        now += 0.001
        if todo and (not waiting or order.random() < 0.5) and core.wants_input:
            for original, choice, texts, finish, opens, _names in shape.units(todo.pop(0)):
                core.feed(original, choice, texts, finish=finish, opens=opens, now=now)
            if not todo and end:
                core.end(now=now)
        elif waiting:
            action = waiting.pop(order.randrange(len(waiting)))
            hit = judge(action.text)
            core.verdict(
                action.ticket, Verdict(hit, {"violence": hit}, {"violence": 0.9 if hit else 0.1}), 0.01, now=now
            )
        else:
            core.tick(now + 1.0)  # reading paused with nothing in moderation: the quiet-gap flush
        drain()
    if end and run.finished is None:
        core.end(now=now)
        drain()
    return run


def stream(channel: str, pieces: Sequence[str], *, finish: str = "stop") -> list[dict[str, Any]]:
    chunks = [chunk({"role": "assistant"})]
    chunks += [chunk(delta_for(channel, p, first=i == 0)) for i, p in enumerate(pieces)]
    chunks.append(chunk({}, finish=finish))
    return chunks


def split(text: str, cuts: Sequence[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


WORDS = "the quick brown fox jumps over the lazy dog while we plan a calm picnic by the river".split()


@st.composite
def texts_with_bad_word(draw: st.DrawFn) -> tuple[str, int]:
    words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=60))
    at = draw(st.integers(0, len(words)))
    words.insert(at, BAD)
    return " ".join(words), at


policies = st.builds(
    Policy,
    window_chars=st.integers(8, 80),
    first_window_chars=st.integers(1, 8),
    overlap_chars=st.integers(0, 24),
    action=st.sampled_from(["cutoff", "redact"]),
    max_held_chars=st.sampled_from([None, 80, 200]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=texts_with_bad_word(),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
    policy=policies,
    channel=st.sampled_from(CHANNELS),
    seed=st.integers(0, 2**32),
)
def test_holdback_never_releases_a_flagged_word_in_any_channel(
    case: tuple[str, int], cuts: list[int], policy: Policy, channel: str, seed: int
) -> None:
    """Whatever the chunking, channel, window sizes and verdict order, the flagged word never goes out."""
    if policy.first_window_chars > policy.window_chars:
        return
    text, _ = case
    run = simulate(stream(channel, split(text, cuts)), policy, order=random.Random(seed))
    assert run.finished is not None and run.finished.error is None
    out = released(run.out)
    for snapshot in run.snapshots:
        for value in snapshot.values():
            assert BAD not in value
    assert run.flags, "the word was never flagged"
    got = out.get(channel, "")
    if policy.action == "cutoff" or channel == "tool":
        if channel == "tool":
            assert got == "" or (policy.action == "redact" and json.loads(got) == policy.redaction)
        else:
            assert text.startswith(got)
        finishes = [c["choices"][0]["finish_reason"] for c in run.out if c["choices"]]
        assert finishes[-1] == ("content_filter" if policy.action == "cutoff" else "stop")
    else:
        assert policy.redaction in got
        kept = got.replace(policy.redaction, "\0")
        assert all(part in text for part in kept.split("\0"))  # nothing but redactions was changed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=80),
    cuts=st.lists(st.integers(0, 10_000), max_size=40),
    policy=policies,
    channel=st.sampled_from(CHANNELS),
    mode=st.sampled_from(["holdback", "stream_first"]),
    seed=st.integers(0, 2**32),
)
def test_clean_text_is_released_whole_and_in_order(
    words: list[str], cuts: list[int], policy: Policy, channel: str, mode: str, seed: int
) -> None:
    """With no flag, every channel's released text equals upstream's, chunks in order, then one finish."""
    if policy.first_window_chars > policy.window_chars:
        return
    text = " ".join(words)
    chunks = stream(channel, split(text, cuts))
    policy = Policy(**{**policy.__dict__, "mode": mode})
    run = simulate(chunks, policy, order=random.Random(seed))
    assert run.finished is not None and run.finished.error is None
    assert released(run.out).get(channel, "") == text
    with_choices = [c for c in run.out if c["choices"]]
    assert with_choices[-1]["choices"][0]["finish_reason"] == "stop"
    assert [c["choices"][0]["finish_reason"] for c in with_choices[:-1]] == [None] * (len(with_choices) - 1)
    assert run.out[-1]["choices"] == [] and "usage" in run.out[-1]
    if channel != "tool":
        # Unsplit chunks are the very objects that came in, in upstream order.
        positions = {id(sent): i for i, sent in enumerate(chunks)}
        same = [positions[id(c)] for c in with_choices if id(c) in positions]
        assert same == sorted(same) and len(same) == len(set(same))


@settings(max_examples=150, deadline=None)
@given(
    case=texts_with_bad_word(),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    seed=st.integers(0, 2**32),
    n=st.integers(1, 3),
)
def test_a_flag_in_one_choice_leaves_the_others_whole(
    case: tuple[str, int], cuts: list[int], seed: int, n: int
) -> None:
    """n > 1: choice 0 carries the flagged word and is cut; every other choice arrives whole."""
    text, _ = case
    clean = text.replace(BAD, "plan")
    rng = random.Random(seed)
    per_choice = [split(text if i == 0 else clean, cuts) for i in range(n)]
    chunks: list[dict[str, Any]] = []
    cursors = [0] * n
    while any(cursors[i] < len(per_choice[i]) for i in range(n)):
        i = rng.choice([i for i in range(n) if cursors[i] < len(per_choice[i])])
        chunks.append(chunk({"content": per_choice[i][cursors[i]]}, index=i))
        cursors[i] += 1
    chunks += [chunk({}, index=i, finish="stop") for i in range(n)]
    run = simulate(chunks, Policy(window_chars=24), order=rng, n=n)
    by_choice: dict[int, str] = {}
    finish: dict[int, str] = {}
    for c in run.out:
        for ch in c["choices"]:
            by_choice[ch["index"]] = by_choice.get(ch["index"], "") + (ch["delta"].get("content") or "")
            if ch["finish_reason"]:
                finish[ch["index"]] = ch["finish_reason"]
    assert BAD not in by_choice.get(0, "") and finish[0] == "content_filter"
    for i in range(1, n):
        assert by_choice[i] == clean and finish[i] == "stop"


def test_a_flagged_tool_call_is_never_emitted_not_even_its_name() -> None:
    """Tool-call arguments are held until judged whole: a flag drops the call, its id and name too."""
    pieces = ['{"q": "how to ', BAD, ' the castle"}']
    run = simulate(stream("tool", pieces, finish="tool_calls"), Policy(), order=random.Random(1))
    for c in run.out:
        for ch in c["choices"]:
            assert not ch["delta"].get("tool_calls")
    assert [c["choices"][0]["finish_reason"] for c in run.out if c["choices"]][-1] == "content_filter"
    assert run.flags[0].channel == "tool:0"


def test_a_redacted_tool_call_keeps_valid_json() -> None:
    """Under redact, a flagged call's arguments become one JSON string; its name is kept."""
    pieces = ['{"q": "how to ', BAD, ' the castle"}']
    run = simulate(stream("tool", pieces, finish="tool_calls"), Policy(action="redact"), order=random.Random(2))
    calls = [call for c in run.out for ch in c["choices"] for call in ch["delta"].get("tool_calls") or []]
    args = "".join(call["function"].get("arguments") or "" for call in calls)
    assert json.loads(args) == "[redacted]"
    assert calls[0]["function"]["name"] == "lookup"
    assert run.out[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_reading_stops_at_the_held_text_cap_until_verdicts_free_room() -> None:
    """wants_input turns False at max_held_chars and True again once verdicts release text."""
    policy = Policy(window_chars=20, first_window_chars=20, max_held_chars=40)
    core = Core(policy)
    shape = ChatShape()
    fed = 0
    while core.wants_input:
        for u in shape.units(chunk({"content": "word " * 2})):
            core.feed(u[0], u[1], u[2], finish=u[3], opens=u[4], now=float(fed))
        fed += 1
    assert core.held_chars >= 40
    tickets = [a for a in core.actions if isinstance(a, Moderate)]
    assert tickets
    for action in tickets:
        core.verdict(action.ticket, Verdict(False, {}, {}), 0.1, now=100.0)
    assert core.wants_input
    assert core.held_chars < 40
    assert core.report().paused_seconds > 0


def test_idle_timeout_ends_with_a_typed_error() -> None:
    """No text for idle_timeout seconds: the stream ends with StreamTimeout."""
    core = Core(Policy(idle_timeout=5.0), now=0.0)
    assert core.next_deadline() == 5.0
    core.tick(4.9)
    assert not core.finished
    core.tick(5.0)
    finished = [a for a in core.actions if isinstance(a, Finished)]
    assert isinstance(finished[0].error, StreamTimeout)
    assert any(isinstance(a, CloseUpstream) for a in core.actions)


def test_max_duration_ends_even_while_text_flows() -> None:
    """A stream that keeps sending text still ends at max_duration."""
    core = Core(Policy(max_duration=10.0, idle_timeout=None), now=0.0)
    shape = ChatShape()
    for t in range(10):
        for u in shape.units(chunk({"content": "hi "})):
            core.feed(u[0], u[1], u[2], finish=u[3], opens=u[4], now=float(t))
    core.tick(10.0)
    assert isinstance([a for a in core.actions if isinstance(a, Finished)][0].error, StreamTimeout)


def test_failed_input_moderation_releases_nothing_under_fail_closed() -> None:
    """A failed input moderation ends the stream with ModerationError; no output text goes out."""
    core = Core(Policy(), input_text="hello there")
    shape = ChatShape()
    first = core.actions.popleft()
    assert isinstance(first, Moderate)
    for u in shape.units(chunk({"content": "Sure, here it is"})):
        core.feed(u[0], u[1], u[2], finish=u[3], opens=u[4], now=0.0)
    for action in list(core.actions):
        if isinstance(action, Moderate):
            core.verdict(action.ticket, Verdict(False, {}, {}), 0.01, now=0.1)
    core.verdict(first.ticket, RuntimeError("moderation down"), 0.01, now=0.2)
    releases = [a for a in core.actions if isinstance(a, Release)]
    assert releases == []
    finished = [a for a in core.actions if isinstance(a, Finished)]
    assert isinstance(finished[0].error, ModerationError)


def test_upstream_failure_during_moderation_ends_the_stream_once() -> None:
    """Upstream fails while a flagged window is in moderation: one ending (the error), no content_filter too."""
    core = Core(Policy(window_chars=10, first_window_chars=10))
    shape = ChatShape()
    for text in ["safe words ", f"then {BAD} "]:
        for u in shape.units(chunk({"content": text})):
            core.feed(u[0], u[1], u[2], finish=u[3], opens=u[4], now=0.0)
    core.fail(ConnectionError("gone"), now=0.1)
    for action in [a for a in core.actions if isinstance(a, Moderate)]:
        hit = BAD in action.text
        core.verdict(action.ticket, Verdict(hit, {"violence": hit}, {}), 0.01, now=0.2)
    endings = [a for a in core.actions if isinstance(a, CutFinish | Finished)]
    assert len(endings) == 1 and isinstance(endings[0], Finished)
    assert isinstance(endings[0].error, ConnectionError)


def test_unknown_delta_fields_with_text_are_dropped_and_reported() -> None:
    """A delta field the adapter does not know is never passed on if it carries text."""
    shape = ChatShape()
    units = shape.units(chunk({"content": "hi", "reasoning_details": [{"text": f"secret {BAD}"}]}))
    assert "reasoning_details" not in units[0][0]["choices"][0]["delta"]
    assert shape.dropped == ["delta.reasoning_details"]


def test_a_huge_delta_is_fed_in_slices() -> None:
    """A delta longer than SLICE_CHARS becomes several units, each carrying a slice of its text."""
    from streamguard._engine.emit import SLICE_CHARS

    text = "word " * (SLICE_CHARS // 2)
    units = ChatShape().units(chunk({"content": text}, finish="stop"))
    assert len(units) >= 3
    assert "".join(u[2][0][2] for u in units) == text
    assert all(len(u[2][0][2]) <= SLICE_CHARS for u in units)
    assert [u[3] for u in units] == [None] * (len(units) - 1) + ["stop"]
