"""The benchmark suite behind ``streamguard bench`` (and ``benchmarks/latency.py``).

Everything runs against the loopback upstream (``streamguard.testing.upstream``: real uvicorn, real SSE) through
the real ``openai`` client, in one process, side by side:

a. CPU time per chunk, guarded vs raw iteration of the same stream (``KeywordModerator``, the
   body sent at once). ``time.process_time()`` counts every thread, the server's too; sending a
   pre-encoded body keeps the server's share small and the same on both sides.
b. Time to first token and total time added by hold-back and stream-first over raw, at
   moderation latencies (``FakeModerator``) and generation paces, paired per repeat.
c. Characters leaked in stream-first mode (a trigger word mid-stream, cut-off).
d. Moderation calls per 1,000 generated tokens, by window size.
e. Batching: HTTP requests per window through one shared ``OpenAIModerator`` at 1/10/100
   concurrent streams against the loopback ``/v1/moderations``.
f. A per-window timeline of one hold-back stream: generated, submitted, verdict, settled, released.

Results: ``results.json``, PNG charts (matplotlib, imported lazily with the Agg backend) and
``summary.md``. Medians with p95 over repeats; the p95 of a handful of repeats is their maximum.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from ..guard import guard
from ..moderation import KeywordModerator, OpenAIModerator, Verdict
from ..policy import Mode, Policy
from ..report import GuardReport, VerdictEvent
from ..testing import FakeModerator
from ..usage import count_tokens

__all__ = ["Config", "run_suite"]

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Benchmark me."}]
TRIGGER = "attack"  # the word FakeModerator flags in the leak runs
# The loopback Moderation endpoint's latency in the batching runs (a fast real endpoint).
ENDPOINT_LATENCY = 0.025
_VOCAB = (
    "the a of and to in is that it for on with as was at by from this be or an are not have which one all "
    "river light stone window garden morning letter quiet harbour ledger wind north paper bridge market "
    "careful bright slowly under before after across through small old green long early late open "
    "walked wrote carried opened watched kept turned answered painted gathered counted folded"
).split()


@dataclass(frozen=True)
class Config:
    """How much to measure."""

    repeats: int  # latency runs per configuration
    words: int  # words per stream in the latency runs
    cpu_chunks: int
    cpu_repeats: int
    leak_repeats: int
    calls_words: int
    batch_words: int
    timeline_words: int
    latencies: tuple[float, ...] = (0.0, 0.025, 0.1)
    word_delays: tuple[float, ...] = (0.005, 0.01, 0.02)
    window_sizes: tuple[int, ...] = (60, 120, 240, 480)
    concurrency: tuple[int, ...] = (1, 10, 100)


FULL = Config(
    repeats=15,
    words=120,
    cpu_chunks=3000,
    cpu_repeats=9,
    leak_repeats=5,
    calls_words=3000,
    batch_words=80,
    timeline_words=160,
)
QUICK = Config(
    repeats=5,
    words=40,
    cpu_chunks=1000,
    cpu_repeats=5,
    leak_repeats=2,
    calls_words=1000,
    batch_words=40,
    timeline_words=90,
)
SMOKE = Config(
    repeats=2,
    words=20,
    cpu_chunks=300,
    cpu_repeats=2,
    leak_repeats=1,
    calls_words=300,
    batch_words=15,
    timeline_words=50,
    latencies=(0.0, 0.025),
)


def words_of(count: int, *, seed: int = 7, trigger_at: int | None = None) -> list[str]:
    """``count`` deterministic word deltas (each with its leading space), optionally with ``TRIGGER``."""
    rng = random.Random(seed)
    words = [rng.choice(_VOCAB) for _ in range(count)]
    for i in range(11, count, 12):
        words[i] += "."
    if trigger_at is not None:
        words[trigger_at] = TRIGGER
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def stats(values: Sequence[float]) -> dict[str, float]:
    """Median, p95 (nearest rank), min, max and count."""
    ordered = sorted(values)
    if not ordered:
        return {"median": math.nan, "p95": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    rank = max(0, math.ceil(0.95 * len(ordered)) - 1)
    return {
        "median": statistics.median(ordered),
        "p95": ordered[rank],
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


# -- the upstream ------------------------------------------------------------------------------------


def _chat(body: dict[str, Any]) -> Any:
    """Loopback chat handler: the request's ``bench`` field says what to stream."""
    from ..testing.upstream import Script, sse_body, text_chunks

    spec = body.get("bench") or {}
    deltas = words_of(int(spec.get("words", 20)), seed=int(spec.get("seed", 7)), trigger_at=spec.get("trigger_at"))
    events = text_chunks(deltas, model=MODEL, id="chatcmpl-bench")
    if spec.get("at_once"):
        return Script(raw=sse_body(events))
    return Script(events, delay=float(spec.get("delay", 0.0)), first_delay=float(spec.get("first_delay", 0.0)))


class _Bench:
    def __init__(self, client: Any, moderation_client: Any, upstream: Any, tick: Callable[[str], None]) -> None:
        self.client = client
        self.moderation_client = moderation_client
        self.upstream = upstream
        self.tick = tick

    async def open(self, **spec: Any) -> Any:
        return await self.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, extra_body={"bench": spec}
        )

    # (a)
    async def cpu_once(self, guarded: bool, chunks: int) -> tuple[float, int]:
        moderator = KeywordModerator(["zzzz"])
        started = time.process_time()
        stream = await self.open(words=chunks - 2, at_once=True)
        seen = 0
        if guarded:
            async with guard(stream, moderator=moderator, policy=Policy(), model=MODEL) as g:
                async for _ in g:
                    seen += 1
        else:
            async with stream:
                async for _ in stream:
                    seen += 1
        return time.process_time() - started, seen

    # (b), (c)
    async def timed(
        self, *, words: int, delay: float, mode: Mode | None, latency: float, trigger_at: int | None = None
    ) -> tuple[float | None, float, GuardReport | None]:
        """One stream: (time to first token, total time, report); ``mode=None`` is raw."""
        started = time.perf_counter()
        ttft: float | None = None
        stream = await self.open(words=words, delay=delay, trigger_at=trigger_at)
        report = None
        if mode is None:
            async with stream:
                async for chunk in stream:
                    if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                        ttft = time.perf_counter() - started
        else:
            moderator = FakeModerator([TRIGGER], latency=latency)
            async with guard(stream, moderator=moderator, policy=Policy(mode=mode), model=MODEL) as g:
                async for chunk in g:
                    if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                        ttft = time.perf_counter() - started
            report = g.report
        return ttft, time.perf_counter() - started, report

    # (e)
    async def batching(self, streams: int, words: int) -> dict[str, Any]:
        moderator = OpenAIModerator(self.moderation_client)
        before = self.upstream.count("/v1/moderations")
        reports: list[GuardReport] = []
        rng = random.Random(streams)

        async def one(i: int) -> None:
            # Streams start within 100 ms of each other, as requests of a busy server would.
            stream = await self.open(words=words, delay=0.005, first_delay=rng.uniform(0, 0.1), seed=i)
            async with guard(stream, moderator=moderator, policy=Policy(), model=MODEL) as g:
                async for _ in g:
                    pass
            reports.append(g.report)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(streams):
                tg.start_soon(one, i)
        elapsed = time.perf_counter() - started
        windows = sum(r.moderation_calls for r in reports)
        requests = moderator.stats.requests
        counted = self.upstream.count("/v1/moderations") - before
        return {
            "streams": streams,
            "windows": windows,
            "http_requests": requests,
            "http_requests_seen_by_server": counted,
            "requests_per_window": requests / windows if windows else math.nan,
            "windows_per_request": windows / requests if requests else math.nan,
            "seconds": elapsed,
        }

    # (f)
    async def timeline(self, words: int) -> list[dict[str, Any]]:
        calls: dict[str, list[tuple[float, float]]] = {}
        settled: list[tuple[VerdictEvent, float]] = []
        arrived: list[tuple[float, int]] = []
        released: list[tuple[float, int]] = []
        inner = FakeModerator(latency=0.1)

        class Timed:
            async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
                t0 = time.perf_counter()
                out = await inner.moderate(texts)
                calls.setdefault(texts[0], []).append((t0, time.perf_counter()))
                return out

        started = time.perf_counter()
        stream = await self.open(words=words, delay=0.02)

        async def source() -> AsyncIterator[Any]:
            total = 0
            try:
                async for chunk in stream:
                    if chunk.choices:
                        total += len(chunk.choices[0].delta.content or "")
                    arrived.append((time.perf_counter(), total))
                    yield chunk
            finally:
                await stream.close()

        def on_verdict(event: VerdictEvent) -> None:
            settled.append((event, time.perf_counter()))

        total = 0
        async with guard(source(), moderator=Timed(), policy=Policy(), model=MODEL, on_verdict=on_verdict) as g:
            async for chunk in g:
                if chunk.choices:
                    total += len(chunk.choices[0].delta.content or "")
                released.append((time.perf_counter(), total))

        def first(series: list[tuple[float, int]], upto: int) -> float | None:
            return next((t - started for t, n in series if n >= upto), None)

        rows = []
        for event, at in settled:
            t0, t1 = calls.get(event.text, [(math.nan, math.nan)])[0]
            rows.append(
                {
                    "window": event.seq,
                    "start": event.start,
                    "end": event.end,
                    "generated": first(arrived, event.end),
                    "submitted": t0 - started,
                    "verdict": t1 - started,
                    "settled": at - started,
                    "released": first(released, event.end),
                }
            )
        return rows


# -- the suite ---------------------------------------------------------------------------------------


def run_suite(out: Path, *, quick: bool = False, smoke: bool = False) -> dict[str, Any]:
    """Run every benchmark, write ``results.json``, the charts and ``summary.md`` into ``out``.

    Args:
        out: Output directory (created if needed).
        quick: Fewer repeats, shorter streams.
        smoke: Fewer still (for the CLI's own test).

    Returns:
        The results, as written to ``results.json``.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    config = SMOKE if smoke else QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    count_tokens("warm up", MODEL)  # load the encoding before anything is timed
    plan = _plan(config)
    console = Console(stderr=True)
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("starting", total=plan)

        def tick(what: str) -> None:
            progress.update(task, advance=1, description=what)

        results = anyio.run(_suite, config, tick, backend="asyncio")
    results["meta"]["config"] = "smoke" if smoke else "quick" if quick else "full"
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    results["charts"] = _charts(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    summary = _summary(results)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    Console().print(f"wrote {out / 'results.json'}, {out / 'summary.md'} and {len(results['charts'])} charts")
    return results


def _plan(config: Config) -> int:
    latency_runs = config.repeats * len(config.word_delays) * (1 + 2 * len(config.latencies))
    leak_runs = config.leak_repeats * len(config.word_delays) * len(config.latencies)
    return (
        2 * config.cpu_repeats
        + latency_runs
        + leak_runs
        + len(config.window_sizes)
        + len(config.concurrency)
        + 1  # timeline
    )


async def _suite(config: Config, tick: Callable[[str], None]) -> dict[str, Any]:
    from openai import AsyncOpenAI

    from ..testing.upstream import LoopbackUpstream, keyword_moderation

    plain = keyword_moderation(())
    started = time.perf_counter()
    upstream = LoopbackUpstream(chat=_chat, moderation=lambda body: replace(plain(body), delay=ENDPOINT_LATENCY))
    with upstream:
        async with (
            AsyncOpenAI(api_key="bench", base_url=upstream.base_url, max_retries=0, timeout=60) as client,
            AsyncOpenAI(api_key="bench", base_url=upstream.base_url, max_retries=0, timeout=60) as moderation_client,
        ):
            bench = _Bench(client, moderation_client, upstream, tick)
            # Open a connection and build the client's chunk parsing first: no timed run pays for it.
            await bench.timed(words=3, delay=0, mode=None, latency=0)
            await bench.timed(words=3, delay=0, mode="holdback", latency=0)
            results: dict[str, Any] = {
                "meta": _meta(config),
                "cpu": await _cpu(bench, config),
                "latency": await _latency(bench, config),
                "leak": await _leak(bench, config),
                "calls_per_1k_tokens": await _calls(bench, config),
                "batching": [],
            }
            for streams in config.concurrency:
                results["batching"].append(await bench.batching(streams, config.batch_words))
                tick(f"batching: {streams} concurrent streams")
            results["timeline"] = await bench.timeline(config.timeline_words)
            tick("timeline")
    results["meta"]["seconds"] = round(time.perf_counter() - started, 2)
    return results


def _meta(config: Config) -> dict[str, Any]:
    import openai

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "openai": openai.__version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": asdict(config),
        "endpoint_latency_ms": ENDPOINT_LATENCY * 1000,
    }


async def _cpu(bench: _Bench, config: Config) -> dict[str, Any]:
    raw: list[float] = []
    guarded: list[float] = []
    ratios: list[float] = []
    chunks = 0
    for _ in range(config.cpu_repeats):
        r, chunks = await bench.cpu_once(False, config.cpu_chunks)
        bench.tick("cpu: raw")
        g, _n = await bench.cpu_once(True, config.cpu_chunks)
        bench.tick("cpu: guarded")
        raw.append(r / chunks * 1e6)
        guarded.append(g / chunks * 1e6)
        ratios.append(g / r if r else math.nan)
    return {
        "chunks": chunks,
        "raw_us_per_chunk": stats(raw),
        "guarded_us_per_chunk": stats(guarded),
        "added_us_per_chunk": stats([g - r for g, r in zip(guarded, raw, strict=True)]),
        "ratio": stats(ratios),
    }


async def _latency(bench: _Bench, config: Config) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    modes: tuple[Mode, ...] = ("holdback", "stream_first")
    for delay in config.word_delays:
        raw_ttft: list[float] = []
        raw_total: list[float] = []
        runs: dict[tuple[Mode, float], list[tuple[float, float, GuardReport]]] = {}
        for _ in range(config.repeats):
            ttft, total, _r = await bench.timed(words=config.words, delay=delay, mode=None, latency=0)
            raw_ttft.append(ttft or math.nan)
            raw_total.append(total)
            bench.tick(f"latency: raw, a word every {delay * 1000:g} ms")
            for latency in config.latencies:
                for mode in modes:
                    ttft, total, report = await bench.timed(words=config.words, delay=delay, mode=mode, latency=latency)
                    assert report is not None
                    runs.setdefault((mode, latency), []).append((ttft or math.nan, total, report))
                    bench.tick(f"latency: {mode}, moderation {latency * 1000:g} ms, word {delay * 1000:g} ms")
        rows.append(
            {
                "mode": "raw",
                "word_delay_ms": delay * 1000,
                "moderation_latency_ms": None,
                "ttft_ms": stats([t * 1000 for t in raw_ttft]),
                "total_ms": stats([t * 1000 for t in raw_total]),
            }
        )
        for (mode, latency), got in runs.items():
            report = got[0][2]
            tokens = report.usage.completion_tokens if report.usage else 0
            rows.append(
                {
                    "mode": mode,
                    "word_delay_ms": delay * 1000,
                    "moderation_latency_ms": latency * 1000,
                    "ttft_ms": stats([t * 1000 for t, _, _ in got]),
                    "total_ms": stats([t * 1000 for _, t, _ in got]),
                    # Paired with the raw run of the same repeat.
                    "added_ttft_ms": stats([(t - r) * 1000 for (t, _, _), r in zip(got, raw_ttft, strict=True)]),
                    "added_total_ms": stats([(t - r) * 1000 for (_, t, _), r in zip(got, raw_total, strict=True)]),
                    # Added TTFT in moderation round trips (the floor for hold-back is 1).
                    "added_ttft_per_round_trip": (
                        stats([(t - r) / latency for (t, _, _), r in zip(got, raw_ttft, strict=True)])
                        if latency
                        else None
                    ),
                    "moderation_calls": report.moderation_calls,
                    "calls_per_1k_tokens": 1000 * report.moderation_calls / tokens if tokens else math.nan,
                }
            )
    return rows


async def _leak(bench: _Bench, config: Config) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    # The flagged window must not be the last one: text keeps coming while it is moderated.
    words, trigger = 200, 30
    for delay in config.word_delays:
        for latency in config.latencies:
            leaked: list[float] = []
            window: list[float] = []
            for _ in range(config.leak_repeats):
                _t, _total, report = await bench.timed(
                    words=words, delay=delay, mode="stream_first", latency=latency, trigger_at=trigger
                )
                assert report is not None and report.flags, "the trigger word must be flagged"
                leaked.append(report.leaked_chars)
                window.append(report.flags[0].end - report.flags[0].start)
                bench.tick(f"leak: moderation {latency * 1000:g} ms, word {delay * 1000:g} ms")
            chars_per_word = len("".join(words_of(words))) / words
            row: dict[str, Any] = {
                "word_delay_ms": delay * 1000,
                "moderation_latency_ms": latency * 1000,
                "leaked_chars": stats(leaked),
                "flagged_window_chars": stats(window),
                # Invariant 3: the window + what is generated during one moderation call, plus two
                # words: the one whose leading space closes the window, and the chunk in hand.
                "bound_chars": round(max(window) + (math.ceil(latency / delay) + 2) * chars_per_word),
            }
            row["within_bound"] = max(leaked) <= row["bound_chars"]
            rows.append(row)
    return rows


async def _calls(bench: _Bench, config: Config) -> list[dict[str, Any]]:
    rows = []
    text = "".join(words_of(config.calls_words))
    tokens = count_tokens(text, MODEL)
    for size in config.window_sizes:
        stream = await bench.open(words=config.calls_words, at_once=True)
        policy = Policy(window_chars=size, first_window_chars=min(16, size))
        async with guard(stream, moderator=KeywordModerator(["zzzz"]), policy=policy, model=MODEL) as g:
            async for _ in g:
                pass
        report = g.report
        rows.append(
            {
                "window_chars": size,
                "overlap_chars": policy.overlap_chars,
                "tokens": tokens,
                "moderation_calls": report.moderation_calls,
                "calls_per_1k_tokens": 1000 * report.moderation_calls / tokens,
                "moderated_chars_per_generated_char": report.moderated_chars / max(1, report.generated_chars),
            }
        )
        bench.tick(f"calls: window {size}")
    return rows


# -- output ------------------------------------------------------------------------------------------


def _charts(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []

    # Added time to first token vs moderation latency.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in results["latency"] if r["mode"] != "raw"]
    for mode, style in (("holdback", "-o"), ("stream_first", "--s")):
        for delay in sorted({r["word_delay_ms"] for r in rows}):
            series = sorted(
                (r for r in rows if r["mode"] == mode and r["word_delay_ms"] == delay),
                key=lambda r: r["moderation_latency_ms"],
            )
            xs = [r["moderation_latency_ms"] for r in series]
            med = [r["added_ttft_ms"]["median"] for r in series]
            up = [max(0.0, r["added_ttft_ms"]["p95"] - r["added_ttft_ms"]["median"]) for r in series]
            ax.errorbar(
                xs, med, yerr=[[0] * len(up), up], fmt=style, capsize=3, label=f"{mode}, a word every {delay:g} ms"
            )
    lat = sorted({r["moderation_latency_ms"] for r in rows})
    ax.plot(lat, lat, ":", color="grey", label="one moderation round trip")
    ax.set_xlabel("moderation latency (ms)")
    ax.set_ylabel("added time to first token (ms, median; bar to p95)")
    ax.set_title("Time to first token added by the guard")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ttft_vs_moderation_latency.png", dpi=120)
    plt.close(fig)
    names.append("ttft_vs_moderation_latency.png")

    # One stream's windows over time.
    timeline = results["timeline"]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(timeline) + 2.6))
    for row in timeline:
        y = row["window"]
        ms = {k: None if row[k] is None else row[k] * 1000 for k in ("generated", "submitted", "verdict", "settled")}
        released = None if row["released"] is None else row["released"] * 1000
        if ms["submitted"] is not None and ms["verdict"] is not None:
            ax.plot([ms["submitted"], ms["verdict"]], [y, y], color="tab:orange", linewidth=6, solid_capstyle="butt")
        if ms["generated"] is not None and released is not None:
            ax.plot([ms["generated"], released], [y, y], color="tab:blue", linewidth=1)
        for key, marker, color in (("generated", "o", "tab:blue"), ("settled", "|", "black")):
            at = ms[key]
            if at is not None:
                ax.plot(at, y, marker, color=color, markersize=6)
        if released is not None:
            ax.plot(released, y, ">", color="tab:green", markersize=7)
    ax.plot([], [], "o", color="tab:blue", markersize=6, label="window's text generated")
    ax.plot([], [], color="tab:orange", linewidth=6, label="moderation call (submitted to verdict)")
    ax.plot([], [], "|", color="black", markersize=9, label="settled (in order)")
    ax.plot([], [], ">", color="tab:green", label="released to the consumer")
    ax.set_yticks([r["window"] for r in timeline])
    ax.set_yticklabels([f"#{r['window']} ({r['end'] - r['start']} ch)" for r in timeline])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the request")
    ax.set_title("Hold-back, one stream: 100 ms moderation, a word every 20 ms")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(out / "window_timeline.png", dpi=120)
    plt.close(fig)
    names.append("window_timeline.png")

    # Batching.
    fig, ax = plt.subplots(figsize=(6, 4))
    batching = results["batching"]
    ax.bar([str(r["streams"]) for r in batching], [r["requests_per_window"] for r in batching], color="tab:purple")
    ax.set_xlabel("concurrent streams sharing one OpenAIModerator")
    ax.set_ylabel("HTTP requests per window")
    ax.set_title("Cross-stream batching of moderation calls")
    ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(out / "batching.png", dpi=120)
    plt.close(fig)
    names.append("batching.png")
    return names


def _f(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _mp(stat: dict[str, float] | None) -> str:
    """``median [p95]``."""
    return "-" if stat is None else f"{_f(stat['median'])} [{_f(stat['p95'])}]"


def _mp2(stat: dict[str, float] | None) -> str:
    """``median [p95]`` with two decimals."""
    return "-" if stat is None else f"{_f(stat['median'], 2)} [{_f(stat['p95'], 2)}]"


def _summary(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# streamguard benchmark",
        "",
        f"{meta['config']} run, {meta['started']}, Python {meta['python']}, openai {meta['openai']}, "
        f"{meta['cpus']} CPUs, {meta['platform']}; {meta['seconds']} s. Loopback upstream (uvicorn, real SSE) "
        "through the real `openai` client. Medians, p95 in brackets.",
        "",
        "## CPU per chunk (KeywordModerator, body sent at once)",
        "",
        "| chunks | raw µs/chunk | guarded µs/chunk | added µs/chunk | guarded / raw |",
        "| --- | --- | --- | --- | --- |",
    ]
    cpu = results["cpu"]
    lines.append(
        f"| {cpu['chunks']} | {_f(cpu['raw_us_per_chunk']['median'])} [{_f(cpu['raw_us_per_chunk']['p95'])}] "
        f"| {_f(cpu['guarded_us_per_chunk']['median'])} [{_f(cpu['guarded_us_per_chunk']['p95'])}] "
        f"| {_f(cpu['added_us_per_chunk']['median'])} [{_f(cpu['added_us_per_chunk']['p95'])}] "
        f"| {_f(cpu['ratio']['median'], 2)} [{_f(cpu['ratio']['p95'], 2)}] |"
    )
    lines += [
        "",
        "## Time to first token and total time (FakeModerator latency; added = guarded - raw, paired per repeat)",
        "",
        "| word every | mode | moderation | TTFT ms | added TTFT ms | added TTFT / round trip "
        "| total ms | added total ms | calls/1k tok |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["latency"]:
        lat = "-" if r["moderation_latency_ms"] is None else f"{r['moderation_latency_ms']:g} ms"
        lines.append(
            f"| {r['word_delay_ms']:g} ms | {r['mode']} | {lat} | {_mp(r['ttft_ms'])} | {_mp(r.get('added_ttft_ms'))} "
            f"| {_mp2(r.get('added_ttft_per_round_trip'))} "
            f"| {_mp(r['total_ms'])} | {_mp(r.get('added_total_ms'))} | {_f(r.get('calls_per_1k_tokens'), 1)} |"
        )
    lines += [
        "",
        "## Leaked characters, stream-first + cut-off (trigger word mid-stream)",
        "",
        "Bound: the flagged window + the words generated during one moderation call + 2 words (the word whose "
        "leading space closes the window, and the chunk in hand).",
        "",
        "| word every | moderation | leaked chars median [max] | flagged window chars | bound | within |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["leak"]:
        lines.append(
            f"| {r['word_delay_ms']:g} ms | {r['moderation_latency_ms']:g} ms "
            f"| {_f(r['leaked_chars']['median'])} [{_f(r['leaked_chars']['max'])}] "
            f"| {_f(r['flagged_window_chars']['median'])} | {r['bound_chars']} "
            f"| {'yes' if r['within_bound'] else 'NO'} |"
        )
    lines += [
        "",
        "## Moderation calls per 1,000 generated tokens (zero delay, overlap 64)",
        "",
        "| window chars | tokens | calls | calls / 1k tokens | moderated chars / generated char |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results["calls_per_1k_tokens"]:
        lines.append(
            f"| {r['window_chars']} | {r['tokens']} | {r['moderation_calls']} | {_f(r['calls_per_1k_tokens'], 1)} "
            f"| {_f(r['moderated_chars_per_generated_char'], 2)} |"
        )
    lines += [
        "",
        f"## Batching: one OpenAIModerator, loopback /v1/moderations ({meta['endpoint_latency_ms']:g} ms per request)",
        "",
        "| streams | windows | HTTP requests | requests / window | windows / request | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["batching"]:
        lines.append(
            f"| {r['streams']} | {r['windows']} | {r['http_requests']} | {_f(r['requests_per_window'], 3)} "
            f"| {_f(r['windows_per_request'], 1)} | {_f(r['seconds'], 2)} |"
        )
    lines += ["", "## Charts", ""]
    lines += [f"- ![{name}]({name})" for name in results.get("charts", [])]
    return "\n".join(lines) + "\n"
