"""StreamGuardrail against LiteLLM's built-in ``openai_moderation`` guardrail, in one LiteLLM proxy, side by side.

One loopback upstream (real HTTP, real SSE) streams ``--words`` words, one every ``--delay``
seconds, and serves a Moderation endpoint that answers after ``--moderation-latency`` seconds
(``keyword_moderation``: it flags the word ``forbidden``). One real LiteLLM proxy
(``litellm --config``) sits in front of it with four guardrails chosen per request: none, the
built-in ``openai_moderation`` (default: every 5th chunk checked), the built-in in end-of-stream
mode, and ``StreamGuardrail`` (hold-back, cut-off, the ``openai`` moderator on the same endpoint).
The real ``openai`` client reads each stream. Each repeat runs every guardrail on a clean answer
and on an answer with the flagged word in the middle, in turn.

Measured per guardrail (medians [p95] over repeats):

- TTFT added: time to the first text, minus the unguarded stream's in the same repeat (clean).
- moderation requests and moderated characters per generated character (clean: everything generated).
- leak: characters of flagged text shown before the block (from the flagged word's first character).
- block latency: from the upstream sending the flagged word to the client seeing the block.
- upstream words after the flag: words the upstream generated after the flagged one.
- proxy CPU per chunk: the proxy process's CPU time during the clean stream / chunks upstream sent.

Usage::

    python benchmarks/litellm_guardrail.py [--words 500] [--delay 0.02] [--moderation-latency 0.1]
        [--repeats 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import openai
import uvicorn
from openai import AsyncOpenAI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root for tests.*

from streamguard.testing.upstream import keyword_moderation
from tests.integration._litellm_proxy import LiteLLMProxy, run_litellm

FLAG = "forbidden"
GUARDRAILS = ("none", "streamguard", "builtin", "builtin_end_of_stream")
LABELS = {
    "none": "no guardrail",
    "streamguard": "StreamGuardrail (hold-back, cut-off)",
    "builtin": "openai_moderation (every 5th chunk)",
    "builtin_end_of_stream": "openai_moderation (end of stream)",
}
CONFIG = """
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {base}
      api_key: upstream-key
guardrails:
  - guardrail_name: streamguard
    litellm_params:
      guardrail: streamguard.integrations.litellm.StreamGuardrail
      mode: post_call
      streamguard_moderator: openai
      streamguard_moderation_base_url: {base}
      streamguard_moderation_api_key: upstream-key
  - guardrail_name: builtin
    litellm_params:
      guardrail: openai_moderation
      mode: post_call
      api_base: {base}
      api_key: upstream-key
  - guardrail_name: builtin_end_of_stream
    litellm_params:
      guardrail: openai_moderation
      mode: post_call
      api_base: {base}
      api_key: upstream-key
      streaming_end_of_stream_only: true
litellm_settings:
  telemetry: false
"""


@dataclass
class Run:
    """What the upstream saw of one stream."""

    words: list[str]
    flag_index: int | None
    sent: int = 0
    flag_sent_at: float | None = None
    ended_at: float | None = None
    completed: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class Upstream:
    """Chat streams and a slow keyword Moderation endpoint on 127.0.0.1, counting what they do."""

    def __init__(self, delay: float, moderation_latency: float) -> None:
        self.delay = delay
        self.moderation_latency = moderation_latency
        self.runs: dict[str, Run] = {}
        self.moderation_requests = 0
        self.moderated_chars = 0
        self._judge = keyword_moderation([FLAG])
        self._lock = threading.Lock()

    def app(self) -> Starlette:
        async def chat(request: Request) -> Response:
            body = await request.json()
            run = self.runs[str(body["messages"][-1]["content"])]
            return StreamingResponse(self._stream(run), media_type="text/event-stream")

        async def moderations(request: Request) -> Response:
            body = await request.json()
            inputs = body.get("input", [])
            texts = [inputs] if isinstance(inputs, str) else [str(t) for t in inputs]
            with self._lock:
                self.moderation_requests += 1
                self.moderated_chars += sum(len(t) for t in texts)
            await anyio.sleep(self.moderation_latency)
            return JSONResponse(self._judge(body).body)

        return Starlette(
            routes=[
                Route("/v1/chat/completions", chat, methods=["POST"]),
                Route("/v1/moderations", moderations, methods=["POST"]),
            ]
        )

    async def _stream(self, run: Run) -> AsyncIterator[bytes]:
        head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
        try:
            for i, word in enumerate(run.words):
                if i:
                    await anyio.sleep(self.delay)
                delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
                choice = {"index": 0, "delta": delta, "finish_reason": None}
                yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n".encode()
                run.sent += 1
                if i == run.flag_index:
                    run.flag_sent_at = time.perf_counter()
            end = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode()
            run.completed = True
        finally:
            run.ended_at = time.perf_counter()
            run.done.set()


@contextmanager
def serve(app: Starlette) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("upstream did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    ttft: float | None
    text: str
    blocked_at: float | None
    ended_by: str
    cpu: float
    run: Run
    moderation_requests: int
    moderated_chars: int


async def one(
    client: AsyncOpenAI, upstream: Upstream, proxy: LiteLLMProxy, guardrail: str, key: str, run: Run
) -> Result:
    """Stream one answer through the proxy with one guardrail."""
    upstream.runs[key] = run
    requests, chars = upstream.moderation_requests, upstream.moderated_chars
    cpu = cpu_seconds(proxy.pid)
    start = time.perf_counter()
    ttft: float | None = None
    blocked_at: float | None = None
    text = ""
    ended_by = "stop"
    extra = {"guardrails": [] if guardrail == "none" else [guardrail]}
    with anyio.fail_after(120):
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": key}], stream=True, extra_body=extra
        )
        try:
            async with stream:
                async for chunk in stream:
                    for choice in chunk.choices:
                        if choice.delta.content:
                            ttft = ttft if ttft is not None else time.perf_counter() - start
                            text += choice.delta.content
                        if choice.finish_reason == "content_filter":
                            blocked_at, ended_by = time.perf_counter(), "content_filter"
        except openai.APIError as exc:
            blocked_at, ended_by = time.perf_counter(), f"error ({type(exc).__name__})"
        await anyio.to_thread.run_sync(run.done.wait, 30)
    await anyio.sleep(0.2)  # let late moderation calls land before counting them
    return Result(
        ttft=ttft,
        text=text,
        blocked_at=blocked_at,
        ended_by=ended_by,
        cpu=cpu_seconds(proxy.pid) - cpu,
        run=run,
        moderation_requests=upstream.moderation_requests - requests,
        moderated_chars=upstream.moderated_chars - chars,
    )


def answer(words: int, flagged: bool) -> tuple[list[str], int | None]:
    out = [("A" if i == 0 else " ") + f"word{i}" for i in range(words)]
    if not flagged:
        return out, None
    middle = words // 2
    out[middle] = f" {FLAG}"
    return out, middle


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: Sequence[float | None]) -> dict[str, float] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"median": statistics.median(present), "p95": pct(present, 0.95)}


async def bench(args: argparse.Namespace, upstream: Upstream, proxy: LiteLLMProxy) -> dict[str, Any]:
    rows: dict[str, dict[str, list[Any]]] = {g: {} for g in GUARDRAILS}
    async with AsyncOpenAI(api_key=proxy.key, base_url=proxy.base_url, max_retries=0, timeout=120) as client:
        for guardrail in GUARDRAILS:  # warm up: the proxy's first requests build caches and clients
            words, _ = answer(20, flagged=False)
            await one(client, upstream, proxy, guardrail, f"{guardrail}-warm-up", Run(words, None))
        for repeat in range(args.repeats):
            clean_ttft: dict[str, float | None] = {}
            for guardrail in GUARDRAILS:
                words, _ = answer(args.words, flagged=False)
                clean = await one(client, upstream, proxy, guardrail, f"{guardrail}-clean-{repeat}", Run(words, None))
                words, flag_index = answer(args.words, flagged=True)
                flagged_text = "".join(words)
                flagged = await one(
                    client, upstream, proxy, guardrail, f"{guardrail}-flagged-{repeat}", Run(words, flag_index)
                )
                generated = len("".join(clean.run.words[: clean.run.sent]))
                flag_at = flagged_text.index(FLAG)
                shown = flagged.text if flagged_text.startswith(flagged.text) else ""
                row = rows[guardrail]
                clean_ttft[guardrail] = clean.ttft
                row.setdefault("ttft_ms", []).append(None if clean.ttft is None else clean.ttft * 1000)
                row.setdefault("clean_whole", []).append(clean.text == "".join(clean.run.words))
                row.setdefault("moderation_requests", []).append(clean.moderation_requests)
                row.setdefault("moderated_per_generated", []).append(clean.moderated_chars / max(generated, 1))
                row.setdefault("cpu_us_per_chunk", []).append(clean.cpu / max(clean.run.sent, 1) * 1e6)
                row.setdefault("leak_chars", []).append(max(0, len(shown) - flag_at))
                row.setdefault("ended_by", []).append(flagged.ended_by)
                sent_at = flagged.run.flag_sent_at
                latency = None if flagged.blocked_at is None or sent_at is None else flagged.blocked_at - sent_at
                row.setdefault("block_latency_ms", []).append(None if latency is None else latency * 1000)
                after = None if flag_index is None else max(0, flagged.run.sent - flag_index - 1)
                row.setdefault("words_after_flag", []).append(after)
                print(
                    f"repeat {repeat} {guardrail:22} ttft {clean.ttft} mod req {clean.moderation_requests} "
                    f"leak {row['leak_chars'][-1]} ended {flagged.ended_by} after-flag {after}",
                    file=sys.stderr,
                )
            base = clean_ttft["none"]
            for guardrail in GUARDRAILS:
                own = clean_ttft[guardrail]
                added = None if own is None or base is None else (own - base) * 1000
                rows[guardrail].setdefault("ttft_added_ms", []).append(added)
    return {
        "settings": {
            "words": args.words,
            "delay": args.delay,
            "moderation_latency": args.moderation_latency,
            "repeats": args.repeats,
        },
        "raw": rows,
        "summary": {g: {k: summary(v) for k, v in rows[g].items() if _numeric(v)} for g in GUARDRAILS},
        "ended_by": {g: sorted(set(rows[g]["ended_by"])) for g in GUARDRAILS},
    }


def _numeric(values: list[Any]) -> bool:
    return all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in values)


def table(result: dict[str, Any]) -> str:
    columns = [
        ("ttft_added_ms", "TTFT added ms", "{:.0f}"),
        ("leak_chars", "leak (flagged chars shown)", "{:.0f}"),
        ("moderation_requests", "moderation requests / stream", "{:.0f}"),
        ("moderated_per_generated", "moderated chars / generated char", "{:.2f}"),
        ("block_latency_ms", "block latency ms", "{:.0f}"),
        ("words_after_flag", "upstream words after the flag", "{:.0f}"),
        ("cpu_us_per_chunk", "proxy CPU µs / chunk", "{:.0f}"),
    ]
    head = "| guardrail | " + " | ".join(c[1] for c in columns) + " | flagged stream ends with |"
    lines = [head, "|" + " --- |" * (len(columns) + 2)]
    for guardrail in GUARDRAILS:
        cells = []
        for key, _, fmt in columns:
            s = result["summary"][guardrail].get(key)
            cells.append("-" if s is None else f"{fmt.format(s['median'])} [{fmt.format(s['p95'])}]")
        ends = ", ".join(result["ended_by"][guardrail])
        lines.append(f"| {LABELS[guardrail]} | " + " | ".join(cells) + f" | {ends} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--words", type=int, default=500)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--moderation-latency", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    upstream = Upstream(args.delay, args.moderation_latency)
    with serve(upstream.app()) as base, tempfile.TemporaryDirectory() as workdir:
        with run_litellm(CONFIG.format(base=base), Path(workdir)) as proxy:
            result = anyio.run(bench, args, upstream, proxy)
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
