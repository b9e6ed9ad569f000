"""StreamGuardrail's configuration: ``litellm_params`` first, environment variables as the fallback, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# LiteLLM fetches its model cost map from the network at import unless told not to. (No importorskip:
# litellm is in the [dev] extra, and a missing install must fail, not skip.)
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from streamguard import ConfigError, KeywordModerator, OpenAIModerator, Policy
from streamguard.integrations.litellm import OPTIONS, GuardrailConfig, GuardrailStartupError, StreamGuardrail


def test_defaults_are_the_openai_moderator_and_the_safe_policy() -> None:
    """With nothing set: the Moderation endpoint, hold-back, cut-off; usage is left to LiteLLM."""
    config = GuardrailConfig.from_params({}, environ={})
    assert config.moderator == "openai"
    assert config.policy == Policy(include_usage=False)


def test_environment_variables_configure_everything() -> None:
    """Each STREAMGUARD_* variable sets its option."""
    env = {
        "STREAMGUARD_MODERATOR": "keyword",
        "STREAMGUARD_KEYWORDS": "forbidden, secret sauce ,",
        "STREAMGUARD_MODE": "stream_first",
        "STREAMGUARD_ACTION": "redact",
        "STREAMGUARD_REDACTION": "[x]",
        "STREAMGUARD_MODERATION_BASE_URL": "http://127.0.0.1:9/v1",
        "STREAMGUARD_MODERATION_API_KEY": "k",
        "STREAMGUARD_WINDOW_CHARS": "120",
        "STREAMGUARD_FIRST_WINDOW_CHARS": "8",
        "STREAMGUARD_OVERLAP_CHARS": "16",
        "STREAMGUARD_WINDOW_GROWTH": "2.5",
        "STREAMGUARD_FLUSH_AFTER": "0.2",
        "STREAMGUARD_MAX_IN_FLIGHT": "2",
        "STREAMGUARD_MODERATION_TIMEOUT": "3",
        "STREAMGUARD_ON_ERROR": "fail_open",
        "STREAMGUARD_MODERATE_INPUT": "yes",
    }
    config = GuardrailConfig.from_params({}, environ=env)
    assert config.moderator == "keyword"
    assert config.keywords == ("forbidden", "secret sauce")
    assert (config.moderation_base_url, config.moderation_api_key) == ("http://127.0.0.1:9/v1", "k")
    assert config.policy == Policy(
        mode="stream_first",
        action="redact",
        redaction="[x]",
        window_chars=120,
        first_window_chars=8,
        overlap_chars=16,
        window_growth=2.5,
        flush_after=0.2,
        max_in_flight=2,
        moderation_timeout=3.0,
        on_error="fail_open",
        moderate_input=True,
        include_usage=False,
    )


def test_litellm_params_win_over_the_environment() -> None:
    """A ``streamguard_*`` key in litellm_params overrides its variable; YAML types are taken as they are."""
    env = {"STREAMGUARD_MODERATOR": "keyword", "STREAMGUARD_KEYWORDS": "a", "STREAMGUARD_ACTION": "cutoff"}
    params = {
        "streamguard_action": "redact",
        "streamguard_keywords": ["b", "c"],
        "streamguard_window_chars": 60,
        "streamguard_moderate_input": True,
        "action": "block",  # LiteLLM's own field, not ours
        "mode": "post_call",
    }
    config = GuardrailConfig.from_params(params, environ=env)
    assert config.keywords == ("b", "c")
    assert config.policy.action == "redact"
    assert config.policy.window_chars == 60
    assert config.policy.moderate_input is True


def test_os_environ_indirection_is_resolved() -> None:
    """``os.environ/NAME``, LiteLLM's way to keep secrets out of config.yaml, works for our keys too."""
    config = GuardrailConfig.from_params(
        {"streamguard_moderation_api_key": "os.environ/MY_KEY"}, environ={"MY_KEY": "secret"}
    )
    assert config.moderation_api_key == "secret"
    with pytest.raises(ConfigError, match="MISSING"):
        GuardrailConfig.from_params({"streamguard_moderation_api_key": "os.environ/MISSING"}, environ={})


@pytest.mark.parametrize(
    ("params", "env", "message"),
    [
        ({}, {"STREAMGUARD_MODERATOR": "llama"}, "STREAMGUARD_MODERATOR must be one of 'openai', 'local', 'keyword'"),
        ({"streamguard_moderator": "keyword"}, {}, "keyword moderator needs STREAMGUARD_KEYWORDS"),
        ({}, {"STREAMGUARD_MODE": "later"}, "mode must be one of 'holdback', 'stream_first'"),
        ({}, {"STREAMGUARD_ACTION": "block"}, "action must be one of 'cutoff', 'redact'"),
        ({}, {"STREAMGUARD_WINDOW_CHARS": "big"}, "STREAMGUARD_WINDOW_CHARS must be an integer, got 'big'"),
        ({"streamguard_window_chars": 1.5}, {}, "streamguard_window_chars must be an integer"),
        ({}, {"STREAMGUARD_WINDOW_CHARS": "0"}, "window_chars and first_window_chars must be >= 1"),
        ({}, {"STREAMGUARD_FLUSH_AFTER": "soon"}, "STREAMGUARD_FLUSH_AFTER must be a number"),
        ({}, {"STREAMGUARD_MODERATE_INPUT": "maybe"}, "STREAMGUARD_MODERATE_INPUT must be true or false"),
        ({"streamguard_keywords": 3}, {}, "streamguard_keywords must be a comma-separated string or a list"),
        ({"streamguard_windw_chars": 10}, {}, "unknown streamguard option"),
    ],
)
def test_invalid_values_raise_config_error(params: dict[str, object], env: dict[str, str], message: str) -> None:
    """A value that cannot work is a ConfigError naming the option and what it accepts."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        GuardrailConfig.from_params(params, environ=env)


def test_every_option_has_an_environment_variable() -> None:
    """Each litellm_params key is a documented variable's name in lower case."""
    assert all(o.startswith("streamguard_") and o == o.lower() for o in OPTIONS)
    assert "streamguard_moderation_base_url" in OPTIONS and "streamguard_overlap_chars" in OPTIONS


def test_guardrails_share_one_moderator_per_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every guardrail of the process with the same moderator settings uses the same moderator object."""
    monkeypatch.setenv("STREAMGUARD_MODERATOR", "keyword")
    monkeypatch.setenv("STREAMGUARD_KEYWORDS", "shared")
    a = StreamGuardrail(guardrail_name="a", event_hook="post_call")
    b = StreamGuardrail(guardrail_name="b", event_hook="post_call", streamguard_action="redact")
    c = StreamGuardrail(guardrail_name="c", event_hook="post_call", streamguard_keywords="other")
    assert isinstance(a.moderator, KeywordModerator)
    assert a.moderator is b.moderator
    assert c.moderator is not a.moderator
    assert b.config.policy.action == "redact"


def test_openai_moderator_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The openai moderator without any key fails at start, not on the first request."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("STREAMGUARD_MODERATION_API_KEY", raising=False)
    monkeypatch.delenv("STREAMGUARD_MODERATOR", raising=False)
    with pytest.raises(GuardrailStartupError, match="'x': the openai moderator needs STREAMGUARD_MODERATION_API_KEY"):
        StreamGuardrail(guardrail_name="x", event_hook="post_call")
    guardrail = StreamGuardrail(
        guardrail_name="y", event_hook="post_call", streamguard_moderation_api_key="k", streamguard_moderator="openai"
    )
    assert isinstance(guardrail.moderator, OpenAIModerator)


def test_a_guardrail_that_cannot_work_is_not_a_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """LiteLLM starts without a guardrail whose constructor raises ValueError or TypeError (unguarded), so a
    bad configuration raises GuardrailStartupError, caused by the ConfigError that says why."""
    monkeypatch.setenv("STREAMGUARD_MODERATOR", "llama")
    with pytest.raises(GuardrailStartupError) as caught:
        StreamGuardrail(guardrail_name="bad", event_hook="post_call")
    assert not isinstance(caught.value, ValueError | TypeError)
    assert isinstance(caught.value.__cause__, ConfigError)
    assert "STREAMGUARD_MODERATOR must be one of" in str(caught.value)


def test_importing_streamguard_does_not_import_litellm() -> None:
    """litellm is the [litellm] extra: ``import streamguard`` never loads it."""
    code = "import sys, streamguard; print('litellm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"
