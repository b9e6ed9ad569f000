"""The local moderator's classification heads: logistic regressions on MiniLM sentence embeddings.

``_models/heads.json`` is written by ``python -m streamguard.moderation.train`` (see that module for
the data and the recipe) and committed. Each head is ``sigmoid(weights · embedding + bias)`` with
its own threshold:

- ``harmful``: any of the training datasets' positive class (hate, toxicity, unsafe requests, ...);
- one head per category where the data has categories (``hate``, ``harassment``, ``sexual``,
  ``sexual/minors``, ``self-harm``, ``violence``), named as the Moderation endpoint names them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..exceptions import ConfigError
from ._minilm import DIMENSIONS

__all__ = ["HEADS_PATH", "Heads", "load_heads"]

HEADS_PATH = Path(__file__).parent / "_models" / "heads.json"
FORMAT = 1


@dataclass(frozen=True)
class Heads:
    """Logistic heads over one embedding space.

    Attributes:
        names: Category of each head, in order.
        weights: numpy array ``(len(names), 384)``.
        biases: numpy array ``(len(names),)``.
        thresholds: Category -> probability at or above which it flags.
        meta: The file's ``embedding`` and ``training`` records (provenance).
    """

    names: tuple[str, ...]
    weights: Any
    biases: Any
    thresholds: Mapping[str, float]
    meta: Mapping[str, Any]

    def probabilities(self, embeddings: Any) -> Any:
        """Each head's probability for each row of ``embeddings``: shape ``(rows, len(names))``."""
        import numpy as np

        logits = np.asarray(embeddings, dtype=np.float64) @ self.weights.T + self.biases
        return 1.0 / (1.0 + np.exp(-np.clip(logits, -60.0, 60.0)))


def heads_from(document: Mapping[str, Any]) -> Heads:
    """Build :class:`Heads` from a parsed ``heads.json`` document (validated)."""
    import numpy as np

    if document.get("format") != FORMAT:
        raise ConfigError(f"heads file format {document.get('format')!r}, expected {FORMAT}")
    raw = document.get("heads")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("heads file has no heads")
    names, rows, biases, thresholds = [], [], [], {}
    for name, head in raw.items():
        weights = head.get("weights") if isinstance(head, dict) else None
        if not isinstance(weights, list) or len(weights) != DIMENSIONS:
            raise ConfigError(f"head {name!r} needs {DIMENSIONS} weights")
        threshold, bias = head.get("threshold"), head.get("bias")
        values = [*weights, bias, threshold]
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise ConfigError(f"head {name!r} has a weight, bias or threshold that is not a finite number")
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"head {name!r} threshold must be in [0, 1], got {threshold!r}")
        names.append(str(name))
        rows.append(weights)
        biases.append(bias)
        thresholds[str(name)] = float(threshold)
    return Heads(
        names=tuple(names),
        weights=np.asarray(rows, dtype=np.float64),
        biases=np.asarray(biases, dtype=np.float64),
        thresholds=thresholds,
        meta={k: document.get(k) for k in ("embedding", "training")},
    )


def load_heads(path: Path = HEADS_PATH) -> Heads:
    """Read and validate a heads file (by default the committed one).

    Raises:
        ConfigError: The file is missing or malformed.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the moderation heads {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return heads_from(document)
