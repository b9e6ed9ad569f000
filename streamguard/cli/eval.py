"""``streamguard eval --data FILE.jsonl``: a moderator's precision, recall and latency on labelled texts,
whole and windowed through the real guard.

The measuring part is importable: ``from streamguard.cli.eval import evaluate, load_samples, eval_policy``
(``evaluate`` is a coroutine; see ``streamguard.cli._eval``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ._common import non_negative_int, positive_int
from ._eval import Sample, eval_policy, evaluate, load_samples
from ._moderators import MODERATION_KEY_VARS, add_moderator_args

__all__ = ["Sample", "add_parser", "eval_policy", "evaluate", "load_samples", "run"]


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``eval``."""
    parser = sub.add_parser(
        "eval",
        help="a moderator's precision/recall on labelled texts, whole and windowed through the guard",
        description="Judge labelled texts (JSON lines: text, flagged, labels) with one moderator, whole and "
        "streamed word by word through the guard; report precision, recall and F1 of both, the windowed recall "
        "against whole texts, per labelled category, latency per window and a threshold sweep. A key for "
        f"--moderator openai comes from {' or '.join(MODERATION_KEY_VARS)}.",
    )
    parser.add_argument("--data", type=Path, required=True, metavar="FILE.jsonl", help="labelled texts")
    parser.add_argument("--out", type=Path, default=Path("eval-results"), help="output directory")
    parser.add_argument("--limit", type=positive_int, help="a seeded random sample of this many texts (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --limit's sample")
    parser.add_argument("--concurrency", type=positive_int, default=32, help="texts in flight at once (default 32)")
    windows = parser.add_argument_group("windows (the rest is Policy()'s)")
    windows.add_argument("--window", type=positive_int, default=240, help="window_chars (default 240)")
    windows.add_argument("--first-window", type=positive_int, help="first_window_chars (default Policy()'s)")
    windows.add_argument("--overlap", type=non_negative_int, help="overlap_chars (default Policy()'s)")
    add_moderator_args(parser.add_argument_group("moderator"), default="local")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``streamguard eval``; returns the exit code."""
    import anyio
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ._moderators import Secrets, moderator_info, open_moderator, require_key
    from ._report import console, html_page, make_out, meta, pyplot, rich_table, write_json

    info = moderator_info(args)
    if info.kind == "openai":
        require_key(MODERATION_KEY_VARS, "--moderator openai")  # before anything is drawn
    policy = eval_policy(window=args.window, first_window=args.first_window, overlap=args.overlap)
    samples = load_samples(args.data, limit=args.limit, seed=args.seed)
    make_out(args.out)
    pyplot()  # fail early without matplotlib
    secrets = Secrets.from_env()
    started = time.perf_counter()
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as progress:
        task = progress.add_task("loading the moderator", total=2 * len(samples))

        def tick(what: str) -> None:
            progress.update(task, advance=1, description=what)

        async def go() -> dict[str, Any]:
            async with open_moderator(args, secrets) as moderator:
                return await evaluate(moderator, samples, policy=policy, concurrency=args.concurrency, tick=tick)

        measured = anyio.run(go, backend="asyncio")
    results: dict[str, Any] = {
        "meta": {**meta(), "seconds": round(time.perf_counter() - started, 2)},
        "settings": {
            "data": str(args.data),
            "limit": args.limit,
            "seed": args.seed,
            "moderator": info.as_dict(),
            "policy": {
                "mode": policy.mode,
                "action": policy.action,
                "window_chars": policy.window_chars,
                "first_window_chars": policy.first_window_chars,
                "window_growth": policy.window_growth,
                "overlap_chars": policy.overlap_chars,
                "flush_after": policy.flush_after,
            },
            "concurrency": args.concurrency,
        },
        **measured,
    }
    results["charts"] = _charts(results, args.out)
    results["report"] = "report.html"
    write_json(args.out / "results.json", results, secrets)
    tables = _tables(results)
    intro = _intro(results)
    page = html_page("streamguard eval", intro, tables, [args.out / c for c in results["charts"]])
    (args.out / "report.html").write_text(secrets.scrub(page), encoding="utf-8")
    out = console()
    for caption, head, rows in tables:
        out.print(rich_table(caption, head, rows))
    for line in intro:
        out.print(secrets.scrub(line), markup=False, soft_wrap=True)
    out.print(f"wrote {args.out / 'results.json'}, {args.out / 'report.html'} and {len(results['charts'])} charts")
    return 0


def _intro(results: dict[str, Any]) -> list[str]:
    s = results["settings"]
    p = s["policy"]
    m = s["moderator"]
    lat = results["latency_ms"]
    return [
        f"{results['n']} texts ({results['positives']} flagged by their labels) from {s['data']}; moderator "
        f"{m['name']}" + (f" ({m['model']} at {m['base_url']})" if m["kind"] == "openai" else ""),
        f"windows: {p['window_chars']} chars (first {p['first_window_chars']}, growth {p['window_growth']:g}, "
        f"overlap {p['overlap_chars']}); {results['windowed']['windows']} windows judged; "
        f"latency per window {_mp(lat['window'])} ms, per whole text {_mp(lat['whole_text'])} ms (median [p95]); "
        f"{results['meta']['seconds']} s.",
        f"recall of windowed vs whole: {_f(results['recall_vs_whole'])}; windowed flags on texts whole did not "
        f"flag: {_f(results['false_flag_rate'])}.",
    ]


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _mp(dist: dict[str, Any]) -> str:
    from ._report import med_p95

    return med_p95(dist, 1)


def _tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    head = ["run", "precision", "recall", "F1", "flagged", "tp", "fp", "fn", "tn"]
    rows = []
    for name in ("whole", "windowed"):
        r = results[name]
        rows.append(
            [name, _f(r["precision"]), _f(r["recall"]), _f(r["f1"])]
            + [str(r[k]) for k in ("flagged", "tp", "fp", "fn", "tn")]
        )
    tables = [("streamguard eval: against the labels", head, rows)]
    categories = results["categories"]
    if categories:
        cat_rows = [
            [
                name,
                str(c["annotated"]),
                str(c["positives"]),
                _f(c["whole_recall"]),
                _f(c["windowed_recall"]),
                _f(c["recall_vs_whole"]),
            ]
            for name, c in categories.items()
        ]
        tables.append(
            (
                "per labelled category",
                ["category", "annotated", "positives", "whole recall", "windowed recall", "windowed vs whole"],
                cat_rows,
            )
        )
    sweep = results["threshold_sweep"]
    if sweep:
        sweep_rows = [
            [
                f"{row['threshold']:.2f}",
                _f(row["whole"]["precision"]),
                _f(row["whole"]["recall"]),
                _f(row["whole"]["f1"]),
                _f(row["windowed"]["precision"]),
                _f(row["windowed"]["recall"]),
                _f(row["windowed"]["f1"]),
            ]
            for row in sweep["rows"]
            if round(row["threshold"] * 100) % 10 == 0 or row in (sweep["best_whole"], sweep["best_windowed"])
        ]
        tables.append(
            (
                "threshold sweep (flag when the highest category score >= threshold)",
                ["threshold", "P whole", "R whole", "F1 whole", "P windowed", "R windowed", "F1 windowed"],
                sweep_rows,
            )
        )
    return tables


def _charts(results: dict[str, Any], out: Path) -> list[str]:
    from ._report import pyplot, save_chart

    plt = pyplot()
    sweep = results["threshold_sweep"]
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(11 if sweep else 5.5, 4.2), squeeze=False)
    ax = axes[0][0]
    metrics = ("precision", "recall", "f1")
    for offset, (name, color) in enumerate((("whole", "tab:blue"), ("windowed", "tab:orange"))):
        xs = [i + (offset - 0.5) * 0.38 for i in range(len(metrics))]
        ax.bar(xs, [results[name][m] for m in metrics], width=0.38, color=color, label=name)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"against the labels (n={results['n']})")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    if sweep:
        ax = axes[0][1]
        ts = [row["threshold"] for row in sweep["rows"]]
        for name, style in (("whole", "-"), ("windowed", "--")):
            for metric, color in (("precision", "tab:green"), ("recall", "tab:red"), ("f1", "tab:purple")):
                ax.plot(ts, [row[name][metric] for row in sweep["rows"]], style, color=color, label=f"{metric}, {name}")
        ax.set_xlabel("threshold on the highest category score")
        ax.set_ylim(0, 1.05)
        ax.set_title("threshold sweep")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['settings']['moderator']['name']} on {Path(results['settings']['data']).name}")
    return [save_chart(fig, out, "eval.png")]
