"""How close streamguard's estimated usage is to the usage OpenAI recorded, and what counting costs.

    python benchmarks/usage_accuracy.py [--data DIR] [--out results.json] [--runs N]

Each ``cc_*.sse`` recording is replayed chunk by chunk through a :class:`UsageTracker` with its usage
chunk withheld, so the tracker must estimate; the estimate is compared with the recorded usage. The
prompt is taken from ``<name>.request.json`` or, for recordings that store none, from
``known_requests.json`` (in DIR or in ``tests/fixtures/streams``). Prints a markdown table, the match
rate, and the cost of incremental counting against re-encoding the whole text after every delta.

:func:`replay_file` is the reusable piece: one recording in, one result dict out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
from openai import AsyncOpenAI
from openai._models import construct_type
from openai.types.chat import ChatCompletionChunk
from pydantic import ValidationError

from streamguard import KeywordModerator, guard
from streamguard.testing.upstream import LoopbackUpstream, Script
from streamguard.usage import UsageTracker, encoding_for_model

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "streams"
SHARED = ROOT.parent / "shared" / "data" / "streams"


def parse_sse(path: Path) -> list[ChatCompletionChunk]:
    """The ``data:`` events of a recording as chunks (``[DONE]`` skipped).

    Chunks that do not validate (Azure's filter annotations: ``object: ""``, no ``delta``) are
    built leniently, as the ``openai`` client itself does when streaming.
    """
    chunks = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        data = json.loads(line[5:])
        try:
            chunks.append(ChatCompletionChunk.model_validate(data))
        except ValidationError:
            chunks.append(construct_type(type_=ChatCompletionChunk, value=data))  # type: ignore[arg-type]
    return chunks


def load_request(path: Path) -> dict[str, Any] | None:
    """The request of a recording: ``<name>.request.json``, else ``known_requests.json``, else None."""
    stem = path.name.removesuffix(".sse")
    recorded = path.with_name(f"{stem}.request.json")
    if recorded.exists():
        request: dict[str, Any] = json.loads(recorded.read_text(encoding="utf-8"))
        return request
    for folder in (path.parent, FIXTURES):
        known = folder / "known_requests.json"
        if known.exists():
            table: dict[str, dict[str, Any]] = json.loads(known.read_text(encoding="utf-8"))
            if stem in table:
                return table[stem]
    return None


def _mismatch_reasons(result: dict[str, Any], chunks: Sequence[ChatCompletionChunk]) -> list[str]:
    """Why an estimate differs from the recording (known, documented causes)."""
    deltas = [c.delta for chunk in chunks for c in chunk.choices if getattr(c, "delta", None) is not None]
    reasons = []
    if result["estimated_completion"] != result["recorded_completion"]:
        model = str(result["model"])
        if result["reasoning_tokens"]:
            reasons.append(f"{result['reasoning_tokens']} hidden reasoning tokens not in the stream")
        elif model.startswith(("gpt-5", "gpt-6", "o1", "o3", "o4")):
            reasons.append("reasoning model: hidden (reasoning/format) tokens not in the stream")
        if any(d.tool_calls for d in deltas):
            reasons.append("tool-call formatting tokens (recipient, parallel wrapper) not in the stream")
        if any(d.refusal for d in deltas):
            reasons.append("refusal: a formatting token not in the stream")
    if result["estimated_prompt"] is not None and result["estimated_prompt"] != result["recorded_prompt"]:
        if result["has_tools"]:
            reasons.append("prompt: tool definitions are an approximation (cookbook recipe)")
        else:
            reasons.append("prompt: this model's chat format differs from the cookbook recipe")
    return reasons or ["unexplained"]


def replay_file(path: Path | str) -> dict[str, Any]:
    """Replay one recording through a tracker with upstream usage withheld.

    Args:
        path: A ``cc_*.sse`` recording.

    Returns:
        ``file``, ``model``, ``recorded_prompt``/``recorded_completion``/``reasoning_tokens`` (None
        without usage), ``estimated_prompt`` (None without a known request), ``estimated_completion``,
        ``match`` (None without usage; prompt compared only when known) and ``reason``.
    """
    path = Path(path)
    chunks = parse_sse(path)
    request = load_request(path)
    tracker = UsageTracker(
        model=request.get("model") if request else None,
        messages=request["messages"] if request else None,
        tools=request.get("tools") if request else None,
    )
    recorded = None
    for chunk in chunks:
        if chunk.usage is not None:
            recorded = chunk.usage
            chunk = chunk.model_copy(update={"usage": None})
        tracker.observe(chunk)
    estimate = tracker.usage()
    details = recorded.completion_tokens_details if recorded else None
    result: dict[str, Any] = {
        "file": path.name,
        "model": tracker.model,
        "recorded_prompt": recorded.prompt_tokens if recorded else None,
        "recorded_completion": recorded.completion_tokens if recorded else None,
        "reasoning_tokens": (details.reasoning_tokens or 0) if details else 0,
        "estimated_prompt": estimate.prompt_tokens if request else None,
        "estimated_completion": estimate.completion_tokens,
        "has_tools": bool(request and request.get("tools")),
    }
    if recorded is None:
        result["match"], result["reason"] = None, "no usage recorded"
        return result
    prompt_ok = result["estimated_prompt"] is None or result["estimated_prompt"] == result["recorded_prompt"]
    result["match"] = prompt_ok and result["estimated_completion"] == result["recorded_completion"]
    result["reason"] = "" if result["match"] else "; ".join(_mismatch_reasons(result, chunks))
    if result["match"] and request is None:
        result["reason"] = "completion only (prompt not recorded)"
    return result


def _body_without_usage(path: Path) -> bytes:
    """The recording's SSE body with every ``usage`` removed (the guard must synthesize it)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[len("data: ") :])
            if event.get("usage"):
                if not event.get("choices") and not event.get("moderation"):
                    continue  # the include_usage chunk itself
                event["usage"] = None
            line = "data: " + json.dumps(event, separators=(",", ":"))
        out.append(line)
    return ("\n".join(out) + "\n").encode()


async def _guarded_usage(base_url: str, request: dict[str, Any] | None) -> dict[str, int]:
    async with AsyncOpenAI(api_key="offline", base_url=base_url, max_retries=0) as client:
        messages = request["messages"] if request else []
        stream = await client.chat.completions.create(model="gpt-4o", messages=messages, stream=True)
        async with guard(
            stream,
            moderator=KeywordModerator(["never-flagged-in-a-recording"]),
            model=request.get("model") if request else None,
            messages=request["messages"] if request else None,
            tools=request.get("tools") if request else None,
        ) as guarded:
            async for _ in guarded:
                pass
    usage = guarded.report.usage
    assert usage is not None and guarded.report.usage_source == "estimated"
    return {"prompt": usage.prompt_tokens, "completion": usage.completion_tokens}


def replay_through_guard(path: Path | str) -> dict[str, int]:
    """Serve the recording (usage removed) from a loopback server, through the real client and the guard.

    Returns:
        The synthesized ``prompt`` and ``completion`` tokens from the guarded stream's report.
    """
    path = Path(path)
    body = _body_without_usage(path)
    with LoopbackUpstream(chat=lambda request: Script(raw=body)) as upstream:
        return anyio.run(_guarded_usage, upstream.base_url, load_request(path))


def _median_us(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of ``fn`` in microseconds."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def counting_cost(deltas: Sequence[str], model: str, runs: int) -> dict[str, float]:
    """Microseconds per 1,000 tokens: incremental tracker vs re-encoding the whole text per delta."""
    encoding = encoding_for_model(model)
    chunks = [
        ChatCompletionChunk.model_validate(
            {
                "id": "x",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": {"content": d}, "finish_reason": None}],
            }
        )
        for d in deltas
    ]
    tokens = len(encoding.encode_ordinary("".join(deltas)))

    def incremental() -> int:
        tracker = UsageTracker(model=model)
        for chunk in chunks:
            tracker.observe(chunk)
        return tracker.usage().completion_tokens

    def whole() -> int:
        text, count = "", 0
        for chunk in chunks:
            text += chunk.choices[0].delta.content or ""
            count = len(encoding.encode_ordinary(text))
        return count

    assert incremental() == whole() == tokens
    return {
        "tokens": tokens,
        "deltas": len(deltas),
        "incremental_us_per_1k_tokens": _median_us(incremental, runs) * 1000 / tokens,
        "reencode_us_per_1k_tokens": _median_us(whole, runs) * 1000 / tokens,
    }


def _content_deltas(path: Path) -> list[str]:
    """The content deltas of choice 0."""
    return [
        c.delta.content
        for chunk in parse_sse(path)
        for c in chunk.choices
        if c.index == 0 and getattr(c, "delta", None) is not None and c.delta.content
    ]


def _table(results: Sequence[dict[str, Any]]) -> Iterator[str]:
    yield (
        "| file | model | recorded prompt | recorded completion | estimated prompt | estimated completion "
        "| match | reason |"
    )
    yield "| --- | --- | --- | --- | --- | --- | --- | --- |"
    for r in results:
        match = {True: "yes", False: "no", None: "n/a"}[r["match"]]
        cells = [
            f"`{r['file']}`",
            str(r["model"]),
            *("-" if r[k] is None else str(r[k]) for k in ("recorded_prompt", "recorded_completion")),
            *("-" if r[k] is None else str(r[k]) for k in ("estimated_prompt", "estimated_completion")),
            match,
            r["reason"],
        ]
        yield "| " + " | ".join(cells) + " |"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=FIXTURES if FIXTURES.is_dir() else SHARED)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--runs", type=int, default=31, help="timing repetitions (median)")
    args = parser.parse_args(argv)

    files = sorted(args.data.glob("cc_*.sse"))
    if not files:
        print(f"no cc_*.sse recordings in {args.data}", file=sys.stderr)
        return 1
    results = [replay_file(f) for f in files]
    for path, result in zip(files, results, strict=True):
        # The same recording through the real client and the guarded stream, from a loopback server:
        # the report's synthesized usage must be what the tracker estimated.
        guarded = replay_through_guard(path)
        result["guarded_completion"] = guarded["completion"]
        if result["estimated_completion"] != guarded["completion"]:
            print(f"{path.name}: guarded stream estimated {guarded}, tracker {result}", file=sys.stderr)
            return 1
    print("Each recording served with its usage removed from a loopback server through the real openai")
    print("client and the guarded stream; the report's synthesized usage equals the estimate below.\n")
    for line in _table(results):
        print(line)
    compared = [r for r in results if r["match"] is not None]
    matched = sum(bool(r["match"]) for r in compared)
    rate = matched / len(compared) if compared else 0.0
    print(f"\nmatch rate: {matched}/{len(compared)} recordings with usage ({rate:.0%})")

    long_text = args.data / "cc_gpt4o_json_object_long.sse"
    deltas = _content_deltas(long_text) if long_text.exists() else _content_deltas(files[0])
    costs = {
        "recording": counting_cost(deltas, "gpt-4o", args.runs),
        "recording_x10": counting_cost(deltas * 10, "gpt-4o", max(3, args.runs // 5)),
    }
    print("\n| text | tokens | deltas | incremental µs/1k tokens | re-encode per delta µs/1k tokens |")
    print("| --- | --- | --- | --- | --- |")
    for label, c in costs.items():
        print(
            f"| {label} | {c['tokens']:.0f} | {c['deltas']:.0f} | {c['incremental_us_per_1k_tokens']:.0f} "
            f"| {c['reencode_us_per_1k_tokens']:.0f} |"
        )
    if args.out:
        payload = {"data": str(args.data), "results": results, "match_rate": rate, "counting_cost": costs}
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
