"""S3Store: the adapter store on S3-compatible object storage (AWS S3, MinIO, Ceph RGW, GCS).

Chosen with `--adapters-store s3://<bucket>/<prefix>`. Endpoint, region and credentials
come the standard way: boto3's environment and config chain (AWS_ENDPOINT_URL for a
server other than AWS, AWS_REGION, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profiles,
instance or pod roles). Layout under the prefix, the same as LocalStore's, so a version
copied down with `aws s3 cp --recursive` is a PEFT folder:

    <name>/versions/<version>/adapter_config.json        immutable objects, written first
    <name>/versions/<version>/adapter_model.safetensors
    <name>/versions/<version>/manifest.json              the version marker, written last
    <name>/CURRENT                                        the current version id
    <name>/PINNED                                         present = keep resident everywhere
    .routes.json (any dot name)                           small documents

Invariants:
- A version exists exactly when its marker does. The marker is written after every other
  object of the version, with If-None-Match: *, so a reader never sees a version with
  objects missing, and two replicas publishing the same bytes agree on one marker. A
  process killed mid-publish leaves only unmarked objects, which `cleanup` removes once
  they are older than `stale_after_s` (another replica may still be writing them).
- CURRENT and the documents change by compare-and-swap: read (with its ETag), compute,
  then PUT with If-Match: <etag> (If-None-Match: * when absent). A lost race (412, or 409
  while another conditional write is in flight) re-reads and recomputes, so concurrent
  writers never lose each other's changes. PINNED is created with If-None-Match: *.
- `snapshot` is one LIST of the prefix (one request per 1000 keys) plus a GET for each
  marker and CURRENT whose ETag it has not seen: a poll where nothing changed is the LIST.
- The registry reads versions through `open_version`, which materialises them into this
  replica's VersionCache (bounded, LRU, verified against the manifest's sha256) and hands
  out that directory; a restart reuses the cache without fetching again.
- Every failure to reach the store (network, credentials, missing bucket, 5xx) is raised
  as StoreUnavailable, with nothing half-visible left behind.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import boto3
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from adapters.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, AdapterManifest
from adapters.package import NAME_PATTERN
from adapters.store import (
    CURRENT_FILE,
    PINNED_FILE,
    STALE_STAGING_S,
    VERSIONS_DIR,
    PutResult,
    StoredAdapter,
    StoredDocument,
    StoredVersion,
    StoreError,
    StoreUnavailable,
    VersionCorrupt,
    document_key,
)
from adapters.version_cache import VersionCache

logger = logging.getLogger(__name__)

S3_URL = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?$")
# Object names inside a version are the server's own (the upload handler chose them).
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A conditional write that lost: 412 (the ETag moved, or the object appeared), 409 (AWS: another
# conditional write to the key is in flight).
PRECONDITION_LOST = {"PreconditionFailed", "ConditionalRequestConflict"}
SWAP_ATTEMPTS = 8
MANIFEST_FETCHERS = 8


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/"); the prefix may be empty."""
    match = S3_URL.fullmatch(url.strip())
    if match is None:
        raise ValueError(f"{url!r} is not s3://<bucket>[/<prefix>] (bucket: 3-63 of a-z 0-9 . -)")
    prefix = "/".join(part for part in (match["prefix"] or "").split("/") if part)
    if any(part in (".", "..") for part in prefix.split("/")):
        raise ValueError(f"{url!r}: the prefix may not contain . or .. segments")
    return match["bucket"], prefix + "/" if prefix else ""


def make_client() -> Any:
    """An S3 client from boto3's standard chain; bounded waits, so an outage answers in seconds."""
    retries = {"mode": os.environ.get("AWS_RETRY_MODE", "standard")}  # max attempts: AWS_MAX_ATTEMPTS
    config = Config(connect_timeout=5, read_timeout=60, retries=retries)
    return boto3.session.Session().client("s3", config=config)


@dataclass(frozen=True)
class _Object:
    etag: str
    modified: float  # unix time


def _marker_version(relative: str) -> str | None:
    """`versions/<version>/manifest.json` -> version."""
    parts = relative.split("/")
    if len(parts) == 3 and parts[0] == VERSIONS_DIR and parts[2] == MANIFEST_FILE and NAME_PATTERN.fullmatch(parts[1]):
        return parts[1]
    return None


def _newest(versions) -> str:
    return max(versions, key=lambda v: (v.created_at, v.version)).version


class S3Store:
    def __init__(self, url: str, cache: VersionCache, client: Any | None = None,
                 stale_after_s: float = STALE_STAGING_S):
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}"
        self.cache = cache
        self.client = client if client is not None else make_client()
        self.stale_after_s = stale_after_s
        # Markers are immutable and CURRENT changes its ETag with its text: both read once per ETag.
        self._manifests: dict[str, tuple[str, AdapterManifest | None]] = {}
        self._texts: dict[str, tuple[str, str]] = {}

    def __repr__(self) -> str:
        return f"S3Store({self.url})"

    # --- start ----------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Check the bucket answers; remove unmarked version objects and multipart uploads
        older than `stale_after_s` (a publisher that died), and the cache's own debris."""
        self.cache.cleanup()
        with self._remote("reach the bucket"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _status(exc) == 404:
                    raise StoreUnavailable(f"adapter store {self.url}: bucket {self.bucket!r} does not exist; "
                                           "create it first") from exc
                raise
        cutoff = time.time() - self.stale_after_s
        groups: dict[str, list[tuple[str, _Object]]] = {}
        for key, obj in self._list("").items():
            parts = key.split("/")
            if len(parts) == 4 and parts[1] == VERSIONS_DIR:
                groups.setdefault("/".join(parts[:3]), []).append((parts[3], obj))
        for base, files in groups.items():
            if MANIFEST_FILE not in {f for f, _ in files} and all(o.modified < cutoff for _, o in files):
                logger.info("removing objects of an unfinished publish: %s%s/", self.url, base)
                self._delete([f"{base}/{f}" for f, _ in files])
        with self._remote("list unfinished multipart uploads"):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for upload in page.get("Uploads", []):
                    if upload["Initiated"].timestamp() < cutoff:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                           UploadId=upload["UploadId"])

    # --- reading --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, StoredAdapter]:
        by_name: dict[str, dict[str, _Object]] = {}
        for key, obj in self._list("").items():
            name, slash, rest = key.partition("/")
            if slash and NAME_PATTERN.fullmatch(name):
                by_name.setdefault(name, {})[rest] = obj
        self._prefetch_manifests(by_name)
        known = {f"{n}/{r}" for n, keys in by_name.items() for r in keys}
        self._manifests = {k: v for k, v in self._manifests.items() if k in known}
        self._texts = {k: v for k, v in self._texts.items() if k in known}
        adapters = {}
        for name, keys in sorted(by_name.items()):
            stored = self._stored(name, keys)
            if stored is not None:
                adapters[name] = stored
        return adapters

    @contextmanager
    def open_version(self, version: StoredVersion) -> Iterator[Path]:
        if version.manifest is None:
            raise StoreError(f"{version.name}@{version.version} has no manifest")  # never made by this store
        with self.cache.open(version.name, version.version, version.manifest.sha256,
                             lambda into: self._download(version, into)) as directory:
            yield directory

    def _download(self, version: StoredVersion, into: Path) -> None:
        base = f"{version.name}/{VERSIONS_DIR}/{version.version}/"
        names = [k[len(base):] for k in self._list(base)]
        missing = {CONFIG_FILE, WEIGHTS_FILE} - set(names)
        if missing:
            raise VersionCorrupt(f"{self.url}{base} lacks {', '.join(sorted(missing))}")
        for name in names:
            if FILE_NAME.fullmatch(name):
                with self._remote(f"download {base}{name}"):
                    self.client.download_file(self.bucket, self.prefix + base + name, str(into / name))
        logger.info("fetched %s@%s from %s", version.name, version.version, self.url)

    def _stored(self, name: str, keys: dict[str, _Object]) -> StoredAdapter | None:
        versions: dict[str, StoredVersion] = {}
        for relative, obj in keys.items():
            version = _marker_version(relative)
            manifest = self._manifest(f"{name}/{relative}", obj.etag) if version else None
            # A marker whose manifest is not this version's was not written by us: skip it.
            if manifest is None or manifest.name != name or manifest.version != version:
                continue
            versions[version] = StoredVersion(name, version, self.cache.path(name, version), manifest,
                                              manifest.created_at or obj.modified)
        if not versions:
            return None
        current_obj = keys.get(CURRENT_FILE)
        current = self._text(f"{name}/{CURRENT_FILE}", current_obj.etag).strip() if current_obj else None
        if current not in versions:
            current = _newest(versions.values())  # no alias yet, or it names a deleted version
        return StoredAdapter(name, versions, current, PINNED_FILE in keys)

    def _read_name(self, name: str) -> StoredAdapter | None:
        if not NAME_PATTERN.fullmatch(name):
            return None
        keys = {k[len(name) + 1:]: o for k, o in self._list(f"{name}/").items()}
        self._prefetch_manifests({name: keys})
        return self._stored(name, keys)

    def _require(self, name: str) -> StoredAdapter:
        stored = self._read_name(name)
        if stored is None:
            raise StoreError(f"adapter {name!r} is not stored")
        return stored

    def _prefetch_manifests(self, by_name: dict[str, dict[str, _Object]]) -> None:
        """Markers not read before, fetched in parallel (a fresh replica reads every one)."""
        wanted = [(f"{n}/{r}", o.etag) for n, keys in by_name.items() for r, o in keys.items()
                  if _marker_version(r) and self._manifests.get(f"{n}/{r}", ("",))[0] != o.etag]
        if len(wanted) > 1:
            with ThreadPoolExecutor(MANIFEST_FETCHERS) as pool:
                list(pool.map(lambda item: self._manifest(*item), wanted))

    def _manifest(self, key: str, etag: str) -> AdapterManifest | None:
        cached = self._manifests.get(key)
        if cached is not None and cached[0] == etag:
            return cached[1]
        got = self._get(key)
        if got is None:
            return None  # deleted since the listing
        manifest = _parse_manifest(got[0])
        self._manifests[key] = (got[1], manifest)
        return manifest

    def _text(self, key: str, etag: str) -> str:
        cached = self._texts.get(key)
        if cached is not None and cached[0] == etag:
            return cached[1]
        got = self._get(key)
        if got is None:
            return ""
        text = got[0].decode("utf-8", "replace")
        self._texts[key] = (got[1], text)
        return text

    # --- writing --------------------------------------------------------------------------

    @contextmanager
    def staging(self) -> Iterator[Path]:
        with self.cache.staging() as path:  # on the cache's filesystem: a publish moves it in
            yield path

    def put(self, name: str, staged: Path, manifest: AdapterManifest) -> PutResult:
        if not NAME_PATTERN.fullmatch(name) or manifest.name != name:
            raise StoreError(f"invalid adapter name {name!r}")
        base = f"{name}/{VERSIONS_DIR}/{manifest.version}/"
        stored = self._fetch_manifest(base + MANIFEST_FILE)
        created = False
        if stored is None:
            manifest.write(staged)
            for path in sorted(staged.iterdir()):
                if path.is_file() and path.name != MANIFEST_FILE:
                    with self._remote(f"upload {base}{path.name}"):
                        self.client.upload_file(str(path), self.bucket, self.prefix + base + path.name)
            created = self._put(base + MANIFEST_FILE, (staged / MANIFEST_FILE).read_bytes(), absent=True)
            # Not created: another replica published these exact bytes first; its marker stands.
            stored = manifest if created else self._fetch_manifest(base + MANIFEST_FILE)
            if stored is None:
                raise StoreError(f"{name}@{manifest.version} was deleted while it was being published")
        stored.write(staged)
        # The uploader already holds the bytes: its cache takes them without a download.
        self.cache.adopt(name, manifest.version, manifest.sha256, staged)
        self.set_current(name, manifest.version)
        version = StoredVersion(name, manifest.version, self.cache.path(name, manifest.version), stored,
                                stored.created_at or time.time())
        return PutResult(version, created)

    def set_current(self, name: str, version: str) -> None:
        if self._fetch_manifest(f"{name}/{VERSIONS_DIR}/{version}/{MANIFEST_FILE}") is None:
            self._require(name)
            raise StoreError(f"adapter {name!r} has no version {version!r}")
        self._swap(f"{name}/{CURRENT_FILE}", lambda _: version)

    def set_pinned(self, name: str, pinned: bool) -> None:
        self._require(name)
        if pinned:
            self._put(f"{name}/{PINNED_FILE}", b"", absent=True)  # False: pinned already
        else:
            self._delete([f"{name}/{PINNED_FILE}"])

    def delete(self, name: str, version: str | None = None) -> str | None:
        stored = self._require(name)
        if version is None or set(stored.versions) == {version}:
            # Markers first (the live one last, so readers keep it until the end), then the rest.
            others = [v for v in stored.versions if v != stored.current]
            self._delete([f"{name}/{VERSIONS_DIR}/{v}/{MANIFEST_FILE}" for v in others])
            self._delete([f"{name}/{VERSIONS_DIR}/{stored.current}/{MANIFEST_FILE}"])
            self._delete(list(self._list(f"{name}/")))
            return None
        if version not in stored.versions:
            raise StoreError(f"adapter {name!r} has no version {version!r}")

        def away_from_deleted(current: str | None) -> str | None:
            """The newest other version, decided on the store's state at the time of the write."""
            if current is not None and current.strip() != version:
                return None  # moved elsewhere meanwhile
            remaining = [v for v in self._require(name).versions.values() if v.version != version]
            if not remaining:
                raise StoreError(f"adapter {name!r}: the other versions were deleted meanwhile")
            return _newest(remaining)

        if stored.current == version:
            # Rolled back before the marker goes, so no reader sees CURRENT name a missing version.
            self._swap(f"{name}/{CURRENT_FILE}", away_from_deleted)
        base = f"{name}/{VERSIONS_DIR}/{version}/"
        self._delete([base + MANIFEST_FILE])
        self._delete(list(self._list(base)))
        after = self._read_name(name)
        return after.current if after else None

    # --- documents --------------------------------------------------------------------------

    def document_stamp(self, key: str) -> str | None:
        key = document_key(key)
        with self._remote(f"check {key}"):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)["ETag"]
            except ClientError as exc:
                if _status(exc) == 404:
                    return None
                raise

    def read_document(self, key: str) -> StoredDocument | None:
        got = self._get(document_key(key))
        return None if got is None else StoredDocument(got[0].decode("utf-8"), got[1])

    def update_document(self, key: str, change: Callable[[str | None], str]) -> None:
        self._swap(document_key(key), change)

    # --- S3 calls ------------------------------------------------------------------------------

    @contextmanager
    def _remote(self, doing: str) -> Iterator[None]:
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise StoreUnavailable(f"adapter store {self.url}: could not {doing}: "
                                   f"{error.get('Code') or _status(exc)} {error.get('Message', '')}".rstrip()) from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise StoreUnavailable(f"adapter store {self.url}: could not {doing}: {exc}") from exc

    def _list(self, relative: str) -> dict[str, _Object]:
        """Every object under prefix + relative, keyed by its path relative to the store's prefix."""
        objects = {}
        with self._remote(f"list {relative or 'the store'}"):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + relative):
                for item in page.get("Contents", []):
                    objects[item["Key"][len(self.prefix):]] = _Object(item["ETag"], item["LastModified"].timestamp())
        return objects

    def _get(self, key: str) -> tuple[bytes, str] | None:
        with self._remote(f"read {key}"):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            except ClientError as exc:
                if _status(exc) == 404:
                    return None
                raise
            return response["Body"].read(), response["ETag"]

    def _fetch_manifest(self, key: str) -> AdapterManifest | None:
        """The marker as stored right now (no cache: writers decide on it)."""
        got = self._get(key)
        return None if got is None else _parse_manifest(got[0])

    def _put(self, key: str, body: bytes, *, etag: str | None = None, absent: bool = False) -> bool:
        """PUT `key`; with `etag` only over that version, with `absent` only if none exists.
        False when that precondition failed (another writer got there first)."""
        conditions = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"} if absent else {}
        with self._remote(f"write {key}"):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=body, **conditions)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                lost = code in PRECONDITION_LOST or _status(exc) in (409, 412)
                # If-Match on an object deleted meanwhile: also someone else's change.
                if conditions and (lost or (etag is not None and _status(exc) == 404)):
                    return False
                raise
        return True

    def _swap(self, key: str, change: Callable[[str | None], str | None]) -> None:
        """Compare-and-swap `key` to change(text); `change` returning None (or the same text) writes nothing."""
        for attempt in range(SWAP_ATTEMPTS):
            got = self._get(key)
            text = got[0].decode("utf-8") if got is not None else None
            new = change(text)
            if new is None or new == text:
                return
            if self._put(key, new.encode("utf-8"), etag=got[1] if got else None, absent=got is None):
                return
            time.sleep(random.uniform(0, 0.02 * 2**attempt))  # a lost race: back off, re-read, redo
        raise StoreError(f"{self.url}{key}: changed by other writers {SWAP_ATTEMPTS} times in a row; try again")

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes up to 1000 keys
            batch = [{"Key": self.prefix + k} for k in keys[start:start + 1000]]
            with self._remote("delete objects"):
                response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                first = response["Errors"][0]
                raise StoreUnavailable(f"adapter store {self.url}: could not delete {first.get('Key')}: "
                                       f"{first.get('Code')} {first.get('Message', '')}")


def _parse_manifest(body: bytes) -> AdapterManifest | None:
    try:
        return AdapterManifest.from_dict(json.loads(body))
    except (ValueError, TypeError):
        return None


def _status(exc: ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
