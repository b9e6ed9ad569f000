"""A fast offline profanity moderator: alt-profanity-check's scikit-learn model, shipped inside the package.

It is the second signal of :class:`~streamguard.moderation.LocalModerator`, and usable alone where
only profanity matters and a window must cost microseconds.

The model is loaded on first use, in a worker thread (loading takes about a second), and every
prediction runs in a worker thread too, so the event loop never blocks. Concurrent callers are
batched (``_batcher.py``): one vectorised ``predict_prob`` call serves many windows.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import anyio.to_thread

from ..exceptions import ConfigError
from ._base import Verdict
from ._batcher import Batcher
from .normalize import moderation_view

__all__ = ["ProfanityModerator"]

CATEGORY = "profanity"
_INSTALL_HINT = "ProfanityModerator needs alt-profanity-check: pip install 'streamguard[local]'"
_load_lock = threading.Lock()


class ProfanityModerator:
    """Flag profanity and insults offline, with alt-profanity-check's linear model.

    Each verdict has one category, ``"profanity"``, scored with the model's probability.

    Args:
        threshold: Probability at or above which a text is flagged.
        max_batch: Most texts in one prediction call.
        max_wait: Seconds the first text of a batch waits for texts of concurrent callers.

    Raises:
        ConfigError: alt-profanity-check is not installed, or an option is out of range.
    """

    def __init__(self, *, threshold: float = 0.5, max_batch: int = 64, max_wait: float = 0.002) -> None:
        if not (0.0 <= threshold <= 1.0 and math.isfinite(threshold)):
            raise ConfigError(f"threshold must be in [0, 1], got {threshold!r}")
        if importlib.util.find_spec("profanity_check") is None:
            raise ConfigError(_INSTALL_HINT)
        self.threshold = threshold
        self._predict: Callable[[list[str]], Any] | None = None
        self._batcher: Batcher[str, float] = Batcher(self._score, max_batch=max_batch, max_wait=max_wait)

    @property
    def batches(self) -> int:
        """Prediction calls made so far (each serves one batch of concurrent callers)."""
        return self._batcher.batches

    def load(self) -> None:
        """Load the model now (blocking, about a second) instead of on the first call.

        Raises:
            ConfigError: alt-profanity-check or scikit-learn cannot be imported.
        """
        if self._predict is not None:
            return
        with _load_lock, warnings.catch_warnings():
            # A model pickled by another scikit-learn version loads with a warning
            # (InconsistentVersionWarning, a UserWarning); the model is a plain linear one.
            warnings.filterwarnings("ignore", message="Trying to unpickle estimator", category=UserWarning)
            try:
                from profanity_check import predict_prob
            except ImportError as exc:
                raise ConfigError(f"{_INSTALL_HINT} ({exc})") from exc
        self._predict = predict_prob

    def probabilities(self, texts: Sequence[str]) -> list[float]:
        """Profanity probability of each text (blocking; loads the model if needed)."""
        if not texts:
            return []
        self.load()
        assert self._predict is not None
        return [float(p) for p in self._predict(list(texts))]

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        """Judge each text in a worker thread; one verdict per text, in order.

        Args:
            texts: Texts to judge, batched with those of concurrent callers.

        Returns:
            One :class:`Verdict` per text, category ``"profanity"``.

        Raises:
            ConfigError: The model cannot be loaded.
        """
        scores = await self._batcher.submit([moderation_view(t).text for t in texts])
        out = []
        for score in scores:
            hit = score >= self.threshold
            out.append(Verdict(flagged=hit, categories={CATEGORY: hit}, scores={CATEGORY: score}))
        return out

    async def _score(self, texts: list[str]) -> list[float]:
        return await anyio.to_thread.run_sync(self.probabilities, texts)
