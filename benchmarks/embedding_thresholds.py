"""Choose the thresholds of an EmbeddingModerator from labelled texts.

Input: a JSON list or a JSONL file of ``{"text": ..., "label": category-or-null}``; texts
labelled with a category are its positives, and every other text (``null`` or another category)
is a negative for it. ``benchmarks/data/topics.jsonl`` is a small example: competitor mentions
and refund promises against ordinary product talk.

Scores are honest: a text is never scored against itself. By default the texts are split into
``--folds`` stratified folds; each fold is scored by an :class:`EmbeddingModerator` whose
examples are the positives of the other folds (cross-validation), so every text gets exactly one
score per category. With ``--examples FILE`` the examples come from that file instead and every
text of ``--data`` is scored once.

For each category and each threshold 0.30, 0.35, ..., 0.95 it reports precision, recall and F1
(a text is predicted positive when its score reaches the threshold), as a markdown table, and
suggests the threshold with the best F1 (ties: the highest, which flags less).

How to choose thresholds:

- Collect real windows, not just tidy sentences: the moderator scores windows of a few hundred
  characters (``Policy.window_chars``), and other words in a window dilute the similarity. Score
  texts of that length, or use smaller windows for an embedding-only policy.
- Include hard negatives: on-topic talk that must pass (your own pricing, the word "switch" in
  another sense). They decide precision; easy negatives only inflate it.
- Start from the suggested (max-F1) threshold, then move it with the cost of each error: raise
  it if a false cut-off is worse than a miss (precision first), lower it if a miss is worse
  (recall first). A cut-off ends the answer, so most products lean to precision.
- If no threshold reaches a useful F1, the examples are the problem, not the threshold: add
  examples that phrase the topic differently (each positive is only as close as its nearest
  example), and check "max negative" against "min positive" in the summary.
- Thresholds are per model: re-run this after changing the embedding model.
- Pass the result as ``EmbeddingModerator(..., threshold={"competitors": 0.6, ...})``.

Usage::

    python benchmarks/embedding_thresholds.py --local [--data FILE] [--folds 5] [--out FILE.json]
    python benchmarks/embedding_thresholds.py --offline [--data FILE] [--folds 5] [--out FILE.json]
    python benchmarks/embedding_thresholds.py --base-url https://api.openai.com/v1 [--model M]
        [--api-key KEY] [--examples FILE] [--data FILE] [--out FILE.json]

``--local`` scores with ``EmbeddingModerator(backend="local")``: all-MiniLM-L6-v2 on this machine
(the ``local`` extra), no key, no network; real numbers for that model.
``--offline`` serves the tests' deterministic hashed bag-of-words embeddings
(``streamguard.testing.upstream.hashed_embeddings``) from an in-process loopback server: it exercises the
whole path with no network, but its numbers say nothing about a real embedding model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import openai

from streamguard.moderation import EmbeddingModerator

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "topics.jsonl"
THRESHOLDS = [round(0.30 + 0.05 * i, 2) for i in range(14)]  # 0.30 .. 0.95 (MiniLM similarities run lower)


@dataclass(frozen=True)
class Sample:
    """One labelled text."""

    text: str
    label: str | None


def load(path: Path) -> list[Sample]:
    """Read a JSON list or JSONL file of ``{"text", "label"}`` objects."""
    raw = path.read_text(encoding="utf-8")
    stripped = raw.lstrip()
    items: list[Any] = (
        json.loads(raw) if stripped.startswith("[") else [json.loads(line) for line in raw.splitlines() if line.strip()]
    )
    samples = []
    for n, item in enumerate(items, 1):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise SystemExit(f"{path}: item {n} is not an object with a 'text' string")
        label = item.get("label")
        if label is not None and not isinstance(label, str):
            raise SystemExit(f"{path}: item {n}: 'label' must be a string or null")
        samples.append(Sample(item["text"], label or None))
    return samples


def folds_of(samples: Sequence[Sample], folds: int) -> list[int]:
    """A fold per sample: round-robin within each label, so every fold has some of each."""
    seen: dict[str | None, int] = {}
    out = []
    for s in samples:
        n = seen.get(s.label, 0)
        seen[s.label] = n + 1
        out.append(n % folds)
    return out


def examples_of(samples: Sequence[Sample]) -> dict[str, list[str]]:
    """Category -> its positive texts."""
    out: dict[str, list[str]] = {}
    for s in samples:
        if s.label is not None:
            out.setdefault(s.label, []).append(s.text)
    return out


async def score(
    client: openai.AsyncOpenAI | None,
    samples: Sequence[Sample],
    *,
    model: str,
    folds: int,
    examples: Mapping[str, Sequence[str]] | None = None,
    backend: str = "openai",
) -> list[dict[str, float]]:
    """Each sample's score per category, from a moderator that never has the sample as an example."""
    if examples is not None:
        moderator = EmbeddingModerator(client, categories=examples, model=model, backend=backend)
        return [dict(v.scores) for v in await moderator.moderate([s.text for s in samples])]
    categories = sorted(examples_of(samples))
    fold = folds_of(samples, folds)
    scores: list[dict[str, float]] = [{} for _ in samples]
    for f in range(folds):
        train = examples_of([s for s, g in zip(samples, fold, strict=True) if g != f])
        missing = [c for c in categories if c not in train]
        if missing:
            raise SystemExit(f"category {missing[0]!r} has too few positives for {folds} folds")
        held_out = [i for i, g in enumerate(fold) if g == f]
        if not held_out:
            continue
        moderator = EmbeddingModerator(client, categories=train, model=model, backend=backend)
        verdicts = await moderator.moderate([samples[i].text for i in held_out])
        for i, verdict in zip(held_out, verdicts, strict=True):
            scores[i] = dict(verdict.scores)
    return scores


def evaluate(samples: Sequence[Sample], scores: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Precision, recall and F1 per category and threshold, and the suggested thresholds."""
    report: dict[str, Any] = {}
    for category in sorted({c for s in scores for c in s}):
        truth = [s.label == category for s in samples]
        values = [s.get(category, 0.0) for s in scores]
        rows: list[dict[str, Any]] = []
        f1s: list[tuple[float, float]] = []  # (F1, threshold)
        for t in THRESHOLDS:
            tp = sum(1 for y, v in zip(truth, values, strict=True) if y and v >= t)
            fp = sum(1 for y, v in zip(truth, values, strict=True) if not y and v >= t)
            fn = sum(1 for y, v in zip(truth, values, strict=True) if y and v < t)
            precision = tp / (tp + fp) if tp + fp else None
            recall = tp / (tp + fn) if tp + fn else None
            f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
            rows.append(
                {"threshold": t, "precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}
            )
            f1s.append((f1, t))
        best_f1, best_threshold = max(f1s)  # ties: the highest threshold
        positives = [v for y, v in zip(truth, values, strict=True) if y]
        negatives = [v for y, v in zip(truth, values, strict=True) if not y]
        report[category] = {
            "positives": len(positives),
            "negatives": len(negatives),
            "min_positive_score": min(positives, default=None),
            "max_negative_score": max(negatives, default=None),
            "thresholds": rows,
            "suggested": best_threshold if best_f1 > 0 else None,
            "suggested_f1": best_f1,
        }
    return report


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown tables, one per category."""
    out = []
    for category, r in report.items():
        out.append(
            f"### {category} ({r['positives']} positives, {r['negatives']} negatives; "
            f"min positive {_fmt(r['min_positive_score'])}, max negative {_fmt(r['max_negative_score'])})\n"
        )
        out.append("| threshold | precision | recall | F1 | TP | FP | FN |")
        out.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for row in r["thresholds"]:
            mark = " **←**" if row["threshold"] == r["suggested"] else ""
            out.append(
                f"| {row['threshold']:.2f}{mark} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | "
                f"{row['f1']:.2f} | {row['tp']} | {row['fp']} | {row['fn']} |"
            )
        if r["suggested"] is None:
            out.append("\nNo threshold in 0.30–0.95 finds any positive: add examples, or check the model.\n")
        else:
            out.append(f"\nSuggested threshold: **{r['suggested']:.2f}** (F1 {r['suggested_f1']:.2f}).")
            if r["suggested"] == THRESHOLDS[0]:
                out.append("It is the lowest one tried: a lower threshold may do better, at the cost of precision.")
            out.append("")
    return "\n".join(out)


@contextlib.contextmanager
def _offline_server() -> Iterator[str]:
    """The tests' hashed embeddings from an in-process loopback server; yields its base URL."""
    from streamguard.testing.upstream import LoopbackUpstream, hashed_embeddings

    with LoopbackUpstream(embeddings=hashed_embeddings) as upstream:
        yield upstream.base_url


async def _run(args: argparse.Namespace, base_url: str | None, samples: list[Sample]) -> list[dict[str, float]]:
    if base_url is None:  # --local
        examples = examples_of(load(args.examples)) if args.examples else None
        return await score(None, samples, model=args.model, folds=args.folds, examples=examples, backend="local")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or "unused"
    examples = examples_of(load(args.examples)) if args.examples else None
    async with openai.AsyncOpenAI(api_key=api_key, base_url=base_url) as client:
        return await score(client, samples, model=args.model, folds=args.folds, examples=examples)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the markdown report; write JSON with ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="an OpenAI-compatible server, e.g. https://api.openai.com/v1")
    where.add_argument("--local", action="store_true", help="all-MiniLM-L6-v2 on this machine (the local extra)")
    where.add_argument("--offline", action="store_true", help="hashed test embeddings from a loopback server")
    parser.add_argument("--api-key", help="default: $OPENAI_API_KEY")
    parser.add_argument("--model", default="text-embedding-3-small")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSON or JSONL of {text, label}")
    parser.add_argument("--examples", type=Path, help="examples per category (same format) instead of folds")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--out", type=Path, help="write the report as JSON")
    args = parser.parse_args(argv)
    if args.folds < 2 and not args.examples:
        parser.error("--folds must be >= 2")
    samples = load(args.data)
    if not examples_of(samples) and not args.examples:
        parser.error(f"{args.data} has no labelled positives")
    with contextlib.ExitStack() as stack:
        base_url = stack.enter_context(_offline_server()) if args.offline else args.base_url
        scores = anyio.run(_run, args, base_url, samples)
    report = evaluate(samples, scores)
    if args.local:
        source = "all-MiniLM-L6-v2, local"
    elif args.offline:
        source = "offline hashed embeddings"
    else:
        source = f"{args.model} at {args.base_url}"
    split = f"examples from {args.examples}" if args.examples else f"{args.folds}-fold cross-validation"
    print(f"## Embedding thresholds: {args.data.name}, {source}, {split}\n")
    print(markdown(report))
    if args.out:
        payload = {
            "data": str(args.data),
            "source": source,
            "split": split,
            "model": "all-MiniLM-L6-v2" if args.local else args.model,
            "categories": report,
            "samples": [
                {"text": s.text, "label": s.label, "scores": sc} for s, sc in zip(samples, scores, strict=True)
            ],
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
