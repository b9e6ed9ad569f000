"""Time to first token with and without input moderation, when the input is clean.

Input moderation (``Policy(moderate_input=True)``) runs concurrently with upstream's generation, so
it should cost nothing while its round trip is shorter than upstream's own time to first token,
and only the difference when it is longer. Each configuration streams the same answer from the
loopback upstream (real HTTP, the real ``openai`` client) in hold-back mode, with and without input
moderation, side by side in each repeat; medians (p95) over ``--repeats``.

Usage::

    python benchmarks/input_moderation.py [--repeats 15] [--out FILE.json]
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
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

import streamguard as sg
from streamguard.testing import FakeModerator
from streamguard.testing.upstream import LoopbackUpstream, Script, text_chunks

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me about the history of lighthouses in a few sentences."},
]
ANSWER = [" Lighthouses", " guided", " ships", " for", " centuries", "."] * 5
UPSTREAM_TTFT = (0.1, 0.3)  # seconds before upstream's first chunk
MODERATION_LATENCY = (0.025, 0.1, 0.25, 0.5)


async def ttft(client: AsyncOpenAI, moderation_latency: float, *, moderate_input: bool) -> float:
    """Seconds from the request to the first released text."""
    start = time.perf_counter()
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    policy = sg.Policy(moderate_input=moderate_input)
    async with sg.guard(
        stream, moderator=FakeModerator(latency=moderation_latency), policy=policy, messages=MESSAGES
    ) as guarded:
        async for chunk in guarded:
            if any(choice.delta.content for choice in chunk.choices):
                return time.perf_counter() - start
    raise RuntimeError("no text came out")


def _stats(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {"median": statistics.median(ms), "p95": ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]}


async def run(repeats: int) -> list[dict[str, Any]]:
    rows = []
    for first_delay in UPSTREAM_TTFT:
        script = Script(text_chunks(ANSWER), first_delay=first_delay, delay=0.01)
        with LoopbackUpstream(chat=lambda body, s=script: s) as upstream:  # type: ignore[misc]
            async with AsyncOpenAI(api_key="offline", base_url=upstream.base_url, max_retries=0) as client:
                await ttft(client, 0.0, moderate_input=False)  # warm-up: connection, tokenizer
                for latency in MODERATION_LATENCY:
                    without, with_input = [], []
                    for _ in range(repeats):
                        without.append(await ttft(client, latency, moderate_input=False))
                        with_input.append(await ttft(client, latency, moderate_input=True))
                    added = [w - o for w, o in zip(with_input, without, strict=True)]
                    rows.append(
                        {
                            "upstream_ttft_ms": first_delay * 1000,
                            "moderation_ms": latency * 1000,
                            "ttft_without_ms": _stats(without),
                            "ttft_with_input_ms": _stats(with_input),
                            "added_ms": _stats(added),
                        }
                    )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = anyio.run(run, args.repeats)
    print("| upstream TTFT | moderation round trip | TTFT without input moderation | with | added |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        a, b, d = r["ttft_without_ms"], r["ttft_with_input_ms"], r["added_ms"]
        print(
            f"| {r['upstream_ttft_ms']:.0f} ms | {r['moderation_ms']:.0f} ms | {a['median']:.1f} [{a['p95']:.1f}] ms "
            f"| {b['median']:.1f} [{b['p95']:.1f}] ms | {d['median']:+.1f} [{d['p95']:+.1f}] ms |"
        )
    print(f"\nhold-back mode, FakeModerator latency, medians [p95] of {args.repeats} paired repeats")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
