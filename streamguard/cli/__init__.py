"""The ``streamguard`` command: ``demo``, ``replay``, ``bench``, ``eval`` and ``serve``.

- ``streamguard demo`` streams a bundled answer from an embedded loopback server (no key, no
  network), guards it through the real ``openai`` client with the offline ``LocalModerator`` and
  shows it live; with ``OPENAI_API_KEY`` and ``--model``/a prompt it does the same against the
  real API with ``OpenAIModerator``.
- ``streamguard serve --upstream URL`` runs the OpenAI-compatible moderating proxy.
- ``streamguard replay FILE.sse`` serves a recorded Chat Completions stream from loopback and
  guards it.
- ``streamguard bench`` runs the benchmark suite (``streamguard.cli._bench``); with ``--upstream URL``
  it measures what the guard adds to your own model and moderator (``streamguard.cli._bench_upstream``).
- ``streamguard eval --data FILE.jsonl`` measures a moderator on labelled texts, whole and windowed
  (``streamguard.cli._eval``).

Errors are one line on stderr: exit code 2 for bad arguments (and what needs a key or is not
supported), 1 for a missing or malformed file and failures while running.

One module per command (``demo``, ``replay``, ``bench``, ``eval``, ``serve``), each with ``add_parser`` and ``run``;
``_common`` holds what they share and ``_render`` the terminal rendering.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from ..exceptions import ConfigError
from . import bench, demo, eval, replay, serve
from ._common import CLIError, Parser

__all__ = ["main"]


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
    from ._moderators import Secrets

    print(f"streamguard {args.command}: error: {Secrets.from_env().scrub(message)}", file=sys.stderr)


def _build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="streamguard", description="Moderate streamed OpenAI chat completions.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    for command in (demo, replay, bench, eval, serve):
        command.add_parser(sub)
    return parser
