"""Latency, CPU, leak, call-count and batching benchmarks: ``python benchmarks/latency.py --quick``.

A thin script over ``streamguard.cli._bench`` (the same code ``streamguard bench`` runs), so an
installed package can run the suite without this checkout.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from streamguard.cli._bench import run_suite


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shorter streams")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output directory")
    args = parser.parse_args(argv)
    run_suite(args.out, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
