"""``streamguard eval``: a moderator's quality on labelled texts, whole and windowed through the real guard.

Each sample is judged twice by the same moderator: whole (``moderate([text])``), and streamed word by
word through :func:`streamguard.guard` (in-process, hold-back, ``action="redact"`` so every window is
judged, no quiet-gap flushes, so only the text decides where windows are cut). A text counts as
flagged by the windowed run if any of its windows was flagged. :func:`evaluate` is the reusable part
(``benchmarks/moderation_quality.py`` and other scripts may call it).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..policy import Policy
from ._common import CLIError
from ._report import distribution

if TYPE_CHECKING:
    from ..moderation import Moderator, Verdict

__all__ = ["Sample", "evaluate", "eval_policy", "load_samples", "stream_words"]

# Thresholds of the sweep: flag when the highest category score reaches the threshold.
SWEEP = tuple(round(0.05 * i, 2) for i in range(1, 20))
# No quiet-gap flushes: the in-process stream never stalls, so a gap would only be event-loop load.
FLUSH_AFTER = 3600.0
_WORDS = re.compile(r"\s*\S+|\s+")


@dataclass(frozen=True)
class Sample:
    """One labelled text: ``flagged`` is the ground truth; ``labels`` maps category -> 0/1 where annotated."""

    text: str
    flagged: bool
    labels: Mapping[str, int] = field(default_factory=dict)


def load_samples(path: Path, *, limit: int | None = None, seed: int = 0) -> list[Sample]:
    """Samples of a JSON-lines file (``{"text": ..., "flagged": bool, "labels": {...}}``).

    Args:
        path: The file.
        limit: Keep a seeded random sample of this many rows (in file order).
        seed: Seed of that sample.

    Raises:
        CLIError: The file is missing, or a line is not such an object (one line, with its number).
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CLIError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read {path}: {exc}") from None
    samples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise CLIError(f"{path}:{number}: not valid JSON ({exc})") from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("text"), str)
            or not isinstance(row.get("flagged"), bool)
        ):
            raise CLIError(f'{path}:{number}: expected {{"text": str, "flagged": bool, "labels": {{...}}}}')
        labels = row.get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(v, (int, bool)) for v in labels.values()):
            raise CLIError(f"{path}:{number}: labels must map category names to 0 or 1")
        samples.append(Sample(row["text"], row["flagged"], {str(k): int(v) for k, v in labels.items()}))
    if not samples:
        raise CLIError(f"no samples in {path}")
    if limit is not None and len(samples) > limit:
        keep = sorted(random.Random(seed).sample(range(len(samples)), limit))
        samples = [samples[i] for i in keep]
    return samples


def eval_policy(*, window: int = 240, first_window: int | None = None, overlap: int | None = None) -> Policy:
    """The policy windowed runs use: ``Policy()``'s windows (or these), redact, no quiet-gap flushes."""
    default = Policy()
    return Policy(
        action="redact",
        window_chars=window,
        first_window_chars=min(window, default.first_window_chars if first_window is None else first_window),
        overlap_chars=default.overlap_chars if overlap is None else overlap,
        flush_after=FLUSH_AFTER,
    )


def stream_words(text: str) -> list[str]:
    """``text`` as stream deltas, the way a model emits them: each word with its leading space."""
    return _WORDS.findall(text)


def _score(verdict: Verdict, policy: Policy) -> float | None:
    scores = [s for c, s in verdict.scores.items() if c not in policy.ignore_categories]
    return max(scores) if scores else None


class _Recorder:
    """Wraps the shared moderator for one sample's stream: keeps each window's score and round trip."""

    def __init__(self, inner: Moderator, policy: Policy) -> None:
        self.inner = inner
        self.policy = policy
        self.scores: list[float] = []
        self.latencies: list[float] = []

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        started = time.perf_counter()
        verdicts = await self.inner.moderate(texts)
        # The guard sends windows that queued up together in one call: each waited the call's time.
        self.latencies.extend([time.perf_counter() - started] * len(texts))
        for verdict in verdicts:
            score = _score(verdict, self.policy)
            if score is not None:
                self.scores.append(score)
        return verdicts


def _prf(predicted: Sequence[bool], truth: Sequence[bool]) -> dict[str, Any]:
    tp = sum(p and t for p, t in zip(predicted, truth, strict=True))
    fp = sum(p and not t for p, t in zip(predicted, truth, strict=True))
    fn = sum(t and not p for p, t in zip(predicted, truth, strict=True))
    tn = len(truth) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "flagged": tp + fp,
    }


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


async def evaluate(
    moderator: Moderator,
    samples: Sequence[Sample],
    *,
    policy: Policy | None = None,
    concurrency: int = 32,
    thresholds: Sequence[float] = SWEEP,
    tick: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Judge ``samples`` whole and windowed through the guard; precision, recall, F1 and more.

    Args:
        moderator: Any moderator; a verdict flags as ``policy.judge`` decides.
        samples: Labelled texts (see :func:`load_samples`).
        policy: Windows and thresholds; by default :func:`eval_policy`. Windowed runs always use hold-back
            and ``action="redact"`` (every window judged; detection is the same as with a cut-off).
        concurrency: Texts judged (whole) or streamed (windowed) at once; the moderator batches them.
        thresholds: The sweep's thresholds on the highest category score (skipped without scores).
        tick: Called once per text judged, for a progress bar.

    Returns:
        The ``results.json`` fields: ``n``, ``positives``, ``whole`` and ``windowed`` (precision,
        recall, f1, tp, fp, fn, tn, flagged; windowed also ``windows``), ``recall_vs_whole``,
        ``false_flag_rate``, ``categories``, ``latency_ms`` and ``threshold_sweep``.
    """
    import anyio

    from .. import guard
    from ..testing import scripted_chunks

    policy = dataclasses.replace(policy or eval_policy(), mode="holdback", action="redact")
    n = len(samples)
    whole_flag = [False] * n
    whole_score: list[float | None] = [None] * n
    whole_latency: list[float] = []
    windowed_flag = [False] * n
    windowed_score: list[float | None] = [None] * n
    windows = [0] * n
    window_latency: list[float] = []
    limiter = anyio.CapacityLimiter(concurrency)

    async def whole(i: int) -> None:
        async with limiter:
            started = time.perf_counter()
            verdicts = await moderator.moderate([samples[i].text])
            whole_latency.append(time.perf_counter() - started)
        if len(verdicts) != 1:
            raise RuntimeError(f"{type(moderator).__name__} returned {len(verdicts)} verdicts for 1 text")
        whole_flag[i] = policy.judge(verdicts[0]) is not None
        whole_score[i] = _score(verdicts[0], policy)
        if tick:
            tick("whole texts")

    async def windowed(i: int) -> None:
        recorder = _Recorder(moderator, policy)
        async with limiter:
            source = scripted_chunks(stream_words(samples[i].text))
            async with guard(source, moderator=recorder, policy=policy) as guarded:
                async for _ in guarded:
                    pass
        report = guarded.report
        if report.error is not None:
            raise report.error
        windowed_flag[i] = bool(report.flags)
        windowed_score[i] = max(recorder.scores) if recorder.scores else None
        windows[i] = report.moderation_calls
        window_latency.extend(recorder.latencies)
        if tick:
            tick("windowed, through the guard")

    for job in (whole, windowed):
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(job, i)

    truth = [s.flagged for s in samples]
    whole_pos = sum(whole_flag)
    result: dict[str, Any] = {
        "n": n,
        "positives": sum(truth),
        "whole": _prf(whole_flag, truth),
        "windowed": {
            **_prf(windowed_flag, truth),
            "windows": sum(windows),
            "windows_per_text": round(sum(windows) / n, 3) if n else None,
        },
        "recall_vs_whole": _share(sum(w and x for w, x in zip(windowed_flag, whole_flag, strict=True)), whole_pos),
        "false_flag_rate": _share(
            sum(w and not x for w, x in zip(windowed_flag, whole_flag, strict=True)), n - whole_pos
        ),
        "categories": _categories(samples, whole_flag, windowed_flag),
        "latency_ms": {
            "whole_text": distribution([1000 * t for t in whole_latency]),
            "window": distribution([1000 * t for t in window_latency]),
        },
        "threshold_sweep": _sweep(whole_score, windowed_score, truth, thresholds),
    }
    return result


def _categories(samples: Sequence[Sample], whole: Sequence[bool], windowed: Sequence[bool]) -> dict[str, Any]:
    """Per labelled category: how many texts were annotated, positives, and each run's recall on them."""
    names = sorted({c for s in samples for c in s.labels})
    out = {}
    for name in names:
        annotated = [i for i, s in enumerate(samples) if name in s.labels]
        positive = [i for i in annotated if samples[i].labels[name]]
        negative = [i for i in annotated if not samples[i].labels[name]]
        whole_hits = [i for i in positive if whole[i]]
        out[name] = {
            "annotated": len(annotated),
            "positives": len(positive),
            "whole_recall": _share(len(whole_hits), len(positive)),
            "windowed_recall": _share(sum(1 for i in positive if windowed[i]), len(positive)),
            "recall_vs_whole": _share(sum(1 for i in whole_hits if windowed[i]), len(whole_hits)),
            "whole_flag_rate_on_negatives": _share(sum(1 for i in negative if whole[i]), len(negative)),
            "windowed_flag_rate_on_negatives": _share(sum(1 for i in negative if windowed[i]), len(negative)),
        }
    return out


def _sweep(
    whole: Sequence[float | None], windowed: Sequence[float | None], truth: Sequence[bool], thresholds: Sequence[float]
) -> dict[str, Any] | None:
    """Precision / recall / F1 if a text flagged when its highest score (windowed: of any window) reaches t."""
    if all(s is None for s in whole) and all(s is None for s in windowed):
        return None
    rows = []
    for t in thresholds:
        row: dict[str, Any] = {"threshold": t}
        for name, scores in (("whole", whole), ("windowed", windowed)):
            prf = _prf([s is not None and s >= t for s in scores], truth)
            row[name] = {k: prf[k] for k in ("precision", "recall", "f1")}
        rows.append(row)
    return {
        "score": "highest category score of the text (windowed: of any of its windows)",
        "rows": rows,
        "best_whole": max(rows, key=lambda r: r["whole"]["f1"]) if rows else None,
        "best_windowed": max(rows, key=lambda r: r["windowed"]["f1"]) if rows else None,
    }
