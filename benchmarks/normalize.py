"""Cost of the normalised view (``moderation_view``) of one 240-character window, by kind of text.

Usage::

    python benchmarks/normalize.py [--repeats 30] [--loops 200] [--chars 240]

Each repeat times ``--loops`` views of each text, interleaved; medians and p95 per view.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

from streamguard.moderation.normalize import moderation_view

TEXTS = {
    "ascii": "plain english text about gardens and rivers. ",
    "japanese": "今日はいい天気ですね、散歩に行きましょう。",
    "russian": "привет, как дела у тебя сегодня? всё хорошо. ",
    "french": "café crème brûlée à la française, très bon. ",
    "disguised": "the b\u200bo\u0301m\u00adb and a \u0431\u043emb here. ",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--loops", type=int, default=200)
    parser.add_argument("--chars", type=int, default=240)
    args = parser.parse_args(argv)
    windows = {name: (text * (args.chars // len(text) + 1))[: args.chars] for name, text in TEXTS.items()}
    moderation_view("warm\u200bup")  # loads the confusables table
    times: dict[str, list[float]] = {name: [] for name in windows}
    for _ in range(args.repeats):
        for name, window in windows.items():
            start = time.perf_counter()
            for _ in range(args.loops):
                moderation_view(window)
            times[name].append((time.perf_counter() - start) / args.loops)
    for name, values in times.items():
        median, p95 = statistics.median(values), statistics.quantiles(values, n=20)[-1]
        print(f"{name:10} median {median * 1e6:7.1f} us  p95 {p95 * 1e6:7.1f} us  per {args.chars}-char window")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
