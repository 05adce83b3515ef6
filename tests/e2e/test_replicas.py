"""Two real server processes sharing one adapters directory (an RWX volume in Kubernetes).

Uploads, new versions, rollbacks and deletes made through either replica reach the other
by its store rescan within 5 s; a server killed with SIGKILL mid-upload leaves nothing
half-visible, and its restart cleans the debris and keeps everything published before.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, make_lora

REPO = Path(__file__).resolve().parents[2]
TOKEN = "replica-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
CONVERGE_S = 5.0


@dataclass
class Replica:
    process: subprocess.Popen
    url: str
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


def start_replica(base: Path, store: Path, workdir: Path, name: str, extra_args: tuple[str, ...] = (),
                  preexec_fn=None) -> Replica:
    """`adaptserve serve` in a subprocess; returns once /readyz is 200 (tests/hardening reuses it)."""
    port = free_port()
    log = workdir / f"{name}-{port}.log"
    command = [sys.executable, "-m", "server.cli", "serve", "--base-model", str(base), "--adapters-dir", str(store),
               "--port", str(port), "--admin-token", TOKEN, "--cache-dir", str(workdir / "cache"),
               "--no-install-example-adapters", "--threads", "1", "--log-level", "warning", *extra_args]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
    replica = Replica(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"replica {name} exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(replica.url + "/readyz", timeout=2).status_code == 200:
                return replica
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise TimeoutError(f"replica {name} not ready: {log.read_text()[-3000:]}")


def stop(replica: Replica) -> None:
    if replica.process.poll() is None:
        replica.process.send_signal(signal.SIGTERM)
        try:
            replica.process.wait(5)
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait()


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("replica-sources")
    return {k: make_lora(tiny_llama, root / k, seed=s, weight_scale=3.0) for k, s in (("v1", 21), ("v2", 22))}


@dataclass
class Pair:
    a: Replica
    b: Replica  # replaced when a test kills and restarts it
    store: Path
    workdir: Path


@pytest.fixture(scope="module")
def pair(tiny_llama, tmp_path_factory):
    store = tmp_path_factory.mktemp("shared-store")
    workdir = tmp_path_factory.mktemp("replicas")
    a = start_replica(tiny_llama, store, workdir, "a")
    try:
        b = start_replica(tiny_llama, store, workdir, "b")
    except Exception:
        stop(a)
        raise
    replicas = Pair(a, b, store, workdir)
    yield replicas
    stop(replicas.a)
    stop(replicas.b)


def upload(client: httpx.Client, name: str, directory: Path) -> httpx.Response:
    files = [(f, (f, (directory / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    return client.post("/v1/adapters", data={"name": name}, files=files, headers=ADMIN)


def wait_until(check, what: str) -> float:
    """Seconds until `check()` holds; fails past the convergence bound."""
    started = time.monotonic()
    while time.monotonic() - started < CONVERGE_S:
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    pytest.fail(f"not converged within {CONVERGE_S} s: {what}")


def current_on(client: httpx.Client, name: str) -> str | None:
    response = client.get(f"/v1/adapters/{name}", headers=ADMIN)
    return response.json()["current"] if response.status_code == 200 else None


def test_replicas_converge_within_five_seconds(pair, adapters):
    a, b = pair.a, pair.b
    timings = {}
    with a.client() as on_a, b.client() as on_b:
        v1 = upload(on_a, "shared", adapters["v1"]).json()["version"]
        timings["upload"] = wait_until(lambda: current_on(on_b, "shared") == v1, "upload on a seen by b")
        # b serves it from disk without a manual load step.
        served = on_b.post("/v1/generate", json={"prompt": "one two", "adapter": "shared", "max_new_tokens": 3})
        assert served.status_code == 200 and served.json()["adapter"]["version"] == v1

        v2 = upload(on_b, "shared", adapters["v2"]).json()["version"]
        timings["new version"] = wait_until(lambda: current_on(on_a, "shared") == v2, "new version on b seen by a")
        assert on_a.post("/v1/generate", json={"prompt": "one two", "adapter": "shared",
                                               "max_new_tokens": 3}).json()["adapter"]["version"] == v2

        assert on_a.post("/v1/adapters/shared/rollback", headers=ADMIN).json()["current"] == v1
        timings["rollback"] = wait_until(lambda: current_on(on_b, "shared") == v1, "rollback on a seen by b")

        assert on_b.post("/v1/adapters/shared/pin", headers=ADMIN).status_code == 200
        timings["pin"] = wait_until(
            lambda: on_a.get("/v1/adapters/shared", headers=ADMIN).json()["pinned"], "pin on b seen by a")
        on_b.post("/v1/adapters/shared/unpin", headers=ADMIN)

        assert on_b.delete("/v1/adapters/shared", headers=ADMIN).status_code == 200
        timings["delete"] = wait_until(lambda: current_on(on_a, "shared") is None, "delete on b seen by a")
        gone = on_a.post("/v1/generate", json={"prompt": "one two", "adapter": "shared", "max_new_tokens": 3})
        assert gone.status_code == 404
    print("convergence seconds:", {k: round(v, 2) for k, v in timings.items()})


def _half_upload(url: str, name: str, payload: bytes) -> socket.socket:
    """Send the headers and part of a large multipart body, then leave the request hanging."""
    host, port = url.removeprefix("http://").split(":")
    boundary = "halfway"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="f"; filename="adapter_model.safetensors"\r\n\r\n')
    body_length = len(head) + 10 * len(payload) + len(f"\r\n--{boundary}--\r\n")
    conn = socket.create_connection((host, int(port)))
    conn.sendall((f"POST /v1/adapters HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                  f"Content-Length: {body_length}\r\n\r\n").encode() + head.encode() + payload)
    return conn


def test_kill_9_during_upload_then_restart(pair, tiny_llama, adapters):
    store = pair.store
    with pair.b.client() as client:
        kept = upload(client, "kept", adapters["v1"]).json()["version"]
        assert client.post("/v1/adapters/kept/pin", headers=ADMIN).status_code == 200
    conn = _half_upload(pair.b.url, "half", os.urandom(256 * 1024))
    deadline = time.monotonic() + 10
    staged = []
    while not staged and time.monotonic() < deadline:
        staged = [p for p in (store / ".tmp").rglob("adapter_model.safetensors") if p.stat().st_size > 0]
        time.sleep(0.05)
    assert staged, "the upload never reached the staging dir"
    pair.b.process.send_signal(signal.SIGKILL)
    pair.b.process.wait()
    conn.close()
    assert not (store / "half").exists()  # nothing half-visible, even before cleanup
    with pair.a.client() as other:  # the surviving replica never lists the torn upload
        time.sleep(1.5)
        assert other.get("/v1/adapters/half", headers=ADMIN).status_code == 404

    pair.b = start_replica(tiny_llama, store, pair.workdir, "b-restarted")
    assert [p for p in (store / ".tmp").rglob("*") if p.is_file()] == []
    with pair.b.client() as client:
        listed = client.get("/v1/adapters", headers=ADMIN).json()["adapters"]
        assert [(x["name"], x["current"], x["pinned"]) for x in listed] == [("kept", kept, True)]
        assert listed[0]["status"] == "device"  # a pin survives the restart and warms the adapter
        assert client.get("/v1/adapters/half", headers=ADMIN).status_code == 404
        served = client.post("/v1/generate", json={"prompt": "one two", "adapter": "kept", "max_new_tokens": 2})
        assert served.status_code == 200 and served.json()["adapter"]["version"] == kept
