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

    python benchmarks/moderation_quality.py [--data DIR] [--limit N] [--moderators local profanity keyword]
        [--heads shipped|lodo|split] [--window 240] [--first-window 1] [--overlap 64] [--out FILE.json]

The local moderator's heads were trained on labelled data (``data/moderation``, a copy of most of
the DEV split), so scoring the shipped heads on that data is scoring them on their training data.
``--heads`` chooses honest alternatives, trained in-process by ``streamguard.moderation.train``'s
recipe (embeddings are cached in ``--cache``):

- ``lodo``: for each dataset, heads trained on the other datasets only, scored on it;
- ``split``: heads trained on the 70% of every dataset that :func:`held_out` leaves in, scored on
  the other 30% (split by hash of the text, of the template for HateCheck);
- ``shipped``: the committed heads, on ``--data`` (in-sample for the rows they were trained on).

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
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

import streamguard
import streamguard.testing
from streamguard.exceptions import ConfigError
from streamguard.moderation import KeywordModerator, LocalModerator, Moderator, ProfanityModerator
from streamguard.policy import Policy

DEFAULT_DATA = Path("/work/shared/data/moderation")
TRAIN_DATA = Path(__file__).resolve().parent.parent / "data" / "moderation"
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
MODERATORS = ("local", "profanity", "keyword")


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


def _sample(rows: Sequence[Any], limit: int | None, seed: int = 0) -> list[Any]:
    rows = list(rows)
    return random.Random(seed).sample(rows, limit) if limit is not None and len(rows) > limit else rows


def trained_heads(kind: str, train_data: Path, limit: int | None, cache: Path | None, folder: Path) -> list[Job]:
    """Heads files trained by ``kind`` (``lodo`` or ``split``), each with the rows to score it on."""
    from streamguard.moderation import _minilm, train

    rows = train.load_rows(train_data)
    embed = train.cached(_minilm.shared().embed, cache)
    plans: list[tuple[str, list[train.Row], list[train.Row]]] = []
    for dataset in sorted({r.dataset for r in rows}):
        own = [r for r in rows if r.dataset == dataset]
        if kind == "lodo":
            plans.append((dataset, [r for r in rows if r.dataset != dataset], own))
        else:
            plans.append((dataset, [r for r in rows if not train.held_out(r)], [r for r in own if train.held_out(r)]))
    jobs: list[Job] = []
    trained: dict[int, Path] = {}
    for dataset, inside, outside in plans:
        key = hash(tuple(r.id for r in inside))
        if key not in trained:
            training = train.with_fragments(inside)
            heads = train.train(training, train.embed_rows(training, embed))
            path = folder / f"heads-{kind}-{len(trained)}.json"
            path.write_text(train.dumps(train.document(inside, heads, train_data)), encoding="utf-8")
            trained[key] = path
        sample = _sample(outside, limit)
        jobs.append(Job(dataset, [r.text for r in sample], [r.flagged for r in sample], trained[key]))
    return jobs


@dataclass(frozen=True)
class Job:
    """A dataset's texts and labels, and the heads file the local moderator scores them with."""

    dataset: str
    texts: list[str]
    labels: list[bool]
    heads: Path | None = None


async def run(jobs: Sequence[Job], policy: Policy, names: Sequence[str] = MODERATORS) -> list[dict[str, Any]]:
    """Evaluate the named moderators (``local``, ``profanity``, ``keyword``) on each job."""
    shared: dict[str, Moderator] = {}
    rows = []
    for job in jobs:
        for name in names:
            moderator: Moderator
            if name == "local":
                local = LocalModerator(heads=job.heads)
                await local.prepare()
                moderator = local
            elif name == "profanity":
                if name not in shared:
                    profanity = ProfanityModerator()
                    await anyio.to_thread.run_sync(profanity.load)
                    shared[name] = profanity
                moderator = shared[name]
            else:
                moderator = shared.setdefault(name, KeywordModerator(KEYWORDS))
            start = time.perf_counter()
            result = await evaluate(moderator, job.texts, job.labels, policy=policy)
            summary = {k: v for k, v in result.items() if k not in ("whole", "windowed")}
            rows.append({"dataset": job.dataset, "moderator": name, **summary, "seconds": time.perf_counter() - start})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    default = Policy()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of *.jsonl files (--heads shipped)")
    parser.add_argument(
        "--limit",
        type=int,
        default=1500,
        help="samples per dataset, a seeded random sample (default 1500, about 30 s in all; 0: all)",
    )
    parser.add_argument("--moderators", nargs="+", choices=MODERATORS, default=list(MODERATORS))
    parser.add_argument("--heads", choices=("shipped", "lodo", "split"), default="shipped")
    parser.add_argument("--train-data", type=Path, default=TRAIN_DATA, help="the heads' training data (lodo, split)")
    parser.add_argument("--cache", type=Path, help="an .npz keeping training embeddings between runs")
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
    with tempfile.TemporaryDirectory() as tmp:
        if args.heads == "shipped":
            jobs = []
            for p in sorted(args.data.glob("*.jsonl")):
                texts, labels = load(p, args.limit or None)
                jobs.append(Job(p.name.split(".")[0], texts, labels))
        else:
            jobs = trained_heads(args.heads, args.train_data, args.limit or None, args.cache, Path(tmp))
        rows = anyio.run(run, jobs, policy, args.moderators)
    elapsed = time.perf_counter() - start
    print(table(rows))
    print(
        f"\nheads: {args.heads}; windows: window_chars={policy.window_chars} "
        f"first_window_chars={policy.first_window_chars} growth={policy.window_growth} "
        f"overlap_chars={policy.overlap_chars}; limit={args.limit}; {elapsed:.1f}s"
    )
    if args.out:
        settings = {
            "heads": args.heads,
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
