"""The proxy's playground page in real headless Chromium: Debian's ``chromium``, driven by Playwright.

Playwright's own browser downloads are never used (no ``playwright install``): the test launches
``/usr/bin/chromium`` (``apt-get install chromium``) with a fresh profile under ``tmp_path``.
Chromium talks to the proxy on 127.0.0.1 only; the test checks that the page requests nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from openai import AsyncOpenAI
from playwright.async_api import Page, async_playwright, expect

from streamguard import Policy
from streamguard.integrations.proxy import ProxyConfig, create_app
from streamguard.testing.upstream import LoopbackUpstream, Script, text_chunks
from tests.helpers import words
from tests.integration._servers import serve_in_thread

PROMPT = "Tell me a story about a castle."
STORY = (
    "Once upon a time a careful engineer wrote a library that watched every word. "
    "Then one day the model said that it would attack the castle at dawn, "
    "and the library stopped it before anyone could read the plan. The end came quietly."
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STEP_MS = 20_000  # Playwright's limit for one step; the whole test is bounded by fail_after


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: the playground test needs Debian's package (apt-get install chromium)")
    return path


@pytest.fixture
def start_proxy() -> Iterator[Any]:
    """Start a proxy app on loopback; returns its origin. Stopped after the test."""
    with ExitStack() as stack:

        def start(**config: Any) -> str:
            return stack.enter_context(serve_in_thread(create_app(ProxyConfig(**config))))

        yield start


@asynccontextmanager
async def browser_page(tmp_path: Path, origin: str, *, expected_errors: int = 0) -> AsyncIterator[Page]:
    """A page in headless Chromium (fresh profile); closed, with the driver, however the test ends.

    On leaving, asserts that the page made no request outside ``origin`` and logged no error but
    ``expected_errors`` failed HTTP requests (Chromium logs each as "Failed to load resource").
    """
    executable = chromium()
    requests: list[str] = []
    errors: list[str] = []
    playwright = await async_playwright().start()
    try:
        context = await playwright.chromium.launch_persistent_context(
            tmp_path / "chromium-profile",
            executable_path=executable,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 820},
            color_scheme="light",
            timeout=STEP_MS,
        )
        try:
            context.set_default_timeout(STEP_MS)
            page = context.pages[0] if context.pages else await context.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            yield page
        finally:
            # We may be cancelled (fail_after): shield, but don't wait forever.
            with anyio.move_on_after(10, shield=True):
                await context.close()
    finally:
        with anyio.move_on_after(10, shield=True):
            await playwright.stop()
    assert requests and all(url.startswith(origin + "/") for url in requests), requests
    failed = [e for e in errors if e.startswith("Failed to load resource")]
    assert len(failed) == expected_errors and len(errors) == expected_errors, errors


async def ask(page: Page, origin: str, prompt: str, *, api_key: str | None = None) -> None:
    """Open the playground, type ``prompt``, press Send, and wait until the stream has ended."""
    await page.goto(origin + "/")
    await expect(page.locator("h1")).to_have_text("streamguard playground")
    await page.locator("#prompt").fill(prompt)
    if api_key is not None:
        await page.locator("#api-key").fill(api_key)
    await page.locator("#send").click()
    await expect(page.locator("#status")).to_have_attribute("data-state", "done")


async def screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    """Save a screenshot under ``tmp_path``, and in ``$STREAMGUARD_SCREENSHOT_DIR`` if it is set."""
    path = tmp_path / name
    png = await page.screenshot(path=path, full_page=True)
    assert png.startswith(b"\x89PNG")
    if target := os.environ.get("STREAMGUARD_SCREENSHOT_DIR"):
        directory = anyio.Path(target)
        await directory.mkdir(parents=True, exist_ok=True)
        await (directory / name).write_bytes(png)
    return path


async def test_playground_shows_a_redacted_stream(upstream: LoopbackUpstream, start_proxy: Any, tmp_path: Path) -> None:
    """The page streams the answer, the flagged word replaced by a highlighted redaction, with a timeline."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY)), delay=0.01)
    policy = Policy(action="redact", redaction="[redacted]", window_chars=48, first_window_chars=16)
    origin = start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["attack"], policy=policy)
    with anyio.fail_after(60):
        async with browser_page(tmp_path, origin) as page:
            await ask(page, origin, PROMPT)
            output = page.locator("#output")
            text = await output.inner_text()
            marks = page.locator("#output mark.redacted")
            rows = page.locator("#timeline tbody tr")
            flagged = page.locator("#timeline tbody tr.flagged")
            await expect(marks).to_have_count(1)
            await expect(marks).to_have_text("[redacted]")
            await expect(marks).to_be_visible()
            assert await rows.count() >= 3
            await expect(flagged).to_have_count(1)
            await expect(flagged.locator(".verdict")).to_have_text("redact: keyword")
            await expect(page.locator("#output .badge.done")).to_have_text("finished (stop)")
            await expect(page.locator("#output .badge.cut")).to_have_count(0)
            await expect(page.locator("#policy")).to_contain_text("action redact")
            await screenshot(page, tmp_path, "playground-redact.png")
    assert "attack" not in text
    assert text.startswith("Once upon a time a careful engineer") and "The end came quietly." in text
    assert upstream.requests[-1][1]["messages"] == [{"role": "user", "content": PROMPT}]
    assert upstream.requests[-1][1]["stream"] is True


async def test_playground_marks_a_cut_off(upstream: LoopbackUpstream, start_proxy: Any, tmp_path: Path) -> None:
    """On a cut-off the page shows the clean part and a content_filter badge; the proxy closes upstream."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY + " More words follow." * 100)), delay=0.005)
    origin = start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["attack"])
    with anyio.fail_after(60):
        async with browser_page(tmp_path, origin) as page:
            await ask(page, origin, PROMPT)
            badge = page.locator("#output .badge.cut")
            await expect(badge).to_have_text("cut off (content_filter)")
            await expect(badge).to_be_visible()
            await expect(page.locator("#status")).to_have_text("Done: cut off by moderation")
            await expect(page.locator("#timeline tbody tr.flagged .verdict")).to_have_text("cutoff: keyword")
            assert await page.locator("#timeline tbody tr").count() >= 1
            text = await page.locator("#output").inner_text()
            await screenshot(page, tmp_path, "playground-cutoff.png")
        assert await upstream.await_ended(1)
    shown = text.removesuffix("cut off (content_filter)").rstrip()
    assert shown.startswith("Once upon a time") and STORY.startswith(shown)
    assert "attack" not in text
    assert upstream.aborted == 1


async def test_playground_sends_the_api_key(upstream: LoopbackUpstream, start_proxy: Any, tmp_path: Path) -> None:
    """With client keys required, the page's key input is what lets the request through."""
    upstream.chat = lambda body: Script(text_chunks(words("A calm answer about gardens.")), delay=0.005)
    origin = start_proxy(
        upstream=upstream.base_url, moderator="keyword", keywords=["attack"], client_keys=frozenset({"pk-1"})
    )
    with anyio.fail_after(60):
        async with browser_page(tmp_path, origin, expected_errors=1) as page:
            await page.goto(origin + "/")
            await page.locator("#prompt").fill(PROMPT)
            await page.locator("#send").click()
            await expect(page.locator("#status")).to_have_attribute("data-state", "error")
            await expect(page.locator("#error")).to_have_text("HTTP 401: Incorrect API key provided.")
            await page.locator("#api-key").fill("pk-1")
            await page.locator("#send").click()
            await expect(page.locator("#status")).to_have_attribute("data-state", "done")
            await expect(page.locator("#error")).to_be_hidden()
            text = await page.locator("#output").inner_text()
    assert text.startswith("A calm answer about gardens.")
    assert len(upstream.requests) == 1  # the refused request never reached upstream


# -- the debug events the page reads (no browser) ------------------------------------------------


async def post_stream(origin: str, headers: dict[str, str]) -> str:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}], "stream": True}
    async with httpx2.AsyncClient(timeout=10) as http:
        r = await http.post(origin + "/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200
    return r.text


async def test_debug_header_adds_verdict_comments(upstream: LoopbackUpstream, start_proxy: Any) -> None:
    """With the debug header, the policy and each verdict come as SSE comments, ahead of the text they release."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY)), delay=0.001)
    policy = Policy(action="redact", window_chars=48, first_window_chars=16)
    origin = start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["attack"], policy=policy)
    with anyio.fail_after(10):
        plain = await post_stream(origin, {})
        debug = await post_stream(origin, {"x-streamguard-debug": "1"})
    assert "streamguard." not in plain
    events = debug.removesuffix("\n\n").split("\n\n")
    assert events[0].startswith(": streamguard.policy ")
    assert json.loads(events[0].split(" ", 2)[2])["redaction"] == "[redacted]"
    verdicts: list[dict[str, Any]] = []
    released = 0
    for event in events[1:]:
        if event.startswith(": streamguard.verdict "):
            verdicts.append(json.loads(event.split(" ", 2)[2]))
        elif event.startswith("data: {"):
            chunk = json.loads(event.removeprefix("data: "))
            released += sum(len(c["delta"].get("content") or "") for c in chunk["choices"])
            assert released <= max((v["end"] for v in verdicts), default=0) + len("[redacted]")  # hold-back
    assert events[-1] == "data: [DONE]"
    assert set(verdicts[0]) == {
        "choice", "seq", "start", "end", "latency_ms", "at_ms", "flagged", "category", "action", "error"
    }  # fmt: skip
    assert [v["seq"] for v in verdicts] == list(range(len(verdicts)))
    assert [(v["category"], v["action"]) for v in verdicts if v["flagged"]] == [("keyword", "redact")]
    assert all(v["latency_ms"] >= 0 and v["at_ms"] > 0 and v["error"] is None for v in verdicts)
    assert "attack" not in debug  # verdicts carry offsets, never the window's text


async def test_openai_client_reads_a_debug_stream(upstream: LoopbackUpstream, start_proxy: Any) -> None:
    """The real openai client skips the debug comments: the chunks are those of a plain stream."""
    upstream.chat = lambda body: Script(text_chunks(words(STORY)), delay=0.001)
    origin = start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["attack"])
    streams = []
    with anyio.fail_after(10):
        async with AsyncOpenAI(api_key="k", base_url=origin + "/v1", max_retries=0, timeout=10) as c:
            for headers in ({}, {"x-streamguard-debug": "1"}):
                stream = await c.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": PROMPT}],
                    stream=True,
                    extra_headers=headers,
                )
                streams.append([json.loads(x.to_json(indent=None)) async for x in stream])
    plain, debug = streams
    assert debug == plain
    assert debug[-1]["choices"][0]["finish_reason"] == "content_filter"


@pytest.mark.parametrize("playground", [True, False])
async def test_playground_page_is_self_contained(
    upstream: LoopbackUpstream, start_proxy: Any, playground: bool
) -> None:
    """GET / serves one page that loads nothing from elsewhere (CSP), unless the playground is off."""
    origin = start_proxy(upstream=upstream.base_url, moderator="keyword", keywords=["x"], playground=playground)
    with anyio.fail_after(10):
        async with httpx2.AsyncClient(timeout=10) as http:
            r = await http.get(origin + "/")
    if not playground:
        assert r.status_code == 404
        return
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", r.text)  # no external resource
    assert "/v1/chat/completions" in r.text and "x-streamguard-debug" in r.text
