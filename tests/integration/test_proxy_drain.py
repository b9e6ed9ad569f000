"""``streamguard serve --workers 2`` as a real process: metrics summed over workers, the budget in Redis, serving on
with Redis stopped, and a graceful drain on SIGTERM during 50 streams (each ends whole or with the shutdown ending,
never mid-chunk)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamguard.testing.upstream import LoopbackUpstream, Script, keyword_moderation, text_chunks
from tests.integration._redis import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.anyio


def answer_words(prompt: str) -> list[str]:
    """The deltas the upstream streams for a prompt ``"story N"``: 10 to 90 words, one every 50 ms."""
    n = int(prompt.split()[-1])
    return [("" if i == 0 else " ") + f"w{n}x{i}" for i in range(10 + 20 * (n % 5))]


def chat(body: dict[str, Any]) -> Script:
    prompt = str(body["messages"][-1]["content"])
    return Script(text_chunks(answer_words(prompt)), delay=0.05)


def start_serve(upstream: str, redis_url: str, port: int, tmp: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "streamguard", "serve", f"--upstream={upstream}", f"--port={port}"]
    argv += ["--workers=2", "--moderator=openai", "--upstream-key-env=SG_DRAIN_KEY", f"--redis-url={redis_url}"]
    argv += ["--drain-timeout=2", "--no-access-log", "--log-level=warning"]
    # TMPDIR: the multiprocess metrics directory is made (and must be removed) there.
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env |= {"SG_DRAIN_KEY": "sk-drain", "TMPDIR": str(tmp)}
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx2.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(process.communicate(timeout=10)[0].decode())
        time.sleep(0.1)


async def until_unready(http: httpx2.AsyncClient) -> None:
    """Poll ``/readyz`` (new connections) until it answers 503; at most ~1.5 s."""
    for _ in range(30):
        if (await http.get("/readyz")).status_code == 503:
            return
        await anyio.sleep(0.05)
    raise AssertionError("/readyz stayed ready after SIGTERM")


def leftovers(directory: Path) -> list[Path]:
    return list(directory.glob("streamguard-metrics-*"))


class Started:
    """Counts streams whose first bytes arrived; ``all`` is set at ``expected``."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.all = anyio.Event()

    def append(self, n: int) -> None:
        self.count += 1
        if self.count >= self.expected:
            self.all.set()


async def stream(http: httpx2.AsyncClient, n: int, started: Started) -> tuple[str, list[bytes]]:
    """One streamed answer as raw SSE events: ("whole" | "shutdown", the events)."""
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": f"story {n}"}]}
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        raw = b""
        async for part in r.aiter_bytes():
            if not raw:
                started.append(n)
            raw += part
    assert raw.endswith(b"\n\n"), raw[-200:]  # the body ends at an event boundary, never mid-chunk
    events = [e for e in raw.split(b"\n\n") if e and not e.startswith(b":")]
    assert all(e.startswith(b"data: ") for e in events), events
    payloads = [e[6:] for e in events]
    expected = "".join(answer_words(f"story {n}"))
    text = "".join(
        c["delta"].get("content") or ""
        for p in payloads
        if p != b"[DONE]" and "choices" in (d := json.loads(p))
        for c in d["choices"]
    )
    if payloads[-1] == b"[DONE]":
        assert text == expected
        return "whole", events
    last = json.loads(payloads[-1])
    assert last["error"]["code"] == "server_shutting_down", last
    assert expected.startswith(text) and text != expected
    return "shutdown", events


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    # A new connection each time, so the scrapes land on either worker.
    r = httpx2.get(f"http://127.0.0.1:{port}/metrics", headers={"connection": "close"}, timeout=5)
    assert r.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


async def test_workers_share_metrics_and_budget_then_drain_on_sigterm(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    with LoopbackUpstream(chat=chat, moderation=keyword_moderation(["never-said"])) as upstream:
        process = start_serve(upstream.base_url, redis_server.url, port, tmp_path)
        try:
            base = f"http://127.0.0.1:{port}"
            limits = httpx2.Limits(max_connections=100, max_keepalive_connections=0)
            # 1. Ten short streams over fresh connections (so both workers serve some).
            async with httpx2.AsyncClient(base_url=base, timeout=30, limits=limits) as http:
                with anyio.fail_after(60):
                    async with anyio.create_task_group() as tg:
                        for n in range(0, 50, 5):  # n % 5 == 0: 10 words
                            tg.start_soon(stream, http, n, Started(10**6))
            scrapes = [await anyio.to_thread.run_sync(scrape, port) for _ in range(6)]
            for samples in scrapes:  # every worker reports the sum over both
                assert total(samples, "streamguard_streams_total", outcome="completed") == 10
                windows = total(samples, "streamguard_windows_per_request_count", route="chat.completions")
                assert windows == 10
                assert total(samples, "streamguard_moderation_latency_seconds_count", moderator="openai") > 0
                assert ("streamguard_redis_fallbacks_total", frozenset({("moderator", "openai")})) in samples
            import redis

            with redis.Redis.from_url(redis_server.url) as r:
                assert r.keys("streamguard:moderation-budget:*")  # the budget lives in Redis
            # 2. Redis stopped: the proxies keep serving, pacing locally (counted, and logged).
            await anyio.to_thread.run_sync(redis_server.stop)
            async with httpx2.AsyncClient(base_url=base, timeout=30, limits=limits) as http:
                with anyio.fail_after(60):
                    kinds = [(await stream(http, n, Started(10**6)))[0] for n in range(100, 120, 5)]
            assert kinds == ["whole"] * 4
            fallbacks = [await anyio.to_thread.run_sync(scrape, port) for _ in range(2)]
            assert all(total(s, "streamguard_redis_fallbacks_total") >= 4 for s in fallbacks), fallbacks
            # 3. Fifty streams of 0.5 to 4.5 s; SIGTERM once all have started; drain timeout 2 s.
            started = Started(50)
            results: list[str] = []
            async with httpx2.AsyncClient(base_url=base, timeout=30, limits=limits) as http:

                async def one(n: int) -> None:
                    results.append((await stream(http, n, started))[0])

                with anyio.fail_after(60):
                    async with anyio.create_task_group() as tg:
                        for n in range(50):
                            tg.start_soon(one, n)
                        await started.all.wait()
                        signalled = time.monotonic()
                        process.send_signal(signal.SIGTERM)
                        # Unready as soon as the workers have the signal (uvicorn's process manager passes it
                        # on within its 0.5 s tick), still live; new work refused with OpenAI's error shape.
                        await until_unready(http)
                        unready = time.monotonic() - signalled
                        await anyio.sleep(0.1)  # the other worker too (signalled in the same loop)
                        assert (await http.get("/healthz")).status_code == 200
                        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "story 1"}]}
                        refused = await http.post("/v1/chat/completions", json=body)
                        assert refused.status_code == 503
                        assert refused.json()["error"]["code"] == "server_shutting_down"
            ended = time.monotonic() - signalled
            output = await anyio.to_thread.run_sync(lambda: process.communicate(timeout=30)[0].decode())
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    assert len(results) == 50, output
    assert results.count("whole") > 0 and results.count("shutdown") > 0, results
    assert unready < 1.0, unready
    assert ended < 2 + 3, ended  # the drain timeout, plus writing the endings
    assert not leftovers(tmp_path), "the metrics directory was left behind"
    assert "Traceback" not in output, output
    assert "pacing locally" in output, output  # the warning of the Redis outage
