"""LocalStore: atomic immutable versions, the CURRENT alias, deletes, crash debris."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adapters.manifest import AdapterManifest
from adapters.package import content_sha256
from adapters.store import LocalStore, StoreError


def stage(store: LocalStore, staging: Path, name: str, payload: bytes, created_at: float | None = None):
    (staging / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (staging / "adapter_model.safetensors").write_bytes(payload)
    sha = content_sha256(staging)
    manifest = AdapterManifest(name=name, version=sha[:12], sha256=sha, task="generate", peft_type="LORA", rank=4,
                               target_modules=("q_proj",), size_bytes=len(payload),
                               created_at=created_at or time.time())
    return store.put(name, staging, manifest)


def put(store: LocalStore, name: str, payload: bytes, created_at: float | None = None):
    with store.staging() as staging:
        return stage(store, staging, name, payload, created_at)


def test_put_publishes_an_immutable_version_and_flips_current(tmp_path):
    store = LocalStore(tmp_path)
    store.cleanup()
    first = put(store, "gen", b"one", 1.0)
    second = put(store, "gen", b"two", 2.0)
    assert first.created and second.created
    snapshot = store.snapshot()["gen"]
    assert set(snapshot.versions) == {first.version.version, second.version.version}
    assert snapshot.current == second.version.version
    assert (tmp_path / "gen" / "CURRENT").read_text() == second.version.version
    version_dir = tmp_path / "gen" / "versions" / first.version.version
    assert sorted(p.name for p in version_dir.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    # Same bytes again: same version, nothing rewritten, and it becomes current again.
    again = put(store, "gen", b"one", 3.0)
    assert not again.created and again.version.version == first.version.version
    assert store.snapshot()["gen"].current == first.version.version
    assert list((tmp_path / ".tmp").rglob("*.safetensors")) == []


def test_hand_dropped_peft_folder_is_one_version_and_can_gain_more(tmp_path):
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"w")
    store = LocalStore(tmp_path)
    (only,) = store.snapshot()["legacy"].versions.values()
    assert only.manifest is None and only.directory == folder
    assert only.version == content_sha256(folder)[:12]
    uploaded = put(store, "legacy", b"new")
    snapshot = store.snapshot()["legacy"]
    assert set(snapshot.versions) == {only.version, uploaded.version.version}
    assert snapshot.current == uploaded.version.version
    # Deleting the folder's own version removes its files, not the uploaded versions.
    store.delete("legacy", only.version)
    assert set(store.snapshot()["legacy"].versions) == {uploaded.version.version}
    assert not (folder / "adapter_config.json").exists()


def test_delete_current_version_rolls_back_and_last_delete_removes_the_name(tmp_path):
    store = LocalStore(tmp_path)
    old = put(store, "gen", b"old", 1.0).version.version
    new = put(store, "gen", b"new", 2.0).version.version
    assert store.delete("gen", new) == old
    assert store.snapshot()["gen"].current == old
    assert store.delete("gen", old) is None
    assert "gen" not in store.snapshot() and not (tmp_path / "gen").exists()
    assert list((tmp_path / ".trash").iterdir()) == []
    with pytest.raises(StoreError):
        store.delete("gen")
    with pytest.raises(StoreError):
        store.set_current("nope", "abc")


def test_pins_live_in_the_store(tmp_path):
    store = LocalStore(tmp_path)
    put(store, "gen", b"x")
    store.set_pinned("gen", True)
    assert LocalStore(tmp_path).snapshot()["gen"].pinned
    store.set_pinned("gen", False)
    assert not store.snapshot()["gen"].pinned


def test_cleanup_removes_dead_processes_staging_only(tmp_path):
    store = LocalStore(tmp_path)
    store.cleanup()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = store.owner.rpartition("-")[0]
    (tmp_path / ".tmp" / f"{host}-{dead.stdout.strip()}" / "x").mkdir(parents=True)
    live = tmp_path / ".tmp" / f"{host}-{os.getppid()}" / "y"
    live.mkdir(parents=True)
    (tmp_path / ".trash" / "old").mkdir()
    store.cleanup()
    assert sorted(p.name for p in (tmp_path / ".tmp").iterdir()) == [live.parent.name]
    assert list((tmp_path / ".trash").iterdir()) == []


def test_a_half_written_version_is_never_visible(tmp_path):
    store = LocalStore(tmp_path)
    with store.staging() as staging:
        (staging / "adapter_config.json").write_text("{}")
        assert store.snapshot() == {}
    # A version dir without its manifest (not made by put) is ignored, as is junk at the top.
    (tmp_path / "gen" / "versions" / "abcdef012345").mkdir(parents=True)
    (tmp_path / "UPPER").mkdir()
    assert store.snapshot() == {}


def test_concurrent_puts_of_one_name_each_get_exactly_one_version(tmp_path):
    store = LocalStore(tmp_path)
    payloads = [f"weights-{i}".encode() for i in range(8)] * 2  # each twice: idempotent races too
    results, errors = [], []

    def worker(payload: bytes) -> None:
        try:
            results.append(put(LocalStore(tmp_path), "gen", payload))
        except Exception as exc:  # collected: the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    snapshot = store.snapshot()["gen"]
    assert len(snapshot.versions) == 8
    assert sum(r.created for r in results) == 8
    assert snapshot.current in snapshot.versions
    for version in snapshot.versions.values():
        assert content_sha256(version.directory)[:12] == version.version
