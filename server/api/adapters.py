"""Adapter management: upload, list, versions, rollback, delete, load/unload, pin/unpin.

Every route needs the admin token (router dependency, checked before any body byte is
read). Uploads stream straight into a private staging dir under the store, counting bytes
as they arrive: past `max_upload_bytes` the request ends with 413 and the staging dir is
removed. A full disk (or quota, or file-size limit) mid-upload answers 507 and removes the
staging dir the same way. Memory tiers (load/unload) are per replica; versions, the current
alias and pins live in the store, so every replica sharing it converges on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from fastapi import APIRouter, Request, Response
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from adapters.archive import ADAPTER_FILES, extract_adapter, is_archive
from adapters.manifest import CONFIG_FILE, WEIGHTS_FILE
from adapters.validate import PICKLE_SUFFIXES
from server.api.deps import AdminDep, ReadyServicesDep
from server.errors import (AdapterRejected, AdaptserveError, InsufficientStorage, InvalidParameter, PayloadTooLarge,
                           status_for)
from server.registry import AdapterEntry, AdapterVersion, Registry, parse_ref

router = APIRouter(tags=["adapters"], dependencies=[AdminDep])

UPLOAD_FILES = ADAPTER_FILES  # the files an upload may carry: an archive's, by one definition
ARCHIVE_NAME = "upload.archive"
MAX_FIELD_BYTES = 1024  # the only text field is the adapter name
# Out of space, out of quota, past RLIMIT_FSIZE (Python ignores SIGXFSZ, so writes get EFBIG).
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class _MultipartToDisk:
    """Streaming multipart parser callbacks: file parts go to disk under names chosen here."""

    def __init__(self, staging: Path):
        self.staging = staging
        self.fields: dict[str, str] = {}
        self.problems: list[str] = []
        self.archive_name: str | None = None
        self._headers: dict[bytes, bytes] = {}
        self._header_field = b""
        self._header_value = b""
        self._field: str | None = None
        self._text: bytearray | None = None
        self._out = None
        self._written: set[str] = set()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._append("_header_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._append("_header_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _append(self, attribute: str, data: bytes) -> None:
        setattr(self, attribute, getattr(self, attribute) + data)

    def _part_begin(self) -> None:
        self._headers, self._field, self._text, self._out = {}, None, None, None

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        field = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is None:
            self._field, self._text = field, bytearray()
            return
        # The client's file name is only a label: never a path, and never trusted for location.
        label = PurePosixPath(filename.decode("utf-8", "replace").replace("\\", "/")).name
        target = self._target(label, field)
        if target is not None:
            self._out = open(self.staging / target, "wb")

    def _target(self, label: str, field: str) -> str | None:
        if is_archive(label):
            if self.archive_name is not None:
                self.problems.append("send one archive, or the adapter files, not several archives")
                return None
            self.archive_name = label
            return ARCHIVE_NAME
        # curl -F adapter_model.safetensors=@out/weights.st names the part, not the file.
        name = label if label in UPLOAD_FILES else field if field in UPLOAD_FILES else None
        if name is None:
            if PurePosixPath(label).suffix.lower() in PICKLE_SUFFIXES:
                self.problems.append(f"{label}: pickle-based weight files are refused; use safetensors")
            else:
                self.problems.append(f"{label!r}: unexpected file (send {CONFIG_FILE} and {WEIGHTS_FILE})")
            return None
        if name in self._written:
            self.problems.append(f"{name} was sent more than once")
            return None
        self._written.add(name)
        return name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None:
            self._out.write(data[start:end])
        elif self._text is not None:
            self._text += data[start:end]
            if len(self._text) > MAX_FIELD_BYTES:
                raise InvalidParameter(f"form field {self._field!r} is longer than {MAX_FIELD_BYTES} bytes",
                                       param=self._field)

    def _part_end(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        elif self._text is not None and self._field:
            self.fields[self._field] = self._text.decode("utf-8", "replace")

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidParameter("upload as multipart/form-data: field `name` plus the adapter files or one archive")
    return boundary


class PublishOutcome:
    """Set `created` once published; `counted_publish` turns the outcome into the upload metric."""

    created: bool | None = None


@contextlib.contextmanager
def counted_publish(uploads) -> Iterator[PublishOutcome]:
    """Around staging + publishing a candidate: counts created/unchanged/rejected/too_large/error
    in `adaptserve_adapter_uploads`, and turns a full disk into 507 (nothing was published)."""
    outcome = PublishOutcome()
    try:
        yield outcome
    except PayloadTooLarge:
        uploads.labels("too_large").inc()
        raise
    except AdaptserveError as exc:
        # A refusal the client caused (a bad package, a file link out of the allowed folders)
        # is not a server error.
        uploads.labels("rejected" if status_for(exc) < 500 else "error").inc()
        raise
    except OSError as exc:
        uploads.labels("error").inc()
        if exc.errno in STORAGE_ERRNOS:
            raise InsufficientStorage(f"the adapter store is out of space: {exc.strerror}") from exc
        raise
    except Exception:
        uploads.labels("error").inc()
        raise
    uploads.labels("created" if outcome.created else "unchanged").inc()


@router.post("/v1/adapters", status_code=201)
async def upload_adapter(request: Request, response: Response, services: ReadyServicesDep) -> dict:
    registry, cap = services.registry, services.settings.max_upload_bytes
    uploads = services.metrics.adapter_uploads
    boundary = _boundary(request)
    length = request.headers.get("content-length", "")
    with counted_publish(uploads) as outcome:
        if length.isdigit() and int(length) > cap:
            raise PayloadTooLarge(f"upload larger than {cap} bytes")
        with registry.store.staging() as staging:
            version, outcome.created = await _receive_and_publish(request, registry, staging, boundary, cap)
    if not outcome.created:
        response.status_code = 200
    return {**_version_out(registry, version), "current": True}


async def _receive_and_publish(request: Request, registry: Registry, staging: Path, boundary: bytes,
                               cap: int) -> tuple[AdapterVersion, bool]:
    receiver = _MultipartToDisk(staging)
    parser = MultipartParser(boundary, receiver.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > cap:
                raise PayloadTooLarge(f"upload larger than {cap} bytes")
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        # A body that is not the multipart its header announced (a 500 before this).
        raise InvalidParameter(f"malformed multipart body: {exc}") from exc
    finally:
        receiver.close()
    problems = list(receiver.problems)
    name = receiver.fields.get("name", "")
    if not name:
        problems.append("form field `name` is missing")
    if receiver.archive_name is not None:
        archive = staging / ARCHIVE_NAME
        if (staging / CONFIG_FILE).exists() or (staging / WEIGHTS_FILE).exists():
            problems.append("send one archive, or the adapter files, not both")
        else:
            problems += await asyncio.to_thread(extract_adapter, archive, receiver.archive_name, staging, cap)
        archive.unlink(missing_ok=True)
        if problems:
            raise AdapterRejected(f"adapter {name!r} is invalid", details=problems)
    if problems:
        # Validation still runs, so one answer lists the upload's and the files' problems.
        problems += await registry.check(name, staging)
        raise AdapterRejected(f"adapter {name!r} is invalid", details=problems)
    return await registry.publish(name, staging)


@router.get("/v1/adapters")
async def list_adapters(services: ReadyServicesDep) -> dict:
    registry = services.registry
    resident = registry.resident_keys()  # one snapshot for every version listed
    return {
        "adapters": [_entry_out(registry, e, resident) for _, e in sorted(registry.entries.items())],
        "rejected": [
            {"name": r.name, "version": r.version, "problems": list(r.problems)}
            for _, r in sorted(registry.rejected.items())
        ],
    }


@router.get("/v1/adapters/{name}")
async def get_adapter(name: str, services: ReadyServicesDep) -> dict:
    return _entry_out(services.registry, services.registry.entry(name))


@router.delete("/v1/adapters/{ref}")
async def delete_adapter(ref: str, services: ReadyServicesDep) -> dict:
    """`name` deletes every version; `name@version` one (the current one rolls back first)."""
    name, version = parse_ref(ref)
    await services.registry.delete(name, version)
    entry = services.registry.entries.get(name)
    return {"deleted": ref, "current": entry.current if entry else None}


@router.post("/v1/adapters/{name}/rollback")
async def rollback_adapter(name: str, services: ReadyServicesDep, version: str | None = None) -> dict:
    """No `?version=`: back to the version published before the current one."""
    return _entry_out(services.registry, await services.registry.set_current(name, version))


@router.post("/v1/adapters/{name}/load")
async def load_adapter(name: str, services: ReadyServicesDep, version: str | None = None) -> dict:
    return _version_out(services.registry, await services.registry.load(name, version))


@router.post("/v1/adapters/{name}/unload")
async def unload_adapter(name: str, services: ReadyServicesDep) -> dict:
    return _entry_out(services.registry, await services.registry.unload(name))


@router.post("/v1/adapters/{name}/pin")
async def pin_adapter(name: str, services: ReadyServicesDep) -> dict:
    return _entry_out(services.registry, await services.registry.set_pinned(name, True))


@router.post("/v1/adapters/{name}/unpin")
async def unpin_adapter(name: str, services: ReadyServicesDep) -> dict:
    return _entry_out(services.registry, await services.registry.set_pinned(name, False))


def _version_out(registry: Registry, version: AdapterVersion, resident: set[str] | None = None) -> dict:
    m = version.manifest
    out = {
        "name": m.name, "version": m.version, "sha256": m.sha256, "task": m.task, "peft_type": m.peft_type,
        "rank": m.rank, "target_modules": list(m.target_modules), "size_bytes": m.size_bytes,
        "created_at": m.created_at, "status": registry.tier(version, resident).value, "last_used": version.last_used,
        "requests": version.requests, "warnings": list(version.warnings),
    }
    if m.labels is not None:
        out["labels"] = list(m.labels)
    if m.prompt_format is not None:
        out["prompt_format"] = m.prompt_format.to_dict()  # the request shape it was trained on
    return out


def _entry_out(registry: Registry, entry: AdapterEntry, resident: set[str] | None = None) -> dict:
    """`resident`: registry.resident_keys(), taken once per response."""
    if resident is None:
        resident = registry.resident_keys()
    versions = sorted(entry.versions.values(), key=lambda v: v.manifest.created_at or 0, reverse=True)
    current = entry.versions[entry.current]
    used = [v.last_used for v in versions if v.last_used is not None]
    return {
        "name": entry.name,
        "current": entry.current,
        "pinned": entry.pinned,
        "status": registry.tier(current, resident).value,
        "size_bytes": current.manifest.size_bytes,
        "last_used": max(used) if used else None,
        "requests": sum(v.requests for v in versions),
        "versions": [_version_out(registry, v, resident) for v in versions],
    }
