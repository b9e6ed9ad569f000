"""The proxy's pure pieces: configuration (flags, file, env), path normalisation, the SSE splitter, the fast encoder."""

from __future__ import annotations

import argparse
import dataclasses
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from streamguard import ConfigError, Policy
from streamguard._sse_parse import SSEParser
from streamguard.integrations.proxy import add_arguments, config_from_args, options_from_args
from streamguard.integrations.proxy._events import EventParser
from streamguard.integrations.proxy.routes import match, normalise


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_every_policy_option_is_a_flag() -> None:
    """Each Policy field but the per-request include_usage has a serve flag that sets it."""
    values: dict[str, list[str]] = {
        "mode": ["--mode", "stream_first"],
        "action": ["--action", "redact"],
        "redaction": ["--redaction", "[x]"],
        "window_chars": ["--window-chars", "100"],
        "first_window_chars": ["--first-window-chars", "8"],
        "window_growth": ["--window-growth", "2.5"],
        "overlap_chars": ["--overlap-chars", "12"],
        "flush_after": ["--flush-after", "0.25"],
        "max_in_flight": ["--max-in-flight", "7"],
        "moderation_timeout": ["--moderation-timeout", "3"],
        "on_error": ["--on-error", "fail_open"],
        "thresholds": ["--threshold", "violence=0.4", "--threshold", "hate=0.2"],
        "ignore_categories": ["--ignore-categories", "sexual"],
        "moderate_input": ["--moderate-input"],
        "input_max_chars": ["--input-max-chars", "500"],
        "close_timeout": ["--close-timeout", "1.5"],
        # Options of the engine rewrite (used once Policy has them).
        "max_held_chars": ["--max-held-chars", "5000"],
        "idle_timeout": ["--idle-timeout", "none"],
        "max_duration": ["--max-duration", "60"],
        "channels": ["--channels", "content", "--channels", "refusal"],
    }
    fields = {f.name for f in dataclasses.fields(Policy)} - {"include_usage"}
    assert fields <= set(values), f"no test value for {fields - set(values)}"
    argv = ["--upstream", "http://up/v1", "--moderator", "keyword", "--keywords", "a,b"]
    for name in sorted(fields):
        argv += values[name]
    policy = config_from_args(parse(*argv)).policy
    default = Policy()
    for name in fields:
        assert getattr(policy, name) != getattr(default, name), name
    assert policy.thresholds == {"violence": 0.4, "hate": 0.2} and policy.ignore_categories == {"sexual"}


def test_config_file_then_flags_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TOML file sets options, flags override it, secrets come from the env variables it names."""
    monkeypatch.setenv("UP_KEY", "sk-up")
    monkeypatch.setenv("MOD_KEY", "sk-mod")
    monkeypatch.setenv("CLIENTS", "c1, c2")
    file = tmp_path / "streamguard.toml"
    file.write_text(
        'upstream = "https://api.example/v1"\nmoderator = "openai"\nupstream_key_env = "UP_KEY"\n'
        'moderation_key_env = "MOD_KEY"\nclient_keys_env = "CLIENTS"\nworkers = 3\naccess_log = false\n'
        'max_connections = 50\nallow_unguarded = ["audio.transcriptions"]\n'
        '[policy]\nwindow_chars = 120\naction = "redact"\nthresholds = { violence = 0.3 }\n'
    )
    args = parse("--config", str(file), "--window-chars", "90", "--port", "9000")
    config = config_from_args(args)
    options = options_from_args(args)
    assert config.upstream == "https://api.example/v1" and config.moderator == "openai"
    assert config.upstream_api_key == "sk-up" and config.moderation_api_key == "sk-mod"
    assert config.client_keys == {"c1", "c2"} and config.max_connections == 50
    assert config.allow_unguarded == {"audio.transcriptions"}
    assert config.policy.window_chars == 90 and config.policy.action == "redact"
    assert config.policy.thresholds == {"violence": 0.3}
    assert (options.workers, options.access_log, options.port) == (3, False, 9000)
    assert "sk-up" not in repr(config) and "sk-mod" not in repr(config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('upstream = "http://x/v1"\nupstream_api_key = "sk-1"\n', "environment variables only"),
        ('upstream = "http://x/v1"\n[policy]\nwindow_size = 3\n', "unknown policy option"),
        ('upstream = "http://x/v1"\n[policy]\nwindow_chars = "big"\n', "must be a number"),
        ('upstream = "http://x/v1"\nupstream_key_env = "SG_TEST_UNSET_VARIABLE"\n', "is not set"),
        ('upstream = "http://x/v1"\nmoderatr = "keyword"\n', "unknown option"),
        ("upstream = [\n", "not valid TOML"),
    ],
)
def test_bad_config_files_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    """Secrets in the file, unknown or mistyped options, unset env variables and bad TOML are ConfigErrors."""
    file = tmp_path / "streamguard.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config_from_args(parse("--config", str(file)))


def test_allow_unguarded_takes_only_refused_routes() -> None:
    """--allow-unguarded rejects a route name that is not refused."""
    with pytest.raises(SystemExit):
        parse("--upstream", "http://x/v1", "--allow-unguarded", "chat.completions")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/v1/models", ("v1", "models")),
        ("/v1/models/../files", ("v1", "files")),
        ("/v1/./models/", ("v1", "models")),
        ("/v1/models/..%2f..%2forganization%2fusage", ("organization", "usage")),  # outside /v1: no route
        ("/v1/models/..%2f..%2f..%2forganization", None),
        ("/v1/models/%252e%252e%252f", None),
        ("/v1/a%5cb", None),
        ("/v1/a%00b", None),
        ("/v1//models", None),
        ("/v1/%ff", None),
        ("/v1/%2e%2e/%2e%2e/x", None),
        ("/v1/%76%31", ("v1", "v1")),
    ],
)
def test_normalise(raw: str, expected: tuple[str, ...] | None) -> None:
    """Paths are decoded once and dot-segment normalised; anything still encoded or climbing out is refused."""
    assert normalise(raw) == expected
    if expected is None or expected[:1] != ("v1",):
        assert match(raw, "GET") is None


def test_event_parser_matches_the_reference_parser_on_any_split() -> None:
    """The bytes splitter gives the same events as the full SSE parser, wherever the body is cut."""
    body = (
        b'\xef\xbb\xbf: comment\r\nevent: response.created\r\ndata: {"a": 1}\r\n\r\n'
        b'data: {"b":\r\ndata:  2}\n\n'
        b'data:{"c":3}\r\rdata: [DONE]\n\n'
        b'id: 7\nretry: 10\ndata: {"\xc3\xa9":4}\n\ndata: {"tail":5}'
    )
    rng = random.Random(7)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(body)), rng.randint(0, 12)))
        parts = [body[i:j] for i, j in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        ours = EventParser()
        reference = SSEParser()
        got: list[Any] = []
        want: list[Any] = []
        for part in parts:
            got += ours.feed(part)
            want += reference.feed(part)
        got += ours.finish()
        want += reference.finish()
        assert [(e.decode() if e else None, d.decode()) for e, d in got] == [(e.event, e.data) for e in want]


async def test_a_chunk_released_unchanged_goes_out_as_its_original_bytes() -> None:
    """The encoder sends the very dict it was given as upstream's bytes, and serialises any other object."""
    import httpx2
    import orjson

    from streamguard.integrations.proxy.shapes import Source, encoder

    odd = b'{"id":"c", "choices" : [{"index":0,"delta":{"content":"Hi"}}],"x":1.50}'
    body = b"data: " + odd + b'\n\ndata: {"id":"d","choices":[]}\n\ndata: [DONE]\n\n'

    async def arrives() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 7):  # in pieces, as from the network
            yield body[i : i + 7]

    response = httpx2.Response(200, content=arrives(), request=httpx2.Request("POST", "http://up/v1/chat/completions"))
    source = Source(response, "chat")
    first = await source.__anext__()
    second = await source.__anext__()
    with pytest.raises(StopAsyncIteration):
        await source.__anext__()
    encode = encoder(source, "chat")
    assert encode(first) == b"data: " + odd + b"\n\n"  # spacing and 1.50 kept: not re-serialised
    edited = {**second, "choices": [{"index": 0, "delta": {"content": "[redacted]"}}]}
    assert encode(edited) == b"data: " + orjson.dumps(edited) + b"\n\n"
    copy = dict(first)  # equal but not the same object: serialised
    assert encode(copy) == b"data: " + orjson.dumps(copy) + b"\n\n"


@pytest.mark.parametrize(
    "delta",
    [
        {"content": "Hello"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "Hi", "refusal": None},
        {"refusal": "I can't"},
        {"content": "a", "refusal": "b"},
        {},
        {"content": "x" * 20_000},
        {"content": "a", "reasoning_content": "think"},
        {"content": "a", "tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{}"}}]},
        {"content": "a", "secret_new_field": "hidden text"},
    ],
)
def test_dict_fast_path_reads_a_delta_as_the_general_path_does(delta: dict[str, Any]) -> None:
    """The fast path for plain content/refusal deltas gives the units the general reader gives."""
    from streamguard._engine.emit import ChatShape

    def chunk() -> dict[str, Any]:
        choice = {"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": None}
        return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}

    fast, general = ChatShape("m"), ChatShape("m")
    fast.dicts = general.dicts = True
    a = fast.units(chunk())
    raw = chunk()
    b = general._dict_choice_general(raw, raw["choices"][0])
    assert [u[1:] for u in a] == [u[1:] for u in b]
    assert fast.dropped == general.dropped


def test_a_serving_worker_freezes_its_startup_objects() -> None:
    """A ``serve`` worker moves what startup built out of the collector's way (``gc.freeze``)."""
    import importlib
    import json
    import os
    import subprocess
    import sys

    serve = importlib.import_module("streamguard.integrations.proxy.serve")  # the module, not the function

    code = (
        "import gc\n"
        "from streamguard.integrations.proxy.serve import app_from_environment\n"
        "before = gc.get_freeze_count()\n"
        "app_from_environment()\n"
        "print(before, gc.get_freeze_count())\n"
    )
    args = ["--upstream", "http://127.0.0.1:9/v1", "--moderator", "keyword", "--keywords", "x", "--no-playground"]
    env = {**os.environ, serve._ARGS_ENV: json.dumps(args)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    before, after = map(int, out.stdout.split())
    assert before == 0 and after > 10_000, out.stdout
