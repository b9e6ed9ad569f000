"""The ``streamguard`` command: ``demo``, ``replay`` and ``bench``.

- ``streamguard demo`` streams a bundled answer from an embedded loopback server (no key, no
  network), guards it through the real ``openai`` client with the offline ``LocalModerator`` and
  shows it live; with ``OPENAI_API_KEY`` and ``--model``/a prompt it does the same against the
  real API with ``OpenAIModerator``.
- ``streamguard serve --upstream URL`` runs the OpenAI-compatible moderating proxy.
- ``streamguard replay FILE.sse`` serves a recorded Chat Completions stream from loopback and
  guards it.
- ``streamguard bench`` runs the benchmark suite (``streamguard.cli._bench``).

Errors are one line on stderr: exit code 2 for bad arguments (and what needs a key or is not
supported), 1 for a missing or malformed file and failures while running.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ..exceptions import ConfigError
from ..integrations.proxy import add_serve_subcommand  # imports no starlette until it runs
from ..policy import Policy

if TYPE_CHECKING:
    from openai import AsyncOpenAI
    from openai.types.chat import ChatCompletionChunk
    from rich.console import Console

    from ..moderation import Moderator
    from ..report import Flag, GuardReport

__all__ = ["main"]

# Pace of ``replay --speed 1``: one event every 20 ms (about 50 tokens/s, a typical gpt-4o pace).
REPLAY_EVENT_DELAY = 0.02


class CLIError(Exception):
    """A one-line error for the user, with the exit code to end with."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (and the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``streamguard`` command.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns:
        The exit code: 0 on success, 1 for a failure, 2 for bad arguments.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.run
    try:
        return command(args)
    except CLIError as exc:
        _fail(args, str(exc))
        return exc.code
    except ConfigError as exc:
        _fail(args, str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line, not a traceback; STREAMGUARD_DEBUG=1 shows it
        if os.environ.get("STREAMGUARD_DEBUG"):
            raise
        _fail(args, f"{type(exc).__name__}: {exc}".splitlines()[0])
        return 1


def _fail(args: argparse.Namespace, message: str) -> None:
    print(f"streamguard {args.command}: error: {message}", file=sys.stderr)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamguard", description="Moderate streamed OpenAI chat completions.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser(
        "demo",
        help="stream a sample answer through the guard, live (offline unless --model/prompt)",
        description="Guard a streamed answer and show it live. Offline by default: a bundled answer from an "
        "embedded loopback server, moderated by the local profanity classifier. With OPENAI_API_KEY, "
        "--model and/or a prompt use the real API and OpenAIModerator.",
    )
    demo.add_argument("prompt", nargs="?", help="prompt for the real API (needs OPENAI_API_KEY)")
    demo.add_argument("--model", help="model for the real API (needs OPENAI_API_KEY; default gpt-4o-mini)")
    _policy_args(demo)
    demo.add_argument(
        "--delay", type=_seconds, default=0.015, help="seconds per word of the offline answer (default 0.015)"
    )
    demo.add_argument(
        "--moderator",
        choices=("local", "keyword", "openai"),
        help="local: offline profanity classifier (default offline); keyword: the demo's word list; "
        "openai: the Moderation endpoint (default with --model/prompt)",
    )
    demo.add_argument("--no-color", action="store_true", help="plain output, no live view (implied when piped)")
    demo.set_defaults(run=_cmd_demo)

    replay = sub.add_parser(
        "replay",
        help="guard a recorded Chat Completions SSE stream",
        description="Serve a recorded Chat Completions SSE body from loopback and guard it through the real client.",
    )
    replay.add_argument("file", type=Path, help="recorded SSE body (data: lines)")
    replay.add_argument(
        "--speed",
        type=_non_negative,
        default=1.0,
        help=f"1 sends an event every {REPLAY_EVENT_DELAY * 1000:.0f} ms, 2 twice as fast; 0 sends the body at once",
    )
    _policy_args(replay)
    replay.add_argument(
        "--moderator", choices=("local", "keyword"), help="default: keyword with --keywords, else local"
    )
    replay.add_argument("--keywords", type=_keywords, help="comma-separated words for the keyword moderator")
    replay.add_argument("--no-color", action="store_true", help="no colour")
    replay.set_defaults(run=_cmd_replay)

    bench = sub.add_parser(
        "bench",
        help="run the benchmark suite (JSON, charts, summary)",
        description="Measure CPU overhead, added latency, leaks, moderation calls and batching on loopback.",
    )
    bench.add_argument("--quick", action="store_true", help="fewer repeats and shorter streams (under 2 minutes)")
    bench.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # for the tests: seconds
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    bench.set_defaults(run=_cmd_bench)

    add_serve_subcommand(sub)
    return parser


def _policy_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("policy")
    group.add_argument("--mode", choices=("holdback", "stream_first"), default="holdback")
    group.add_argument("--action", choices=("cutoff", "redact"), default="cutoff")
    group.add_argument("--window", type=_positive_int, default=240, help="window size in characters (default 240)")
    group.add_argument("--first-window", type=_positive_int, help="first window's size (default min(16, --window))")
    group.add_argument("--overlap", type=_non_negative_int, default=64, help="context characters (default 64)")


def _policy(args: argparse.Namespace) -> Policy:
    first = args.first_window if args.first_window is not None else min(16, args.window)
    return Policy(
        mode=args.mode,
        action=args.action,
        window_chars=args.window,
        first_window_chars=first,
        overlap_chars=args.overlap,
    )


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _seconds(text: str) -> float:
    value = _number(text)
    if value < 0 or value > 10:
        raise argparse.ArgumentTypeError(f"must be between 0 and 10 seconds: {text!r}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _keywords(text: str) -> list[str]:
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise argparse.ArgumentTypeError("give at least one word, e.g. --keywords attack,castle")
    return words


def _console(args: argparse.Namespace) -> Console:
    from rich.console import Console

    if args.no_color:
        return Console(no_color=True, highlight=False, force_terminal=False)
    return Console(highlight=False)


def _run_async(fn: Callable[[], Awaitable[int]]) -> int:
    import anyio

    async def run() -> int:
        return await fn()

    # asyncio: the openai client's own streams are tested there (see tests/conftest.py).
    return anyio.run(run, backend="asyncio")


# -- demo ------------------------------------------------------------------------------------------


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


def _cmd_demo(args: argparse.Namespace) -> int:
    policy = _policy(args)
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

    console = _console(args)
    moderator: Moderator
    if args.moderator == "keyword":
        moderator = KeywordModerator({"profanity": DEMO_KEYWORDS})
        moderator_name = "KeywordModerator (the demo's word list)"
    else:
        local = LocalModerator()
        with console.status("loading the local profanity model..."):
            local.load()  # about a second; not part of any measured time
            local.probabilities(["warm up"])  # the first prediction is slow (tens of ms)
        moderator, moderator_name = local, "LocalModerator (offline profanity classifier)"
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
                    f"{args.delay * 1000:g} ms | {moderator_name} | {_describe(policy)}",
                    warm_up=warm_up,
                )
                return await _demo(demo, console, live=not args.no_color and console.is_terminal)

        return _run_async(run)


def _demo_online(args: argparse.Namespace, policy: Policy) -> int:
    """The same demo against the real API (not exercised by the tests: it needs a key)."""
    from openai import AsyncOpenAI

    from ..moderation import KeywordModerator, LocalModerator, OpenAIModerator
    from ._demo_data import DEMO_KEYWORDS, DEMO_PROMPT

    console = _console(args)
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

            header = f"{model} via the OpenAI API | {type(moderator).__name__} | {_describe(policy)}"
            demo = _DemoRun(open_stream, moderator, policy, model, messages, header=header, warm_up=client.models.list)
            return await _demo(demo, console, live=not args.no_color and console.is_terminal)

    return _run_async(run)


def _describe(policy: Policy) -> str:
    return (
        f"{policy.mode}/{policy.action}, window {policy.window_chars} "
        f"(first {policy.first_window_chars}, overlap {policy.overlap_chars})"
    )


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
    _warm_up(demo.model)
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


def _warm_up(model: str) -> None:
    """Load the token encoding now: the first stream of a process would otherwise pay for it."""
    from ..usage import count_tokens

    count_tokens("warm up", model)


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


# -- replay ----------------------------------------------------------------------------------------


@dataclass
class _Recording:
    payloads: list[str]  # the data of each event, "[DONE]" included, in order
    choices: int
    model: str


def _read_recording(path: Path) -> _Recording:
    """Parse a recorded SSE body; one-line :class:`CLIError` if it is not a Chat Completions one."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CLIError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise CLIError(f"is a directory, not a recording: {path}") from None
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror}") from None
    try:
        body = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CLIError(f"malformed recording {path}: not UTF-8 text") from None
    payloads: list[str] = []
    data: list[str] = []
    events = False
    for line in [*body.splitlines(), ""]:
        if not line:
            if data:
                payloads.append("\n".join(data))
                data = []
        elif line.startswith("event:"):
            events = True
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line.startswith((":", "id:", "retry:")):
            raise CLIError(f"malformed recording {path}: not an SSE body (line {line[:40]!r})")
    if events:
        raise CLIError(
            f"{path} is a Responses API recording (it has `event:` lines): "
            "Responses API recordings are not supported yet, only Chat Completions streams",
            code=2,
        )
    if not payloads:
        raise CLIError(f"malformed recording {path}: no `data:` events")
    indexes: set[int] = set()
    model = ""
    for number, payload in enumerate(payloads, 1):
        if payload == "[DONE]":
            continue
        try:
            event = json.loads(payload)
        except ValueError as exc:
            raise CLIError(f"malformed recording {path}: event {number} is not valid JSON ({exc})") from None
        if not isinstance(event, dict):
            raise CLIError(f"malformed recording {path}: event {number} is not a JSON object")
        if "error" in event:
            raise CLIError(f"{path} records an error event, not a completion: {str(event['error'])[:80]}")
        choices = event.get("choices")
        if not isinstance(choices, list):
            raise CLIError(f"malformed recording {path}: event {number} has no `choices` list")
        model = model or str(event.get("model") or "")
        indexes.update(c["index"] for c in choices if isinstance(c, dict) and isinstance(c.get("index"), int))
    return _Recording(payloads, max(indexes, default=0) + 1, model or "gpt-4o-mini")


def _cmd_replay(args: argparse.Namespace) -> int:
    from ..moderation import KeywordModerator, LocalModerator
    from ..testing.upstream import LoopbackUpstream, Script

    recording = _read_recording(args.file)
    policy = _policy(args)
    kind = args.moderator or ("keyword" if args.keywords else "local")
    moderator: Moderator
    if kind == "keyword":
        if not args.keywords:
            raise CLIError("--moderator keyword needs --keywords, e.g. --keywords attack,castle", code=2)
        moderator = KeywordModerator({"keyword": args.keywords})
    else:
        if args.keywords:
            raise CLIError("--keywords goes with --moderator keyword", code=2)
        local = LocalModerator()
        local.load()
        local.probabilities(["warm up"])
        moderator = local
    request = _request_of(args.file)
    messages = request.get("messages") or [{"role": "user", "content": "(replayed recording)"}]
    tools = request.get("tools")
    model = recording.model
    if args.speed == 0:
        script = Script(raw="".join(f"data: {p}\n\n" for p in recording.payloads).encode())
    else:
        script = Script(recording.payloads, delay=REPLAY_EVENT_DELAY / args.speed, done=False)
    console = _console(args)
    speed = "all at once" if args.speed == 0 else f"an event every {REPLAY_EVENT_DELAY / args.speed * 1000:g} ms"
    console.print(
        f"replaying {args.file} ({len(recording.payloads)} events, {speed}) | {type(moderator).__name__} | "
        f"{_describe(policy)}",
        style="dim",
        markup=False,
        soft_wrap=True,
    )
    with LoopbackUpstream(chat=lambda body: script) as upstream:

        async def run() -> int:
            from openai import AsyncOpenAI

            async with AsyncOpenAI(api_key="replay", base_url=upstream.base_url, max_retries=0, timeout=30) as client:
                return await _replay(client, console, moderator, policy, model, messages, tools, recording.choices)

        return _run_async(run)


def _request_of(path: Path) -> dict[str, Any]:
    """The recorded request next to ``X.sse`` (``X.request.json``), if there is one."""
    sibling = path.with_name(path.name.removesuffix(".sse") + ".request.json")
    try:
        request = json.loads(sibling.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return request if isinstance(request, dict) else {}


async def _replay(
    client: AsyncOpenAI,
    console: Console,
    moderator: Moderator,
    policy: Policy,
    model: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    n: int,
) -> int:
    from .. import guard
    from ._render import Transcript, print_report

    _warm_up(model)
    transcripts: dict[int, Transcript] = {}
    flags: list[Flag] = []
    finish: dict[int, str | None] = {}

    def transcript(index: int) -> Transcript:
        return transcripts.setdefault(index, Transcript(redaction=policy.redaction))

    def on_flag(flag: Flag) -> None:
        flags.append(flag)
        transcript(flag.choice).on_flag(flag)

    extra: dict[str, Any] = {"tools": tools} if tools else {}
    create: Any = client.chat.completions.create  # the recorded request's messages and tools, as they are
    stream = await create(model=model, messages=messages, stream=True, **extra)
    chunk: ChatCompletionChunk
    async with guard(
        stream, moderator=moderator, policy=policy, model=model, messages=messages, tools=tools, n=n, on_flag=on_flag
    ) as g:
        async for chunk in g:
            for choice in chunk.choices:
                t = transcript(choice.index)
                # Not validated by the client: e.g. Azure's annotation chunks have no delta.
                delta = getattr(choice, "delta", None)
                text = "" if delta is None else (delta.content or "") + (delta.refusal or "")
                if text:
                    t.add_text(text)
                for call in (delta.tool_calls if delta is not None else None) or ():
                    if call.function is not None and call.function.name:
                        t.add_text(f"\n[tool call: {call.function.name}] ")
                    if call.function is not None and call.function.arguments:
                        t.add_text(call.function.arguments)
                if choice.finish_reason is not None:
                    finish[choice.index] = choice.finish_reason
                    if choice.finish_reason == "content_filter":
                        t.add_cut(next((f for f in reversed(flags) if f.choice == choice.index), None))
    for index in sorted(transcripts):
        console.print(f"\n--- choice {index} (finish_reason: {finish.get(index)}) ---", style="bold", markup=False)
        t = transcripts[index]
        console.print(t.plain() if console.no_color or not console.is_terminal else t.rich(), markup=False)
    console.print()
    print_report(console, g.report)
    if g.report.error is not None:
        raise CLIError(f"the stream ended with {type(g.report.error).__name__}: {g.report.error}")
    return 0


# -- bench -----------------------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    from ._bench import run_suite

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create {args.out}: {exc.strerror}") from None
    run_suite(args.out, quick=args.quick or args.smoke, smoke=args.smoke)
    return 0
