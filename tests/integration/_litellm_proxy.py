"""Run a real LiteLLM proxy (``litellm --config``) on 127.0.0.1 in a subprocess, for tests and benchmarks.

The proxy must not reach the network: the model cost map is read from the package
(``LITELLM_LOCAL_MODEL_COST_MAP``), telemetry is off, and startup is bounded in time.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2

STARTUP_SECONDS = 180.0
"""Bound on the proxy's start (about 20 s on a loaded 2-core machine: it imports all of LiteLLM)."""


@dataclass(frozen=True)
class LiteLLMProxy:
    """A running proxy: ``base_url`` for ``AsyncOpenAI`` and the master key it requires."""

    base_url: str
    key: str
    pid: int
    log: Path


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def litellm_executable() -> str:
    """The ``litellm`` command installed next to this interpreter."""
    here = Path(sys.executable).parent / "litellm"
    found = str(here) if here.exists() else shutil.which("litellm")
    if found is None:
        raise RuntimeError("the litellm command is not installed (pip install 'streamguard[litellm]')")
    return found


def quiet_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a proxy that reaches nothing but loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGUARD_")}
    env.update(
        {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_TELEMETRY": "False",
            "LITELLM_LOG": "ERROR",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    env.update(extra or {})
    return env


@contextmanager
def run_litellm(config: str, workdir: Path, env: Mapping[str, str] | None = None) -> Iterator[LiteLLMProxy]:
    """Start ``litellm --config`` with ``config`` (YAML text) on a free loopback port; stop it after.

    Raises:
        RuntimeError: The proxy exited or did not answer ``/health/liveliness`` within
            :data:`STARTUP_SECONDS` (the message has the end of its log).
    """
    key = "sk-" + secrets.token_hex(32)
    port = free_port()
    config_path = workdir / "config.yaml"
    config_path.write_text(config)
    log = workdir / "litellm.log"
    command = [litellm_executable(), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=quiet_env({**(env or {}), "LITELLM_MASTER_KEY": key}),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(process, port, log)
        yield LiteLLMProxy(base_url=f"http://127.0.0.1:{port}/v1", key=key, pid=process.pid, log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _wait_ready(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    url = f"http://127.0.0.1:{port}/health/liveliness"
    with httpx2.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"litellm exited with {process.returncode}:\n{_tail(log)}")
            try:
                if http.get(url).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.25)
    raise RuntimeError(f"litellm did not start within {STARTUP_SECONDS:.0f} s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-40:])
