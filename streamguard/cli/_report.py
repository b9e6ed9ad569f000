"""What ``bench --upstream`` and ``eval`` share for their output: statistics, JSON, charts and an offline HTML page."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import CLIError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ._moderators import Secrets


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """Median, p95 and p99 (nearest rank), mean, min, max and count; ``None`` values when empty."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return {"median": None, "p95": None, "p99": None, "mean": None, "min": None, "max": None, "n": 0}

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {
        "median": round(statistics.median(ordered), 3),
        "p95": round(rank(0.95), 3),
        "p99": round(rank(0.99), 3),
        "mean": round(statistics.fmean(ordered), 3),
        "min": round(ordered[0], 3),
        "max": round(ordered[-1], 3),
        "n": len(ordered),
    }


def per_1k(count: float, tokens: int) -> float | None:
    """``count`` per 1,000 ``tokens`` (``None`` without tokens)."""
    return 1000 * count / tokens if tokens else None


def meta() -> dict[str, Any]:
    """Where and when it ran."""
    import openai

    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "openai": openai.__version__,
    }


def make_out(out: Path) -> None:
    """Create the output directory, or a one-line error."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create {out}: {exc.strerror}") from None


def write_json(path: Path, results: dict[str, Any], secrets: Secrets) -> None:
    """``results`` as indented JSON, with every key scrubbed out."""
    path.write_text(secrets.scrub(json.dumps(results, indent=2, allow_nan=False)) + "\n", encoding="utf-8")


def save_chart(fig: Figure, out: Path, name: str) -> str:
    """Save a matplotlib figure as ``out/name`` (PNG) and close it; returns ``name``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed), or a one-line error if missing."""
    try:
        import matplotlib
    except ImportError:
        raise CLIError("charts need matplotlib: pip install 'streamguard[bench]'", code=2) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt(value: float | int | None, digits: int = 0) -> str:
    """A number for a table; ``-`` for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text  # no "-0"


def med_p95(dist: dict[str, Any] | None, digits: int = 0) -> str:
    """``median [p95]`` of a :func:`distribution`."""
    if not dist or not dist.get("n"):
        return "-"
    return f"{fmt(dist['median'], digits)} [{fmt(dist['p95'], digits)}]"


def html_page(
    title: str, intro: Sequence[str], tables: Sequence[tuple[str, list[str], list[list[str]]]], charts: Sequence[Path]
) -> str:
    """A self-contained HTML report: inline CSS, charts as ``data:`` URIs, no scripts, no external links."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:1em 0}"
        "p.meta{color:#555;font-size:13px}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts += [f'<p class="meta">{html.escape(line)}</p>' for line in intro]
    for caption, head, rows in tables:
        parts.append(f"<h2>{html.escape(caption)}</h2><table><thead><tr>")
        parts += [f"<th>{html.escape(h)}</th>" for h in head]
        parts.append("</tr></thead><tbody>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
        parts.append("</tbody></table>")
    for chart in charts:
        data = base64.b64encode(chart.read_bytes()).decode("ascii")
        parts.append(f'<img alt="{html.escape(chart.stem)}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def rich_table(title: str, head: list[str], rows: list[list[str]]) -> Any:
    """The same table for the terminal (cells are plain text, never markup)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), title_justify="left")
    for i, name in enumerate(head):
        table.add_column(Text(name), justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    return table


def console() -> Any:
    """A console for the summary: wide enough for the tables when the output is not a terminal."""
    from rich.console import Console

    probe = Console()
    return probe if probe.is_terminal else Console(width=200, highlight=False)
