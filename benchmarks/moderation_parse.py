"""Cost of reading a Moderation response: strict pydantic validation vs openai's generic parser.

Both sides start from the same JSON bytes (``--results`` results of the 13 omni-moderation
categories) and end with streamguard verdicts:

- ``strict``: :func:`streamguard.moderation.openai.parse_moderation` (one pydantic-core
  ``validate_json`` call with strict bools and finite numbers);
- ``generic``: what ``raw.parse()`` did before: ``json.loads``, openai's ``construct_type``
  (the client's default, non-validating path) into ``ModerationCreateResponse``, then a verdict
  from each result's ``to_dict()``.

Usage::

    python benchmarks/moderation_parse.py [--results 1 32] [--repeats 30] [--loops 200]

Each repeat times ``--loops`` parses of each side, interleaved; medians and p95 per parse.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from openai._models import construct_type
from openai.types import ModerationCreateResponse

from streamguard.moderation import Verdict
from streamguard.moderation.openai import parse_moderation

CATEGORIES = [
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
]


def body(results: int) -> bytes:
    result = {
        "flagged": False,
        "categories": dict.fromkeys(CATEGORIES, False),
        "category_scores": {c: 0.0001 * (i + 1) for i, c in enumerate(CATEGORIES)},
        "category_applied_input_types": {c: ["text"] for c in CATEGORIES},
    }
    return json.dumps({"id": "modr-1", "model": "omni-moderation-latest", "results": [result] * results}).encode()


def generic(raw: bytes) -> list[Verdict]:
    parsed: Any = construct_type(type_=ModerationCreateResponse, value=json.loads(raw))
    out = []
    for r in parsed.results:
        categories = {k: v for k, v in r.categories.to_dict().items() if isinstance(v, bool)}
        scores = {k: float(v) for k, v in r.category_scores.to_dict().items() if isinstance(v, int | float)}
        out.append(Verdict(flagged=bool(r.flagged), categories=categories, scores=scores))
    return out


def per_call(fn: Callable[[bytes], list[Verdict]], raw: bytes, loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        fn(raw)
    return (time.perf_counter() - start) / loops


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--loops", type=int, default=200)
    args = parser.parse_args(argv)
    for n in args.results:
        raw = body(n)
        assert parse_moderation(raw) == generic(raw)
        times: dict[str, list[float]] = {"strict": [], "generic": []}
        for _ in range(args.repeats):
            times["strict"].append(per_call(parse_moderation, raw, args.loops))
            times["generic"].append(per_call(generic, raw, args.loops))
        med = {k: statistics.median(v) for k, v in times.items()}
        p95 = {k: statistics.quantiles(v, n=20)[-1] for k, v in times.items()}
        print(
            f"results={n:3d}  strict median {med['strict'] * 1e6:8.1f} us (p95 {p95['strict'] * 1e6:8.1f})"
            f"  generic median {med['generic'] * 1e6:8.1f} us (p95 {p95['generic'] * 1e6:8.1f})"
            f"  generic/strict {med['generic'] / med['strict']:.1f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
