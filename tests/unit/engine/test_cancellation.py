"""A client that disconnects frees its engine row within a step; full queues answer 429."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from server.engine.factory import build_engine
from tests.conftest import start_server, stop_server, tiny_settings

STEP_DELAY_S = 0.02  # slows the tiny model so a 200-token request takes seconds


def slow_engine_factory(settings):
    engine = build_engine(settings)
    original_step = engine.step

    def step():
        time.sleep(STEP_DELAY_S)
        return original_step()

    engine.step = step
    return engine


@pytest.fixture(scope="module")
def slow_server(tiny_llama, llama_adapters, tmp_path_factory):
    store = next(iter(llama_adapters.values())).parent
    settings = tiny_settings(tiny_llama, store, tmp_path_factory.mktemp("slow"), max_new_tokens_limit=220,
                             max_queue=3, max_batch_size=2)
    running = start_server(settings, engine_factory=slow_engine_factory)
    yield running
    stop_server(running)


def running_rows(server) -> int:
    return server.services.engine.stats()["running"]


def wait_for(predicate, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


def raw_post(server, body: bytes) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_frees_the_row(slow_server, stream):
    body = b'{"prompt": "the quick", "max_new_tokens": 200, "adapter": "gen-a", "stream": %s}' % (
        b"true" if stream else b"false")
    sock = raw_post(slow_server, body)
    wait_for(lambda: running_rows(slow_server) == 1, timeout=10)
    sock.close()
    # A full run would take 200 steps x 20 ms = 4 s; the row must go within a few steps.
    freed_after = wait_for(lambda: running_rows(slow_server) == 0, timeout=2)
    assert freed_after < 1.0


def test_queue_full_answers_429_with_retry_after(slow_server):
    results: list[int] = []

    def call():
        with slow_server.client() as client:
            results.append(client.post("/v1/generate", json={"prompt": "one", "max_new_tokens": 40}).status_code)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: slow_server.services.scheduler.in_flight == 3, timeout=10)
    with slow_server.client() as client:
        refused = client.post("/v1/generate", json={"prompt": "one", "max_new_tokens": 4})
    for t in threads:
        t.join()
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert results == [200, 200, 200]


def test_deadline_frees_the_row(tiny_llama, llama_adapters, tmp_path):
    store = next(iter(llama_adapters.values())).parent
    settings = tiny_settings(tiny_llama, store, tmp_path, max_new_tokens_limit=220, request_timeout_s=0.3)
    running = start_server(settings, engine_factory=slow_engine_factory)
    try:
        with running.client() as client:
            body = client.post("/v1/generate", json={"prompt": "one", "max_new_tokens": 200, "adapter": "gen-a"}).json()
        assert body["finish_reason"] == "timeout"
        assert body["usage"]["completion_tokens"] < 200
        # The answer ended, so no cancel follows: the deadline alone must free the row and its
        # adapter's slot, not leave it decoding out its 200 tokens (4 s at this step delay).
        freed_after = wait_for(lambda: running_rows(running) == 0, timeout=2)
        assert freed_after < 1.0
        key = running.services.registry.lookup("gen-a").key
        assert running.services.engine.resident_adapters()[key] is False, "the slot must have no user left"
    finally:
        stop_server(running)
