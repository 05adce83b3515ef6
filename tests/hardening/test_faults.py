"""Faults with real servers: a full disk mid-upload, an adapter that does not fit in memory,
and SIGTERM with several streams running.

Covered elsewhere, not repeated here:
- kill -9 during an upload, then restart: tests/e2e/test_replicas.py::test_kill_9_during_upload_then_restart
- delete and re-version while requests stream on the old version:
  tests/unit/lifecycle/test_versions.py::test_requests_in_flight_finish_on_their_version_through_update_and_delete
- a client that disconnects mid-stream frees its engine row:
  tests/unit/engine/test_cancellation.py::test_disconnect_frees_the_row
- SIGTERM drain of one stream on the default base: tests/e2e/test_graceful_shutdown.py
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
import torch

from server.services import default_engine_factory
from tests.conftest import start_server, stop_server, tiny_settings
from tests.e2e.test_replicas import ADMIN, start_replica, stop, upload

STORE_BYTES = 2 * 1024 * 1024


@pytest.fixture
def small_store(tmp_path):
    """A store that fills up at 2 MB: a tmpfs when we may mount one, else RLIMIT_FSIZE on the
    server (Python ignores SIGXFSZ, so its writes fail with EFBIG, which the server treats
    like ENOSPC). Yields (store, preexec_fn for the server process)."""
    store = tmp_path / "small-store"
    store.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STORE_BYTES}", "tmpfs", str(store)],
                             capture_output=True).returncode == 0

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (STORE_BYTES, STORE_BYTES))

    try:
        yield store, None if mounted else limit_file_size
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(store)], check=False)


def test_disk_full_during_upload_is_507_then_the_server_carries_on(small_store, tiny_llama, llama_adapters, tmp_path):
    store, preexec_fn = small_store
    replica = start_replica(tiny_llama, store, tmp_path, "disk-full", preexec_fn=preexec_fn)
    try:
        with replica.client() as client:
            config = (llama_adapters["gen-a"] / "adapter_config.json").read_bytes()
            files = [("f", ("adapter_model.safetensors", b"\0" * (3 * 1024 * 1024))),
                     ("f", ("adapter_config.json", config))]
            full = client.post("/v1/adapters", data={"name": "too-much"}, files=files, headers=ADMIN)
            assert full.status_code == 507, full.text
            assert full.json()["error"]["code"] == "insufficient_storage"
            assert [p for p in (store / ".tmp").rglob("*") if p.is_file()] == []  # staging removed
            assert not (store / "too-much").exists()
            assert client.get("/readyz").status_code == 200
            served = client.post("/v1/generate", json={"prompt": "one two", "max_new_tokens": 3})
            assert served.status_code == 200
            # The space came back: a normal upload fits and serves.
            assert upload(client, "fits", llama_adapters["gen-a"]).status_code == 201
            assert client.post("/v1/generate", json={"prompt": "one", "adapter": "fits",
                                                     "max_new_tokens": 2}).status_code == 200
    finally:
        stop(replica)
    assert replica.process.returncode == 0, replica.log.read_text()[-2000:]


def out_of_memory_factory(settings):
    """The real engine, except that copying any adapter named `too-big*` into a device slot
    runs out of memory halfway (after the first layer), as a real CUDA OOM would."""
    engine = default_engine_factory(settings)
    real_load = engine.load_adapter
    last_layer = engine.layers[sorted(engine.layers)[-1]]
    real_copy = last_layer.load_slot
    failing = threading.local()

    def load_adapter(binding):
        failing.now = binding.name.startswith("too-big")
        try:
            return real_load(binding)
        finally:
            failing.now = False

    def load_slot(*args, **kwargs):
        if getattr(failing, "now", False):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_copy(*args, **kwargs)

    engine.load_adapter = load_adapter
    last_layer.load_slot = load_slot
    return engine


def test_an_adapter_that_does_not_fit_fails_alone_and_the_base_keeps_serving(tiny_llama, llama_adapters, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    # gen-b touches every projection, so the simulated OOM hits mid-copy.
    shutil.copytree(llama_adapters["gen-b"], store / "too-big")
    shutil.copytree(llama_adapters["gen-a"], store / "gen-a")
    running = start_server(tiny_settings(tiny_llama, store, tmp_path, admin_token="t"),
                           engine_factory=out_of_memory_factory)
    engine = running.services.engine
    free_before = sorted(engine.slots.free)
    chunks: list[dict] = []
    try:
        with running.client() as client, httpx.stream(
                "POST", running.url + "/v1/generate", timeout=60,
                json={"prompt": "one two", "max_new_tokens": 60, "stream": True}) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            chunks.append(json.loads(first[6:]))
            failed = client.post("/v1/generate", json={"prompt": "x", "adapter": "too-big", "max_new_tokens": 2})
            assert failed.status_code == 503, failed.text
            assert failed.json()["error"]["code"] == "adapter_load_failed"
            assert failed.headers["retry-after"]
            chat = client.post("/v1/chat/completions", json={"model": "too-big", "max_tokens": 2,
                                                             "messages": [{"role": "user", "content": "x"}]})
            assert chat.status_code == 503 and chat.json()["error"]["code"] == "adapter_load_failed"
            # The running stream never noticed.
            chunks += [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            assert chunks[-1]["finish_reason"] in ("length", "stop") and "error" not in chunks[-1]
            # No slot leaked by the half-done copy, and other adapters still load into it.
            assert sorted(engine.slots.free) == free_before
            ok = client.post("/v1/generate", json={"prompt": "x", "adapter": "gen-a", "max_new_tokens": 2})
            assert ok.status_code == 200, ok.text
            assert client.get("/readyz").status_code == 200
            assert engine.stats()["running"] == 0
    finally:
        stop_server(running)


def test_sigterm_drains_several_streams_then_exits_zero(tiny_llama, tmp_path):
    store = tmp_path / "store"
    replica = start_replica(tiny_llama, store, tmp_path, "drain", extra_args=("--drain-timeout-s", "60"))
    finals: dict[int, dict] = {}
    started = [threading.Event() for _ in range(4)]

    def stream(i: int) -> None:
        body = {"prompt": f"story {i}", "max_new_tokens": 200, "stream": True}
        with httpx.stream("POST", replica.url + "/v1/generate", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    started[i].set()
                    event = json.loads(line[6:])
                    if "finish_reason" in event:
                        finals[i] = event

    clients = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    try:
        for thread in clients:
            thread.start()
        assert all(event.wait(60) for event in started)
        replica.process.send_signal(signal.SIGTERM)
        refused = httpx.post(replica.url + "/v1/generate", json={"prompt": "late"}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        for thread in clients:
            thread.join(120)
        assert sorted(finals) == [0, 1, 2, 3]
        for event in finals.values():  # finished, not cut: no error, no cancellation
            assert event["finish_reason"] in ("length", "stop") and "error" not in event, event
        assert replica.process.wait(timeout=60) == 0
    finally:
        stop(replica)
