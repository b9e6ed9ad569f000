"""Moderation quality of windowed (streamed) text against whole texts and against labels.

Each labelled sample is streamed word by word through a ``WindowBuffer`` with the default
``Policy()`` window sizes; every window's text (context + new text) is moderated, and the sample
counts as flagged by the windowed run if any of its windows is. The same moderator also judges
the whole text at once. Reported per dataset and moderator:

- ``recall_vs_whole``: of the texts the whole-text run flags, the share the windowed run flags too;
- ``false_flag_rate``: of the texts the whole-text run does not flag, the share windowed flags;
- precision / recall / F1 of both runs against the dataset's ``flagged`` label.

Usage::

    python benchmarks/moderation_quality.py [--data DIR] [--limit N] [--out FILE.json]

:func:`evaluate` is reusable with any :class:`~streamguard.moderation.Moderator`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from streamguard.moderation import KeywordModerator, LocalModerator, Moderator
from streamguard.policy import Policy
from streamguard.window import WindowBuffer

DEFAULT_DATA = Path("/work/shared/data/moderation")
# A small baseline list: common profanity, insults and violent words (no slurs).
KEYWORDS = [
    r"fuck\w*",
    r"shit\w*",
    r"bitch\w*",
    r"cunt\w*",
    r"asshole\w*",
    r"whore\w*",
    r"slut\w*",
    r"idiot\w*",
    r"moron\w*",
    "stupid",
    "kill",
    "murder",
    "rape",
    "hate",
]
_WORDS = re.compile(r"\s*\S+|\s+")


def words(text: str) -> list[str]:
    """Split text into stream deltas the way a model emits them: each word with its leading space."""
    return _WORDS.findall(text)


def window_texts(text: str, policy: Policy) -> list[str]:
    """The texts of the windows a guarded stream would moderate for ``text`` streamed word by word."""
    buffer = WindowBuffer(
        window_chars=policy.window_chars,
        first_window_chars=policy.first_window_chars,
        growth=policy.window_growth,
        overlap_chars=policy.overlap_chars,
    )
    windows = [w for word in words(text) for w in buffer.feed(word)]
    last = buffer.flush()
    if last is not None:
        windows.append(last)
    return [w.text for w in windows]


async def _flags(moderator: Moderator, texts: Sequence[str], policy: Policy) -> list[bool]:
    verdicts = await moderator.moderate(texts)
    if len(verdicts) != len(texts):
        raise RuntimeError(f"{type(moderator).__name__} returned {len(verdicts)} verdicts for {len(texts)}")
    return [policy.judge(v) is not None for v in verdicts]


def _prf(predicted: Sequence[bool], labels: Sequence[bool]) -> dict[str, float]:
    tp = sum(p and t for p, t in zip(predicted, labels, strict=True))
    fp = sum(p and not t for p, t in zip(predicted, labels, strict=True))
    fn = sum(t and not p for p, t in zip(predicted, labels, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


async def evaluate(
    moderator: Moderator,
    texts: Sequence[str],
    labels: Sequence[bool] | None = None,
    *,
    policy: Policy | None = None,
) -> dict[str, Any]:
    """Compare windowed and whole-text moderation of ``texts`` with one moderator.

    Args:
        moderator: Any moderator; its verdicts are decided with ``policy.judge``.
        texts: Samples, each streamed word by word through the policy's windows.
        labels: Ground truth (flag or not) per text, for precision / recall / F1.
        policy: Window sizes and thresholds; ``Policy()`` by default.

    Returns:
        ``n``, ``windows`` (moderated in total), ``whole_flagged``, ``windowed_flagged``,
        ``recall_vs_whole``, ``false_flag_rate``, per-text ``whole`` / ``windowed`` flags and, with
        labels, ``whole_vs_labels`` / ``windowed_vs_labels`` (precision, recall, f1).
    """
    policy = policy or Policy()
    whole = await _flags(moderator, texts, policy)
    per_text = [window_texts(t, policy) for t in texts]
    flat = [w for ws in per_text for w in ws]
    flat_flags = await _flags(moderator, flat, policy)
    windowed: list[bool] = []
    i = 0
    for ws in per_text:
        windowed.append(any(flat_flags[i : i + len(ws)]))
        i += len(ws)
    whole_pos = sum(whole)
    whole_neg = len(texts) - whole_pos
    result: dict[str, Any] = {
        "n": len(texts),
        "windows": len(flat),
        "whole_flagged": whole_pos,
        "windowed_flagged": sum(windowed),
        "recall_vs_whole": sum(w and x for w, x in zip(windowed, whole, strict=True)) / whole_pos if whole_pos else 1.0,
        "false_flag_rate": sum(w and not x for w, x in zip(windowed, whole, strict=True)) / whole_neg
        if whole_neg
        else 0.0,
        "whole": whole,
        "windowed": windowed,
    }
    if labels is not None:
        result["positives"] = sum(labels)
        result["whole_vs_labels"] = _prf(whole, labels)
        result["windowed_vs_labels"] = _prf(windowed, labels)
    return result


def load(path: Path, limit: int | None, seed: int = 0) -> tuple[list[str], list[bool]]:
    """Texts and labels of one JSONL file: a seeded random sample of ``limit`` rows."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if limit is not None and len(rows) > limit:
        rows = random.Random(seed).sample(rows, limit)
    return [str(r["text"]) for r in rows], [bool(r["flagged"]) for r in rows]


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the summary rows."""
    head = (
        "| dataset | moderator | n | windows | recall vs whole | false-flag rate | "
        "P whole | R whole | F1 whole | P windowed | R windowed | F1 windowed |"
    )
    lines = [head, "|" + " --- |" * 12]
    for r in rows:
        w, s = r["whole_vs_labels"], r["windowed_vs_labels"]
        lines.append(
            f"| {r['dataset']} | {r['moderator']} | {r['n']} | {r['windows']} | {r['recall_vs_whole']:.3f} | "
            f"{r['false_flag_rate']:.3f} | {w['precision']:.3f} | {w['recall']:.3f} | {w['f1']:.3f} | "
            f"{s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} |"
        )
    return "\n".join(lines)


async def run(datasets: dict[str, tuple[list[str], list[bool]]]) -> list[dict[str, Any]]:
    """Evaluate the local and keyword moderators on each dataset (name -> texts, labels)."""
    local = LocalModerator()
    await anyio.to_thread.run_sync(local.load)
    moderators: dict[str, Moderator] = {"local": local, "keyword": KeywordModerator(KEYWORDS)}
    rows = []
    for dataset, (texts, labels) in datasets.items():
        for name, moderator in moderators.items():
            start = time.perf_counter()
            result = await evaluate(moderator, texts, labels)
            summary = {k: v for k, v in result.items() if k not in ("whole", "windowed")}
            rows.append({"dataset": dataset, "moderator": name, **summary, "seconds": time.perf_counter() - start})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of *.jsonl files")
    parser.add_argument(
        "--limit", type=int, default=0, help="samples per dataset, a seeded random sample (default 0: all)"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"no data folder: {args.data}", file=sys.stderr)
        return 2
    policy = Policy()
    start = time.perf_counter()
    datasets = {p.name.split(".")[0]: load(p, args.limit or None) for p in sorted(args.data.glob("*.jsonl"))}
    rows = anyio.run(run, datasets)
    elapsed = time.perf_counter() - start
    print(table(rows))
    print(
        f"\nwindows: window_chars={policy.window_chars} first_window_chars={policy.first_window_chars} "
        f"growth={policy.window_growth} overlap_chars={policy.overlap_chars}; limit={args.limit}; "
        f"{elapsed:.1f}s"
    )
    if args.out:
        settings = {
            "limit": args.limit,
            "window_chars": policy.window_chars,
            "first_window_chars": policy.first_window_chars,
            "window_growth": policy.window_growth,
            "overlap_chars": policy.overlap_chars,
            "keywords": KEYWORDS,
        }
        args.out.write_text(json.dumps({"settings": settings, "results": rows}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
