"""Proxy cost per core: the moderating proxy against a minimal byte-forwarding relay, in separate processes.

Roles, each its own process (this file re-run with ``--role``): a loopback upstream (a small
asyncio HTTP/1.1 server: chat chunks as SSE at a fixed pace, and a ``/v1/moderations`` endpoint
that answers after a fixed delay), the system under test, and a client process running the
concurrent streams. Where the machine has enough cores they are pinned apart with
``os.sched_setaffinity``: the system under test gets cores of its own (the last ones); upstream
and clients share the rest.

Systems under test, at each concurrency level, side by side in one run:

- ``direct``: clients straight to upstream (the baseline for added latency; no middle process);
- ``relay``: a minimal pass-through relay (Starlette + httpx2, upstream bytes forwarded as they
  come), with ``--workers`` worker processes;
- ``proxy-keyword``: ``streamguard serve --moderator keyword`` (hold-back, default policy);
- ``proxy-openai``: ``streamguard serve --moderator openai`` with its own moderation key, i.e. one
  batched ``OpenAIModerator`` per worker calling the loopback moderation endpoint.

Measured per run, after warming every worker up: CPU time of the middle process and its workers
(``/proc``, during the load only) per relayed chunk; chunks per second per core (its inverse);
added time to first token and inter-chunk p99 against ``direct``; and whether every stream
arrived whole (every word, in order, then ``[DONE]``). The CPU ratio to the relay is taken per
repeat (each proxy run against the relay run just before it), then the median and range of those
ratios are reported. Writes JSON and a chart.

Usage::

    python benchmarks/proxy_load.py [--streams 50,200] [--workers 1,2] [--words 100] [--word-ms 20]
        [--moderation-ms 50] [--repeats 3] [--out proxy_load.json] [--chart proxy_load.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
_TICK = os.sysconf("SC_CLK_TCK")
_WORDS = "the river runs past the old mill and the light falls softly on the water".split()


# -- upstream: a small asyncio HTTP/1.1 server (keep-alive, chunked SSE) ----------------------------


def chunk_bytes(i: int, word: str, finish: str | None = None) -> bytes:
    delta = {"content": word} if finish is None else {}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    chunk = {
        "id": f"chatcmpl-{i}",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_bench",
        "choices": [choice],
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


async def upstream_main(port: int, words: int, word_ms: float, moderation_ms: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length) if length else b""
                if path.endswith("/moderations"):
                    inputs = json.loads(body).get("input", [])
                    count = 1 if isinstance(inputs, str) else len(inputs)
                    await asyncio.sleep(moderation_ms / 1000)
                    result = {
                        "flagged": False,
                        "categories": {"violence": False},
                        "category_scores": {"violence": 0.01},
                    }
                    data = json.dumps({"id": "modr", "model": "omni-moderation-latest", "results": [result] * count})
                    payload = data.encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        + f"content-length: {len(payload)}\r\n\r\n".encode()
                        + payload
                    )
                    await writer.drain()
                    continue
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                    b"x-request-id: req_bench\r\n\r\n"
                )
                events = [chunk_bytes(0, "", None).replace(b'"content":""', b'"role":"assistant","content":""')]
                events += [chunk_bytes(k, (" " if k else "") + _WORDS[k % len(_WORDS)]) for k in range(words)]
                events += [chunk_bytes(words, "", "stop"), b"data: [DONE]\n\n"]
                for k, event in enumerate(events):
                    if k and word_ms:
                        await asyncio.sleep(word_ms / 1000)
                    writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


# -- the relay: Starlette + httpx2, bytes forwarded -----------------------------------------------


def relay_app() -> Any:
    import httpx2
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    upstream = os.environ["BENCH_UPSTREAM"]
    http = httpx2.AsyncClient(timeout=60, limits=httpx2.Limits(max_connections=4096, max_keepalive_connections=512))

    async def chat(request: Request) -> StreamingResponse:
        body = await request.body()
        req = http.build_request(
            "POST", upstream + "/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        response = await http.send(req, stream=True)
        return StreamingResponse(
            response.aiter_raw(), media_type="text/event-stream", background=BackgroundTask(response.aclose)
        )

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


# -- clients ---------------------------------------------------------------------------------------


async def clients_main(url: str, streams: int, rounds: int, words: int) -> dict[str, Any]:
    import httpx2
    import orjson

    limits = httpx2.Limits(max_connections=streams, max_keepalive_connections=streams)
    expected = "".join((" " if k else "") + _WORDS[k % len(_WORDS)] for k in range(words))
    ttfts: list[float] = []
    gaps: list[float] = []
    whole = 0
    broken = 0
    errors: list[str] = []
    chunks = 0
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Tell me about rivers."}], "stream": True}
    ).encode()

    async def one(http: httpx2.AsyncClient) -> None:
        nonlocal whole, broken, chunks
        started = time.perf_counter()
        text: list[str] = []
        done = False
        last: float | None = None
        buffer = b""
        try:
            async with http.stream(
                "POST", url + "/chat/completions", content=body, headers={"content-type": "application/json"}
            ) as r:
                async for part in r.aiter_bytes():
                    now = time.perf_counter()
                    buffer += part
                    *events, buffer = buffer.split(b"\n\n")
                    for event in events:
                        if not event.startswith(b"data: "):
                            continue
                        data = event[6:]
                        if data == b"[DONE]":
                            done = True
                            continue
                        chunks += 1
                        for choice in orjson.loads(data).get("choices") or []:
                            content = (choice.get("delta") or {}).get("content")
                            if content:
                                if not text:
                                    ttfts.append(now - started)
                                text.append(content)
                        if last is not None:
                            gaps.append(now - last)
                        last = now
        except Exception as exc:
            broken += 1
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        if done and "".join(text) == expected:
            whole += 1
        else:
            broken += 1
            errors.append(f"incomplete: done={done} text={''.join(text)[-60:]!r}")

    async with httpx2.AsyncClient(timeout=120, limits=limits) as http:
        started = time.perf_counter()
        for _ in range(rounds):
            async with asyncio.TaskGroup() as tg:
                for _ in range(streams):
                    tg.create_task(one(http))
        wall = time.perf_counter() - started
    return {
        "streams": streams * rounds,
        "whole": whole,
        "broken": broken,
        "errors": sorted(set(errors))[:5],
        "chunks": chunks,
        "wall": wall,
        "ttft_p50": _pct(ttfts, 50),
        "ttft_p99": _pct(ttfts, 99),
        "gap_p50": _pct(gaps, 50),
        "gap_p99": _pct(gaps, 99),
    }


def _pct(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# -- orchestration ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants, from /proc."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICK
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += times.get(current, 0.0)
        todo += [child for child, parent in parents.items() if parent == current]
    return total


def spawn(args: list[str], cores: set[int] | None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    def pin() -> None:
        if cores:
            os.sched_setaffinity(0, cores)

    return subprocess.Popen(
        args, preexec_fn=pin, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def middle(system: str, workers: int, port: int, upstream: str, cores: set[int] | None) -> subprocess.Popen[bytes]:
    if system == "relay":
        args = [sys.executable, "-m", "uvicorn", "proxy_load:relay_app", "--factory", "--app-dir", str(HERE.parent)]
        args += ["--port", str(port), "--workers", str(workers), "--no-access-log", "--log-level", "warning"]
        return spawn(args, cores, {"BENCH_UPSTREAM": upstream})
    args = [sys.executable, "-m", "streamguard", "serve", "--upstream", upstream, "--port", str(port)]
    args += ["--workers", str(workers), "--no-access-log", "--log-level", "warning", "--no-playground"]
    if system == "proxy-keyword":
        args += ["--moderator", "keyword", "--keywords", "zyzzyva"]
    else:
        args += ["--moderator", "openai", "--moderation-key-env", "BENCH_MODERATION_KEY"]
    return spawn(args, cores, {"BENCH_MODERATION_KEY": "bench-moderation-key"})


def run(opts: argparse.Namespace) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    middle_cores: set[int] | None = None
    side_cores: set[int] | None = None
    if len(cpus) >= 2:
        share = max(1, len(cpus) // 2)
        middle_cores, side_cores = set(cpus[-share:]), set(cpus[:-share])
    up_port = free_port()
    upstream = spawn(
        [sys.executable, str(HERE), "--role", "upstream", "--port", str(up_port), "--words", str(opts.words)]
        + ["--word-ms", str(opts.word_ms), "--moderation-ms", str(opts.moderation_ms)],
        side_cores,
    )
    results: list[dict[str, Any]] = []
    try:
        wait_port(up_port)
        up_url = f"http://127.0.0.1:{up_port}/v1"
        for repeat in range(opts.repeats):
            for streams in opts.streams:
                results.append(one_run("direct", 0, streams, up_url, None, side_cores, opts, repeat))
                for workers in opts.workers:
                    for system in ("relay", "proxy-keyword", "proxy-openai"):
                        results.append(
                            one_run(system, workers, streams, up_url, middle_cores, side_cores, opts, repeat)
                        )
    finally:
        stop(upstream)
    return {
        "cpus": len(cpus),
        "middle_cores": sorted(middle_cores or []),
        "options": {k: v for k, v in vars(opts).items() if k not in ("role",)},
        "runs": results,
        "summary": summarise(results),
    }


def one_run(
    system: str,
    workers: int,
    streams: int,
    up_url: str,
    middle_cores: set[int] | None,
    side_cores: set[int] | None,
    opts: argparse.Namespace,
    repeat: int,
) -> dict[str, Any]:
    process = None
    url = up_url
    if system != "direct":
        port = free_port()
        process = middle(system, workers, port, up_url, middle_cores)
        wait_port(port)
        time.sleep(1.0 + 0.5 * workers)  # every worker up
        url = f"http://127.0.0.1:{port}/v1"
        # Warm every worker up (imports, tiktoken's encoding, pools): one-time costs are not per chunk.
        warm = spawn(
            [sys.executable, str(HERE), "--role", "clients", "--url", url, "--streams", str(8 * workers)]
            + ["--rounds", "1", "--words", str(opts.words)],
            side_cores,
        )
        warm.communicate(timeout=600)
    try:
        before = tree_cpu(process.pid) if process else 0.0
        client = spawn(
            [sys.executable, str(HERE), "--role", "clients", "--url", url, "--streams", str(streams)]
            + ["--rounds", str(opts.rounds), "--words", str(opts.words)],
            side_cores,
        )
        out, _ = client.communicate(timeout=600)
        after = tree_cpu(process.pid) if process else 0.0
        measured = json.loads(out)
    finally:
        if process is not None:
            stop(process)
    cpu = after - before
    chunks = measured["chunks"]
    result = {"system": system, "workers": workers, "concurrency": streams, "repeat": repeat, **measured}
    result["cpu_s"] = cpu
    result["cpu_us_per_chunk"] = cpu / chunks * 1e6 if process and chunks else None
    result["chunks_per_s"] = chunks / measured["wall"]
    result["chunks_per_cpu_s"] = chunks / cpu if process and cpu else None
    print(
        json.dumps({k: result[k] for k in ("system", "workers", "concurrency", "whole", "broken", "cpu_us_per_chunk")})
    )
    return result


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(r["system"], r["workers"], r["concurrency"]) for r in results}, key=str)
    for system, workers, concurrency in keys:
        runs = [r for r in results if (r["system"], r["workers"], r["concurrency"]) == (system, workers, concurrency)]
        direct = [r for r in results if r["system"] == "direct" and r["concurrency"] == concurrency]
        row: dict[str, Any] = {"system": system, "workers": workers, "concurrency": concurrency, "runs": len(runs)}
        row["every_stream_whole"] = all(r["broken"] == 0 for r in runs)
        for key in ("cpu_us_per_chunk", "chunks_per_cpu_s", "chunks_per_s", "ttft_p50", "gap_p99"):
            values = [r[key] for r in runs if r[key] is not None]
            row[key] = statistics.median(values) if values else None
        if direct and system != "direct":
            base_ttft = statistics.median(r["ttft_p50"] for r in direct)
            base_gap = statistics.median(r["gap_p99"] for r in direct)
            row["added_ttft_ms"] = (row["ttft_p50"] - base_ttft) * 1000 if row["ttft_p50"] is not None else None
            row["added_gap_p99_ms"] = (row["gap_p99"] - base_gap) * 1000 if row["gap_p99"] is not None else None
        relay = {
            r["repeat"]: r["cpu_us_per_chunk"]
            for r in results
            if (r["system"], r["workers"], r["concurrency"]) == ("relay", workers, concurrency)
        }
        if relay and system.startswith("proxy") and row["cpu_us_per_chunk"]:
            # Paired: each repeat's proxy against the relay measured just before it (the machine's
            # speed drifts between repeats; a pair shares it).
            ratios = sorted(
                r["cpu_us_per_chunk"] / relay[r["repeat"]]
                for r in runs
                if r["cpu_us_per_chunk"] and relay.get(r["repeat"])
            )
            row["cpu_vs_relay"] = statistics.median(ratios)
            row["cpu_vs_relay_range"] = [ratios[0], ratios[-1]]
        rows.append(row)
    return rows


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = {"relay": 0, "proxy-keyword": 1, "proxy-openai": 2}
    rows = [r for r in report["summary"] if r["system"] != "direct"]
    rows.sort(key=lambda r: (r["concurrency"], r["workers"], order[r["system"]]))
    labels = [f"{r['system']}\nw{r['workers']} c{r['concurrency']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    colours = {"relay": "#888888", "proxy-keyword": "#2a7ab0", "proxy-openai": "#d9822b"}
    ax.bar(range(len(rows)), [r["cpu_us_per_chunk"] or 0 for r in rows], color=[colours[r["system"]] for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("CPU µs per relayed chunk (median)")
    ax.set_title("Proxy vs byte-forwarding relay: CPU per chunk (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["bench", "upstream", "clients"], default="bench")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--url", default="")
    parser.add_argument("--streams", default="50,200", help="concurrency levels (comma-separated)")
    parser.add_argument("--rounds", type=int, default=2, help="streams per client slot, one after another")
    parser.add_argument("--workers", default="1,2", help="worker counts (comma-separated)")
    parser.add_argument("--words", type=int, default=100)
    parser.add_argument("--word-ms", type=float, default=20.0)
    parser.add_argument("--moderation-ms", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("proxy_load.json"))
    parser.add_argument("--chart", type=Path, default=Path("proxy_load.png"))
    opts = parser.parse_args(argv)
    if opts.role == "upstream":
        asyncio.run(upstream_main(opts.port, opts.words, opts.word_ms, opts.moderation_ms))
        return 0
    if opts.role == "clients":
        print(json.dumps(asyncio.run(clients_main(opts.url, int(opts.streams), opts.rounds, opts.words))))
        return 0
    opts.streams = [int(s) for s in opts.streams.split(",")]
    opts.workers = [int(w) for w in opts.workers.split(",")]
    report = run(opts)
    opts.out.write_text(json.dumps(report, indent=2, default=str))
    chart(report, opts.chart)
    for row in report["summary"]:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
