"""The engine's costs, side by side in one run: CPU per chunk, memory under slow moderation, long deltas.

    .venv/bin/python benchmarks/engine.py all --out docs/bench/engine.json

- ``cpu``: the same loopback stream (an upstream in its own process, at full speed) read by the
  real ``openai`` client raw and guarded (``KeywordModerator``), interleaved; CPU is
  ``time.process_time()`` of the client process (every thread of it). Reports guarded/raw per
  pair, median and p95.
- ``memory``: an upstream in its own process that would send 50 MB at full speed, moderation at
  100 ms a window, hold-back: RSS growth of the client process, what upstream managed to send,
  how long reading was paused, and that what was released is exactly upstream's text so far.
- ``delta``: one 10 MB delta through ``guard()`` with ``KeywordModerator``: wall time, and the
  longest event-loop stall a 1 ms heartbeat task saw.
- ``emoji``: 20,000 deltas after an emoji newer than Python's Unicode tables: time per 1,000
  deltas at the start and at the end (linear: the same).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
from openai import AsyncOpenAI

import streamguard as sg
from streamguard.testing import FakeModerator

WORDS = "the quick brown fox jumps over the lazy dog while we plan a calm picnic by the river".split()


# -- the upstream, in its own process ---------------------------------------------------------------


def serve(chunks: int, delta_chars: int) -> None:
    """Run a loopback OpenAI-compatible upstream; print its port; stop when stdin closes."""
    from streamguard.testing.upstream import LoopbackUpstream, Script, text_chunks

    words = [" " + WORDS[i % len(WORDS)] for i in range(max(1, delta_chars // 5) * chunks)]
    deltas = ["".join(words[i : i + max(1, delta_chars // 5)]) for i in range(0, len(words), max(1, delta_chars // 5))]
    events = text_chunks(deltas[:chunks])
    with LoopbackUpstream(chat=lambda body: Script(events)) as upstream:
        print(upstream.port, flush=True)
        sys.stdin.read()
        print(json.dumps({"events_sent": upstream.events_sent, "aborted": upstream.aborted}), flush=True)


class Upstream:
    """The upstream subprocess (pinned to the other core where there is one)."""

    def __init__(self, chunks: int, delta_chars: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "serve", "--chunks", str(chunks), "--delta-chars", str(delta_chars)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
            os.sched_setaffinity(self.proc.pid, {1})
            os.sched_setaffinity(0, {0})

    def stop(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        line = self.proc.stdout.readline()
        self.proc.wait(timeout=10)
        return json.loads(line) if line.strip() else {}


def client(port: int) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="test", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=60)


async def _stream(c: AsyncOpenAI) -> Any:
    return await c.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )


# -- cpu ----------------------------------------------------------------------------------------------


async def cpu(chunks: int, repeats: int) -> dict[str, Any]:
    up = Upstream(chunks, 5)
    moderator = sg.KeywordModerator(["attack"])
    ratios: list[float] = []
    raw_us: list[float] = []
    guarded_us: list[float] = []
    try:
        async with client(up.port) as c:
            for _ in range(2):  # warm up: tokenizer, connection pool, code paths
                async with sg.guard(await _stream(c), moderator=moderator) as g:
                    async for _chunk in g:
                        pass
            for i in range(repeats):
                pair: dict[str, float] = {}
                for side in ("raw", "guarded") if i % 2 == 0 else ("guarded", "raw"):
                    started = time.process_time()
                    n = 0
                    stream = await _stream(c)
                    if side == "raw":
                        async for _chunk in stream:
                            n += 1
                    else:
                        async with sg.guard(stream, moderator=moderator) as g:
                            async for _chunk in g:
                                n += 1
                    pair[side] = (time.process_time() - started) / max(n, 1) * 1e6
                raw_us.append(pair["raw"])
                guarded_us.append(pair["guarded"])
                ratios.append(pair["guarded"] / pair["raw"])
    finally:
        up.stop()
    return {
        "chunks": chunks,
        "repeats": repeats,
        "raw_us_per_chunk": _dist(raw_us),
        "guarded_us_per_chunk": _dist(guarded_us),
        "ratio": _dist(ratios),
    }


# -- cpu, as instructions (callgrind: repeatable whatever else the machine runs) -----------------------


async def _client_run(port: int, side: str, chunks_seen: list[int]) -> None:
    moderator = sg.KeywordModerator(["attack"])
    async with client(port) as c:
        stream = await _stream(c)
        if side == "raw":
            async for _chunk in stream:
                chunks_seen[0] += 1
        else:
            async with sg.guard(stream, moderator=moderator) as g:
                async for _chunk in g:
                    chunks_seen[0] += 1


def client_main(port: int, side: str, streams: int) -> None:
    """One client process: a warm-up stream of each side, then ``streams`` streams of ``side``."""
    sg.count_tokens("warm up", "gpt-4o-mini")
    seen = [0]
    asyncio.run(_client_run(port, "raw", seen))
    asyncio.run(_client_run(port, "guarded", seen))
    for _ in range(streams):
        asyncio.run(_client_run(port, side, seen))


def instructions(chunks: int) -> dict[str, Any]:
    """Client instructions per chunk, raw and guarded: (runs of 3 streams - runs of 1) / 2 streams."""
    up = Upstream(chunks, 5)
    counts: dict[str, dict[int, int]] = {"raw": {}, "guarded": {}}
    try:
        for side in ("raw", "guarded"):
            for streams in (1, 3):
                out = Path(f"/tmp/streamguard-callgrind-{side}-{streams}.out")
                subprocess.run(
                    [
                        "valgrind",
                        "--tool=callgrind",
                        "--cache-sim=no",
                        f"--callgrind-out-file={out}",
                        sys.executable,
                        __file__,
                        "client",
                        "--port",
                        str(up.port),
                        "--side",
                        side,
                        "--streams",
                        str(streams),
                    ],
                    check=True,
                    capture_output=True,
                    timeout=1800,
                )
                counts[side][streams] = _callgrind_total(out)
                out.unlink()
    finally:
        up.stop()
    per_chunk = {side: (c[3] - c[1]) / (2 * (chunks + 2)) for side, c in counts.items()}
    return {
        "chunks_per_stream": chunks,
        "raw_instructions_per_chunk": round(per_chunk["raw"]),
        "guarded_instructions_per_chunk": round(per_chunk["guarded"]),
        "ratio": round(per_chunk["guarded"] / per_chunk["raw"], 3),
    }


def _callgrind_total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


# -- memory -------------------------------------------------------------------------------------------


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def memory(total_mb: int, seconds: float) -> dict[str, Any]:
    delta_chars = 4000
    chunks = total_mb * 1_000_000 // delta_chars
    sg.count_tokens("warm up", "gpt-4o-mini")
    warm = Upstream(50, 5)  # warm up on a short stream: imports, model classes, the tokenizer
    async with client(warm.port) as c:
        async with sg.guard(await _stream(c), moderator=FakeModerator()) as g:
            async for _chunk in g:
                pass
    warm.stop()
    up = Upstream(chunks, delta_chars)
    before = rss_mb()
    peak = before
    released = 0
    text_ok = True
    policy = sg.Policy()  # hold-back, cut-off, max_held_chars default
    expected = ""
    try:
        async with client(up.port) as c:
            stream = await _stream(c)
            async with sg.guard(stream, moderator=FakeModerator(latency=0.1), policy=policy) as g:
                started = time.monotonic()
                got: list[str] = []
                async for chunk in g:
                    for ch in chunk.choices:
                        got.append(ch.delta.content or "")
                    peak = max(peak, rss_mb())
                    if time.monotonic() - started > seconds:
                        break
                report = g.report
            released = sum(map(len, got))
            text = "".join(got)
            # Upstream's text is the WORDS cycle: what was released must be exactly its prefix.
            expected = "".join(" " + WORDS[i % len(WORDS)] for i in range(released // 3 + 10))
            text_ok = expected.startswith(text)
    finally:
        stats = up.stop()
    sent_mb = stats.get("events_sent", 0) * delta_chars / 1e6
    return {
        "upstream_would_send_mb": total_mb,
        "seconds": seconds,
        "rss_before_mb": round(before, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_growth_mb": round(peak - before, 1),
        "upstream_sent_mb": round(sent_mb, 2),
        "released_chars": released,
        "paused_seconds": round(report.paused_seconds, 2),
        "released_is_upstream_prefix": text_ok,
        "leaked_chars": report.leaked_chars,
    }


# -- long deltas --------------------------------------------------------------------------------------


async def _heartbeat(stalls: list[float], stop: anyio.Event) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await anyio.sleep(0.001)
        now = time.perf_counter()
        stalls.append(now - last)
        last = now


async def big_delta(mb: int) -> dict[str, Any]:
    text = ("word " * (mb * 200_000))[: mb * 1_000_000]

    async def source() -> AsyncIterator[dict[str, Any]]:
        base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
        yield {
            **base,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}],
        }
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

    # A long-running process has its tokenizer built already (a first build, in a worker
    # thread, holds the GIL for a while): build it before timing, as the CPU run warms up too.
    sg.count_tokens("warm up", "gpt-4o-mini")
    stalls: list[float] = []
    stop = anyio.Event()
    out = 0
    async with anyio.create_task_group() as tg:
        tg.start_soon(_heartbeat, stalls, stop)
        started = time.perf_counter()
        async with sg.guard(source(), moderator=sg.KeywordModerator(["attack"])) as g:
            async for chunk in g:
                for ch in chunk["choices"]:
                    out += len(ch["delta"].get("content") or "")
        took = time.perf_counter() - started
        stop.set()
    return {
        "delta_mb": mb,
        "seconds": round(took, 3),
        "max_loop_stall_ms": round(max(stalls) * 1000, 1),
        "released_whole": out == len(text),
    }


async def emoji(deltas: int) -> dict[str, Any]:
    async def source() -> AsyncIterator[dict[str, Any]]:
        base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
        yield {**base, "choices": [{"index": 0, "delta": {"content": "Love \U0001fa77 it."}, "finish_reason": None}]}
        for i in range(deltas):
            yield {**base, "choices": [{"index": 0, "delta": {"content": f" word{i % 7}"}, "finish_reason": None}]}
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

    marks: list[float] = []
    n = 0
    async with sg.guard(source(), moderator=sg.KeywordModerator(["attack"])) as g:
        async for _chunk in g:
            n += 1
            if n % 1000 == 0:
                marks.append(time.perf_counter())
        report = g.report
    per_1000 = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    head, tail = per_1000[:3], per_1000[-3:]
    return {
        "deltas": deltas,
        "first_ms_per_1000": round(statistics.median(head) * 1000, 2),
        "last_ms_per_1000": round(statistics.median(tail) * 1000, 2),
        "last_over_first": round(statistics.median(tail) / statistics.median(head), 2),
        "completion_tokens": report.usage.completion_tokens if report.usage else None,
    }


def _dist(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median": round(statistics.median(ordered), 3), "p95": round(p95, 3), "n": len(ordered)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["all", "cpu", "instructions", "memory", "delta", "emoji", "serve", "client"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--side", choices=["raw", "guarded"], default="raw")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--chunks", type=int, default=5000)
    parser.add_argument("--delta-chars", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.what == "serve":
        serve(args.chunks, args.delta_chars)
        return 0
    if args.what == "client":
        client_main(args.port, args.side, args.streams)
        return 0
    jobs: dict[str, Callable[[], Any]] = {
        "cpu": lambda: cpu(args.chunks, args.repeats),
        "instructions": lambda: asyncio.to_thread(instructions, 1000),
        "memory": lambda: memory(50, 8.0),
        "delta": lambda: big_delta(10),
        "emoji": lambda: emoji(20_000),
    }
    results: dict[str, Any] = {}
    for name, job in jobs.items():
        if args.what in ("all", name):
            results[name] = asyncio.run(job())
            print(name, json.dumps(results[name]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
