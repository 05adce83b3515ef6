"""AdapterStore: where adapter versions live, shared by every replica that uses it.

Two implementations: LocalStore here (a directory, possibly an RWX volume shared by
replicas) and S3Store in adapters/s3_store.py (S3-compatible object storage, read through
a local disk cache). Both keep the same guarantees: versions are immutable and
content-addressed, a version is visible only once complete, the current alias and pins are
small records changed atomically, and small documents (the task routes) beside the adapters
change by read-modify-write that never loses a concurrent writer's change.

Layout of a LocalStore root (a local disk or an RWX volume shared by replicas):

    <root>/.tmp/<owner>/...                 staging; never read as adapters
    <root>/.trash/<owner>-<id>/             deleted names/versions awaiting rmtree
    <root>/<name>/versions/<version>/       immutable: adapter_config.json,
                                            adapter_model.safetensors, manifest.json
    <root>/<name>/CURRENT                   the current version id (replaced atomically)
    <root>/<name>/PINNED                    present = keep resident on every replica
    <root>/<name>/adapter_config.json       a hand-dropped PEFT folder: one version
    <root>/.<document>                      a small document (`.routes.json`), replaced atomically

Every change is a single rename (os.replace) of something fully written and fsynced
beforehand, so a reader on any replica sees a version either complete or not at all, and
a process killed mid-upload leaves only staging debris that `cleanup` removes at start.
Version ids are content hashes, so two replicas publishing the same bytes agree.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol

from adapters.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, AdapterManifest
from adapters.package import NAME_PATTERN, content_sha256

logger = logging.getLogger(__name__)

TMP_DIR = ".tmp"
TRASH_DIR = ".trash"
VERSIONS_DIR = "versions"
CURRENT_FILE = "CURRENT"
PINNED_FILE = "PINNED"
# Staging from another host cannot be checked for liveness; past this age it is debris.
STALE_STAGING_S = 3600.0
# Documents are dot names, so a scan for adapters never reads one as an adapter.
DOCUMENT_PATTERN = re.compile(r"^\.[a-z0-9][a-z0-9._-]{0,63}$")


class StoreError(Exception):
    """A store operation that cannot be done as asked (unknown name or version, a lost race)."""


class StoreUnavailable(Exception):
    """The store cannot be reached (network, credentials, a missing bucket): nothing was changed."""


class VersionCorrupt(Exception):
    """A version's bytes do not match the content hash its manifest records."""


@dataclass(frozen=True)
class StoredVersion:
    name: str
    version: str
    directory: Path
    # None for a hand-dropped folder without manifest.json: the reader must validate it.
    manifest: AdapterManifest | None
    created_at: float


@dataclass(frozen=True)
class StoredAdapter:
    name: str
    versions: Mapping[str, StoredVersion]
    current: str | None
    pinned: bool


@dataclass(frozen=True)
class PutResult:
    version: StoredVersion
    created: bool  # False: these exact bytes were already stored under this name


@dataclass(frozen=True)
class StoredDocument:
    text: str
    stamp: str  # changes whenever the text does


class AdapterStore(Protocol):
    """What the registry and the route table need from a store.

    Every method may raise StoreUnavailable (a remote store that cannot be reached); none
    leaves a half-made change visible when it does.
    """

    def snapshot(self) -> dict[str, StoredAdapter]:
        """Every adapter name with its versions, current version and pin, as stored now."""

    @contextmanager
    def open_version(self, version: StoredVersion) -> Iterator[Path]:
        """The version's files in a local directory, which stays in place until the block exits."""

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """An empty private directory to write a candidate into; removed on exit."""

    def put(self, name: str, staged: Path, manifest: AdapterManifest) -> PutResult:
        """Publish `staged` as an immutable version of `name` and make it current."""

    def set_current(self, name: str, version: str) -> None: ...

    def set_pinned(self, name: str, pinned: bool) -> None: ...

    def delete(self, name: str, version: str | None = None) -> str | None:
        """Remove a version (or the whole name); returns the version that is current after."""

    def cleanup(self) -> None:
        """Remove debris left by processes that died mid-write."""

    def document_stamp(self, key: str) -> str | None:
        """Cheap check: the stamp of document `key` (a dot name), None if there is none."""

    def read_document(self, key: str) -> StoredDocument | None: ...

    def update_document(self, key: str, change: Callable[[str | None], str]) -> None:
        """Replace document `key` with change(current text); a concurrent update is never lost
        (`change` runs again on the newer text when another writer got in first)."""


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flush every file and the directory itself, so a rename publishes durable bytes."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(directory)


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / TMP_DIR
        self.trash = self.root / TRASH_DIR
        self.owner = _owner()
        # Version dirs are immutable, so their manifests are read once per process.
        self._manifests: dict[Path, AdapterManifest | None] = {}
        # Hand-dropped folders may be edited in place: their hash is keyed by file stats.
        self._folder_hashes: dict[Path, tuple[tuple, str]] = {}

    # --- start ----------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove staging of dead processes (this host) or old staging (other hosts), and trash."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        self.trash.mkdir(exist_ok=True)
        host = socket.gethostname()
        now = time.time()
        for entry in self.tmp.iterdir():
            owner_host, _, pid = entry.name.rpartition("-")
            if owner_host == host and pid.isdigit():
                stale = not pid_alive(int(pid)) or int(pid) == os.getpid()
            else:
                stale = now - entry.stat().st_mtime > STALE_STAGING_S
            if stale:
                logger.info("removing staging debris %s", entry)
                _remove(entry)
        for entry in self.trash.iterdir():
            _remove(entry)

    # --- reading --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, StoredAdapter]:
        adapters: dict[str, StoredAdapter] = {}
        if not self.root.is_dir():
            return adapters
        for directory in sorted(self.root.iterdir()):
            if directory.name.startswith(".") or not NAME_PATTERN.fullmatch(directory.name):
                continue
            try:
                stored = self._read_name(directory)
            except FileNotFoundError:
                continue  # deleted while we looked: absent from this snapshot
            if stored is not None:
                adapters[stored.name] = stored
        return adapters

    def _read_name(self, directory: Path) -> StoredAdapter | None:
        name = directory.name
        versions: dict[str, StoredVersion] = {}
        versions_dir = directory / VERSIONS_DIR
        if versions_dir.is_dir():
            for version_dir in versions_dir.iterdir():
                manifest = self._manifest(version_dir)
                # A version dir whose name is not its content hash was not made by us: skip it.
                if manifest is None or manifest.version != version_dir.name or manifest.name != name:
                    continue
                versions[manifest.version] = StoredVersion(
                    name, manifest.version, version_dir, manifest, manifest.created_at or 0.0
                )
        if (directory / CONFIG_FILE).is_file():
            # Listed even without weights, so the registry reports why it cannot serve it.
            folder = self._folder_version(directory)
            versions.setdefault(folder.version, folder)
        if not versions:
            return None
        current = _read_text(directory / CURRENT_FILE)
        if current not in versions:
            # No alias yet (first publish in progress, or a hand-dropped folder): newest wins.
            current = max(versions.values(), key=lambda v: (v.created_at, v.version)).version
        return StoredAdapter(name, versions, current, (directory / PINNED_FILE).exists())

    def _manifest(self, version_dir: Path) -> AdapterManifest | None:
        if version_dir not in self._manifests:
            try:
                data = json.loads((version_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
                self._manifests[version_dir] = AdapterManifest.from_dict(data)
            except FileNotFoundError:
                return None  # being deleted: not cached, so a later look sees it gone
            except (ValueError, TypeError):
                self._manifests[version_dir] = None
        return self._manifests[version_dir]

    def _folder_version(self, directory: Path) -> StoredVersion:
        files = [directory / f for f in (CONFIG_FILE, WEIGHTS_FILE) if (directory / f).is_file()]
        stats = tuple((s.st_size, s.st_mtime_ns) for s in (f.stat() for f in files))
        cached = self._folder_hashes.get(directory)
        if cached is None or cached[0] != stats:
            sha = content_sha256(directory) if len(files) == 2 else _config_only_sha(files[0])
            cached = (stats, sha)
            self._folder_hashes[directory] = cached
        # A trainer-written manifest.json is provenance only; the files decide the version.
        return StoredVersion(directory.name, cached[1][:12], directory, None, stats[-1][1] / 1e9)

    @contextmanager
    def open_version(self, version: StoredVersion) -> Iterator[Path]:
        yield version.directory  # already local; deletes rename it away, never edit it in place

    # --- writing --------------------------------------------------------------------------

    @contextmanager
    def staging(self) -> Iterator[Path]:
        base = self.tmp / self.owner
        base.mkdir(parents=True, exist_ok=True)
        path = base / uuid.uuid4().hex
        path.mkdir()
        try:
            yield path
        finally:
            _remove(path)

    def put(self, name: str, staged: Path, manifest: AdapterManifest) -> PutResult:
        if not NAME_PATTERN.fullmatch(name) or manifest.name != name:
            raise StoreError(f"invalid adapter name {name!r}")
        manifest.write(staged)
        fsync_tree(staged)
        versions_dir = self.root / name / VERSIONS_DIR
        versions_dir.mkdir(parents=True, exist_ok=True)
        target = versions_dir / manifest.version
        created = True
        # Nothing is ever opened in a target; a rename makes the whole folder appear at once.
        if target.exists():
            created = False
        else:
            try:
                os.rename(staged, target)
            except OSError:
                if not target.is_dir():  # not "another replica published the same bytes first"
                    raise
                created = False
            else:
                _fsync_dir(versions_dir)
        self.set_current(name, manifest.version)
        stored = self._read_name(self.root / name)
        return PutResult(stored.versions[manifest.version], created)

    def set_current(self, name: str, version: str) -> None:
        stored = self._require(name)
        if version not in stored.versions:
            raise StoreError(f"adapter {name!r} has no version {version!r}")
        self._write_atomic(self.root / name / CURRENT_FILE, version)

    def set_pinned(self, name: str, pinned: bool) -> None:
        self._require(name)
        marker = self.root / name / PINNED_FILE
        if pinned:
            self._write_atomic(marker, "")
        else:
            marker.unlink(missing_ok=True)

    def delete(self, name: str, version: str | None = None) -> str | None:
        stored = self._require(name)
        directory = self.root / name
        if version is None or set(stored.versions) == {version}:
            self._tombstone(directory)
            return None
        chosen = stored.versions.get(version)
        if chosen is None:
            raise StoreError(f"adapter {name!r} has no version {version!r}")
        if stored.current == version:
            # Deleting the live version rolls back to the newest remaining one first, so
            # no reader ever sees CURRENT naming a version that is gone.
            remaining = [v for v in stored.versions.values() if v.version != version]
            self.set_current(name, max(remaining, key=lambda v: (v.created_at, v.version)).version)
        if chosen.directory == directory:
            self._tombstone_folder_files(directory)
        else:
            self._tombstone(chosen.directory)
        return self._read_name(directory).current

    # --- documents --------------------------------------------------------------------------

    def document_stamp(self, key: str) -> str | None:
        try:
            stat = (self.root / document_key(key)).stat()
        except FileNotFoundError:
            return None
        # The inode too: a replacement written within the clock's granularity still differs.
        return f"{stat.st_ino}-{stat.st_mtime_ns}-{stat.st_size}"

    def read_document(self, key: str) -> StoredDocument | None:
        path = self.root / document_key(key)
        try:
            with open(path, encoding="utf-8") as fh:
                stat = os.fstat(fh.fileno())
                return StoredDocument(fh.read(), f"{stat.st_ino}-{stat.st_mtime_ns}-{stat.st_size}")
        except FileNotFoundError:
            return None

    def update_document(self, key: str, change: Callable[[str | None], str]) -> None:
        path = self.root / document_key(key)
        self.root.mkdir(parents=True, exist_ok=True)
        # Replicas sharing the directory serialise on the lock; the rename publishes.
        with open(self.root / f"{key}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._write_atomic(path, change(_read_text_raw(path)))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _require(self, name: str) -> StoredAdapter:
        stored = self._read_name(self.root / name) if NAME_PATTERN.fullmatch(name) else None
        if stored is None:
            raise StoreError(f"adapter {name!r} is not stored")
        return stored

    def _write_atomic(self, path: Path, text: str) -> None:
        base = self.tmp / self.owner
        base.mkdir(parents=True, exist_ok=True)
        temporary = base / f"{path.name}.{uuid.uuid4().hex}"
        try:
            with open(temporary, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)  # a full disk must not leave the temp behind
        _fsync_dir(path.parent)

    def _tombstone(self, directory: Path) -> None:
        """Rename out of sight (atomic), then delete at leisure; a crash leaves only trash."""
        self.trash.mkdir(parents=True, exist_ok=True)
        grave = self.trash / f"{self.owner}-{uuid.uuid4().hex}"
        os.rename(directory, grave)
        _fsync_dir(directory.parent)
        _remove(grave)

    def _tombstone_folder_files(self, directory: Path) -> None:
        """A hand-dropped folder's own files are one version; the config goes first, which hides it."""
        grave = self.trash / f"{self.owner}-{uuid.uuid4().hex}"
        grave.mkdir(parents=True)
        for filename in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE):
            if (directory / filename).exists():
                os.rename(directory / filename, grave / filename)
        _fsync_dir(directory)
        _remove(grave)


def document_key(key: str) -> str:
    if not DOCUMENT_PATTERN.fullmatch(key):
        raise StoreError(f"invalid document name {key!r}")
    return key


def _read_text_raw(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _config_only_sha(config: Path) -> str:
    """Identity of a folder that lacks its weights (it is listed only to be rejected)."""
    return hashlib.sha256(config.read_bytes()).hexdigest()


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
