"""``streamguard bench``: the benchmark suite (``streamguard.cli._bench``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import CLIError


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``bench``."""
    bench = sub.add_parser(
        "bench",
        help="run the benchmark suite (JSON, charts, summary)",
        description="Measure CPU overhead, added latency, leaks, moderation calls and batching on loopback.",
    )
    bench.add_argument("--quick", action="store_true", help="fewer repeats and shorter streams (under 2 minutes)")
    bench.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # for the tests: seconds
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``streamguard bench``; returns the exit code."""
    from ._bench import run_suite

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create {args.out}: {exc.strerror}") from None
    run_suite(args.out, quick=args.quick or args.smoke, smoke=args.smoke)
    return 0
