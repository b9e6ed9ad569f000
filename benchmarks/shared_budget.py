"""One moderation budget in Redis against separate pacing: 2 proxy processes x 2 workers, side by side in one run.

A loopback upstream (in this process, in a thread) streams a deterministic story per prompt and
serves a Moderation endpoint that allows ``--limit`` requests per ``--window`` seconds with
OpenAI's ``x-ratelimit-*`` headers and answers 429 past it
(:class:`streamguard.testing.upstream.RateLimitedModeration`). Two ``streamguard serve --workers 2``
processes moderate through it (``--moderator openai``, one batched moderator per worker), with
``--redis-url`` (one budget in a real ``redis-server`` on loopback) or without (each worker paces
itself from the headers it sees). Clients stream ``--streams`` answers, ``--concurrency`` at a
time, alternating between the two proxies, and check each one is whole (the exact text, then
``finish_reason="stop"``). Per run: moderation requests accepted and refused with 429, streams
whole, wall time. The two modes alternate within each repeat; medians and p95 over repeats.

Usage::

    python benchmarks/shared_budget.py [--streams 60] [--concurrency 12] [--limit 10] [--window 1.0]
        [--words 80] [--repeats 3] [--out shared_budget.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import openai

from streamguard.testing.upstream import LoopbackUpstream, RateLimitedModeration, Script, story_chat
from tests.integration._redis import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "SHARED_BUDGET_BENCH_KEY"


def start_proxy(upstream: str, port: int, *, workers: int, redis_url: str | None) -> subprocess.Popen[bytes]:
    """``streamguard serve`` on 127.0.0.1:port, ready (``/readyz`` answers 200)."""
    args = [
        sys.executable,
        "-m",
        "streamguard",
        "serve",
        f"--upstream={upstream}",
        f"--port={port}",
        f"--workers={workers}",
        "--moderator=openai",
        f"--upstream-key-env={KEY_ENV}",
        "--no-access-log",
        "--log-level=warning",
    ]
    if redis_url:
        args.append(f"--redis-url={redis_url}")
    process = subprocess.Popen(args, cwd=ROOT, env={**os.environ, KEY_ENV: "bench"}, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
                if answer.status == 200:
                    return process
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"streamguard serve did not start on port {port}")
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


async def run_clients(bases: Sequence[str], streams: int, concurrency: int, words: int) -> dict[str, Any]:
    """Stream ``streams`` answers through the proxies in turn; count the whole ones."""
    expected_for = story_chat(words=words, delay=0)
    whole = 0
    failures: list[str] = []
    limiter = anyio.CapacityLimiter(concurrency)
    clients = [openai.AsyncOpenAI(api_key="bench", base_url=base, max_retries=0, timeout=120) for base in bases]

    async def one(i: int) -> None:
        nonlocal whole
        prompt = f"Tell story number {i}."
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
        script = expected_for(body)
        assert isinstance(script, Script)
        expected = "".join(e["choices"][0]["delta"].get("content") or "" for e in script.events if isinstance(e, dict))
        async with limiter:
            text: list[str] = []
            finish = None
            try:
                stream = await clients[i % len(clients)].chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], stream=True
                )
                async for chunk in stream:
                    for choice in chunk.choices:
                        text.append(choice.delta.content or "")
                        finish = choice.finish_reason or finish
            except openai.APIError as exc:
                failures.append(f"{type(exc).__name__}: {str(exc)[:120]}")
                return
        if "".join(text) == expected and finish == "stop":
            whole += 1
        else:
            failures.append(f"stream {i}: finish={finish} chars={len(''.join(text))}/{len(expected)}")

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for i in range(streams):
            tg.start_soon(one, i)
    wall = time.monotonic() - started
    for client in clients:
        await client.close()
    return {"whole": whole, "failures": failures[:5], "failed": len(failures), "wall_s": wall}


def one_run(mode: str, args: argparse.Namespace, redis: RedisServer) -> dict[str, Any]:
    """Both proxies in one mode, the clients, the endpoint's counts."""
    limit = RateLimitedModeration(requests=args.limit, window=args.window)
    chat = story_chat(words=args.words, delay=args.word_ms / 1000)
    with LoopbackUpstream(chat=chat, moderation=limit) as upstream:
        redis_url = redis.url if mode == "redis" else None
        ports = [free_port() for _ in range(args.proxies)]
        proxies = [start_proxy(upstream.base_url, p, workers=args.workers, redis_url=redis_url) for p in ports]
        try:
            time.sleep(args.window)  # a fresh window
            limit.accepted = limit.rejected = 0
            bases = [f"http://127.0.0.1:{p}/v1" for p in ports]
            clients = anyio.run(run_clients, bases, args.streams, args.concurrency, args.words)
            accepted, rejected = limit.accepted, limit.rejected
        finally:
            for proxy in proxies:
                stop(proxy)
    total = accepted + rejected
    return {
        "mode": mode,
        "moderation_requests": total,
        "accepted": accepted,
        "rejected_429": rejected,
        "share_429": rejected / total if total else 0.0,
        "streams": args.streams,
        **clients,
    }


def summary(runs: list[dict[str, Any]], field: str) -> dict[str, float]:
    values = sorted(float(r[field]) for r in runs)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return {"median": statistics.median(values), "p95": p95, "max": values[-1]}


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark; print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--limit", type=int, default=10, help="moderation requests allowed per window")
    parser.add_argument("--window", type=float, default=1.0, help="seconds per rate-limit window")
    parser.add_argument("--words", type=int, default=80, help="words per streamed answer")
    parser.add_argument("--word-ms", type=float, default=10.0, help="ms between streamed words")
    parser.add_argument("--proxies", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("shared_budget.json"))
    args = parser.parse_args(argv)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as directory:
        redis = RedisServer(Path(directory))
        redis.start()
        try:
            for repeat in range(args.repeats):
                for mode in ("redis", "apart"):
                    run = one_run(mode, args, redis)
                    run["repeat"] = repeat
                    runs.append(run)
                    print(
                        f"{mode:6} #{repeat}: {run['moderation_requests']} moderation requests, "
                        f"{run['rejected_429']} got 429 ({run['share_429']:.1%}); "
                        f"{run['whole']}/{run['streams']} streams whole; {run['wall_s']:.1f}s",
                        flush=True,
                    )
        finally:
            redis.stop()
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "summary": {}}
    for mode in ("redis", "apart"):
        mine = [r for r in runs if r["mode"] == mode]
        fields = ("share_429", "rejected_429", "moderation_requests", "whole", "wall_s")
        result["summary"][mode] = {field: summary(mine, field) for field in fields}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
