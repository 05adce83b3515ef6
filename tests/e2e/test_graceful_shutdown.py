"""A real `adaptserve serve` process: early /healthz, late /readyz, and SIGTERM drain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration


def test_sigterm_drains_running_requests_then_exits_zero(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--adapters-dir", str(tmp_path / "store"),
         "--no-install-example-adapters", "--drain-timeout-s", "30", "--log-level", "warning"],
        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        seen_alive_not_ready = False
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                alive = httpx.get(url + "/healthz", timeout=2).status_code == 200
                ready = httpx.get(url + "/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            seen_alive_not_ready |= alive and not ready
            if ready:
                break
            time.sleep(0.05)
        assert seen_alive_not_ready, "/healthz must answer while the base is still loading"

        chunks: list[dict] = []
        first_chunk = threading.Event()

        def stream() -> None:
            story = [{"role": "user", "content": "Write a long story about a cat."}]
            body = {"messages": story, "max_new_tokens": 48, "stream": True}
            with httpx.stream("POST", url + "/v1/generate", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                        first_chunk.set()

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert first_chunk.wait(60)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(url + "/readyz", timeout=5).status_code == 503
        refused = httpx.post(url + "/v1/generate", json={"prompt": "hi"}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        streamer.join(60)
        assert chunks[-1]["finish_reason"] == "length", "the running request must finish, not be cut"
        assert chunks[-1]["usage"]["completion_tokens"] == 48
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.stdout.read().decode(errors="replace") if process.stdout else ""
        print(output[-3000:])
