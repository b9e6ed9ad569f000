"""``streamguard bench --upstream URL``: what the guard adds to *your* model, moderator and window sizes.

Every prompt is streamed raw and guarded under each (mode, action, window) variant, through the real
``openai`` client. The runs of one round (a prompt, a repeat) go back to back in a shuffled order, so
raw and guarded streams see the same conditions; "added" figures pair each guarded run with the raw
run of its round. Rounds run ``--concurrency`` at a time and share one moderator (its batching works
across streams as in production).

Output: ``results.json``, PNG charts, ``report.html`` (opens offline) and a table in the terminal.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..policy import Action, Mode, Policy
from ._common import CLIError
from ._moderators import (
    MODERATION_KEY_VARS,
    UPSTREAM_KEY_VARS,
    Secrets,
    moderator_info,
    open_moderator,
    public_url,
    require_key,
)
from ._report import console as summary_console
from ._report import (
    distribution,
    fmt,
    html_page,
    make_out,
    med_p95,
    meta,
    per_1k,
    pyplot,
    rich_table,
    save_chart,
    write_json,
)

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from ..moderation import Moderator, Verdict

# Answers of a few paragraphs: long enough for several windows, short enough to be cheap.
DEFAULT_PROMPTS = (
    "Explain how a lighthouse lens concentrates light, in two short paragraphs.",
    "Write a short story (about 150 words) about a night-shift baker.",
    "Give five practical tips for keeping houseplants alive through winter, one sentence each.",
    "Summarise the causes of the French Revolution in about 120 words.",
    "Describe how a bicycle gear system works to a ten-year-old, in about 100 words.",
)
DEFAULT_POLICIES = ("holdback:cutoff", "stream_first:cutoff")
DEFAULT_WINDOWS = (240,)
MAX_ERRORS_LISTED = 3


@dataclass(frozen=True)
class Variant:
    """One guarded configuration: mode, action and window size (the rest is ``Policy()``'s)."""

    mode: Mode
    action: Action
    window_chars: int

    @property
    def label(self) -> str:
        return f"{self.mode}/{self.action} w{self.window_chars}"

    def policy(self) -> Policy:
        default = Policy()
        return Policy(
            mode=self.mode,
            action=self.action,
            window_chars=self.window_chars,
            first_window_chars=min(default.first_window_chars, self.window_chars),
        )


@dataclass(frozen=True)
class Settings:
    """What ``bench --upstream`` was asked to do."""

    upstream: str
    model: str
    prompts: tuple[tuple[dict[str, Any], ...], ...]
    prompts_file: str | None
    variants: tuple[Variant, ...]
    repeats: int
    concurrency: int
    max_tokens: int | None
    seed: int


@dataclass
class Run:
    """One stream, raw (``variant is None``) or guarded."""

    variant: Variant | None
    round: int
    ttft: float | None = None
    total: float | None = None
    completion_tokens: int = 0
    moderation_calls: int = 0
    moderated_tokens: int = 0
    round_trips: list[float] = field(default_factory=list)
    flags: int = 0
    categories: list[str] = field(default_factory=list)
    leaked_chars: int = 0
    finish_reason: str | None = None
    error: str | None = None


def policy_spec(text: str) -> tuple[Mode, Action]:
    """``MODE[:ACTION]``, e.g. ``holdback``, ``stream_first:redact`` (action cutoff by default)."""
    mode, _, action = text.partition(":")
    action = action or "cutoff"
    if mode not in ("holdback", "stream_first") or action not in ("cutoff", "redact"):
        raise argparse.ArgumentTypeError(
            f"not a policy: {text!r} (MODE[:ACTION], MODE holdback or stream_first, ACTION cutoff or redact)"
        )
    return mode, action  # type: ignore[return-value]


def window_list(text: str) -> list[int]:
    """``60,240,960``: window sizes in characters."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"window sizes must be integers >= 1: {text!r}")
    return sizes


def load_prompts(path: Path) -> list[tuple[dict[str, Any], ...]]:
    """Prompts from a file: one per line (plain text), or JSON lines ``{"prompt": ...}`` / ``{"messages": [...]}``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CLIError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read {path}: {exc}") from None
    prompts: list[tuple[dict[str, Any], ...]] = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if not line.startswith("{"):
            prompts.append(({"role": "user", "content": line},))
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise CLIError(f"{path}:{number}: not valid JSON ({exc})") from None
        if isinstance(row.get("prompt"), str):
            prompts.append(({"role": "user", "content": row["prompt"]},))
        elif isinstance(row.get("messages"), list) and all(isinstance(m, dict) for m in row["messages"]):
            prompts.append(tuple(row["messages"]))
        else:
            raise CLIError(f'{path}:{number}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
    if not prompts:
        raise CLIError(f"no prompts in {path}")
    return prompts


def settings_from(args: argparse.Namespace) -> Settings:
    """Validate the ``--upstream`` options into :class:`Settings` (one-line errors, exit code 2)."""
    if not args.model:
        raise CLIError("--upstream needs --model", code=2)
    for name in ("quick", "smoke"):
        if getattr(args, name):
            raise CLIError(f"--{name} is for the offline suite (without --upstream)", code=2)
    prompts_file = args.prompts
    prompts = (
        load_prompts(prompts_file) if prompts_file else [({"role": "user", "content": p},) for p in DEFAULT_PROMPTS]
    )
    specs: list[tuple[Mode, Action]] = list(dict.fromkeys(args.policies or [policy_spec(p) for p in DEFAULT_POLICIES]))
    windows = list(dict.fromkeys(args.windows or DEFAULT_WINDOWS))
    variants = tuple(Variant(mode, action, w) for mode, action in specs for w in windows)
    for variant in variants:
        variant.policy()  # a ConfigError here is a usage error
    return Settings(
        upstream=args.upstream,
        model=args.model,
        prompts=tuple(prompts),
        prompts_file=str(prompts_file) if prompts_file else None,
        variants=variants,
        repeats=args.repeats if args.repeats is not None else 3,
        concurrency=args.concurrency if args.concurrency is not None else 1,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )


class _Counting:
    """Wraps the shared moderator for one stream: counts calls and tokens sent, times round trips."""

    def __init__(self, inner: Moderator, model: str) -> None:
        self.inner = inner
        self.model = model
        self.calls = 0
        self.tokens = 0
        self.round_trips: list[float] = []

    async def moderate(self, texts: Sequence[str]) -> list[Verdict]:
        from ..usage import count_tokens

        started = time.perf_counter()
        verdicts = await self.inner.moderate(texts)
        self.round_trips.append(time.perf_counter() - started)
        self.calls += 1
        self.tokens += sum(count_tokens(text, self.model) for text in texts)
        return verdicts


def _text_of(chunk: Any) -> str:
    """Choice 0's visible text in a chunk (content or refusal)."""
    for choice in getattr(chunk, "choices", None) or ():
        if getattr(choice, "index", 0) == 0:
            delta = getattr(choice, "delta", None)
            if delta is not None:
                return (getattr(delta, "content", None) or "") + (getattr(delta, "refusal", None) or "")
    return ""


def _finish_of(chunk: Any) -> str | None:
    for choice in getattr(chunk, "choices", None) or ():
        if getattr(choice, "index", 0) == 0 and getattr(choice, "finish_reason", None):
            return str(choice.finish_reason)
    return None


async def _stream(
    client: AsyncOpenAI,
    settings: Settings,
    messages: Sequence[dict[str, Any]],
    variant: Variant | None,
    moderator: Moderator,
    round_: int,
) -> Run:
    """Stream one answer, raw or guarded, timing the first visible text and the end."""
    from .. import guard
    from ..usage import count_tokens

    run = Run(variant, round_)
    extra: dict[str, Any] = {}
    if settings.max_tokens is not None:
        extra["max_completion_tokens"] = settings.max_tokens
    create: Any = client.chat.completions.create
    text: list[str] = []
    started = time.perf_counter()
    try:
        stream = await create(
            model=settings.model,
            messages=list(messages),
            stream=True,
            stream_options={"include_usage": True},
            **extra,
        )
        if variant is None:
            usage = None
            async with stream:
                async for chunk in stream:
                    piece = _text_of(chunk)
                    if piece:
                        if run.ttft is None:
                            run.ttft = time.perf_counter() - started
                        text.append(piece)
                    run.finish_reason = _finish_of(chunk) or run.finish_reason
                    usage = getattr(chunk, "usage", None) or usage
            run.total = time.perf_counter() - started
            run.completion_tokens = (
                usage.completion_tokens if usage is not None else count_tokens("".join(text), settings.model)
            )
            return run
        counting = _Counting(moderator, settings.model)
        guarded = guard(
            stream, moderator=counting, policy=variant.policy(), model=settings.model, messages=list(messages)
        )
        async with guarded:
            async for chunk in guarded:
                if _text_of(chunk) and run.ttft is None:
                    run.ttft = time.perf_counter() - started
                run.finish_reason = _finish_of(chunk) or run.finish_reason
        run.total = time.perf_counter() - started
        report = guarded.report
        run.completion_tokens = report.usage.completion_tokens if report.usage is not None else 0
        run.moderation_calls = counting.calls
        run.moderated_tokens = counting.tokens
        run.round_trips = counting.round_trips
        run.flags = len(report.flags)
        run.categories = [f.category or "(none)" for f in report.flags]
        run.leaked_chars = report.leaked_chars
    except Exception as exc:  # counted and listed; the benchmark goes on
        run.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return run


async def measure(
    settings: Settings, args: argparse.Namespace, secrets: Secrets, tick: Callable[[str], None]
) -> list[Run]:
    """Stream every round; returns every run (raw and guarded), in completion order."""
    import anyio
    from openai import AsyncOpenAI

    from ..usage import count_tokens

    key = require_key(UPSTREAM_KEY_VARS, "--upstream")
    secrets.add(key)
    count_tokens("warm up", settings.model)  # load the encoding before anything is timed
    runs: list[Run] = []
    async with (
        AsyncOpenAI(api_key=key, base_url=settings.upstream, max_retries=0, timeout=120) as client,
        open_moderator(args, secrets) as moderator,
    ):
        # A raw and a guarded stream first: connections, parsing, the moderator's client. Not counted.
        first = settings.prompts[0]
        for variant in (None, settings.variants[0]):
            warm = await _stream(client, settings, first, variant, moderator, -1)
            if warm.error is not None:
                where = "the upstream" if variant is None else "the guarded stream"
                raise CLIError(f"{where} failed on the first request: {secrets.scrub(warm.error)}")
        tick("warmed up")
        limiter = anyio.CapacityLimiter(settings.concurrency)
        rounds = [(r, p) for r in range(settings.repeats) for p in range(len(settings.prompts))]

        async def one_round(index: int, prompt: int) -> None:
            order: list[Variant | None] = [None, *settings.variants]
            random.Random(settings.seed * 1_000_003 + index).shuffle(order)
            async with limiter:
                for variant in order:
                    run = await _stream(client, settings, settings.prompts[prompt], variant, moderator, index)
                    runs.append(run)
                    tick("raw" if variant is None else variant.label)

        async with anyio.create_task_group() as tg:
            for index, (_repeat, prompt) in enumerate(rounds):
                tg.start_soon(one_round, index, prompt)
    return runs


def summarise(settings: Settings, runs: Sequence[Run], secrets: Secrets) -> dict[str, Any]:
    """``raw`` and one ``policies`` row per variant, from the runs."""
    raw = {r.round: r for r in runs if r.variant is None}
    raw_ok = [r for r in raw.values() if r.error is None]
    rows = []
    for variant in settings.variants:
        mine = [r for r in runs if r.variant == variant]
        ok = [r for r in mine if r.error is None]
        paired = [(r, raw[r.round]) for r in ok if r.round in raw and raw[r.round].error is None]
        tokens = sum(r.completion_tokens for r in ok)
        calls = sum(r.moderation_calls for r in ok)
        moderated = sum(r.moderated_tokens for r in ok)
        flagged = [r for r in ok if r.flags]
        policy = variant.policy()
        rows.append(
            {
                "label": variant.label,
                "mode": variant.mode,
                "action": variant.action,
                "window_chars": variant.window_chars,
                "first_window_chars": policy.first_window_chars,
                "window_growth": policy.window_growth,
                "overlap_chars": policy.overlap_chars,
                "runs": len(mine),
                "errors": len(mine) - len(ok),
                "error_messages": sorted({secrets.scrub(r.error or "") for r in mine if r.error})[:MAX_ERRORS_LISTED],
                "paired_runs": len(paired),
                "no_text_runs": sum(1 for r in ok if r.ttft is None),
                "ttft_ms": distribution([1000 * r.ttft for r in ok if r.ttft is not None]),
                "total_ms": distribution([1000 * (r.total or 0.0) for r in ok]),
                "ttft_added_ms": distribution(
                    [1000 * (g.ttft - w.ttft) for g, w in paired if g.ttft is not None and w.ttft is not None]
                ),
                # Over runs that were not cut off: a cut-off ends the stream early.
                "total_added_ms": distribution(
                    [
                        1000 * ((g.total or 0.0) - (w.total or 0.0))
                        for g, w in paired
                        if g.finish_reason != "content_filter"
                    ]
                ),
                "moderation_round_trip_ms": distribution([1000 * t for r in ok for t in r.round_trips]),
                "completion_tokens": tokens,
                "moderation_calls": calls,
                "moderation_calls_per_1k_tokens": per_1k(calls, tokens),
                "moderated_tokens": moderated,
                "moderated_tokens_per_1k_tokens": per_1k(moderated, tokens),
                "flagged_runs": len(flagged),
                "flags": sum(r.flags for r in ok),
                "flag_categories": dict(Counter(c for r in ok for c in r.categories).most_common()),
                "cut_off_runs": sum(1 for r in ok if r.finish_reason == "content_filter"),
                "leaked_chars": distribution([float(r.leaked_chars) for r in flagged]),
                "leaked_chars_total": sum(r.leaked_chars for r in ok),
                "runs_with_leak": sum(1 for r in ok if r.leaked_chars),
            }
        )
    return {
        "raw": {
            "runs": len(raw),
            "errors": len(raw) - len(raw_ok),
            "error_messages": sorted({secrets.scrub(r.error or "") for r in raw.values() if r.error})[
                :MAX_ERRORS_LISTED
            ],
            "ttft_ms": distribution([1000 * r.ttft for r in raw_ok if r.ttft is not None]),
            "total_ms": distribution([1000 * (r.total or 0.0) for r in raw_ok]),
            "completion_tokens": sum(r.completion_tokens for r in raw_ok),
        },
        "policies": rows,
    }


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The summary table: one row per variant."""
    head = [
        "policy",
        "runs",
        "TTFT added ms",
        "total added ms",
        "moderation RTT ms",
        "calls /1k tok",
        "moderated tok /1k tok",
        "flagged runs",
        "leaked chars",
        "errors",
    ]
    rows = []
    for p in results["policies"]:
        leak = p["leaked_chars"]
        rows.append(
            [
                p["label"],
                str(p["runs"]),
                med_p95(p["ttft_added_ms"]),
                med_p95(p["total_added_ms"]),
                med_p95(p["moderation_round_trip_ms"], 1),
                fmt(p["moderation_calls_per_1k_tokens"], 1),
                fmt(p["moderated_tokens_per_1k_tokens"], 0),
                f"{p['flagged_runs']}/{p['runs'] - p['errors']}",
                "-" if not leak["n"] else f"{fmt(leak['median'])} [max {fmt(leak['max'])}]",
                str(p["errors"]),
            ]
        )
    return head, rows


def charts(results: dict[str, Any], round_trips: Sequence[Sequence[float]], out: Path) -> list[str]:
    """``added_latency.png`` and ``moderation_round_trip.png`` (``round_trips``: ms per call, per variant)."""
    plt = pyplot()
    rows = results["policies"]
    labels = [p["label"] for p in rows]
    names = []

    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.6 * len(rows) + 3), 4.2))
    for ax, key, title in (
        (axes[0], "ttft_added_ms", "time to first token added"),
        (axes[1], "total_added_ms", "total time added"),
    ):
        med = [_num(p[key]["median"]) for p in rows]
        up = [max(0.0, _num(p[key]["p95"]) - _num(p[key]["median"])) for p in rows]
        colors = ["tab:blue" if p["mode"] == "holdback" else "tab:orange" for p in rows]
        ax.bar(range(len(rows)), med, yerr=[[0.0] * len(up), up], capsize=4, color=colors)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_ylabel("ms over the raw stream (median; bar to p95)")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{results['settings']['model']}: what the guard adds ({results['settings']['moderator']['name']})")
    names.append(save_chart(fig, out, "added_latency.png"))

    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.5))
    if any(round_trips):
        ax.boxplot([list(s) or [math.nan] for s in round_trips], whis=(5, 95), showfliers=False)
        ax.set_xticks(range(1, len(rows) + 1))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("ms per call (box: quartiles, whiskers: p5-p95)")
    ax.set_title("Moderation round trips")
    ax.grid(axis="y", alpha=0.3)
    names.append(save_chart(fig, out, "moderation_round_trip.png"))
    return names


def _num(value: float | None) -> float:
    return 0.0 if value is None else float(value)


def run_upstream_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``bench --upstream``: measure, then write ``results.json``, charts, ``report.html`` and the table."""
    import anyio
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    settings = settings_from(args)
    info = moderator_info(args)
    require_key(UPSTREAM_KEY_VARS, "--upstream")  # before anything is drawn: a one-line error
    if info.kind == "openai":
        require_key(MODERATION_KEY_VARS, "--moderator openai")
    secrets = Secrets.from_env()
    out: Path = args.out
    make_out(out)
    pyplot()  # fail early without matplotlib
    total = 1 + settings.repeats * len(settings.prompts) * (1 + len(settings.variants))
    started = time.perf_counter()
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as progress:
        task = progress.add_task("warming up", total=total)

        def tick(what: str) -> None:
            progress.update(task, advance=1, description=what)

        runs = anyio.run(measure, settings, args, secrets, tick, backend="asyncio")
    results: dict[str, Any] = {
        "meta": {**meta(), "seconds": round(time.perf_counter() - started, 2)},
        "settings": {
            "upstream": public_url(settings.upstream),
            "model": settings.model,
            "moderator": info.as_dict(),
            "prompts": len(settings.prompts),
            "prompts_file": settings.prompts_file,
            "policies": sorted({f"{v.mode}:{v.action}" for v in settings.variants}),
            "windows": sorted({v.window_chars for v in settings.variants}),
            "repeats": settings.repeats,
            "concurrency": settings.concurrency,
            "max_tokens": settings.max_tokens,
            "seed": settings.seed,
        },
        **summarise(settings, runs, secrets),
    }
    round_trips = [
        [1000 * t for r in runs if r.variant == v and r.error is None for t in r.round_trips] for v in settings.variants
    ]
    results["charts"] = charts(results, round_trips, out)
    results["report"] = "report.html"
    write_json(out / "results.json", results, secrets)
    head, rows = table_rows(results)
    raw = results["raw"]
    intro = [
        f"{settings.model} at {results['settings']['upstream']}; moderator {info.name}"
        + (f" ({info.model} at {info.base_url})" if info.kind == "openai" else ""),
        f"{len(settings.prompts)} prompts x {settings.repeats} repeats, concurrency {settings.concurrency}; "
        f"raw stream: TTFT {med_p95(raw['ttft_ms'])} ms, total {med_p95(raw['total_ms'])} ms (median [p95]); "
        f"{raw['errors']} raw errors; {results['meta']['seconds']} s.",
        "Added = guarded minus the raw run of the same round (median [p95]); total added counts only the runs "
        "that were not cut off.",
    ]
    page = html_page(
        "streamguard bench: your stack", intro, [("Per policy", head, rows)], [out / c for c in results["charts"]]
    )
    (out / "report.html").write_text(secrets.scrub(page), encoding="utf-8")
    console = summary_console()
    console.print(rich_table("streamguard bench --upstream (median [p95])", head, rows))
    for line in intro:
        console.print(secrets.scrub(line), markup=False, soft_wrap=True)
    for row in results["policies"]:
        for message in row["error_messages"]:
            console.print(f"{row['label']}: {message}", markup=False, soft_wrap=True)
    console.print(f"wrote {out / 'results.json'}, {out / 'report.html'} and {len(results['charts'])} charts")
    return results
