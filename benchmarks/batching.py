"""Requests per window and added latency of cross-stream batching in OpenAIModerator.

``callers`` concurrent streams each moderate ``windows`` windows one after the other (as a
guarded stream does) through one shared :class:`~streamguard.moderation.OpenAIModerator`,
against the loopback OpenAI-compatible server (real HTTP, real ``openai`` client). The same run
without batching (``max_batch=1, max_wait=0``) is the baseline. Medians over ``--repeats``.

Usage::

    python benchmarks/batching.py [--callers 1 10 100] [--windows 20] [--repeats 5] [--out FILE.json]

The server runs in a thread of the same process, so at 100 callers both sides share one GIL:
absolute latencies are pessimistic; the request counts are exact.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import openai

from streamguard.moderation import OpenAIModerator
from streamguard.testing.upstream import LoopbackUpstream, keyword_moderation

WINDOW = "The quick brown fox jumps over the lazy dog while the model keeps on talking. " * 3


async def one_run(base_url: str, callers: int, windows: int, *, batched: bool) -> dict[str, float]:
    """All callers once: requests per window and the median latency of one moderate() call."""
    async with openai.AsyncOpenAI(api_key="test", base_url=base_url) as client:
        if batched:
            moderator = OpenAIModerator(client)
        else:
            moderator = OpenAIModerator(client, max_batch=1, max_wait=0)
        latencies: list[float] = []

        async def stream(c: int) -> None:
            for w in range(windows):
                start = time.perf_counter()
                await moderator.moderate([f"{c}/{w} {WINDOW}"])
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for c in range(callers):
                tg.start_soon(stream, c)
        wall = time.perf_counter() - start
        stats = moderator.stats
    return {
        "requests_per_window": stats.requests / (callers * windows),
        "latency_ms": statistics.median(latencies) * 1000,
        "p95_ms": statistics.quantiles(latencies, n=20)[-1] * 1000 if len(latencies) > 1 else latencies[0] * 1000,
        "wall_s": wall,
    }


async def measure(callers: Sequence[int], windows: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    with LoopbackUpstream(moderation=keyword_moderation(["kill"])) as upstream:
        await one_run(upstream.base_url, 4, 2, batched=True)  # warm up: imports, connections
        for n in callers:
            runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
            for _ in range(repeats):
                for batched in (False, True):
                    runs[batched].append(await one_run(upstream.base_url, n, windows, batched=batched))
            row: dict[str, Any] = {"callers": n, "windows_per_caller": windows, "repeats": repeats}
            for batched, label in ((False, "unbatched"), (True, "batched")):
                for key in ("requests_per_window", "latency_ms", "p95_ms", "wall_s"):
                    row[f"{label}_{key}"] = statistics.median(r[key] for r in runs[batched])
            row["added_latency_ms"] = row["batched_latency_ms"] - row["unbatched_latency_ms"]
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| callers | requests/window batched | requests/window unbatched | median latency batched (ms) | "
        "median latency unbatched (ms) | added latency (ms) | p95 batched (ms) | p95 unbatched (ms) |",
        "|" + " --- |" * 8,
    ]
    for r in rows:
        lines.append(
            f"| {r['callers']} | {r['batched_requests_per_window']:.3f} | {r['unbatched_requests_per_window']:.3f} | "
            f"{r['batched_latency_ms']:.1f} | {r['unbatched_latency_ms']:.1f} | {r['added_latency_ms']:+.1f} | "
            f"{r['batched_p95_ms']:.1f} | {r['unbatched_p95_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--windows", type=int, default=20, help="sequential windows per caller")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    rows = anyio.run(measure, args.callers, args.windows, args.repeats)
    print(table(rows))
    print(f"\nOpenAIModerator defaults (max_batch=32, max_wait=5 ms); medians of {args.repeats} repeats.")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
