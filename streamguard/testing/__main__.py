"""``python -m streamguard.testing``: serve the loopback OpenAI-compatible upstream until interrupted.

A stand-in model for trying ``streamguard bench --upstream`` (and the proxy) without an API key:
``/v1/chat/completions`` streams a made-up answer per prompt (:func:`~streamguard.testing.upstream.story_chat`,
a word every ``--delay`` seconds) and ``/v1/moderations`` flags the ``--flag`` words after
``--moderation-latency`` seconds. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .upstream import LoopbackUpstream, Reply, keyword_moderation, story_chat


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until interrupted; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m streamguard.testing", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765; 0: a free one)")
    parser.add_argument("--words", type=int, default=60, help="words per answer (default 60)")
    parser.add_argument("--delay", type=float, default=0.01, help="seconds between words (default 0.01)")
    parser.add_argument("--first-delay", type=float, default=0.1, help="seconds before the first word (default 0.1)")
    parser.add_argument(
        "--flag",
        action="append",
        dest="flag_words",
        help="a word the moderation endpoint flags; a prompt containing it gets it in its answer "
        "(repeatable; default: attack)",
    )
    parser.add_argument(
        "--moderation-latency", type=float, default=0.03, help="seconds per moderation request (default 0.03)"
    )
    args = parser.parse_args(argv)
    words: list[str] = args.flag_words or ["attack"]
    flags = keyword_moderation(words)

    def moderation(body: dict[str, Any]) -> Reply:
        return dataclasses.replace(flags(body), delay=args.moderation_latency)

    chat = story_chat(words=args.words, delay=args.delay, first_delay=args.first_delay, flag_words=words)
    with LoopbackUpstream(chat=chat, moderation=moderation, port=args.port) as upstream:
        sys.stdout.write(f"serving an OpenAI-compatible upstream at {upstream.base_url} (Ctrl-C to stop)\n")
        sys.stdout.flush()
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
