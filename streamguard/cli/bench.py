"""``streamguard bench``: the offline loopback suite (``streamguard.cli._bench``), or with ``--upstream``,
what the guard adds to your own model and moderator (``streamguard.cli._bench_upstream``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import CLIError, positive_int
from ._moderators import MODERATION_KEY_VARS, UPSTREAM_KEY_VARS, add_moderator_args

# Options that only make sense with --upstream (their defaults are None so a stray one is caught).
_UPSTREAM_ONLY = (
    "model",
    "prompts",
    "policies",
    "windows",
    "repeats",
    "concurrency",
    "max_tokens",
    "moderator",
    "moderation_base_url",
    "keywords",
)


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``bench``."""
    from ._bench_upstream import DEFAULT_POLICIES, DEFAULT_WINDOWS, policy_spec, window_list

    bench = sub.add_parser(
        "bench",
        help="benchmark: the offline loopback suite, or --upstream URL for your own model and moderator",
        description="Without --upstream: measure CPU overhead, added latency, leaks, moderation calls and batching "
        "on loopback. With --upstream URL --model M: stream prompts raw and guarded under each policy and window, "
        "interleaved, and report what the guard adds. Keys come from the environment only: "
        f"{' or '.join(UPSTREAM_KEY_VARS)} for the upstream, {' or '.join(MODERATION_KEY_VARS)} for the "
        "Moderation endpoint.",
    )
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    offline = bench.add_argument_group("offline suite (without --upstream)")
    offline.add_argument("--quick", action="store_true", help="fewer repeats and shorter streams (under 2 minutes)")
    offline.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # for the tests: seconds
    mine = bench.add_argument_group("your stack (--upstream)")
    mine.add_argument("--upstream", metavar="URL", help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1")
    mine.add_argument("--model", help="model to stream from (required with --upstream)")
    mine.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help='prompts, one per line, or JSON lines {"prompt": ...} / {"messages": [...]} (default: 5 built in)',
    )
    mine.add_argument(
        "--policies",
        nargs="+",
        type=policy_spec,
        metavar="MODE[:ACTION]",
        help=f"policies to compare (default: {' '.join(DEFAULT_POLICIES)})",
    )
    mine.add_argument(
        "--windows",
        type=window_list,
        metavar="N,N,...",
        help=f"window sizes in characters, each run under every policy (default {','.join(map(str, DEFAULT_WINDOWS))})",
    )
    mine.add_argument("--repeats", type=positive_int, help="rounds per prompt (default 3)")
    mine.add_argument("--concurrency", type=positive_int, help="rounds streaming at once (default 1)")
    mine.add_argument("--max-tokens", type=positive_int, help="max_completion_tokens per request (default: not sent)")
    mine.add_argument("--seed", type=int, default=0, help="seed of the shuffled order within each round")
    add_moderator_args(mine, default=None)
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``streamguard bench``; returns the exit code."""
    if args.upstream:
        from ._bench_upstream import run_upstream_bench

        args.moderator = args.moderator or "openai"
        run_upstream_bench(args)
        return 0
    stray = [name for name in _UPSTREAM_ONLY if getattr(args, name) is not None]
    if stray:
        raise CLIError(f"--{stray[0].replace('_', '-')} goes with --upstream URL", code=2)
    from ._bench import run_suite

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create {args.out}: {exc.strerror}") from None
    run_suite(args.out, quick=args.quick or args.smoke, smoke=args.smoke)
    return 0
