"""Two real server processes sharing one adapter store, run against both kinds of store:
one directory (an RWX volume in Kubernetes), and one bucket on a real S3 API server
(moto's, in its own process) where each replica has only its own disk cache.

Uploads, new versions, rollbacks, persistent merges, pins, routes and deletes made through
either replica reach the other by its store rescan within about a second, as README says
(bound: the default --store-poll-interval-s plus 1 s for the rescan itself on two busy
cores); same-name uploads on both replicas at once keep both versions; a server killed
with SIGKILL mid-upload leaves nothing half-visible, and its restart cleans the debris and
keeps everything published before (on S3, served from its disk cache without fetching
again). On S3, an outage keeps adapters in memory answering and gives the others a clear
503.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from server.config import Settings
from tests.conftest import free_port, make_lora

REPO = Path(__file__).resolve().parents[2]
TOKEN = "replica-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
# The replicas run with the default poll interval: the change lands within one rescan.
CONVERGE_S = Settings.model_fields["store_poll_interval_s"].default + 1.0


@dataclass
class Replica:
    process: subprocess.Popen
    url: str
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


def launch_replica(base: Path, store: Path, workdir: Path, name: str, extra_args: tuple[str, ...] = (),
                   preexec_fn=None, env: dict[str, str] | None = None) -> Replica:
    """`adaptserve serve` in a subprocess, not waited for (see wait_ready)."""
    port = free_port()
    log = workdir / f"{name}-{port}.log"
    command = [sys.executable, "-m", "server.cli", "serve", "--base-model", str(base), "--adapters-dir", str(store),
               "--port", str(port), "--admin-token", TOKEN, "--cache-dir", str(workdir / "cache"),
               "--no-install-example-adapters", "--threads", "1", "--log-level", "warning", *extra_args]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
                                   env={**os.environ, **(env or {})})
    return Replica(process, f"http://127.0.0.1:{port}", log)


def wait_ready(replica: Replica, timeout: float = 120) -> Replica:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if replica.process.poll() is not None:
            raise RuntimeError(f"replica exited: {replica.log.read_text()[-3000:]}")
        try:
            if httpx.get(replica.url + "/readyz", timeout=2).status_code == 200:
                return replica
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    replica.process.kill()
    raise TimeoutError(f"replica not ready: {replica.log.read_text()[-3000:]}")


def start_replica(base: Path, store: Path, workdir: Path, name: str, extra_args: tuple[str, ...] = (),
                  preexec_fn=None, env: dict[str, str] | None = None) -> Replica:
    """`adaptserve serve` in a subprocess; returns once /readyz is 200 (tests/hardening reuses it)."""
    return wait_ready(launch_replica(base, store, workdir, name, extra_args, preexec_fn, env))


def stop(replica: Replica) -> None:
    if replica.process.poll() is None:
        replica.process.send_signal(signal.SIGTERM)
        try:
            replica.process.wait(15)  # a loaded machine takes seconds to exit
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait()


@dataclass
class SharedStore:
    """What the two replicas share: a directory, or a bucket reached through a cuttable link."""

    kind: str  # "directory" | "s3"
    directory: Path  # the directory store; for S3 only --adapters-dir (the replicas write nothing there)
    workdir: Path
    url: str | None = None  # s3://bucket/prefix
    env: dict[str, str] = field(default_factory=dict)
    link: object = None  # tests.objectstore.Link in front of the S3 server
    bucket: str | None = None
    endpoint: str | None = None

    def args(self, role: str) -> tuple[str, ...]:
        """Flags for the replica playing `role`; a restart of the role keeps its disk cache."""
        if self.kind == "directory":
            return ()
        return "--adapters-store", self.url, "--store-cache-dir", str(self.cache(role))

    def cache(self, role: str) -> Path:
        return self.workdir / f"{role}-store-cache"

    def staging(self, role: str) -> Path:
        """Where uploads to that replica are staged before publishing."""
        return (self.directory if self.kind == "directory" else self.cache(role)) / ".tmp"

    def keys(self) -> list[str]:
        from tests.objectstore import s3_client

        listed = s3_client(self.endpoint).list_objects_v2(Bucket=self.bucket).get("Contents", [])
        return sorted(o["Key"] for o in listed)


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("replica-sources")
    return {k: make_lora(tiny_llama, root / k, seed=s, weight_scale=3.0) for k, s in (("v1", 21), ("v2", 22))}


@dataclass
class Pair:
    a: Replica
    b: Replica  # replaced when a test kills and restarts it
    store: SharedStore
    workdir: Path

    def start(self, tiny_llama: Path, role: str, name: str) -> Replica:
        return start_replica(tiny_llama, self.store.directory, self.workdir, name, self.store.args(role),
                             env=self.store.env)


@pytest.fixture(scope="module", params=["directory", "s3"])
def pair(request, tiny_llama, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"replicas-{request.param}")
    store = SharedStore(request.param, tmp_path_factory.mktemp("shared-store"), workdir)
    if request.param == "s3":
        from tests.objectstore import Link, aws_env, new_bucket

        moto = request.getfixturevalue("s3_server")
        store.bucket, store.endpoint = new_bucket(moto.url), moto.url
        store.link = Link(moto.port)
        store.url, store.env = f"s3://{store.bucket}/fleet", aws_env(store.link.url)
    # Both start at once: the base load is most of a start.
    launched = [launch_replica(tiny_llama, store.directory, workdir, role, store.args(role), env=store.env)
                for role in ("a", "b")]
    try:
        replicas = Pair(*(wait_ready(r) for r in launched), store, workdir)
    except Exception:
        for replica in launched:
            stop(replica)
        raise
    yield replicas
    stop(replicas.a)
    stop(replicas.b)
    if store.link is not None:
        store.link.close()


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


def generate(client: httpx.Client, adapter: str | None) -> httpx.Response:
    body = {"prompt": "one two", "max_new_tokens": 2} | ({"adapter": adapter} if adapter else {})
    return client.post("/v1/generate", json=body)


def test_replicas_converge_within_about_a_second(pair, adapters):
    a, b = pair.a, pair.b
    timings = {}
    with a.client() as on_a, b.client() as on_b:
        v1 = upload(on_a, "shared", adapters["v1"]).json()["version"]
        timings["upload"] = wait_until(lambda: current_on(on_b, "shared") == v1, "upload on a seen by b")
        # b serves it from the store without a manual load step.
        served = generate(on_b, "shared")
        assert served.status_code == 200 and served.json()["adapter"]["version"] == v1

        v2 = upload(on_b, "shared", adapters["v2"]).json()["version"]
        timings["new version"] = wait_until(lambda: current_on(on_a, "shared") == v2, "new version on b seen by a")
        assert generate(on_a, "shared").json()["adapter"]["version"] == v2

        assert on_a.post("/v1/adapters/shared/rollback", headers=ADMIN).json()["current"] == v1
        timings["rollback"] = wait_until(lambda: current_on(on_b, "shared") == v1, "rollback on a seen by b")

        merged = on_a.post("/v1/adapters/merge", headers=ADMIN, json={
            "name": "blend", "method": "cat",
            "sources": [{"name": f"shared@{v1}", "weight": 0.7}, {"name": f"shared@{v2}", "weight": 0.3}]})
        assert merged.status_code == 201, merged.text
        blend = merged.json()["version"]
        timings["merge"] = wait_until(lambda: current_on(on_b, "blend") == blend, "persistent merge on a seen by b")
        assert generate(on_b, "blend").json()["adapter"]["version"] == blend
        assert on_b.delete("/v1/adapters/blend", headers=ADMIN).status_code == 200

        assert on_b.post("/v1/adapters/shared/pin", headers=ADMIN).status_code == 200
        timings["pin"] = wait_until(
            lambda: on_a.get("/v1/adapters/shared", headers=ADMIN).json()["pinned"], "pin on b seen by a")
        on_b.post("/v1/adapters/shared/unpin", headers=ADMIN)

        assert on_a.put("/v1/routes/chat", json={"adapter": "shared"}, headers=ADMIN).status_code == 200
        timings["route"] = wait_until(lambda: on_b.get("/v1/routes/chat", headers=ADMIN).status_code == 200,
                                      "route on a seen by b")

        assert on_b.delete("/v1/adapters/shared", headers=ADMIN).status_code == 200
        timings["delete"] = wait_until(lambda: current_on(on_a, "shared") is None, "delete on b seen by a")
        assert generate(on_a, "shared").status_code == 404
        on_a.delete("/v1/routes/chat", headers=ADMIN)
    print(f"{pair.store.kind} convergence seconds:", {k: round(v, 2) for k, v in timings.items()})


def test_same_name_uploads_on_both_replicas_at_once_keep_both_versions(pair, adapters):
    answers = {}

    def send(replica: Replica, source: str) -> None:
        with replica.client() as client:
            answers[source] = upload(client, "race", adapters[source])

    threads = [threading.Thread(target=send, args=(r, s)) for r, s in ((pair.a, "v1"), (pair.b, "v2"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [answers[s].status_code for s in ("v1", "v2")] == [201, 201], {s: r.text for s, r in answers.items()}
    versions = {answers[s].json()["version"] for s in ("v1", "v2")}
    with pair.a.client() as on_a, pair.b.client() as on_b:
        def listed(client):
            entry = client.get("/v1/adapters/race", headers=ADMIN).json()
            return {v["version"] for v in entry["versions"]}, entry["current"]

        wait_until(lambda: listed(on_a) == listed(on_b) and listed(on_a)[0] == versions, "both versions on both")
        assert listed(on_a)[1] in versions
        assert on_a.delete("/v1/adapters/race", headers=ADMIN).status_code == 200


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
        staged = [p for p in store.staging("b").rglob("adapter_model.safetensors") if p.stat().st_size > 0]
        time.sleep(0.05)
    assert staged, "the upload never reached the staging dir"
    pair.b.process.send_signal(signal.SIGKILL)
    pair.b.process.wait()
    conn.close()
    # Nothing half-visible, even before cleanup.
    assert not (store.directory / "half").exists()
    if store.kind == "s3":
        assert not [k for k in store.keys() if k.startswith("fleet/half/")]
    with pair.a.client() as other:  # the surviving replica never lists the torn upload
        time.sleep(1.5)
        assert other.get("/v1/adapters/half", headers=ADMIN).status_code == 404

    removed = _take_weights_out_of_the_bucket(store, "kept", kept)
    try:
        pair.b = pair.start(tiny_llama, "b", "b-restarted")
        assert [p for p in store.staging("b").rglob("*") if p.is_file()] == []
        with pair.b.client() as client:
            listed = client.get("/v1/adapters", headers=ADMIN).json()["adapters"]
            assert [(x["name"], x["current"], x["pinned"]) for x in listed] == [("kept", kept, True)]
            assert listed[0]["status"] == "device"  # a pin survives the restart and warms the adapter
            assert client.get("/v1/adapters/half", headers=ADMIN).status_code == 404
            served = generate(client, "kept")
            assert served.status_code == 200 and served.json()["adapter"]["version"] == kept
    finally:
        removed()


def _take_weights_out_of_the_bucket(store: SharedStore, name: str, version: str):
    """On S3: hide a version's weights object while a replica restarts, so serving it proves
    the restart reused the disk cache instead of fetching again; returns the undo."""
    if store.kind != "s3":
        return lambda: None
    from tests.objectstore import s3_client

    client, key = s3_client(store.endpoint), f"fleet/{name}/versions/{version}/adapter_model.safetensors"
    weights = client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    client.delete_object(Bucket=store.bucket, Key=key)
    return lambda: client.put_object(Bucket=store.bucket, Key=key, Body=weights)


def test_store_outage_resident_adapters_answer_others_get_a_clear_503(pair, adapters):
    if pair.store.kind != "s3":
        pytest.skip("a directory store has no outage of its own (a full disk: tests/hardening/test_faults.py)")
    with pair.a.client() as on_a, pair.b.client() as on_b:
        warm = upload(on_a, "warm", adapters["v1"]).json()["version"]
        cold = upload(on_a, "cold", adapters["v2"]).json()["version"]
        wait_until(lambda: current_on(on_b, "warm") == warm and current_on(on_b, "cold") == cold, "uploads on b")
        assert generate(on_b, "warm").status_code == 200  # now in b's memory; cold is only listed on b
        pair.store.link.cut()
        try:
            assert generate(on_b, "warm").json()["adapter"]["version"] == warm
            refused = generate(on_b, "cold")
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "adapter_store_unavailable"
            assert refused.headers["retry-after"]
            assert generate(on_b, None).status_code == 200  # the base serves throughout
            rejected_upload = upload(on_b, "during", adapters["v1"])
            assert rejected_upload.status_code == 503
            assert rejected_upload.json()["error"]["code"] == "adapter_store_unavailable"
            assert httpx.get(pair.b.url + "/readyz").status_code == 200
        finally:
            pair.store.link.restore()
        served = generate(on_b, "cold")
        assert served.status_code == 200 and served.json()["adapter"]["version"] == cold
        assert not [k for k in pair.store.keys() if k.startswith("fleet/during/")]
        assert on_a.get("/v1/adapters/during", headers=ADMIN).status_code == 404
