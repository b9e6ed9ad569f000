"""The ``streamguard`` command through its real entry point (``python -m streamguard``), offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORDING = ROOT / "tests" / "fixtures" / "cli" / "cc_gpt4o_plain_text.sse"
RECORDED_TEXT = (
    "I'm unable to provide real-time weather updates. To get the current weather in San Francisco, "
    "I recommend checking a reliable weather website or a weather app."
)
LABELLED = ROOT / "tests" / "fixtures" / "cli" / "xstest_sample.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def streamguard(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the command offline: no API key, output piped (not a terminal)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "STREAMGUARD_DEBUG")}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "streamguard", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )


def flat(text: str) -> str:
    """Whitespace collapsed, so wrapping does not matter."""
    return " ".join(text.split())


def test_demo_offline_cuts_off_the_flagged_passage() -> None:
    """The offline demo exits 0 and shows the profanity flag and the cut-off; nothing after it."""
    result = streamguard("demo", "--delay", "0.002")
    assert result.returncode == 0, result.stderr
    out = flat(result.stdout)
    assert "Traceback" not in result.stderr
    assert "cut off: profanity" in out
    assert "content_filter" in out
    assert "Caught: 1 window(s) flagged (profanity" in out
    assert "Here is a short story about a lighthouse keeper" in out
    assert "bastard" not in out  # the flagged window was held back
    assert "oranges" not in out  # the answer ended at the cut
    assert "time to first token" in out


def test_demo_offline_redacts_with_the_keyword_moderator() -> None:
    """With --action redact the flagged window is replaced and the rest of the answer follows."""
    result = streamguard("demo", "--delay", "0.002", "--action", "redact", "--moderator", "keyword", "--no-color")
    assert result.returncode == 0, result.stderr
    out = flat(result.stdout)
    assert "[redacted]" in out
    assert "bastard" not in out
    assert "fog, ship safe, oranges." in out
    assert "redacted as '[redacted]'" in out


def test_demo_stream_first_reports_what_was_shown() -> None:
    """In stream-first mode the flagged text was shown before its verdict, and the report counts it."""
    result = streamguard("demo", "--delay", "0.002", "--mode", "stream_first", "--window", "120")
    assert result.returncode == 0, result.stderr
    out = flat(result.stdout)
    assert "[shown, then flagged:" in out
    assert "flagged characters had already been shown" in out


def test_replay_prints_the_recorded_text() -> None:
    """A recorded Chat Completions stream, sent event by event, is printed whole with its usage."""
    result = streamguard("replay", str(RECORDING), "--speed", "5")
    assert result.returncode == 0, result.stderr
    out = flat(result.stdout)
    assert RECORDED_TEXT in out
    assert "finish_reason: stop" in out
    assert "prompt 14, completion 30, total 44 (upstream)" in out


def test_replay_with_keywords_cuts_off() -> None:
    """--keywords moderates with the keyword moderator: the recorded answer is cut at its first window."""
    result = streamguard("replay", str(RECORDING), "--speed", "0", "--keywords", "unable")
    assert result.returncode == 0, result.stderr
    out = flat(result.stdout)
    assert "finish_reason: content_filter" in out
    assert "cut off: keyword" in out
    assert "weather app" not in out


def test_bench_smoke_writes_results_and_charts(tmp_path: Path) -> None:
    """The benchmark writes results.json with every section, PNG charts and a summary."""
    out = tmp_path / "bench"
    result = streamguard("bench", "--smoke", "--out", str(out), timeout=180)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert {"meta", "cpu", "latency", "leak", "calls_per_1k_tokens", "batching", "timeline", "charts"} <= set(results)
    assert results["cpu"]["ratio"]["n"] >= 1
    assert {row["mode"] for row in results["latency"]} == {"raw", "holdback", "stream_first"}
    assert all(row["leaked_chars"]["max"] > 0 for row in results["leak"])
    assert [row["streams"] for row in results["batching"]] == [1, 10, 100]
    assert all(row["windows"] > 0 and row["http_requests"] > 0 for row in results["batching"])
    assert [row["window"] for row in results["timeline"]] == list(range(len(results["timeline"])))
    assert len(results["charts"]) >= 2
    for name in results["charts"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert (out / "summary.md").read_text(encoding="utf-8").startswith("# streamguard benchmark")


def test_demo_with_model_but_no_key_exits_2() -> None:
    """--model needs OPENAI_API_KEY: without it, one line on stderr and exit code 2."""
    result = streamguard("demo", "--model", "gpt-4o-mini", "Tell me a story")
    assert result.returncode == 2
    assert "OPENAI_API_KEY" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("make", "args", "code", "message"),
    [
        (None, ("replay", "no-such-file.sse"), 1, "no such file"),
        ("hello, not SSE\n", ("replay",), 1, "malformed recording"),
        ('data: {"choices": [\n\n', ("replay",), 1, "not valid JSON"),
        ("data: [1, 2]\n\n", ("replay",), 1, "not a JSON object"),
        (b"\xff\xfe data", ("replay",), 1, "not UTF-8"),
        ("event: response.created\ndata: {}\n\n", ("replay",), 2, "Responses API recordings are not supported yet"),
        (None, ("demo", "--window", "abc"), 2, "not an integer"),
        (None, ("demo", "--mode", "fast"), 2, "invalid choice"),
        (None, ("demo", "--window", "8", "--first-window", "10"), 2, "first_window_chars"),
        (None, ("replay", str(RECORDING), "--speed", "-1"), 2, "must be >= 0"),
        (None, ("replay", str(RECORDING), "--moderator", "keyword"), 2, "needs --keywords"),
        (None, ("bench", "--quiet"), 2, "unrecognized arguments"),
        (None, ("bench", "--repeats", "3"), 2, "--repeats goes with --upstream URL"),
        (None, ("bench", "--upstream", "http://127.0.0.1:9/v1"), 2, "--upstream needs --model"),
        (None, ("bench", "--upstream", "http://127.0.0.1:9/v1", "--model", "m", "--quick"), 2, "--quick is for the"),
        (None, ("bench", "--upstream", "http://127.0.0.1:9/v1", "--model", "m", "--windows", "60,0"), 2, ">= 1"),
        (None, ("bench", "--upstream", "http://127.0.0.1:9/v1", "--model", "m", "--policies", "fast"), 2, "policy"),
        (None, ("bench", "--upstream", "http://127.0.0.1:9/v1", "--model", "m"), 2, "needs an API key"),
        (None, ("eval",), 2, "--data"),
        (None, ("eval", "--data", "no-such-file.jsonl"), 1, "no such file"),
        ('{"text": "hi", "flagged": true}\n{"text": 1}\n', ("eval", "--data"), 1, ":2: expected"),
        (None, ("eval", "--data", str(LABELLED), "--keywords", "kill"), 2, "--keywords goes with --moderator keyword"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(
    tmp_path: Path, make: str | bytes | None, args: tuple[str, ...], code: int, message: str
) -> None:
    """Bad arguments and bad files end with a one-line message and a non-zero exit code, no traceback."""
    argv = list(args)
    if make is not None:
        path = tmp_path / "recording.sse"
        if isinstance(make, bytes):
            path.write_bytes(make)
        else:
            path.write_text(make, encoding="utf-8")
        argv.append(str(path))
    result = streamguard(*argv)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr


def test_serve_is_wired_into_the_cli() -> None:
    """`streamguard serve` exists and rejects a missing --upstream with a one-line error."""
    result = subprocess.run(
        [sys.executable, "-m", "streamguard", "serve"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "--upstream" in result.stderr and "Traceback" not in result.stderr
