"""The incremental SSE parser: chunk boundaries never matter; the event-stream rules hold."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamguard._sse_parse import SSEEvent, SSEParser
from streamguard.exceptions import StreamFormatError, StreamGuardError
from streamguard.sse import _payload


def parse(body: bytes, cuts: list[int] | None = None) -> list[SSEEvent]:
    """Feed ``body`` split at ``cuts`` (sorted offsets), then finish."""
    parser = SSEParser()
    events: list[SSEEvent] = []
    start = 0
    for cut in sorted(cuts or []):
        events += parser.feed(body[start:cut])
        start = cut
    events += parser.feed(body[start:])
    return events + parser.finish()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"data: a\n\n", [SSEEvent("a")]),
        (b"data: a\r\n\r\ndata: b\r\r", [SSEEvent("a"), SSEEvent("b")]),
        (b"data: one\ndata: two\n\n", [SSEEvent("one\ntwo")]),
        (b": ping\n\ndata: x\n\n", [SSEEvent("x")]),
        (b"event: delta\ndata: x\nid: 7\n\n", [SSEEvent("x", "delta", "7")]),
        (b"event: only\n\ndata: x\n\n", [SSEEvent("x")]),  # no data: not dispatched, name reset
        (b"data:no-space\n\n", [SSEEvent("no-space")]),
        (b"data:  two\n\n", [SSEEvent(" two")]),
        (b"data\n\n", [SSEEvent("")]),
        (b"retry: 10\nfoo: bar\ndata: x\n\n", [SSEEvent("x")]),
        (b"\xef\xbb\xbfdata: bom\n\n", [SSEEvent("bom")]),
        (b"data: last", [SSEEvent("last")]),  # no closing blank line: dispatched at the end
        ("data: caf\u00e9 \U0001f600\n\n".encode(), [SSEEvent("caf\u00e9 \U0001f600")]),
        (b"", []),
    ],
)
def test_parses(body: bytes, expected: list[SSEEvent]) -> None:
    """Each body parses to the expected events."""
    assert parse(body) == expected


def test_crlf_split_between_cr_and_lf() -> None:
    """A boundary between ``\\r`` and ``\\n`` (even with an empty chunk between) is one line ending."""
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\n\r") == [SSEEvent("a")]
    assert parser.feed(b"\ndata: b\n\n") == [SSEEvent("b")]
    assert parser.finish() == []


def test_invalid_utf8_is_a_format_error() -> None:
    """A line that is not UTF-8 raises StreamFormatError (a ValueError)."""
    with pytest.raises(StreamFormatError) as info:
        parse(b"data: \xff\xfe\n\n")
    assert isinstance(info.value, ValueError) and isinstance(info.value, StreamGuardError)


_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), max_size=20)
_event = st.tuples(st.lists(_text, min_size=1, max_size=3), st.none() | _text.filter(lambda s: ":" not in s))
_newline = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, list[SSEEvent]]:
    """A valid body (mixed line endings, comments, BOM) and the events it holds."""
    events = draw(st.lists(_event, max_size=6))
    lines: list[str] = []
    expected = []
    for data, name in events:
        if draw(st.booleans()):
            lines.append(": keep-alive")
        if name is not None:
            lines.append(f"event: {name}")
        lines += [f"data: {line}" for line in data]
        lines.append("")
        expected.append(SSEEvent("\n".join(data), name or None))
    endings = [draw(_newline) for _ in lines]
    for i in range(len(endings) - 1):
        if endings[i] == "\r" and not lines[i + 1] and endings[i + 1].startswith("\n"):
            endings[i] = "\r\n"  # "\r" then an empty "\n" line would be one line ending
    bom = "\ufeff" if draw(st.booleans()) else ""
    return (bom + "".join(line + end for line, end in zip(lines, endings, strict=True))).encode(), expected


@given(bodies(), st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_random_splits_give_the_same_events(case: tuple[bytes, list[SSEEvent]], cuts: list[int]) -> None:
    """Any split of a valid body, even inside a UTF-8 character, gives the same events."""
    body, expected = case
    whole = parse(body)
    assert whole == [SSEEvent(e.data, e.event) for e in expected]
    assert parse(body, [c for c in cuts if c <= len(body)]) == whole


@given(bodies())
def test_byte_at_a_time(case: tuple[bytes, list[SSEEvent]]) -> None:
    """Feeding one byte at a time gives the same events as feeding it whole."""
    body, _ = case
    assert parse(body, list(range(len(body)))) == parse(body)


@pytest.mark.parametrize(
    ("data", "event", "match"),
    [
        ("{not json", None, "not valid JSON"),
        ("[1, 2]", None, "not a JSON object"),
        ('"text"', None, "not a JSON object"),
        (json.dumps({"error": {"message": "Rate limit reached", "type": "rate_limit"}}), None, "Rate limit reached"),
        (json.dumps({"error": "overloaded"}), None, "overloaded"),
        (json.dumps({"message": "bad"}), "error", "error event"),
    ],
)
def test_malformed_payloads(data: str, event: str | None, match: str) -> None:
    """Malformed or error payloads raise StreamFormatError naming the problem."""
    with pytest.raises(StreamFormatError, match=match):
        _payload(data, event)
