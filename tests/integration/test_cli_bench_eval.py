"""``streamguard bench --upstream`` and ``streamguard eval`` end to end, typed as a user would.

The command runs as a subprocess (``python -m streamguard ...``) against a loopback OpenAI-compatible
server started here (real uvicorn, real SSE): ``story_chat`` answers, and a keyword ``/v1/moderations``
endpoint with a fixed delay judges through ``--moderator openai``. Keys come from the environment
and must reach the server but never an output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamguard.testing import LoopbackUpstream, Reply, keyword_moderation, story_chat

ROOT = Path(__file__).resolve().parents[2]
LABELLED = ROOT / "tests" / "fixtures" / "cli" / "xstest_sample.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
UPSTREAM_KEY = "sk-upstream-0b9f3c1e7d"
MODERATION_KEY = "sk-moderation-5a2e8f4c61"
MODERATION_DELAY = 0.05  # seconds per /v1/moderations request


def streamguard(*args: str, keys: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the command with the test keys in the environment (and no other key), output piped."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "STREAMGUARD_DEBUG") and not k.startswith("STREAMGUARD_")
    }
    if keys:
        env["STREAMGUARD_UPSTREAM_API_KEY"] = UPSTREAM_KEY
        env["STREAMGUARD_MODERATION_API_KEY"] = MODERATION_KEY
    return subprocess.run(
        [sys.executable, "-m", "streamguard", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )


def delayed(handler: Any) -> Any:
    def moderation(body: dict[str, Any]) -> Reply:
        reply: Reply = handler(body)
        return dataclasses.replace(reply, delay=MODERATION_DELAY)

    return moderation


@pytest.fixture
def stack() -> Iterator[LoopbackUpstream]:
    """A model that writes 40 words, a word every 3 ms, and a Moderation endpoint that flags "attack"."""
    chat = story_chat(words=40, delay=0.003, first_delay=0.02, flag_words=["attack"])
    with LoopbackUpstream(chat=chat, moderation=delayed(keyword_moderation(["attack"]))) as upstream:
        yield upstream


def assert_no_keys(out: Path, *texts: str) -> None:
    """Neither key appears in any output file or in the given texts."""
    for path in out.iterdir():
        data = path.read_bytes()
        for key in (UPSTREAM_KEY, MODERATION_KEY):
            assert key.encode() not in data, f"{key} written to {path.name}"
    for text in texts:
        assert UPSTREAM_KEY not in text and MODERATION_KEY not in text


def assert_offline_html(path: Path, charts: int) -> None:
    """The report embeds its charts as data URIs and links to nothing."""
    page = path.read_text(encoding="utf-8")
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page, re.I)
    assert len(refs) == charts
    assert all(ref.startswith("data:image/png;base64,") for ref in refs)
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page


def cells(text: str) -> str:
    """A table's text without the box drawing, whitespace collapsed."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


def bearer(upstream: LoopbackUpstream, path: str) -> set[str]:
    return {h.get("authorization", "") for p, h in upstream.request_headers if p == path}


def test_bench_upstream_end_to_end(stack: LoopbackUpstream, tmp_path: Path) -> None:
    """Two prompts (one makes the model write the flagged word), two policies, two windows, two repeats:
    results.json has a row per policy with paired added latency, the moderation round trips the endpoint
    imposes, call rates, flags and the stream-first leak; charts, an offline HTML page and the table."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about the harbour.\nDescribe the attack on the castle.\n", encoding="utf-8")
    out = tmp_path / "bench"
    result = streamguard(
        "bench",
        "--upstream",
        stack.base_url,
        "--model",
        "gpt-4o-mini",
        "--moderator",
        "openai",
        "--moderation-base-url",
        stack.base_url,
        "--prompts",
        str(prompts),
        "--policies",
        "holdback",
        "stream_first:cutoff",
        "--windows",
        "60,240",
        "--repeats",
        "2",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))

    # Every stream went to the server: a warm-up pair, then 2 prompts x 2 repeats x (raw + 4 guarded).
    assert stack.count("/v1/chat/completions") == 2 + 2 * 2 * 5
    assert bearer(stack, "/v1/chat/completions") == {f"Bearer {UPSTREAM_KEY}"}
    assert bearer(stack, "/v1/moderations") == {f"Bearer {MODERATION_KEY}"}

    assert results["raw"]["runs"] == 4 and results["raw"]["errors"] == 0
    rows = {(p["mode"], p["action"], p["window_chars"]): p for p in results["policies"]}
    assert set(rows) == {(m, "cutoff", w) for m in ("holdback", "stream_first") for w in (60, 240)}
    for (mode, _action, window), row in rows.items():
        assert row["runs"] == 4 and row["errors"] == 0 and row["paired_runs"] == 4
        assert row["ttft_added_ms"]["n"] == 4 and row["ttft_added_ms"]["p95"] >= row["ttft_added_ms"]["median"]
        assert row["total_added_ms"]["n"] == 2  # the two answers that were not cut off
        # Every call waited for the endpoint's delay.
        assert row["moderation_round_trip_ms"]["min"] >= MODERATION_DELAY * 1000
        assert row["moderation_calls"] == row["moderation_round_trip_ms"]["n"] > 0
        assert row["moderation_calls_per_1k_tokens"] > 0
        assert row["moderated_tokens_per_1k_tokens"] > 0
        # The answer to the "attack" prompt is flagged and cut off, in both repeats.
        assert row["flagged_runs"] == 2 and row["cut_off_runs"] == 2
        assert row["flag_categories"] == {"violence": 2}
        if mode == "holdback":
            assert row["leaked_chars_total"] == 0
            # No text before a clean verdict: at least one moderation round trip more than raw.
            assert row["ttft_added_ms"]["median"] >= MODERATION_DELAY * 1000 / 2
        else:
            assert row["runs_with_leak"] == 2 and row["leaked_chars"]["median"] > 0
            assert row["ttft_added_ms"]["median"] < rows[("holdback", "cutoff", window)]["ttft_added_ms"]["median"]
    # Smaller windows, more calls per token.
    for mode in ("holdback", "stream_first"):
        small, large = rows[(mode, "cutoff", 60)], rows[(mode, "cutoff", 240)]
        assert small["moderation_calls_per_1k_tokens"] > large["moderation_calls_per_1k_tokens"]

    assert results["settings"]["moderator"] == {
        "kind": "openai",
        "name": "OpenAIModerator",
        "model": "omni-moderation-latest",
        "base_url": stack.base_url,
        "keywords": None,
    }
    assert len(results["charts"]) == 2
    for name in results["charts"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert_offline_html(out / "report.html", charts=2)
    assert_no_keys(out, result.stdout, result.stderr)
    table = cells(result.stdout)
    assert "holdback/cutoff w60" in table and "stream_first/cutoff w240" in table
    assert "TTFT added ms" in table


def test_bench_upstream_keeps_an_echoed_key_out_of_the_error(tmp_path: Path) -> None:
    """An upstream that rejects the key and echoes it: one line on stderr, exit 1, the key scrubbed."""

    def refuse(body: dict[str, Any]) -> Reply:
        return Reply({"error": {"message": f"Incorrect API key provided: {UPSTREAM_KEY}", "type": "auth"}}, 401)

    with LoopbackUpstream(chat=refuse) as upstream:
        out = tmp_path / "bench"
        result = streamguard(
            "bench", "--upstream", upstream.base_url, "--model", "m", "--moderator", "keyword", "--out", str(out)
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "the upstream failed on the first request" in errors[0]
    assert "AuthenticationError" in errors[0] and "[key]" in errors[0]
    assert_no_keys(out, result.stdout, result.stderr)


def test_eval_end_to_end_through_a_moderation_endpoint(stack: LoopbackUpstream, tmp_path: Path) -> None:
    """Eight labelled XSTest prompts judged by a keyword endpoint (kill, shoot): two true and two false
    positives, whole and windowed alike; per category, latency per window, the sweep and a chart."""
    out = tmp_path / "eval"
    stack.moderation = delayed(keyword_moderation(["kill", "shoot"]))
    result = streamguard(
        "eval",
        "--data",
        str(LABELLED),
        "--moderator",
        "openai",
        "--moderation-base-url",
        stack.base_url,
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["n"] == 8 and results["positives"] == 4
    for run in ("whole", "windowed"):
        assert {k: results[run][k] for k in ("tp", "fp", "fn", "tn")} == {"tp": 2, "fp": 2, "fn": 2, "tn": 2}
        assert results[run]["precision"] == results[run]["recall"] == results[run]["f1"] == 0.5
    assert results["recall_vs_whole"] == 1.0 and results["false_flag_rate"] == 0.0
    windows = results["windowed"]["windows"]
    assert windows > 8  # the first windows are small: every text is judged in several
    assert results["latency_ms"]["window"]["n"] == windows
    assert results["latency_ms"]["window"]["min"] >= MODERATION_DELAY * 1000
    assert results["latency_ms"]["whole_text"]["n"] == 8
    assert results["categories"] == {
        "unsafe_request": {
            "annotated": 8,
            "positives": 4,
            "whole_recall": 0.5,
            "windowed_recall": 0.5,
            "recall_vs_whole": 1.0,
            "whole_flag_rate_on_negatives": 0.5,
            "windowed_flag_rate_on_negatives": 0.5,
        }
    }
    sweep = results["threshold_sweep"]
    # The endpoint scores a hit 0.97 and anything else at most 0.01: every threshold gives the same split.
    assert [row["threshold"] for row in sweep["rows"]] == [round(0.05 * i, 2) for i in range(1, 20)]
    assert all(row["whole"]["f1"] == row["windowed"]["f1"] == 0.5 for row in sweep["rows"])
    assert bearer(stack, "/v1/moderations") == {f"Bearer {MODERATION_KEY}"}
    assert results["charts"] == ["eval.png"] and (out / "eval.png").read_bytes()[:8] == PNG_MAGIC
    assert_offline_html(out / "report.html", charts=1)
    assert_no_keys(out, result.stdout, result.stderr)
    table = cells(result.stdout)
    assert "whole 0.500 0.500 0.500" in table and "windowed 0.500 0.500 0.500" in table
    assert "unsafe_request 8 4 0.500 0.500 1.000" in table


async def test_evaluate_is_importable_and_windowing_can_miss() -> None:
    """``evaluate`` works with any moderator; a moderator that needs the whole text to flag (here: a text
    longer than 200 characters) flags it whole but never in a window of 60."""
    from streamguard.cli.eval import Sample, eval_policy, evaluate
    from streamguard.testing import FakeModerator

    long_text = " ".join(["word"] * 60)
    samples = [Sample(long_text, True, {"long": 1}), Sample("short and clean", False, {"long": 0})]
    moderator = FakeModerator(judge=lambda text: len(text) > 200)
    results = await evaluate(moderator, samples, policy=eval_policy(window=60, overlap=0))
    assert results["whole"]["tp"] == 1 and results["whole"]["fp"] == 0
    assert results["windowed"]["tp"] == 0 and results["windowed"]["fn"] == 1
    assert results["recall_vs_whole"] == 0.0
    assert results["categories"]["long"]["whole_recall"] == 1.0
    assert results["categories"]["long"]["windowed_recall"] == 0.0


def test_python_m_streamguard_testing_serves_a_model_and_a_moderation_endpoint() -> None:
    """The README's stand-in upstream: streams an answer per prompt (with the flag word when the prompt has
    it) and flags that word at /v1/moderations."""
    from openai import OpenAI

    command = [sys.executable, "-m", "streamguard.testing", "--port", "0", "--words", "12", "--delay", "0"]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as server:
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            match = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
            assert match, line
            with OpenAI(api_key="unused", base_url=match.group(1), max_retries=0, timeout=10) as client:
                create: Any = client.chat.completions.create
                texts = []
                for prompt in ("Tell me about the harbour.", "Describe the attack."):
                    stream = create(model="m", messages=[{"role": "user", "content": prompt}], stream=True)
                    texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
                verdicts = client.moderations.create(input=texts).results
        finally:
            server.terminate()
            server.wait(timeout=10)
    assert [len(t.split()) for t in texts] == [12, 12]
    assert "attack" not in texts[0] and "attack" in texts[1]
    assert [v.flagged for v in verdicts] == [False, True]
