"""``streamguard demo``: guard a streamed answer and show it live (offline by default)."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..policy import Policy
from ._common import CLIError, console_of, describe, policy_args, policy_of, run_async, seconds, warm_up_encoding

if TYPE_CHECKING:
    from rich.console import Console

    from ..moderation import Moderator
    from ..report import Flag, GuardReport


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``demo``."""
    demo = sub.add_parser(
        "demo",
        help="stream a sample answer through the guard, live (offline unless --model/prompt)",
        description="Guard a streamed answer and show it live. Offline by default: a bundled answer from an "
        "embedded loopback server, moderated by the local profanity classifier. With OPENAI_API_KEY, "
        "--model and/or a prompt use the real API and OpenAIModerator.",
    )
    demo.add_argument("prompt", nargs="?", help="prompt for the real API (needs OPENAI_API_KEY)")
    demo.add_argument("--model", help="model for the real API (needs OPENAI_API_KEY; default gpt-4o-mini)")
    policy_args(demo)
    demo.add_argument(
        "--delay", type=seconds, default=0.015, help="seconds per word of the offline answer (default 0.015)"
    )
    demo.add_argument(
        "--moderator",
        choices=("local", "keyword", "openai"),
        help="local: offline profanity classifier (default offline); keyword: the demo's word list; "
        "openai: the Moderation endpoint (default with --model/prompt)",
    )
    demo.add_argument("--no-color", action="store_true", help="plain output, no live view (implied when piped)")
    demo.set_defaults(run=run)


@dataclass
class _Timing:
    ttft: float | None = None
    total: float | None = None


@dataclass
class _DemoRun:
    """Everything one demo run needs: how to open the stream and what guards it."""

    open_stream: Callable[[], Awaitable[Any]]
    moderator: Moderator
    policy: Policy
    model: str
    messages: list[dict[str, str]]
    header: str
    warm_up: Callable[[], Awaitable[object]]  # opens the connection, so no timed pass pays for it
    flags: list[Flag] = field(default_factory=list)


def run(args: argparse.Namespace) -> int:
    """Run ``streamguard demo``; returns the exit code."""
    policy = policy_of(args)
    online = args.model is not None or args.prompt is not None
    if online:
        if not os.environ.get("OPENAI_API_KEY"):
            raise CLIError(
                "--model and a prompt use the real OpenAI API and need OPENAI_API_KEY "
                "(run `streamguard demo` without them for the offline demo)",
                code=2,
            )
        return _demo_online(args, policy)
    if args.moderator == "openai":
        raise CLIError("--moderator openai needs the real API: set OPENAI_API_KEY and give --model", code=2)
    return _demo_offline(args, policy)


def _demo_offline(args: argparse.Namespace, policy: Policy) -> int:
    from openai import AsyncOpenAI

    from ..moderation import KeywordModerator, LocalModerator
    from ..testing.upstream import LoopbackUpstream, Script, text_chunks
    from ._demo_data import DEMO_ANSWER, DEMO_KEYWORDS, DEMO_MODEL, DEMO_PROMPT, word_deltas

    console = console_of(args)
    moderator: Moderator
    if args.moderator == "keyword":
        moderator = KeywordModerator({"profanity": DEMO_KEYWORDS})
        moderator_name = "KeywordModerator (the demo's word list)"
    else:
        local = LocalModerator()
        with console.status("loading the local moderation models..."):
            local.load()  # about a second; not part of any measured time
            local.probabilities(["warm up"])  # the first prediction is slow (tens of ms)
        moderator, moderator_name = local, "LocalModerator (offline: MiniLM embeddings + profanity model)"
    events = text_chunks(word_deltas(DEMO_ANSWER), model=DEMO_MODEL, id="chatcmpl-demo")
    messages = [{"role": "user", "content": DEMO_PROMPT}]
    # A request with max_tokens=1 gets a one-word answer: the warm-up stream.
    short = text_chunks(word_deltas(DEMO_ANSWER)[:1], model=DEMO_MODEL, id="chatcmpl-demo", finish_reason="length")

    def chat(body: dict[str, Any]) -> Script:
        return Script(short) if body.get("max_tokens") == 1 else Script(events, delay=args.delay)

    with LoopbackUpstream(chat=chat) as upstream:

        async def run() -> int:
            async with AsyncOpenAI(api_key="demo", base_url=upstream.base_url, max_retries=0, timeout=30) as client:
                create: Any = client.chat.completions.create

                async def open_stream() -> Any:
                    return await create(model=DEMO_MODEL, messages=messages, stream=True)

                async def warm_up() -> None:
                    # Opens the connection and builds the client's chunk parsing once, before timing.
                    async with await create(model=DEMO_MODEL, messages=messages, stream=True, max_tokens=1) as s:
                        async for _ in s:
                            pass

                demo = _DemoRun(
                    open_stream,
                    moderator,
                    policy,
                    DEMO_MODEL,
                    messages,
                    header=f"offline demo: a bundled answer from {upstream.base_url}, a word every "
                    f"{args.delay * 1000:g} ms | {moderator_name} | {describe(policy)}",
                    warm_up=warm_up,
                )
                return await _demo(demo, console, live=not args.no_color and console.is_terminal)

        return run_async(run)


def _demo_online(args: argparse.Namespace, policy: Policy) -> int:
    """The same demo against the real API (not exercised by the tests: it needs a key)."""
    from openai import AsyncOpenAI

    from ..moderation import KeywordModerator, LocalModerator, OpenAIModerator
    from ._demo_data import DEMO_KEYWORDS, DEMO_PROMPT

    console = console_of(args)
    model = args.model or "gpt-4o-mini"
    messages = [{"role": "user", "content": args.prompt or DEMO_PROMPT}]

    async def run() -> int:
        async with AsyncOpenAI() as client:
            moderator: Moderator
            if args.moderator == "local":
                moderator = LocalModerator()
            elif args.moderator == "keyword":
                moderator = KeywordModerator({"profanity": DEMO_KEYWORDS})
            else:
                moderator = OpenAIModerator(client)

            async def open_stream() -> Any:
                create: Any = client.chat.completions.create
                return await create(model=model, messages=messages, stream=True, stream_options={"include_usage": True})

            header = f"{model} via the OpenAI API | {type(moderator).__name__} | {describe(policy)}"
            demo = _DemoRun(open_stream, moderator, policy, model, messages, header=header, warm_up=client.models.list)
            return await _demo(demo, console, live=not args.no_color and console.is_terminal)

    return run_async(run)


async def _raw_pass(open_stream: Callable[[], Awaitable[Any]]) -> _Timing:
    """Stream the answer once without the guard: the baseline time to first token."""
    timing = _Timing()
    started = time.perf_counter()
    stream = await open_stream()
    async with stream:
        async for chunk in stream:
            if timing.ttft is None and any(c.delta.content or c.delta.refusal for c in chunk.choices):
                timing.ttft = time.perf_counter() - started
    timing.total = time.perf_counter() - started
    return timing


async def _demo(demo: _DemoRun, console: Console, *, live: bool) -> int:
    from rich.console import Group
    from rich.live import Live
    from rich.panel import Panel

    from .. import guard
    from ._render import Transcript, print_report, status_line

    console.print(demo.header, style="dim", markup=False, soft_wrap=True)
    warm_up_encoding(demo.model)
    await demo.warm_up()
    with console.status("baseline: streaming the same answer once without the guard..."):
        raw = await _raw_pass(demo.open_stream)

    transcript = Transcript(redaction=demo.policy.redaction)
    guarded = _Timing()
    cut: Flag | None = None
    cut_seen = False

    def on_flag(flag: Flag) -> None:
        demo.flags.append(flag)
        if flag.choice == 0:
            transcript.on_flag(flag)

    started = time.perf_counter()
    stream = await demo.open_stream()
    g = guard(
        stream, moderator=demo.moderator, policy=demo.policy, model=demo.model, messages=demo.messages, on_flag=on_flag
    )

    def view(state: str) -> Group:
        return Group(
            Panel(transcript.rich(), title="guarded answer", title_align="left", border_style="blue"),
            status_line(g.report, state=state, first_token=guarded.ttft, in_flight=0),
        )

    live_view = Live(view("streaming"), console=console, refresh_per_second=20, vertical_overflow="visible")
    out = console.file
    if live:
        live_view.start()
    try:
        async with g:
            async for chunk in g:
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    text = (choice.delta.content or "") + (choice.delta.refusal or "")
                    if text:
                        if guarded.ttft is None:
                            guarded.ttft = time.perf_counter() - started
                        transcript.add_text(text)
                        if not live:
                            out.write(text)
                            out.flush()
                    if choice.finish_reason == "content_filter" and not cut_seen:
                        cut_seen = True
                        cut = next((f for f in reversed(demo.flags) if f.choice == 0), None)
                        transcript.add_cut(cut)
                        if not live:
                            out.write(f"\n{transcript.segments[-1].text.strip()}")
                if live:
                    live_view.update(view("streaming"))
        guarded.total = time.perf_counter() - started
        if live:
            live_view.update(view("done"))
    finally:
        if live:
            live_view.stop()
    report = g.report
    if not live:
        out.write("\n\n")
        if any(seg.style == "leaked" for seg in transcript.segments):
            console.print("Shown before the verdict arrived (stream-first):", markup=False)
            console.print(transcript.plain(), markup=False)
            console.print()
        status = status_line(report, state="done", first_token=guarded.ttft, in_flight=0)
        console.print(status.plain, markup=False, soft_wrap=True)
    print_report(
        console,
        report,
        timings={
            "time to first token": (raw.ttft, guarded.ttft),
            "total time" + (" (guarded: cut off)" if cut_seen else ""): (raw.total, guarded.total),
        },
    )
    console.print(_verdict_line(report, demo.policy), markup=False, soft_wrap=True)
    return 0


def _verdict_line(report: GuardReport, policy: Policy) -> str:
    from ._render import flag_label

    if not report.flags:
        return "Nothing was flagged; every window was released."
    flag = report.flags[0]
    if flag.action == "cutoff":
        what = f"the answer was cut off at character {flag.start} (finish_reason content_filter)"
    else:
        what = f"{len(report.flags)} window(s) redacted as {policy.redaction!r}"
    leak = f"; {report.leaked_chars} flagged characters had already been shown" if report.leaked_chars else ""
    return f"Caught: {len(report.flags)} window(s) flagged ({flag_label(flag)}); {what}{leak}."
