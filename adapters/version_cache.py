"""VersionCache: one replica's local copies of adapter versions read from a remote store.

The registry reads adapters from directories; a remote store (adapters/s3_store.py) hands
it one of these instead of its own objects. Layout under the cache root:

    <root>/.tmp/<owner>/<uuid>/        a download in progress (owner = host-pid)
    <root>/.trash/<owner>-<uuid>/      an evicted entry awaiting rmtree
    <root>/<name>/<version>/           a complete copy, verified, never modified

Invariants:
- An entry appears whole or not at all: files land in a private temp dir, their sha256 is
  checked against the version's manifest, then one rename puts the directory in place.
- Entries are content-addressed like the versions they copy, so a restart reuses every
  entry without refetching; each is re-hashed once per process before its first use.
- Total bytes stay under `max_bytes`: after each fill, least recently used entries (by the
  entry directory's mtime, which every use touches, so the order survives restarts) are
  evicted, except the newest one and any entry a reader holds (readers hold a shared
  flock on the entry directory; eviction takes an exclusive one without waiting).
- Several processes may share one root: renames and flocks are their only coordination.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from adapters.package import content_sha256
from adapters.store import STALE_STAGING_S, VersionCorrupt, pid_alive

logger = logging.getLogger(__name__)

TMP_DIR = ".tmp"
TRASH_DIR = ".trash"


@dataclass(frozen=True)
class CacheEntry:
    name: str
    version: str
    directory: Path
    nbytes: int
    last_used: float


class VersionCache:
    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.owner = f"{socket.gethostname()}-{os.getpid()}"
        self._verified: set[Path] = set()  # entries hashed by this process
        self._fill_locks: dict[Path, threading.Lock] = {}
        self._guard = threading.Lock()

    def path(self, name: str, version: str) -> Path:
        return self.root / name / version

    def cleanup(self) -> None:
        """Remove downloads of dead processes on this host, and evicted entries left behind."""
        (self.root / TMP_DIR).mkdir(parents=True, exist_ok=True)
        (self.root / TRASH_DIR).mkdir(exist_ok=True)
        host, now = socket.gethostname(), time.time()
        for entry in (self.root / TMP_DIR).iterdir():
            owner_host, _, pid = entry.name.rpartition("-")
            if owner_host == host and pid.isdigit():
                stale = int(pid) == os.getpid() or not pid_alive(int(pid))
            else:
                stale = now - entry.stat().st_mtime > STALE_STAGING_S
            if stale:
                shutil.rmtree(entry, ignore_errors=True)
        for entry in (self.root / TRASH_DIR).iterdir():
            shutil.rmtree(entry, ignore_errors=True)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private empty directory on the cache's filesystem (so `adopt` is a rename)."""
        path = self.root / TMP_DIR / self.owner / uuid.uuid4().hex
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    @contextmanager
    def open(self, name: str, version: str, sha256: str, fetch: Callable[[Path], None]) -> Iterator[Path]:
        """The entry for (name, version), fetched first if absent; held until the block exits.

        `fetch(directory)` writes the version's files into an empty directory.
        """
        entry = self.path(name, version)
        fd = self._hold(entry, sha256)
        if fd is None:
            with self._fill_lock(entry):  # one download per entry however many threads ask
                fd = self._hold(entry, sha256)
                if fd is None:
                    with self.staging() as tmp:
                        fetch(tmp)
                        self._install(tmp, entry, sha256)
                    fd = self._hold(entry, sha256)
                    if fd is None:
                        raise FileNotFoundError(f"cache entry {entry} vanished right after it was filled")
            self._evict(keep=entry)
        try:
            yield entry
        finally:
            os.close(fd)  # releases the shared lock

    def adopt(self, name: str, version: str, sha256: str, directory: Path) -> None:
        """Move a complete local copy in (an upload this replica just published)."""
        entry = self.path(name, version)
        with self._fill_lock(entry):
            if not entry.is_dir():
                self._install(directory, entry, sha256)
        self._evict(keep=entry)

    def entries(self) -> list[CacheEntry]:
        """Complete entries, least recently used first."""
        found = []
        if not self.root.is_dir():
            return found
        for name_dir in self.root.iterdir():
            if name_dir.name.startswith(".") or not name_dir.is_dir():
                continue
            for entry in name_dir.iterdir():
                try:
                    nbytes = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
                    found.append(CacheEntry(name_dir.name, entry.name, entry, nbytes, entry.stat().st_mtime))
                except FileNotFoundError:
                    continue  # evicted while we looked
        return sorted(found, key=lambda e: e.last_used)

    # --- internals ----------------------------------------------------------------------

    def _fill_lock(self, entry: Path) -> threading.Lock:
        with self._guard:
            return self._fill_locks.setdefault(entry, threading.Lock())

    def _hold(self, entry: Path, sha256: str) -> int | None:
        """A shared-locked fd on the entry if it is present and sound, else None."""
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            if os.stat(entry).st_ino != os.fstat(fd).st_ino:
                os.close(fd)
                return None  # evicted (renamed away) between open and lock
            if entry not in self._verified:
                # Not written by this process: a torn or edited copy is refetched, never served.
                if content_sha256(entry) != sha256:
                    logger.warning("cached %s does not match its content hash; fetching it again", entry)
                    os.close(fd)
                    self._discard(entry)
                    return None
                self._verified.add(entry)
            os.utime(entry)  # LRU order, kept on disk so a restart inherits it
        except FileNotFoundError:
            os.close(fd)
            return None
        return fd

    def _install(self, directory: Path, entry: Path, sha256: str) -> None:
        actual = content_sha256(directory)
        if actual != sha256:
            raise VersionCorrupt(f"{entry.parent.name}@{entry.name}: fetched bytes hash to {actual[:12]}, "
                                 f"the manifest says {sha256[:12]}")
        # No fsync: a copy torn by a power cut fails the next process's hash check and is refetched.
        entry.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(directory, entry)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            return  # another process installed the same bytes first
        self._verified.add(entry)

    def _discard(self, entry: Path) -> bool:
        """Rename the entry out of sight and delete it, unless a reader holds it."""
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return True
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            grave = self.root / TRASH_DIR / f"{self.owner}-{uuid.uuid4().hex}"
            grave.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(entry, grave)
            except FileNotFoundError:
                return True
            self._verified.discard(entry)
        finally:
            os.close(fd)
        shutil.rmtree(grave, ignore_errors=True)
        return True

    def _evict(self, keep: Path) -> None:
        entries = self.entries()
        total = sum(e.nbytes for e in entries)
        for entry in entries:
            if total <= self.max_bytes:
                return
            if entry.directory == keep:
                continue
            if self._discard(entry.directory):
                total -= entry.nbytes
                logger.info("evicted %s@%s (%d bytes) from the local cache", entry.name, entry.version, entry.nbytes)
        if total > self.max_bytes:
            logger.warning("local adapter cache holds %d bytes, over its %d-byte budget: the rest is in use",
                           total, self.max_bytes)
