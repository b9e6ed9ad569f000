"""Load: N concurrent guarded streams through the moderating proxy; nothing lost, mixed up, or kept.

The proxy (``streamguard.integrations.proxy``, uvicorn on 127.0.0.1) sits in front of the loopback
OpenAI-compatible upstream (``streamguard.testing.upstream``); each stream is about 40 words with a small
delay per word, and its text names its stream, so every received text is checked against what
that stream should say. Clients are real ``openai.AsyncOpenAI`` instances sharing connection pools
sized for the load. The proxy moderator is ``openai`` (the proxy's one shared, batched
``OpenAIModerator`` calling the upstream's ``/v1/moderations``) or ``keyword``.

Each wave runs the same load twice, side by side: an unguarded *baseline* straight to the
upstream, then *guarded* through the proxy; the difference in inter-chunk delay (and in time to
first token) is what the proxy and moderation add. Reported per wave: wall time, p50/p99 delays,
moderation HTTP requests per window, RSS after the wave (after a garbage collection: it should not
grow from wave to wave); overall: peak RSS (``VmHWM``) and memory per concurrent stream.

Usage::

    python benchmarks/load.py [--streams 1000] [--waves 3] [--moderator openai|keyword] [--out FILE.json]

The upstream, the proxy and the clients all run in this one process (three event loops in three
threads sharing one GIL) on however many cores the machine has, so absolute delays are pessimistic:
each side's CPU time slows the others. The counts and the correctness checks are exact.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import resource
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import openai
import uvicorn

from streamguard.integrations.proxy import ProxyConfig, create_app
from streamguard.testing.upstream import LoopbackUpstream, Script, keyword_moderation, text_chunks

CLIENT_KEY = "bench-client-key"
_ID = re.compile(r"stream (\d+)")
_FILLER = (
    "the river runs past the old mill and the light falls softly on the water while a heron waits "
    "near the reeds for the evening to come and the town grows quiet"
).split()


def expected_words(i: int, words: int) -> list[str]:
    """The deltas of stream ``i``: about ``words`` words, several of which name the stream."""
    out = [f"Stream {i}:"]
    for k in range(words - 2):
        out.append(f" {_FILLER[(i + k) % len(_FILLER)]}" if k % 8 else f" s{i}w{k}")
    out.append(f" end {i}.")
    return out


def vm(field_name: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def mib(n: float) -> float:
    return n / (1024 * 1024)


def raise_fd_limit(streams: int) -> int:
    """Raise the soft open-files limit as far as allowed (each stream holds about four sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 8 * streams + 1024)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 (free port) in a thread; yields its base URL."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="critical", lifespan="on", access_log=False, backlog=4096
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="bench-proxy", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("proxy did not start")
            time.sleep(0.005)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class CountingUpstream:
    """The loopback upstream's handlers, counting moderation requests and windows (thread-safe)."""

    def __init__(self, words: int, delay: float) -> None:
        self.words = words
        self.delay = delay
        self.lock = threading.Lock()
        self.moderation_requests = 0
        self.windows = 0
        self._flag = keyword_moderation(["attack"])

    def chat(self, body: dict[str, Any]) -> Script:
        match = _ID.search(str(body.get("messages", [{}])[0].get("content", "")))
        i = int(match.group(1)) if match else -1
        return Script(text_chunks(expected_words(i, self.words)), delay=self.delay)

    def moderation(self, body: dict[str, Any]) -> Any:
        inputs = body.get("input", [])
        with self.lock:
            self.moderation_requests += 1
            self.windows += 1 if isinstance(inputs, str) else len(inputs)
        return self._flag(body)

    def take(self) -> tuple[int, int]:
        with self.lock:
            counts = self.moderation_requests, self.windows
            self.moderation_requests = self.windows = 0
        return counts


@dataclass
class StreamResult:
    text: str = ""
    finish: list[str] = field(default_factory=list)
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # of each text delta, from the request's start
    error: str | None = None


@contextlib.asynccontextmanager
async def clients(base_url: str, count: int, streams: int, limit: float) -> AsyncIterator[list[openai.AsyncOpenAI]]:
    """``count`` clients whose pools together hold ``streams`` connections (httpx's default is 100)."""
    per_client = -(-streams // count) + 8
    limits = httpx2.Limits(max_connections=per_client, max_keepalive_connections=per_client)
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for _ in range(count):
            http = httpx2.AsyncClient(limits=limits, timeout=httpx2.Timeout(limit, connect=limit))
            client = openai.AsyncOpenAI(api_key=CLIENT_KEY, base_url=base_url, max_retries=0, http_client=http)
            out.append(await stack.enter_async_context(client))
        yield out


async def run_load(
    base_url: str, streams: int, n_clients: int, limit: float
) -> tuple[dict[int, StreamResult], float, int]:
    """All streams at once; returns each stream's result, the wall time and the sampled peak RSS."""
    results = {i: StreamResult() for i in range(streams)}
    peak = vm("VmRSS")
    async with clients(base_url, n_clients, streams, limit) as pool:

        async def one(i: int) -> None:
            r = results[i]
            parts: list[str] = []
            started = time.perf_counter()
            last: float | None = None
            try:
                stream = await pool[i % len(pool)].chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"stream {i}"}], stream=True
                )
                async with stream:
                    async for chunk in stream:
                        now = time.perf_counter()
                        for choice in chunk.choices:
                            if choice.delta.content:
                                parts.append(choice.delta.content)
                                r.arrivals.append(now - started)
                                if last is None:
                                    r.ttft = now - started
                                else:
                                    r.gaps.append(now - last)
                                last = now
                            if choice.finish_reason:
                                r.finish.append(choice.finish_reason)
            except Exception as exc:  # counted and reported: a benchmark run must finish
                r.error = f"{type(exc).__name__}: {exc}"[:200]
            r.text = "".join(parts)

        async def sample(stop: anyio.Event) -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, vm("VmRSS"))
                with anyio.move_on_after(0.05):
                    await stop.wait()

        started = time.perf_counter()
        with anyio.fail_after(limit):
            async with anyio.create_task_group() as outer:
                stop = anyio.Event()
                outer.start_soon(sample, stop)
                async with anyio.create_task_group() as tg:
                    for i in range(streams):
                        tg.start_soon(one, i)
                stop.set()
        wall = time.perf_counter() - started
    return results, wall, peak


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def added_delays(guarded: dict[int, StreamResult], baseline: dict[int, StreamResult]) -> list[float]:
    """Per text delta: its arrival (from its request's start) guarded minus unguarded, same stream and delta."""
    return [
        g - b
        for i, r in guarded.items()
        if r.error is None and baseline[i].error is None
        for g, b in zip(r.arrivals, baseline[i].arrivals, strict=False)
    ]


def summarize(results: dict[int, StreamResult], words: int) -> dict[str, Any]:
    wrong = [i for i, r in results.items() if r.error is None and r.text != "".join(expected_words(i, words))]
    errors = [r.error for r in results.values() if r.error is not None]
    gaps = [g for r in results.values() for g in r.gaps]
    ttfts = [r.ttft for r in results.values() if r.ttft is not None]
    return {
        "ok": sum(1 for r in results.values() if r.error is None and r.finish == ["stop"]) - len(wrong),
        "mismatched": len(wrong),
        "errors": len(errors),
        "first_errors": errors[:3],
        "gap_p50_ms": pct(gaps, 50) * 1000,
        "gap_p99_ms": pct(gaps, 99) * 1000,
        "ttft_p50_ms": pct(ttfts, 50) * 1000,
        "ttft_p99_ms": pct(ttfts, 99) * 1000,
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    fd_limit = raise_fd_limit(args.streams)
    handlers = CountingUpstream(args.words, args.delay)
    waves: list[dict[str, Any]] = []
    with LoopbackUpstream(chat=handlers.chat, moderation=handlers.moderation) as upstream:
        config = ProxyConfig(
            upstream=upstream.base_url,
            moderator=args.moderator,
            keywords=["attack"],
            upstream_api_key="bench-upstream-key",  # held by the proxy: one shared, batched OpenAIModerator
            client_keys=frozenset({CLIENT_KEY}),
            ping=None,
            playground=False,
        )
        with serve_in_thread(create_app(config)) as proxy_url:
            # Warm up both paths (imports, the tokenizer, first connections), then measure.
            await run_load(upstream.base_url, 4, 1, args.limit)
            await run_load(proxy_url + "/v1", 4, 1, args.limit)
            handlers.take()
            _clear_recorded(upstream)
            gc.collect()
            rss_start = vm("VmRSS")
            for wave in range(1, args.waves + 1):
                # Guarded first: in wave 1 its peak over the starting RSS is the memory of N streams
                # (freed memory is kept by the allocator, so a later run's peak would say little).
                handlers.take()
                guard_results, guard_wall, guard_peak = await run_load(
                    proxy_url + "/v1", args.streams, args.clients, args.limit
                )
                requests, windows = handlers.take()
                guarded = summarize(guard_results, args.words)
                base_results, base_wall, base_peak = await run_load(
                    upstream.base_url, args.streams, args.clients, args.limit
                )
                baseline = summarize(base_results, args.words)
                added = added_delays(guard_results, base_results)
                del guard_results, base_results
                _clear_recorded(upstream)
                gc.collect()
                waves.append(
                    {
                        "wave": wave,
                        "baseline": baseline | {"wall_s": base_wall, "peak_rss_mib": mib(base_peak)},
                        "guarded": guarded
                        | {
                            "wall_s": guard_wall,
                            "peak_rss_mib": mib(guard_peak),
                            "moderation_requests": requests,
                            "windows": windows,
                            "requests_per_window": requests / windows if windows else None,
                        },
                        "added_delay_p50_ms": pct(added, 50) * 1000,
                        "added_delay_p99_ms": pct(added, 99) * 1000,
                        "added_ttft_p50_ms": guarded["ttft_p50_ms"] - baseline["ttft_p50_ms"],
                        "rss_after_wave_mib": mib(vm("VmRSS")),
                    }
                )
    return {
        "streams": args.streams,
        "words": args.words,
        "delay_s": args.delay,
        "moderator": args.moderator,
        "clients": args.clients,
        "cpus": os.cpu_count(),
        "fd_limit": fd_limit,
        "rss_start_mib": mib(rss_start),
        "peak_rss_mib": mib(vm("VmHWM")),
        "kib_per_stream": (waves[0]["guarded"]["peak_rss_mib"] - mib(rss_start)) * 1024 / args.streams,
        "waves": waves,
    }


def _clear_recorded(upstream: LoopbackUpstream) -> None:
    """Drop the request bodies the loopback upstream records for tests: the harness's own memory."""
    stats = upstream._stats  # private: the harness's own bookkeeping
    with stats.lock:
        stats.requests.clear()


def table(result: dict[str, Any]) -> str:
    n = result["streams"]
    lines = [
        "| wave | run | streams ok | wall (s) | TTFT p50 / p99 (ms) | inter-chunk p50 / p99 (ms) | "
        "added per chunk p50 / p99 (ms) | moderation req / windows | req per window | peak RSS (MiB) | "
        "RSS after wave (MiB) |",
        "|" + " --- |" * 11,
    ]
    for w in result["waves"]:
        b, g = w["baseline"], w["guarded"]
        per_window = f"{g['requests_per_window']:.3f}" if g["requests_per_window"] is not None else "n/a"
        lines.append(
            f"| {w['wave']} | baseline | {b['ok']}/{n} | {b['wall_s']:.1f} | {b['ttft_p50_ms']:.0f} / "
            f"{b['ttft_p99_ms']:.0f} | {b['gap_p50_ms']:.1f} / {b['gap_p99_ms']:.1f} | | | | "
            f"{b['peak_rss_mib']:.0f} | |"
        )
        lines.append(
            f"| {w['wave']} | guarded | {g['ok']}/{n} | {g['wall_s']:.1f} | {g['ttft_p50_ms']:.0f} / "
            f"{g['ttft_p99_ms']:.0f} | {g['gap_p50_ms']:.1f} / {g['gap_p99_ms']:.1f} | "
            f"{w['added_delay_p50_ms']:+.0f} / {w['added_delay_p99_ms']:+.0f} | "
            f"{g['moderation_requests']} / {g['windows']} | {per_window} | {g['peak_rss_mib']:.0f} | "
            f"{w['rss_after_wave_mib']:.0f} |"
        )
    return "\n".join(lines)


def notes(result: dict[str, Any]) -> str:
    waves = result["waves"]
    problems = [
        f"wave {w['wave']} {run}: {w[run]['mismatched']} mismatched, {w[run]['errors']} failed {w[run]['first_errors']}"
        for w in waves
        for run in ("baseline", "guarded")
        if w[run]["mismatched"] or w[run]["errors"]
    ]
    per_stream = result["kib_per_stream"]
    rss = [w["rss_after_wave_mib"] for w in waves]
    return "\n".join(
        [
            f"{result['streams']} concurrent streams of {result['words']} words, {result['delay_s'] * 1000:.0f} ms "
            f"per word; proxy moderator `{result['moderator']}`; {result['clients']} AsyncOpenAI clients.",
            f"Upstream, proxy and clients share this one process (one GIL) and {result['cpus']} CPU core(s): "
            "the delays include each side's CPU time slowing the others.",
            "Added per chunk: each text delta's arrival time (from its request's start) through the proxy minus "
            "the same stream's same delta straight from upstream. Inter-chunk delays through the proxy are bimodal "
            "by design (hold-back releases a window's deltas together once its verdict is in).",
            "Every received text was compared with its stream's expected text: "
            + ("none lost, mixed up or failed." if not problems else "PROBLEMS: " + "; ".join(problems)),
            f"Peak RSS (VmHWM, whole process): {result['peak_rss_mib']:.0f} MiB; "
            f"memory per concurrent guarded stream (upstream + proxy + client sides): {per_stream:.0f} KiB "
            "(sampled peak RSS of wave 1's guarded run minus the RSS before it, over the streams).",
            f"RSS before the first wave {result['rss_start_mib']:.0f} MiB, after each wave "
            + ", ".join(f"{r:.0f}" for r in rss)
            + f" MiB (change from wave 1 to {len(rss)}: {rss[-1] - rss[0]:+.1f} MiB).",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams per run")
    parser.add_argument("--waves", type=int, default=3, help="repeated waves (RSS is reported after each)")
    parser.add_argument("--words", type=int, default=40, help="words per stream")
    parser.add_argument("--delay", type=float, default=0.02, help="upstream seconds per word")
    parser.add_argument("--moderator", choices=["openai", "keyword"], default="openai")
    parser.add_argument("--clients", type=int, default=4, help="AsyncOpenAI clients sharing the streams")
    parser.add_argument("--limit", type=float, default=300.0, help="bound on one run, in seconds")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    result = anyio.run(measure, args)
    print(table(result))
    print()
    print(notes(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    failed = any(w[run]["mismatched"] or w[run]["errors"] for w in result["waves"] for run in ("baseline", "guarded"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
