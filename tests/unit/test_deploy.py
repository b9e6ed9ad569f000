"""The deployment examples in deploy/: valid YAML, and what they promise is wired up consistently."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamguard.exceptions import ConfigError
from streamguard.integrations.proxy.config import (
    ProxyConfig,
    ServeOptions,
    add_arguments,
    config_from_args,
    options_from_args,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` arguments as a dict."""
    flags = {}
    for arg in args:
        assert arg.startswith("--") and "=" in arg, arg
        name, _, value = arg[2:].partition("=")
        flags[name] = value
    return flags


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)s", value)
    assert match, value
    return float(match[1])


def test_compose_file_shares_one_redis_and_drains_before_the_kill() -> None:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) >= {"redis", "streamguard", "lb"}
    proxy = services["streamguard"]
    flags = _flags(proxy["command"])
    assert flags["redis-url"] == "redis://redis:6379/0"  # the redis service, by its compose name
    assert int(flags["workers"]) >= 2
    assert proxy["deploy"]["replicas"] >= 2
    assert _seconds(proxy["stop_grace_period"]) > float(flags["drain-timeout"])
    assert "/readyz" in " ".join(proxy["healthcheck"]["test"])
    assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"
    assert proxy["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY.parent / proxy["build"]["dockerfile"]).is_file()
    # Secrets come from the environment, never written in the file.
    assert all(str(v).startswith("${") for v in proxy["environment"].values())
    nginx = compose["configs"]["nginx"]["content"]
    assert "server streamguard:8000;" in nginx and "proxy_buffering off;" in nginx
    assert services["lb"]["configs"][0]["source"] == "nginx"


def test_kubernetes_example_is_consistent() -> None:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s.yaml").read_text()) if d is not None]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), doc
    by_kind: dict[tuple[str, str], dict[str, Any]] = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert set(by_kind) == {
        ("Deployment", "streamguard-redis"),
        ("Service", "streamguard-redis"),
        ("Deployment", "streamguard"),
        ("Service", "streamguard"),
    }
    for name in ("streamguard", "streamguard-redis"):
        deployment, service = by_kind["Deployment", name], by_kind["Service", name]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert service["spec"]["selector"].items() <= labels.items()
    proxy = by_kind["Deployment", "streamguard"]
    pod = proxy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    flags = _flags(container["args"])
    assert flags["redis-url"] == "redis://streamguard-redis:6379/0"  # the Redis Service, by name
    assert int(flags["workers"]) >= 2
    assert proxy["spec"]["replicas"] >= 2
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > float(flags["drain-timeout"]) + pre_stop
    assert proxy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    env = {e["name"]: e for e in container["env"]}
    assert all("secretKeyRef" in env[name]["valueFrom"] for name in ("OPENAI_API_KEY", "STREAMGUARD_KEYS"))
    assert flags["upstream-key-env"] in env and flags["client-keys-env"] in env


def test_dockerfile_installs_the_server_and_redis_extras() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r'pip install .*"\.\[server,redis\]"', text)
    assert 'ENTRYPOINT ["streamguard", "serve"]' in text


def _serve_config(args: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[ProxyConfig, ServeOptions]:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("STREAMGUARD_KEYS", "key-a,key-b")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parsed = parser.parse_args(args)
    return config_from_args(parsed), options_from_args(parsed)


def test_the_examples_arguments_are_what_serve_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compose and Kubernetes arguments parse with the real `serve` parser into the intended config."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["streamguard"]["command"]
    k8s = [d for d in yaml.safe_load_all((DEPLOY / "k8s.yaml").read_text()) if d]
    (proxy,) = [d for d in k8s if d["kind"] == "Deployment" and d["metadata"]["name"] == "streamguard"]
    k8s_args = proxy["spec"]["template"]["spec"]["containers"][0]["args"]
    for args, redis_host in ((compose, "redis"), (k8s_args, "streamguard-redis")):
        config, options = _serve_config(args, monkeypatch)
        assert config.redis_url == f"redis://{redis_host}:6379/0"
        assert config.upstream_api_key == "sk-test" and config.client_keys == {"key-a", "key-b"}
        assert config.drain_timeout == float(_flags(args)["drain-timeout"])
        assert options.workers == 2 and options.host == "0.0.0.0"


def test_redis_url_with_a_password_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["--upstream=https://api.openai.com/v1"]
    with pytest.raises(ConfigError, match="redis_url_env"):
        _serve_config([*base, "--redis-url=redis://:hunter2@redis:6379/0"], monkeypatch)
    monkeypatch.setenv("SG_REDIS", "redis://:hunter2@redis:6379/0")
    config, _ = _serve_config([*base, "--redis-url-env=SG_REDIS"], monkeypatch)
    assert config.redis_url == "redis://:hunter2@redis:6379/0"
    assert "hunter2" not in repr(config)
    with pytest.raises(ConfigError, match="redis://"):
        _serve_config([*base, "--redis-url=http://redis:6379"], monkeypatch)
    with pytest.raises(ConfigError, match="drain_timeout"):
        _serve_config([*base, "--drain-timeout=-1"], monkeypatch)
