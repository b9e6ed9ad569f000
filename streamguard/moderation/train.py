"""Train the local moderator's classification heads; write ``_models/heads.json``.

Usage (from the repo root; needs the ``local`` extra)::

    python -m streamguard.moderation.train             # retrain, write streamguard/moderation/_models/heads.json
    python -m streamguard.moderation.train --check     # retrain, compare with the committed file (exit 1 if not equal)
    python -m streamguard.moderation.train --lodo      # leave-one-dataset-out F1 of the heads, whole texts
    python -m streamguard.moderation.train --split --out FILE    # heads from the 70% that held_out() leaves in
    python -m streamguard.moderation.train --exclude xstest_prompts --out FILE   # without a dataset

``--cache FILE.npz`` keeps the embeddings between runs (development only: ``--check`` without it
re-embeds everything, so it also checks that the embeddings are reproducible).
``benchmarks/moderation_quality.py --heads split|lodo`` streams held-out texts through ``guard()``
with heads trained this way.

Data: ``data/moderation/*.jsonl`` in the repo (labelled DEV data copied from public datasets, see
``data/moderation/README.md`` for sources, licences and how the rows were chosen).

Recipe (deterministic: the same data gives byte-identical weights):

1. Embed every text with :class:`~streamguard.moderation._minilm.MiniLM` (the run-time model).
2. ``harmful`` head: target = the row's ``flagged``; every dataset gets the same total weight
   (so 3,000 tweets do not drown 273 XSTest prompts).
3. One head per category (:data:`CATEGORIES`): a row is positive when a label maps to the
   category (:data:`CATEGORY_OF`), negative when that label is 0 or the row is not flagged at all,
   and left out otherwise (e.g. a flagged HateCheck case says nothing about ``sexual``); positives
   and negatives get equal total weight.
4. Windows of clean texts are negatives too (:func:`windows_of`: the first word, the next few
   words with the first as context, ... as a guarded stream cuts them with the default
   ``Policy``): a fragment like "You" or "How do I kill" must not flag on its own. They share
   :data:`FRAGMENT_WEIGHT` of their dataset's weight. Windows of flagged texts are not used (a
   window of a hateful text may be harmless).
5. L2-regularised logistic regression (:data:`L2`, bias not penalised), fitted by Newton's method
   in float64 until a step moves no weight by more than 1e-9; weights rounded to 6 decimals.

Thresholds are fixed, chosen on a 70/30 split of this data by template/text hash (never on the
held-out data): 0.5 for ``harmful``, 0.8 for the category heads (which only add recall where the
``harmful`` head is unsure), except 1.0 (never flags alone) for :data:`REPORT_ONLY` heads, which
had too few examples to be trusted on their own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._heads import FORMAT, HEADS_PATH
from ._minilm import MODEL_PACKAGE, MODEL_SHA256

__all__ = [
    "CATEGORIES",
    "CATEGORY_OF",
    "Row",
    "fit_logistic",
    "fragments",
    "held_out",
    "load_rows",
    "main",
    "train",
    "windows_of",
    "with_fragments",
]

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "moderation"
CATEGORIES = ("hate", "harassment", "sexual", "sexual/minors", "self-harm", "violence")
# Dataset label -> category (labels not listed only count towards ``harmful``).
CATEGORY_OF = {
    "hate": "hate",
    "hateful": "hate",
    "hate_speech": "hate",
    "hate/threatening": "hate",
    "harassment": "harassment",
    "sexual": "sexual",
    "sexual/minors": "sexual/minors",
    "self-harm": "self-harm",
    "violence": "violence",
    "violence/graphic": "violence",
}
L2 = 1.0
ITERATIONS = 20
TOLERANCE = 1e-9
HARMFUL = "harmful"
HARMFUL_THRESHOLD = 0.5
CATEGORY_THRESHOLD = 0.8
# Heads with too few positives to trust alone (25-37 in the 70% split; held-out F1 0.21 and 0.30 at
# 0.8): scored and reported, but they never flag by themselves unless Policy.thresholds says so.
REPORT_ONLY = frozenset({"harassment", "violence"})
DECIMALS = 6
# Total weight of a dataset's clean-text windows, relative to its rows' own weight.
FRAGMENT_WEIGHT = 0.5
COMMAND = "python -m streamguard.moderation.train"

Embed = Callable[[Sequence[str]], Any]


@dataclass(frozen=True)
class Row:
    """One labelled text."""

    dataset: str
    id: str
    text: str
    flagged: bool
    labels: Mapping[str, int]
    group: str

    def target(self, category: str) -> int | None:
        """1 / 0 for ``category``, or ``None`` when the row says nothing about it."""
        values = [v for k, v in self.labels.items() if CATEGORY_OF.get(k) == category]
        if values:
            return int(max(values))
        return None if self.flagged else 0


def load_rows(data: Path = DATA_DIR) -> list[Row]:
    """Every row of ``data/*.jsonl``, files in name order, rows in file order."""
    rows = []
    for path in sorted(data.glob("*.jsonl")):
        dataset = path.name.split(".")[0]
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                rows.append(
                    Row(dataset, r["id"], r["text"], bool(r["flagged"]), r["labels"], r.get("group") or r["id"])
                )
    if not rows:
        raise SystemExit(f"no *.jsonl rows in {data}")
    return rows


def windows_of(text: str, *, first: int = 1, growth: float = 4.0, size: int = 240, overlap: int = 64) -> list[str]:
    """The windows a guarded stream with these window sizes sends for ``text``, whole text excluded.

    Each window's new text grows from ``first`` characters by ``growth`` up to ``size``, is
    extended to the end of its word, and is sent after up to ``overlap`` characters of context.
    """
    out = []
    start, target = 0, first
    while start < len(text):
        end = start + target
        while end < len(text) and not text[end].isspace():
            end += 1
        window = text[max(0, start - overlap) : end]
        if window.strip() and window.strip() != text.strip():
            out.append(window)
        start, target = end, min(size, int(target * growth))
    return out


def fragments(rows: Sequence[Row]) -> list[Row]:
    """Windows of the clean rows, as clean rows of their dataset; each distinct text once."""
    seen = {r.text for r in rows}
    out = []
    for r in rows:
        if r.flagged:
            continue
        for n, window in enumerate(windows_of(r.text)):
            if window not in seen:
                seen.add(window)
                out.append(Row(r.dataset, f"{r.id}#w{n}", window, False, {}, r.group))
    return out


def data_hashes(data: Path = DATA_DIR) -> dict[str, str]:
    """sha256 of each data file, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data.glob("*.jsonl"))}


def fit_logistic(x: Any, y: Any, w: Any, l2: float = L2, iterations: int = ITERATIONS) -> tuple[Any, float]:
    """Weighted, L2-regularised logistic regression by Newton's method: (weights, bias)."""
    import numpy as np

    xb = np.hstack([np.asarray(x, dtype=np.float64), np.ones((len(x), 1))])
    beta = np.zeros(xb.shape[1])
    penalty = l2 * np.eye(xb.shape[1])
    penalty[-1, -1] = 0.0  # the bias is not penalised
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ beta, -60.0, 60.0)))
        gradient = xb.T @ (w * (p - y)) + penalty @ beta
        hessian = (xb * (w * p * (1.0 - p))[:, None]).T @ xb + penalty
        step = np.linalg.solve(hessian, gradient)
        beta = beta - step
        if float(np.abs(step).max()) < TOLERANCE:  # converged (Newton: quadratically, in ~8 steps)
            break
    return beta[:-1], float(beta[-1])


def _dataset_weights(rows: Sequence[Row]) -> Any:
    """Each dataset the same total weight; its fragments FRAGMENT_WEIGHT of that, on top."""
    import numpy as np

    counts: dict[tuple[str, bool], int] = {}
    for r in rows:
        key = (r.dataset, _is_fragment(r))
        counts[key] = counts.get(key, 0) + 1
    datasets = {d for d, _ in counts}
    w = np.asarray([(FRAGMENT_WEIGHT if f else 1.0) / counts[(r.dataset, f)] for r in rows for f in [_is_fragment(r)]])
    return w * (len(w) / w.sum()) if datasets else w


def _is_fragment(row: Row) -> bool:
    return "#w" in row.id


def _balanced(y: Any) -> Any:
    import numpy as np

    positives = int(y.sum())
    negatives = len(y) - positives
    return np.where(y == 1, 0.5 * len(y) / max(positives, 1), 0.5 * len(y) / max(negatives, 1))


def train(rows: Sequence[Row], embeddings: Any) -> dict[str, dict[str, Any]]:
    """Fit the heads on ``rows`` (``embeddings[i]`` is row i's vector): name -> head record.

    ``rows`` are the labelled rows followed by their :func:`fragments` (ids with ``#w``).
    """
    import numpy as np

    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray([float(r.flagged) for r in rows])
    heads: dict[str, dict[str, Any]] = {}
    weights, bias = fit_logistic(x, y, _dataset_weights(rows))
    heads[HARMFUL] = _record(weights, bias, HARMFUL_THRESHOLD)
    for category in CATEGORIES:
        targets = [r.target(category) for r in rows]
        known = [i for i, t in enumerate(targets) if t is not None]
        yc = np.asarray([float(targets[i] or 0) for i in known])
        if not 0 < yc.sum() < len(yc):
            continue  # no positives (or no negatives) for it in these rows
        weights, bias = fit_logistic(x[known], yc, _balanced(yc))
        heads[category] = _record(weights, bias, 1.0 if category in REPORT_ONLY else CATEGORY_THRESHOLD)
    return heads


def _record(weights: Any, bias: float, threshold: float) -> dict[str, Any]:
    return {
        "threshold": threshold,
        "bias": round(float(bias), DECIMALS),
        "weights": [round(float(v), DECIMALS) for v in weights],
    }


def embed_rows(rows: Sequence[Row], embed: Embed) -> Any:
    """Every row's embedding (``embed`` may be :func:`cached`, which batches)."""
    return embed([r.text for r in rows])


def document(rows: Sequence[Row], heads: Mapping[str, Any], data: Path = DATA_DIR) -> dict[str, Any]:
    """The ``heads.json`` document: heads plus provenance."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.dataset] = counts.get(r.dataset, 0) + 1
    return {
        "format": FORMAT,
        "embedding": {
            "package": MODEL_PACKAGE,
            "model_sha256": MODEL_SHA256,
            "vectors": "all-MiniLM-L6-v2, dynamic int8 per channel, mean-pooled, L2-normalised",
        },
        "training": {
            "command": COMMAND,
            "data": data_hashes(data),
            "rows": counts,
            "l2": L2,
            "iterations": ITERATIONS,
        },
        "heads": dict(heads),
    }


def dumps(doc: Mapping[str, Any]) -> str:
    """Serialise a heads document deterministically."""
    return json.dumps(doc, indent=1, sort_keys=False) + "\n"


def _prf(predicted: Sequence[bool], labels: Sequence[bool]) -> tuple[float, float, float]:
    tp = sum(p and t for p, t in zip(predicted, labels, strict=True))
    fp = sum(p and not t for p, t in zip(predicted, labels, strict=True))
    fn = sum(t and not p for p, t in zip(predicted, labels, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return precision, recall, (2 * tp / (2 * tp + fp + fn) if tp else 0.0)


def flags(heads: Mapping[str, Any], embeddings: Any) -> list[bool]:
    """Whether any head reaches its threshold, per row (the semantic part of LocalModerator)."""
    from ._heads import heads_from

    parsed = heads_from({"format": FORMAT, "heads": dict(heads)})
    probabilities = parsed.probabilities(embeddings)
    thresholds = [parsed.thresholds[n] for n in parsed.names]
    return [any(p >= t for p, t in zip(row, thresholds, strict=True)) for row in probabilities]


def held_out(row: Row, percent: int = 30) -> bool:
    """Whether ``row`` is in the ``percent``% held-out part of a split by hash of its group."""
    return int(hashlib.sha256(row.group.encode()).hexdigest(), 16) % 100 < percent


def with_fragments(rows: Sequence[Row]) -> list[Row]:
    """``rows`` followed by their :func:`fragments`: what :func:`train` takes."""
    return [*rows, *fragments(rows)]


def leave_one_dataset_out(rows: Sequence[Row], embed: Embed) -> list[dict[str, Any]]:
    """For each dataset: heads trained on the others, scored on it (whole texts, heads only)."""
    out = []
    for dataset in sorted({r.dataset for r in rows}):
        inside = with_fragments([r for r in rows if r.dataset != dataset])
        outside = [r for r in rows if r.dataset == dataset]
        heads = train(inside, embed_rows(inside, embed))
        predicted = flags(heads, embed_rows(outside, embed))
        p, r, f = _prf(predicted, [r.flagged for r in outside])
        out.append({"dataset": dataset, "n": len(outside), "precision": p, "recall": r, "f1": f})
    return out


def cached(embed: Embed, path: Path | None, batch: int = 256) -> Embed:
    """``embed`` memoised by text (sha256), kept in ``path`` (an .npz) when given: for repeated runs."""
    import numpy as np

    memo: dict[str, Any] = {}
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as saved:
            memo.update(zip(saved["keys"].tolist(), saved["vectors"], strict=True))

    def key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    def run(texts: Sequence[str]) -> Any:
        keys = [key(t) for t in texts]
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys, strict=True) if k not in memo))
        for i in range(0, len(missing), batch):
            chunk = missing[i : i + batch]
            memo.update(zip((key(t) for t in chunk), embed(chunk), strict=True))
        if missing and path is not None:
            np.savez(path, keys=np.asarray(list(memo)), vectors=np.asarray(list(memo.values())))
        return np.asarray([memo[k] for k in keys], dtype=np.float32)

    return run


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Train (or check, or evaluate) the heads."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="folder of *.jsonl training data")
    parser.add_argument("--out", type=Path, default=HEADS_PATH, help="where to write the heads")
    parser.add_argument("--exclude", nargs="*", default=[], help="datasets to leave out of training")
    parser.add_argument("--split", action="store_true", help="train on the 70%% not held out (see held_out)")
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    parser.add_argument("--lodo", action="store_true", help="print leave-one-dataset-out F1, write nothing")
    parser.add_argument("--cache", type=Path, help="an .npz to keep embeddings in between runs (development)")
    args = parser.parse_args(argv)
    rows = [r for r in load_rows(args.data) if r.dataset not in args.exclude and not (args.split and held_out(r))]
    from ._minilm import MiniLM

    embed = cached(MiniLM().embed, args.cache)  # batches of 256 texts, cached or not
    if args.lodo:
        _say("| dataset (left out) | n | precision | recall | F1 |\n| --- | --- | --- | --- | --- |")
        for r in leave_one_dataset_out(rows, embed):
            _say(f"| {r['dataset']} | {r['n']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} |")
        return 0
    training = with_fragments(rows)
    text = dumps(document(rows, train(training, embed_rows(training, embed)), args.data))
    digest = hashlib.sha256(text.encode()).hexdigest()
    if args.check:
        committed = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        same = committed == text
        _say(f"retrained sha256 {digest}; {args.out} {'matches' if same else 'DIFFERS'}")
        return 0 if same else 1
    args.out.write_text(text, encoding="utf-8")
    _say(f"wrote {args.out} (sha256 {digest}) from {len(rows)} rows and {len(training) - len(rows)} windows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
