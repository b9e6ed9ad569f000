"""``streamguard replay FILE.sse``: serve a recorded Chat Completions stream from loopback and guard it."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..policy import Policy
from ._common import (
    CLIError,
    console_of,
    describe,
    keywords,
    non_negative,
    policy_args,
    policy_of,
    run_async,
    warm_up_encoding,
)

if TYPE_CHECKING:
    from openai import AsyncOpenAI
    from openai.types.chat import ChatCompletionChunk
    from rich.console import Console

    from ..moderation import Moderator
    from ..report import Flag

# Pace of ``replay --speed 1``: one event every 20 ms (about 50 tokens/s, a typical gpt-4o pace).
REPLAY_EVENT_DELAY = 0.02


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``replay``."""
    replay = sub.add_parser(
        "replay",
        help="guard a recorded Chat Completions SSE stream",
        description="Serve a recorded Chat Completions SSE body from loopback and guard it through the real client.",
    )
    replay.add_argument("file", type=Path, help="recorded SSE body (data: lines)")
    replay.add_argument(
        "--speed",
        type=non_negative,
        default=1.0,
        help=f"1 sends an event every {REPLAY_EVENT_DELAY * 1000:.0f} ms, 2 twice as fast; 0 sends the body at once",
    )
    policy_args(replay)
    replay.add_argument(
        "--moderator", choices=("local", "keyword"), help="default: keyword with --keywords, else local"
    )
    replay.add_argument("--keywords", type=keywords, help="comma-separated words for the keyword moderator")
    replay.add_argument("--no-color", action="store_true", help="no colour")
    replay.set_defaults(run=run)


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


def run(args: argparse.Namespace) -> int:
    """Run ``streamguard replay``; returns the exit code."""
    from ..moderation import KeywordModerator, LocalModerator
    from ..testing.upstream import LoopbackUpstream, Script

    recording = _read_recording(args.file)
    policy = policy_of(args)
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
    console = console_of(args)
    speed = "all at once" if args.speed == 0 else f"an event every {REPLAY_EVENT_DELAY / args.speed * 1000:g} ms"
    console.print(
        f"replaying {args.file} ({len(recording.payloads)} events, {speed}) | {type(moderator).__name__} | "
        f"{describe(policy)}",
        style="dim",
        markup=False,
        soft_wrap=True,
    )
    with LoopbackUpstream(chat=lambda body: script) as upstream:

        async def run() -> int:
            from openai import AsyncOpenAI

            async with AsyncOpenAI(api_key="replay", base_url=upstream.base_url, max_retries=0, timeout=30) as client:
                return await _replay(client, console, moderator, policy, model, messages, tools, recording.choices)

        return run_async(run)


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

    warm_up_encoding(model)
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
