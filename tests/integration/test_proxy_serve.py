"""``streamguard serve`` as a process: worker processes, the access log switch, keys from environment variables."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx2
import pytest

from tests.integration._proxy_upstream import RecordingUpstream, fixed
from tests.integration._servers import serve_in_thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize(("workers", "access_log"), [(2, False), (1, True)])
def test_serve_runs_workers_and_switches_the_access_log(workers: int, access_log: bool) -> None:
    """`serve --workers N` answers with the key from the named env variable; the access log obeys its flag."""
    upstream = RecordingUpstream()
    upstream.answers[("GET", "/v1/models")] = fixed(b'{"object":"list","data":[]}')
    port = free_port()
    with serve_in_thread(upstream, lifespan="off") as upstream_url:
        argv = [sys.executable, "-m", "streamguard", "serve", "--upstream", upstream_url + "/v1", "--port", str(port)]
        argv += ["--workers", str(workers), "--moderator", "keyword", "--keywords", "attack"]
        argv += ["--upstream-key-env", "SG_TEST_UPSTREAM_KEY", "--client-key", "caller-1"]
        argv += ["--access-log" if access_log else "--no-access-log", "--log-level", "info"]
        env = {**os.environ, "SG_TEST_UPSTREAM_KEY": "sk-from-env"}
        process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            statuses: list[int] = []
            while time.monotonic() < deadline and len(statuses) < 2 * workers:
                try:
                    r = httpx2.get(f"http://127.0.0.1:{port}/v1/models", headers={"authorization": "Bearer caller-1"})
                    statuses.append(r.status_code)
                except httpx2.TransportError:
                    time.sleep(0.1)
        finally:
            process.send_signal(signal.SIGINT)
            output = process.communicate(timeout=30)[0].decode()
    assert statuses == [200] * (2 * workers), output
    assert {s.headers["authorization"] for s in upstream.seen} == {"Bearer sk-from-env"}
    assert "sk-from-env" not in output
    assert ("GET /v1/models" in output) is access_log, output
    if workers > 1:
        assert output.count("Started server process") >= workers, output
