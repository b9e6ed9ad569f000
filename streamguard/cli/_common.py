"""What the ``streamguard`` commands share: the one-line error, argument types, the policy options."""

from __future__ import annotations

import argparse
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NoReturn

from ..policy import Policy

if TYPE_CHECKING:
    from rich.console import Console


class CLIError(Exception):
    """A one-line error for the user, with the exit code to end with."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (and the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def policy_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("policy")
    group.add_argument("--mode", choices=("holdback", "stream_first"), default="holdback")
    group.add_argument("--action", choices=("cutoff", "redact"), default="cutoff")
    group.add_argument("--window", type=positive_int, default=240, help="window size in characters (default 240)")
    group.add_argument("--first-window", type=positive_int, help="first window's size (default min(16, --window))")
    group.add_argument("--overlap", type=non_negative_int, default=64, help="context characters (default 64)")


def policy_of(args: argparse.Namespace) -> Policy:
    first = args.first_window if args.first_window is not None else min(16, args.window)
    return Policy(
        mode=args.mode,
        action=args.action,
        window_chars=args.window,
        first_window_chars=first,
        overlap_chars=args.overlap,
    )


def number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def seconds(text: str) -> float:
    value = number(text)
    if value < 0 or value > 10:
        raise argparse.ArgumentTypeError(f"must be between 0 and 10 seconds: {text!r}")
    return value


def non_negative(text: str) -> float:
    value = number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def keywords(text: str) -> list[str]:
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise argparse.ArgumentTypeError("give at least one word, e.g. --keywords attack,castle")
    return words


def console_of(args: argparse.Namespace) -> Console:
    from rich.console import Console

    if args.no_color:
        return Console(no_color=True, highlight=False, force_terminal=False)
    return Console(highlight=False)


def run_async(fn: Callable[[], Awaitable[int]]) -> int:
    import anyio

    async def run() -> int:
        return await fn()

    # asyncio: the openai client's own streams are tested there (see tests/conftest.py).
    return anyio.run(run, backend="asyncio")


def describe(policy: Policy) -> str:
    return (
        f"{policy.mode}/{policy.action}, window {policy.window_chars} "
        f"(first {policy.first_window_chars}, overlap {policy.overlap_chars})"
    )


def warm_up_encoding(model: str) -> None:
    """Load the token encoding now: the first stream of a process would otherwise pay for it."""
    from ..usage import count_tokens

    count_tokens("warm up", model)
