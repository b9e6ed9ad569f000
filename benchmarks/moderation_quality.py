"""Moderation quality of windowed (streamed) text against whole texts and against labels.

Each labelled sample is streamed word by word through the real guarded stream
(``guard(scripted_chunks(words), moderator=..., policy=...)``, in-process, no delay; many samples
at once, so the moderators' batchers see concurrent streams); the sample counts as flagged by the
windowed run if the stream's ``report.flags`` is not empty. With the default ``action="cutoff"``
a stream ends at its first flag, so ``windows`` counts the windows actually moderated. The same
moderator also judges each whole text at once (``moderate([text])``). Reported per dataset and
moderator:

- ``recall_vs_whole``: of the texts the whole-text run flags, the share the windowed run flags too;
- ``false_flag_rate``: of the texts the whole-text run does not flag, the share windowed flags;
- precision / recall / F1 of both runs against the dataset's ``flagged`` label.

Usage::

    python benchmarks/moderation_quality.py [--data DIR] [--limit N] [--moderators local keyword]
        [--window 240] [--first-window 1] [--overlap 64] [--out FILE.json]

Window sizes default to ``Policy()``'s. ``flush_after`` is raised to an hour: the scripted upstream
never stalls, so only the text (never event-loop load) decides where windows are cut.
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

import streamguard
import streamguard.testing
from streamguard.exceptions import ConfigError
from streamguard.moderation import KeywordModerator, LocalModerator, Moderator
from streamguard.policy import Policy

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
# Samples streamed at once: enough to fill the moderators' batches, few enough to keep memory low.
CONCURRENCY = 64
# No quiet-gap flushes: the scripted upstream never stalls, so a gap would only be event-loop load.
FLUSH_AFTER = 3600.0
MODERATORS = ("local", "keyword")


def words(text: str) -> list[str]:
    """Split text into stream deltas the way a model emits them: each word with its leading space."""
    return _WORDS.findall(text)


def bench_policy(*, window: int | None = None, first_window: int | None = None, overlap: int | None = None) -> Policy:
    """``Policy()`` with the given window sizes (``None``: the default) and no quiet-gap flushes."""
    default = Policy()
    return Policy(
        window_chars=default.window_chars if window is None else window,
        first_window_chars=default.first_window_chars if first_window is None else first_window,
        overlap_chars=default.overlap_chars if overlap is None else overlap,
        flush_after=FLUSH_AFTER,
    )


async def stream_flagged(moderator: Moderator, text: str, policy: Policy) -> tuple[bool, int]:
    """Stream ``text`` word by word through a guarded stream; return (flagged, windows moderated)."""
    source = streamguard.testing.scripted_chunks(words(text))
    async with streamguard.guard(source, moderator=moderator, policy=policy) as guarded:
        async for _ in guarded:
            pass
    report = guarded.report
    return bool(report.flags), report.moderation_calls


async def _windowed(
    moderator: Moderator, texts: Sequence[str], policy: Policy, concurrency: int
) -> tuple[list[bool], int]:
    """Windowed flag of every text and the windows moderated in all, ``concurrency`` streams at once."""
    flagged = [False] * len(texts)
    windows = [0] * len(texts)
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            flagged[i], windows[i] = await stream_flagged(moderator, texts[i], policy)

    async with anyio.create_task_group() as tg:
        for i in range(len(texts)):
            tg.start_soon(one, i)
    return flagged, sum(windows)


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
    concurrency: int = CONCURRENCY,
) -> dict[str, Any]:
    """Compare windowed and whole-text moderation of ``texts`` with one moderator.

    Args:
        moderator: Any moderator; its verdicts are decided with ``policy.judge``.
        texts: Samples, each streamed word by word through a guarded stream.
        labels: Ground truth (flag or not) per text, for precision / recall / F1.
        policy: The guard's policy (window sizes, thresholds); by default :func:`bench_policy`,
            i.e. ``Policy()`` without quiet-gap flushes. A short ``flush_after`` lets load cut
            extra windows.
        concurrency: Guarded streams running at once.

    Returns:
        ``n``, ``windows`` (moderated in total), ``whole_flagged``, ``windowed_flagged``,
        ``recall_vs_whole``, ``false_flag_rate``, per-text ``whole`` / ``windowed`` flags and, with
        labels, ``whole_vs_labels`` / ``windowed_vs_labels`` (precision, recall, f1).
    """
    policy = policy or bench_policy()
    whole = await _flags(moderator, texts, policy)
    windowed, windows = await _windowed(moderator, texts, policy, concurrency)
    whole_pos = sum(whole)
    whole_neg = len(texts) - whole_pos
    result: dict[str, Any] = {
        "n": len(texts),
        "windows": windows,
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


async def run(
    datasets: dict[str, tuple[list[str], list[bool]]], policy: Policy, names: Sequence[str] = MODERATORS
) -> list[dict[str, Any]]:
    """Evaluate the named moderators (``local``, ``keyword``) on each dataset (name -> texts, labels)."""
    moderators: dict[str, Moderator] = {}
    for name in names:
        if name == "local":
            local = LocalModerator()
            await anyio.to_thread.run_sync(local.load)
            moderators[name] = local
        else:
            moderators[name] = KeywordModerator(KEYWORDS)
    rows = []
    for dataset, (texts, labels) in datasets.items():
        for name, moderator in moderators.items():
            start = time.perf_counter()
            result = await evaluate(moderator, texts, labels, policy=policy)
            summary = {k: v for k, v in result.items() if k not in ("whole", "windowed")}
            rows.append({"dataset": dataset, "moderator": name, **summary, "seconds": time.perf_counter() - start})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    default = Policy()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of *.jsonl files")
    parser.add_argument(
        "--limit",
        type=int,
        default=1500,
        help="samples per dataset, a seeded random sample (default 1500, about 30 s in all; 0: all)",
    )
    parser.add_argument("--moderators", nargs="+", choices=MODERATORS, default=list(MODERATORS))
    parser.add_argument("--window", type=int, default=default.window_chars, help="Policy.window_chars")
    parser.add_argument(
        "--first-window", type=int, default=default.first_window_chars, help="Policy.first_window_chars"
    )
    parser.add_argument("--overlap", type=int, default=default.overlap_chars, help="Policy.overlap_chars")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"no data folder: {args.data}", file=sys.stderr)
        return 2
    try:
        policy = bench_policy(window=args.window, first_window=args.first_window, overlap=args.overlap)
    except ConfigError as exc:
        parser.error(str(exc))
    start = time.perf_counter()
    datasets = {p.name.split(".")[0]: load(p, args.limit or None) for p in sorted(args.data.glob("*.jsonl"))}
    rows = anyio.run(run, datasets, policy, args.moderators)
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
            "flush_after": policy.flush_after,
            "concurrency": CONCURRENCY,
            "keywords": KEYWORDS,
        }
        args.out.write_text(json.dumps({"settings": settings, "results": rows}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
