"""Property tests of the engine: random chunkings, flag positions, verdict latencies, n=1..2."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionChunk

import streamguard as sg
from streamguard.testing import ScriptedStream, chat_chunk

MARKER = "XBAD"
VOCAB = ["alpha", "beta", "gamma", "of", "a", "longerwordhere", "x", "\n", "é", "字字", MARKER]


class JitterModerator:
    """Flags texts holding MARKER as a whole word, after latencies drawn by hypothesis."""

    def __init__(self, latencies: Sequence[float]) -> None:
        self._latencies = itertools.cycle(latencies or [0.0])
        self._rule = re.compile(rf"\b{MARKER}\b")

    async def moderate(self, texts: Sequence[str]) -> list[sg.Verdict]:
        await anyio.sleep(next(self._latencies))
        return [sg.Verdict(bool(self._rule.search(t)), {"bad": bool(self._rule.search(t))}) for t in texts]


@st.composite
def choice_text(draw: st.DrawFn) -> tuple[str, list[str]]:
    tokens = draw(st.lists(st.sampled_from(VOCAB), min_size=1, max_size=40))
    text = " ".join(tokens)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=30))))
    bounds = [0, *[c for c in cuts if c < len(text)], len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def redact(text: str, spans: list[tuple[int, int]], redaction: str) -> str:
    out, pos = [], 0
    for s, e in sorted(spans):
        out += [text[pos:s], redaction]
        pos = e
    return "".join(out) + text[pos:]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    choices=st.lists(choice_text(), min_size=1, max_size=2),
    latencies=st.lists(st.sampled_from([0.0, 0.0005, 0.002, 0.004]), max_size=6),
    mode=st.sampled_from(["holdback", "stream_first"]),
    action=st.sampled_from(["cutoff", "redact"]),
    window=st.integers(6, 48),
    first=st.integers(1, 48),
    overlap=st.integers(len(MARKER) + 1, 24),
)
def test_guarded_stream_properties(
    choices: list[tuple[str, list[str]]],
    latencies: list[float],
    mode: str,
    action: str,
    window: int,
    first: int,
    overlap: int,
) -> None:
    """Hold-back never shows flagged text; clean text is never lost, duplicated or reordered."""
    policy = sg.Policy(
        mode=mode,  # type: ignore[arg-type]
        action=action,  # type: ignore[arg-type]
        window_chars=window,
        first_window_chars=min(first, window),
        overlap_chars=overlap,
        flush_after=0.01,
    )
    chunks = [chat_chunk("", role="assistant", index=i) for i in range(len(choices))]
    streams = [[chat_chunk(d, index=i) for d in deltas] for i, (_, deltas) in enumerate(choices)]
    for group in itertools.zip_longest(*streams):
        chunks += [c for c in group if c is not None]
    chunks += [chat_chunk(index=i, finish_reason="stop") for i in range(len(choices))]

    async def main() -> tuple[list[ChatCompletionChunk], sg.GuardReport]:
        with anyio.fail_after(10):  # every stream terminates
            async with sg.guard(
                ScriptedStream(chunks), moderator=JitterModerator(latencies), policy=policy, n=len(choices)
            ) as guarded:
                out = [c async for c in guarded]
        return out, guarded.report

    out, report = anyio.run(main)
    for index, (text, _) in enumerate(choices):
        released = "".join(ch.delta.content or "" for c in out for ch in c.choices if ch.index == index)
        flags = [f for f in report.flags if f.choice == index]
        finishes = [ch.finish_reason for c in out for ch in c.choices if ch.index == index and ch.finish_reason]
        if not flags:
            assert released == text
            assert finishes == ["stop"]
            continue
        if mode == "holdback":
            assert MARKER not in released.replace(policy.redaction, "|")
            assert report.leaked_chars == 0 or any(f.choice != index for f in report.flags)
            if action == "cutoff":
                assert released == text[: flags[0].start]
                assert finishes == ["content_filter"]
            else:
                assert released == redact(text, [(f.start, f.end) for f in flags], policy.redaction)
                assert finishes == ["stop"]
        else:
            if action == "cutoff":
                assert text.startswith(released) and len(released) >= flags[0].start
                assert finishes == ["content_filter"]
            else:
                assert released == text  # shown already; the flags say what to retract
    if mode == "stream_first" and action == "cutoff":
        shown = sum(
            len("".join(ch.delta.content or "" for c in out for ch in c.choices if ch.index == f.choice)) - f.start
            for f in report.flags
        )
        assert report.leaked_chars == shown
