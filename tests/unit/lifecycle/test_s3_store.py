"""S3Store against a real S3 API server process (moto, over HTTP): the LocalStore guarantees
on object storage, the compare-and-swap writes, crash debris, the local disk cache, outages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from adapters.package import content_sha256
from adapters.s3_store import S3Store, parse_s3_url
from adapters.store import StoreError, StoreUnavailable, VersionCorrupt
from adapters.version_cache import VersionCache
from tests.objectstore import Link, aws_env, new_bucket, s3_client
from tests.unit.lifecycle.test_store import put, stage

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def bucket(s3_server) -> str:
    return new_bucket(s3_server.url)


class Replica:
    """One replica's view: its own S3 client (counting requests) and its own disk cache."""

    def __init__(self, endpoint: str, bucket: str, cache: Path, cache_bytes: int = 10**9, **kwargs):
        self.client = s3_client(endpoint)
        self.requests: Counter[str] = Counter()
        self.client.meta.events.register("before-send.s3", self._count)
        self.store = S3Store(f"s3://{bucket}/fleet", VersionCache(cache, cache_bytes), client=self.client, **kwargs)

    def _count(self, request, **_) -> None:
        # Path-style URLs: /<bucket>/fleet/<key>; a listing is a GET of the bucket itself.
        path = urlsplit(request.url).path.split("/", 2)[2:]
        self.requests[f"{request.method} {path[0].removeprefix('fleet/') if path else ''}"] += 1


@pytest.fixture
def replicas(s3_server, bucket, tmp_path):
    return [Replica(s3_server.url, bucket, tmp_path / f"cache-{i}") for i in range(2)]


def keys(endpoint: str, bucket: str) -> list[str]:
    listed = s3_client(endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])
    return sorted(o["Key"] for o in listed)


def test_s3_urls_are_checked():
    assert parse_s3_url("s3://my-bucket") == ("my-bucket", "")
    assert parse_s3_url("s3://my-bucket//a/b/") == ("my-bucket", "a/b/")
    for bad in ("s3://B", "http://bucket/x", "s3://bucket/../x", "bucket/x"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)


def test_a_missing_bucket_is_named_at_start(s3_server, tmp_path):
    missing = S3Store("s3://no-such-bucket/x", VersionCache(tmp_path, 10**6), client=s3_client(s3_server.url))
    with pytest.raises(StoreUnavailable, match="bucket 'no-such-bucket' does not exist"):
        missing.cleanup()


def test_put_writes_a_peft_folder_marker_last_and_flips_current(s3_server, bucket, replicas):
    store = replicas[0].store
    store.cleanup()
    first = put(store, "gen", b"one", 1.0)
    second = put(store, "gen", b"two", 2.0)
    assert first.created and second.created
    v1, v2 = first.version.version, second.version.version
    assert keys(s3_server.url, bucket) == sorted(
        [f"fleet/gen/versions/{v}/{f}" for v in (v1, v2)
         for f in ("adapter_config.json", "adapter_model.safetensors", "manifest.json")] + ["fleet/gen/CURRENT"])
    order = [k for k in replicas[0].requests if k.startswith("PUT gen/versions/" + v1)]
    assert order[-1].endswith("/manifest.json")  # the marker is the last object of a version written
    snapshot = store.snapshot()["gen"]
    assert set(snapshot.versions) == {v1, v2} and snapshot.current == v2
    # Same bytes again: the same version, no object rewritten, current again.
    before = sum(n for k, n in replicas[0].requests.items() if k.startswith("PUT gen/versions/"))
    again = put(store, "gen", b"one", 3.0)
    assert not again.created and again.version.version == v1
    assert again.version.manifest.created_at == 1.0  # the first publish's marker stands
    assert sum(n for k, n in replicas[0].requests.items() if k.startswith("PUT gen/versions/")) == before
    assert store.snapshot()["gen"].current == v1


def test_another_replica_reads_a_version_through_its_own_cache_once(replicas):
    writer, reader = replicas
    published = put(writer.store, "gen", b"weights").version
    (stored,) = reader.store.snapshot()["gen"].versions.values()
    with reader.store.open_version(stored) as directory:
        assert content_sha256(directory) == published.manifest.sha256
        assert directory.is_relative_to(reader.store.cache.root)
    fetched = reader.requests["GET gen/versions/%s/adapter_model.safetensors" % stored.version]
    with reader.store.open_version(stored):
        pass
    assert fetched == 1
    assert reader.requests["GET gen/versions/%s/adapter_model.safetensors" % stored.version] == 1
    # The uploader's own cache took the staged bytes: it never downloads what it published.
    with writer.store.open_version(published):
        pass
    assert not [k for k in writer.requests if k.startswith("GET gen/versions/") and "safetensors" in k]


def test_a_poll_where_nothing_changed_is_one_list_request(replicas):
    writer, reader = replicas
    put(writer.store, "a", b"1")
    put(writer.store, "b", b"2")
    reader.store.snapshot()
    reader.requests.clear()
    reader.store.snapshot()
    assert list(reader.requests) == ["GET "]  # ListObjectsV2; no object read again
    newer = put(writer.store, "a", b"3").version.version
    reader.requests.clear()
    assert reader.store.snapshot()["a"].current == newer
    assert sorted(reader.requests) == ["GET ", "GET a/CURRENT", f"GET a/versions/{newer}/manifest.json"]


def test_concurrent_puts_from_two_replicas_keep_every_version(replicas):
    payloads = [f"weights-{i}".encode() for i in range(6)] * 2  # each twice: identical-bytes races too
    results, errors = [], []

    def worker(index: int, payload: bytes) -> None:
        try:
            results.append(put(replicas[index % 2].store, "gen", payload))
        except Exception as exc:  # collected: the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i, p)) for i, p in enumerate(payloads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for replica in replicas:
        snapshot = replica.store.snapshot()["gen"]
        assert len(snapshot.versions) == 6 and snapshot.current in snapshot.versions
    assert sum(r.created for r in results) == 6


def test_concurrent_document_updates_from_two_replicas_lose_nothing(replicas):
    """Read-modify-write of one object by 12 writers at once: If-Match makes each one count."""

    def add(key: str):
        def change(text: str | None) -> str:
            document = json.loads(text) if text else {}
            time.sleep(0.02)  # widen the race: every writer reads before most have written
            return json.dumps({**document, key: True})
        return change

    threads = [threading.Thread(target=replicas[i % 2].store.update_document, args=(".routes.json", add(f"t{i}")))
               for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(json.loads(replicas[0].store.read_document(".routes.json").text)) == {f"t{i}" for i in range(12)}
    with pytest.raises(StoreError):
        replicas[0].store.update_document("routes", lambda _: "{}")  # documents are dot names


def test_rollback_delete_and_pins(s3_server, bucket, replicas):
    store, other = replicas[0].store, replicas[1].store
    old = put(store, "gen", b"old", 1.0).version.version
    new = put(store, "gen", b"new", 2.0).version.version
    other.set_pinned("gen", True)
    assert store.snapshot()["gen"].pinned
    other.set_current("gen", old)
    assert store.snapshot()["gen"].current == old
    with pytest.raises(StoreError):
        store.set_current("gen", "abcdef123456")
    store.set_current("gen", new)
    # Deleting the live version moves CURRENT first, then removes every object of the version.
    assert other.delete("gen", new) == old
    assert store.snapshot()["gen"].current == old
    assert not [k for k in keys(s3_server.url, bucket) if f"/{new}/" in k]
    other.set_pinned("gen", False)
    assert not store.snapshot()["gen"].pinned
    assert store.delete("gen") is None
    assert "gen" not in other.snapshot() and keys(s3_server.url, bucket) == []
    for call in (lambda: store.delete("gen"), lambda: store.set_pinned("gen", True),
                 lambda: store.set_current("nope", "abc")):
        with pytest.raises(StoreError):
            call()


KILL_MID_PUBLISH = """
import os, signal, sys
from adapters.s3_store import S3Store
from adapters.version_cache import VersionCache
from tests.unit.lifecycle.test_store import put

real_put = S3Store._put
def dying_put(self, key, body, **kwargs):
    if key.endswith("manifest.json"):
        os.kill(os.getpid(), signal.SIGKILL)  # after the weights, before the marker
    return real_put(self, key, body, **kwargs)
S3Store._put = dying_put
put(S3Store(sys.argv[1], VersionCache(sys.argv[2], 10**9)), "torn", b"never visible")
"""


def test_kill_9_mid_publish_leaves_no_visible_version_and_cleanup_removes_it_once_stale(s3_server, bucket,
                                                                                         tmp_path):
    url = f"s3://{bucket}/fleet"
    dead = subprocess.run([sys.executable, "-c", KILL_MID_PUBLISH, url, str(tmp_path / "dead-cache")], cwd=REPO,
                          env={**os.environ, **aws_env(s3_server.url)}, capture_output=True, text=True, timeout=120)
    assert dead.returncode == -signal.SIGKILL, dead.stderr
    torn = [k for k in keys(s3_server.url, bucket) if "/torn/" in k]
    assert any(k.endswith("adapter_model.safetensors") for k in torn)
    assert not any(k.endswith("manifest.json") for k in torn)
    replica = Replica(s3_server.url, bucket, tmp_path / "cache")
    assert replica.store.snapshot() == {}
    replica.store.cleanup()  # young debris stays: another replica may still be publishing it
    assert [k for k in keys(s3_server.url, bucket) if "/torn/" in k] == torn
    Replica(s3_server.url, bucket, tmp_path / "cache", stale_after_s=0).store.cleanup()
    assert keys(s3_server.url, bucket) == []


def test_disk_cache_is_bounded_lru_and_keeps_what_a_reader_holds(replicas, tmp_path):
    writer = replicas[0]
    versions = [put(writer.store, f"a{i}", bytes([i]) * 1000).version for i in range(4)]
    reader = Replica(writer.client.meta.endpoint_url, writer.store.bucket, tmp_path / "small")
    snapshot = reader.store.snapshot()

    def open_(i):
        return reader.store.open_version(snapshot[f"a{i}"].versions[versions[i].version])

    with open_(0):
        (entry,) = reader.store.cache.entries()
        reader.store.cache.max_bytes = 2 * entry.nbytes + entry.nbytes // 2  # room for two
        with open_(1):
            pass
        with open_(2):  # over budget: the least recently used entry not in use (a1) goes
            assert {e.name for e in reader.store.cache.entries()} == {"a0", "a2"}
    with open_(3):
        pass
    assert [e.name for e in reader.store.cache.entries()] == ["a2", "a3"]
    assert sum(e.nbytes for e in reader.store.cache.entries()) <= reader.store.cache.max_bytes
    assert not list((tmp_path / "small" / ".tmp").rglob("*.safetensors"))


def test_a_restart_reuses_the_cache_without_fetching_and_refetches_a_damaged_copy(replicas, tmp_path):
    writer, reader = replicas
    published = put(writer.store, "gen", b"weights" * 100).version
    stored = reader.store.snapshot()["gen"].versions[published.version]
    with reader.store.open_version(stored):
        pass
    weights = f"GET gen/versions/{published.version}/adapter_model.safetensors"
    restarted = Replica(writer.client.meta.endpoint_url, writer.store.bucket, reader.store.cache.root)
    with restarted.store.open_version(restarted.store.snapshot()["gen"].versions[published.version]) as directory:
        assert content_sha256(directory) == published.manifest.sha256
    assert restarted.requests[weights] == 0
    # A copy damaged on disk fails the next process's hash check and is fetched again.
    (reader.store.cache.path("gen", published.version) / "adapter_model.safetensors").write_bytes(b"bit rot")
    again = Replica(writer.client.meta.endpoint_url, writer.store.bucket, reader.store.cache.root)
    with again.store.open_version(again.store.snapshot()["gen"].versions[published.version]) as directory:
        assert content_sha256(directory) == published.manifest.sha256
    assert again.requests[weights] == 1


def test_bytes_that_do_not_match_the_manifest_are_refused_and_not_cached(s3_server, bucket, replicas):
    writer, reader = replicas
    published = put(writer.store, "gen", b"good").version
    s3_client(s3_server.url).put_object(Bucket=bucket, Body=b"tampered",
                                        Key=f"fleet/gen/versions/{published.version}/adapter_model.safetensors")
    with pytest.raises(VersionCorrupt):
        with reader.store.open_version(reader.store.snapshot()["gen"].versions[published.version]):
            pass
    assert reader.store.cache.entries() == []


def test_an_outage_raises_store_unavailable_changes_nothing_and_cached_versions_still_open(s3_server, bucket,
                                                                                           tmp_path):
    link = Link(s3_server.port)
    try:
        replica = Replica(link.url, bucket, tmp_path / "cache")
        published = put(replica.store, "gen", b"kept").version
        link.cut()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="could not list"):
            replica.store.snapshot()
        with pytest.raises(StoreUnavailable):
            with replica.store.staging() as staging:
                stage(replica.store, staging, "gen", b"during the outage")
        assert time.monotonic() - started < 30
        with replica.store.open_version(published) as directory:  # the local cache needs no store
            assert content_sha256(directory) == published.manifest.sha256
        link.restore()
        assert list(replica.store.snapshot()["gen"].versions) == [published.version]
    finally:
        link.close()
