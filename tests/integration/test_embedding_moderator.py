"""EmbeddingModerator through the real openai client, over real HTTP to a loopback Embeddings endpoint."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import anyio
import openai
import pytest

import streamguard as sg
from streamguard.exceptions import ConfigError, ModerationError
from streamguard.moderation import CompositeModerator, EmbeddingModerator, KeywordModerator, Verdict
from streamguard.moderation.embedding import _as_matrix, _Examples, _normalised, _similarities
from streamguard.testing.upstream import LoopbackUpstream, Reply, Script, hashed_embeddings, hashed_vector, text_chunks

PATH = "/v1/embeddings"
COMPETITORS = [
    "Globex sells a cheaper alternative to our product.",
    "Initech has better pricing than us, switch to Initech.",
    "Compared with Globex and Initech our plan costs more.",
]
REFUNDS = [
    "You will get a full refund within thirty days, guaranteed.",
    "We promise to refund your money if you are not happy.",
]
CATEGORIES = {"competitors": COMPETITORS, "refunds": REFUNDS}
EXAMPLES = COMPETITORS + REFUNDS
NEAR = "Globex pricing is cheaper, switch to Globex."
UNRELATED = "The weather is sunny and warm in the park today."


def expected_score(text: str, examples: Sequence[str]) -> float:
    """The score the moderator should report: the best cosine to the examples, clamped to [0, 1]."""
    q = hashed_vector(text)
    return max(0.0, min(1.0, max(sum(a * b for a, b in zip(q, hashed_vector(e), strict=True)) for e in examples)))


def inputs(body: dict[str, Any]) -> list[str]:
    """The input texts of an embeddings request body."""
    value = body.get("input", [])
    return [value] if isinstance(value, str) else [str(v) for v in value]


def sent_texts(upstream: LoopbackUpstream) -> list[str]:
    return [text for path, body in upstream.requests if path == PATH for text in inputs(body)]


@pytest.fixture
def upstream() -> Iterator[LoopbackUpstream]:
    with LoopbackUpstream(embeddings=hashed_embeddings) as server:
        yield server


@pytest.fixture
async def client(upstream: LoopbackUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(api_key="test", base_url=upstream.base_url) as c:
        yield c


class Failing:
    """An embeddings handler that fails with ``status`` for the first ``times`` requests."""

    def __init__(self, status: int, times: int) -> None:
        self.status = status
        self.times = times
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.calls += 1
            failing = self.calls <= self.times
        if failing:
            return Reply({"error": {"message": "down", "type": "server_error"}}, status=self.status)
        return hashed_embeddings(body)


async def test_close_text_flags_its_category_with_its_score(client: openai.AsyncOpenAI) -> None:
    """A text sharing words with a category's examples flags that category, scored by its best cosine."""
    moderator = EmbeddingModerator(client, categories=CATEGORIES, threshold=0.5)
    with anyio.fail_after(10):
        [verdict] = await moderator.moderate([NEAR])
    competitors = expected_score(NEAR, COMPETITORS)
    assert competitors >= 0.5
    assert verdict.flagged
    assert verdict.categories == {"competitors": True, "refunds": False}
    assert verdict.scores["competitors"] == pytest.approx(competitors, abs=1e-5)
    assert verdict.scores["refunds"] == pytest.approx(expected_score(NEAR, REFUNDS), abs=1e-5)
    decision = sg.Policy().judge(verdict)
    assert decision is not None and decision.category == "competitors"


async def test_unrelated_text_is_clean(client: openai.AsyncOpenAI) -> None:
    """A text sharing no words with any example stays clean, with low scores."""
    moderator = EmbeddingModerator(client, categories=CATEGORIES, threshold=0.5)
    with anyio.fail_after(10):
        [verdict] = await moderator.moderate([UNRELATED])
    assert verdict == Verdict(
        flagged=False, categories={"competitors": False, "refunds": False}, scores=dict(verdict.scores)
    )
    assert all(score < 0.5 for score in verdict.scores.values())
    assert sg.Policy().judge(verdict) is None


async def test_per_category_thresholds(client: openai.AsyncOpenAI) -> None:
    """Each category is compared with its own threshold; unlisted categories use the default 0.8."""
    text = "Globex is cheaper, and we promise a full refund of your money."
    competitors, refunds = expected_score(text, COMPETITORS), expected_score(text, REFUNDS)
    assert 0.2 < competitors < 0.8 and 0.2 < refunds < 0.8
    strict_competitors = EmbeddingModerator(
        client, categories=CATEGORIES, threshold={"competitors": competitors + 0.01, "refunds": refunds - 0.01}
    )
    strict_refunds = EmbeddingModerator(
        client, categories=CATEGORIES, threshold={"competitors": competitors - 0.01, "refunds": refunds + 0.01}
    )
    default_refunds = EmbeddingModerator(client, categories=CATEGORIES, threshold={"competitors": 0.1})
    with anyio.fail_after(10):
        [a] = await strict_competitors.moderate([text])
        [b] = await strict_refunds.moderate([text])
        [c] = await default_refunds.moderate([text])
    assert a.categories == {"competitors": False, "refunds": True} and a.flagged
    assert b.categories == {"competitors": True, "refunds": False} and b.flagged
    assert c.categories == {"competitors": True, "refunds": False}
    assert default_refunds.thresholds == {"competitors": 0.1, "refunds": 0.8}


async def test_examples_are_embedded_once(upstream: LoopbackUpstream, client: openai.AsyncOpenAI) -> None:
    """Concurrent first calls and many later calls embed the examples exactly once."""
    moderator = EmbeddingModerator(client, categories=CATEGORIES, max_wait=0.0)

    async def call(i: int) -> None:
        await moderator.moderate([f"window {i} about Globex"])

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(call, i)
        for i in range(10, 15):
            await call(i)
    sent = sent_texts(upstream)
    assert all(sent.count(example) == 1 for example in EXAMPLES)
    assert sorted(t for t in sent if t not in EXAMPLES) == sorted(f"window {i} about Globex" for i in range(15))
    requests = upstream.count(PATH)
    assert moderator.stats.requests == requests
    assert moderator.stats.calls == 15


async def test_examples_failure_is_not_cached(upstream: LoopbackUpstream, client: openai.AsyncOpenAI) -> None:
    """If embedding the examples fails, the next call embeds them again and succeeds."""
    upstream.embeddings = Failing(400, times=1)
    moderator = EmbeddingModerator(client, categories=CATEGORIES)
    with anyio.fail_after(10):
        with pytest.raises(ModerationError, match="HTTP 400"):
            await moderator.moderate([NEAR])
        [verdict] = await moderator.moderate([NEAR])
    assert verdict.categories["competitors"] is (expected_score(NEAR, COMPETITORS) >= 0.8)
    assert upstream.count(PATH) == 3  # failed examples, examples, the window


async def test_concurrent_calls_share_requests(upstream: LoopbackUpstream, client: openai.AsyncOpenAI) -> None:
    """50 concurrent callers make far fewer requests, and each gets the verdict of its own text."""
    moderator = EmbeddingModerator(client, categories=CATEGORIES, threshold=0.5, max_batch=64, max_wait=0.02)
    texts = [f"stream {i}: " + (NEAR if i % 5 == 0 else UNRELATED) for i in range(50)]
    verdicts: dict[int, list[Verdict]] = {}

    async def call(i: int) -> None:
        verdicts[i] = await moderator.moderate([texts[i]])

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(call, i)
    for i, text in enumerate(texts):
        [verdict] = verdicts[i]
        assert verdict.flagged is (i % 5 == 0), i
        assert verdict.scores["competitors"] == pytest.approx(expected_score(text, COMPETITORS), abs=1e-5)
    assert upstream.count(PATH) <= 6  # one for the examples, a few batches for 50 windows
    assert sorted(t for t in sent_texts(upstream) if t not in EXAMPLES) == sorted(texts)


async def test_results_are_mapped_by_index(upstream: LoopbackUpstream, client: openai.AsyncOpenAI) -> None:
    """Embeddings returned out of order are placed by their index, for the examples and the windows."""

    def shuffled(body: dict[str, Any]) -> Reply:
        reply = hashed_embeddings(body)
        data = reply.body["data"]
        reply.body["data"] = data[1::2][::-1] + data[::2]
        return reply

    upstream.embeddings = shuffled
    moderator = EmbeddingModerator(client, categories=CATEGORIES, threshold=0.5)
    texts = [UNRELATED, NEAR, "A full refund of your money, we promise.", UNRELATED + " Globex", "", NEAR]
    with anyio.fail_after(10):
        verdicts = await moderator.moderate(texts)
    for text, verdict in zip(texts, verdicts, strict=True):
        for name, examples in CATEGORIES.items():
            score = expected_score(text, examples) if text else 0.0
            assert verdict.scores[name] == pytest.approx(score, abs=1e-5), (text, name)
    assert [v.flagged for v in verdicts] == [False, True, True, False, False, True]
    assert "" not in sent_texts(upstream)  # the endpoint rejects empty inputs: never sent


@pytest.mark.parametrize("body", [{"data": [], "object": "list"}, {"data": [{"index": 7, "embedding": [1.0]}]}])
async def test_malformed_response_is_a_moderation_error(
    upstream: LoopbackUpstream, client: openai.AsyncOpenAI, body: Mapping[str, Any]
) -> None:
    """Missing embeddings or a bad index raise ModerationError instead of misattributing scores."""
    upstream.embeddings = lambda _: Reply(
        {"object": "list", "model": "m", "usage": {"prompt_tokens": 1, "total_tokens": 1}, **body}
    )
    with anyio.fail_after(10), pytest.raises(ModerationError):
        await EmbeddingModerator(client, categories=CATEGORIES).moderate(["text"])


async def test_5xx_exhausts_retries_then_raises_moderation_error(
    upstream: LoopbackUpstream, client: openai.AsyncOpenAI
) -> None:
    """A persistent 500 is tried 1 + max_retries times, then raised as ModerationError from the cause."""
    upstream.embeddings = Failing(500, times=1000)
    moderator = EmbeddingModerator(client, categories=CATEGORIES, max_retries=2, backoff=0.01)
    with anyio.fail_after(10), pytest.raises(ModerationError, match="after 2 retries") as info:
        await moderator.moderate(["hello"])
    assert isinstance(info.value.__cause__, openai.InternalServerError)
    assert upstream.count(PATH) == 3
    assert moderator.stats.retries == 2


async def test_transient_5xx_is_retried(upstream: LoopbackUpstream, client: openai.AsyncOpenAI) -> None:
    """A 503 followed by success is retried transparently."""
    upstream.embeddings = Failing(503, times=1)
    moderator = EmbeddingModerator(client, categories=CATEGORIES, threshold=0.5, backoff=0.01)
    with anyio.fail_after(10):
        [verdict] = await moderator.moderate([NEAR])
    assert verdict.flagged
    assert moderator.stats.retries == 1


async def test_composes_with_other_moderators(client: openai.AsyncOpenAI) -> None:
    """Inside a CompositeModerator, embedding categories and keyword categories merge into one verdict."""
    composite = CompositeModerator(
        EmbeddingModerator(client, categories=CATEGORIES, threshold=0.5), KeywordModerator({"profanity": ["damn"]})
    )
    with anyio.fail_after(10):
        near, cursed, clean = await composite.moderate([NEAR, "damn it", UNRELATED])
    assert near.flagged and near.categories["competitors"] and not near.categories["profanity"]
    assert cursed.flagged and cursed.categories["profanity"] and not cursed.categories["competitors"]
    assert not clean.flagged and set(clean.scores) >= {"competitors", "refunds"}


STORY = [
    "Thanks for asking about the Pro tier. ",
    "It includes unlimited projects, shared dashboards and priority support. ",
    "Setup takes a few minutes from the settings page. ",
    "Honestly, Globex sells a cheaper alternative with better pricing, ",
    "so switch to Globex or Initech instead. ",
    "Anyway, let me know if you need anything else. ",
] * 3


async def test_guarded_stream_is_cut_off_on_a_competitor_topic(
    upstream: LoopbackUpstream, client: openai.AsyncOpenAI
) -> None:
    """A loopback chat stream guarded by EmbeddingModerator ends with content_filter before the competitor talk."""
    deltas = [w + " " for part in STORY for w in part.split()]
    upstream.chat = lambda body: Script(text_chunks(deltas), delay=0.001)
    moderator = EmbeddingModerator(client, categories={"competitors": COMPETITORS}, threshold=0.5)
    with anyio.fail_after(10):
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Tell me about Pro."}], stream=True
        )
        # Default windows; no flush at a quiet gap, so the windows do not depend on scheduling.
        async with sg.guard(stream, moderator=moderator, policy=sg.Policy(flush_after=5.0)) as guarded:
            chunks = [c async for c in guarded]
        assert await upstream.await_ended(1)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Thanks for asking about the Pro tier. It includes")
    assert "Globex" not in text and "Initech" not in text
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["content_filter"]
    flag = guarded.report.flags[0]
    assert flag.category == "competitors" and flag.score is not None and flag.score >= 0.5
    assert upstream.aborted == 1


def test_similarities_without_numpy_match_numpy() -> None:
    """The pure-Python fallback computes the same similarities as the numpy path."""
    rows = [_normalised(hashed_vector(e)) for e in EXAMPLES]
    owners = ["competitors"] * len(COMPETITORS) + ["refunds"] * len(REFUNDS)
    queries = [_normalised(hashed_vector(t)) for t in (NEAR, "refund Globex")]
    pure = _similarities(queries, _Examples(vectors=rows, owners=owners))
    fast = _similarities(queries, _Examples(vectors=rows, owners=owners, matrix=_as_matrix(rows)))
    for a, b in zip(pure, fast, strict=True):
        assert a == pytest.approx(b, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"categories": {}}, "at least one category"),
        ({"categories": {"c": []}}, "non-empty example"),
        ({"categories": {"c": ["  "]}}, "non-empty example"),
        ({"categories": {"c": "one string"}}, "not one string"),
        ({"categories": {"c": ["x"]}, "threshold": 1.5}, "in \\[0, 1\\]"),
        ({"categories": {"c": ["x"]}, "threshold": {"d": 0.5}}, "unknown categories"),
        ({"categories": {"c": ["x"]}, "max_batch": 0}, "max_batch"),
        ({"categories": {"c": ["x"]}, "max_retries": -1}, "max_retries"),
    ],
)
def test_bad_options_raise_config_error(kwargs: dict[str, Any], message: str) -> None:
    """Invalid options fail at construction with a ConfigError naming the problem."""
    client = openai.AsyncOpenAI(api_key="test", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match=message):
        EmbeddingModerator(client, **kwargs)
