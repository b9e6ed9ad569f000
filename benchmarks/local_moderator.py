"""Cost of the offline LocalModerator: load time, latency per window and per batch, memory, install size.

Usage::

    python benchmarks/local_moderator.py [--repeats 50] [--out FILE.json]

- Latency: ``LocalModerator.probabilities`` (embedding, heads and profanity model; no event loop)
  on one thread (onnxruntime runs with one intra-op thread), for a 240-character window alone,
  the same window with the guard's 64 characters of overlap context (304 characters), and
  batches of 16 and 64 such windows. Medians and p95 over ``--repeats`` runs, wall and CPU time.
  CPU time is the figure that does not depend on other load on the machine.
- Memory: resident set size of this process before and after loading the model.
- Install size: bytes on disk of the ``local`` extra's distributions and everything they require
  that the core package does not (from the installed distributions' RECORD files).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from streamguard.moderation import LocalModerator

TEXT = (
    "The committee met on Tuesday to review the budget for the coming year. After a long discussion about "
    "the costs of the new building, they agreed to postpone the decision until the auditors had finished "
    "their report, and to meet again next month with the architects."
)
WINDOW = TEXT[:240]
WITH_CONTEXT = (TEXT + " " + TEXT)[:304]


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _time(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    walls, cpus = [], []
    fn()  # warm-up
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)

    def p95(xs: list[float]) -> float:
        return sorted(xs)[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]

    return {
        "wall_median_ms": statistics.median(walls) * 1000,
        "wall_p95_ms": p95(walls) * 1000,
        "cpu_median_ms": statistics.median(cpus) * 1000,
        "cpu_p95_ms": p95(cpus) * 1000,
    }


def _requirements(name: str, extra: str | None = None) -> set[str]:
    """Names of the distributions ``name`` (with ``extra``) requires directly."""
    out = set()
    for req in metadata.requires(name) or []:
        spec, _, marker = req.partition(";")
        wanted = f'extra == "{extra}"' in marker.replace("'", '"') if extra else "extra ==" not in marker
        if wanted:
            out.add(re.split(r"[\s\[<>=!~(]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-"))
    return out


def _closure(names: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen or name == "streamguard":
            continue
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        todo.extend(_requirements(name))
    return seen


def install_size() -> dict[str, Any]:
    """MiB on disk per distribution the ``local`` extra adds to a core install."""
    extra = _closure(_requirements("streamguard", "local")) - _closure(_requirements("streamguard"))
    sizes = {}
    for name in sorted(extra):
        dist = metadata.distribution(name)
        total = 0
        for f in dist.files or []:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                total += path.stat().st_size
        sizes[name] = round(total / 2**20, 1)
    return {"per_distribution_mib": sizes, "total_mib": round(sum(sizes.values()), 1)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    before = _rss_mib()
    local = LocalModerator()
    start = time.perf_counter()
    local.load()
    loaded = time.perf_counter() - start
    local.probabilities(["warm up"])
    after = _rss_mib()
    rows = {
        "240 chars": _time(lambda: local.probabilities([WINDOW]), args.repeats),
        "240 + 64 context chars": _time(lambda: local.probabilities([WITH_CONTEXT]), args.repeats),
        "batch of 16 x 304 chars": _time(lambda: local.probabilities([WITH_CONTEXT] * 16), max(5, args.repeats // 5)),
        "batch of 64 x 304 chars": _time(lambda: local.probabilities([WITH_CONTEXT] * 64), max(3, args.repeats // 10)),
    }
    size = install_size()
    print(f"load: {loaded:.2f} s; RSS {before:.0f} MiB -> {after:.0f} MiB (+{after - before:.0f} MiB)\n")
    print("| input | wall median ms | wall p95 ms | CPU median ms | CPU p95 ms |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(
            f"| {name} | {r['wall_median_ms']:.1f} | {r['wall_p95_ms']:.1f} | "
            f"{r['cpu_median_ms']:.1f} | {r['cpu_p95_ms']:.1f} |"
        )
    print(f"\ninstall size of the local extra: {size['total_mib']} MiB")
    print(", ".join(f"{k} {v}" for k, v in sorted(size["per_distribution_mib"].items(), key=lambda kv: -kv[1])))
    if args.out:
        payload = {"load_s": loaded, "rss_before_mib": before, "rss_after_mib": after, "latency": rows, "size": size}
        args.out.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
