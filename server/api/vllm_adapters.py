"""vLLM's runtime LoRA endpoints: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

Training loops and operator tools written for vLLM push a fresh adapter by naming a PEFT
folder on the server's disk (`{"lora_name", "lora_path"}`) and drop it by name. Here a
load copies that folder's adapter files into a private staging dir and publishes them
through the same validation and atomic store as an upload: a new content-addressed version
of `lora_name`, current at once (a same-name load serves the new weights from the next
request on; requests already running finish on the version they started with). An unload
deletes the adapter, as DELETE /v1/adapters/{name} does. Both need the admin token.

`lora_path` is resolved first (symlinks followed, `..` collapsed), and the folder and each
file copied from it must lie inside `--adapters-dir` or an `--adapter-import-dir`, else 403
before anything is read: the admin token must not become a way to read any file the server
process can. Answers follow vLLM: 200 with its plain-text message, 400 for a malformed
body, 404 for an unknown adapter or a missing path; beyond vLLM, 403 for a path outside
those folders and 422 listing every problem of an invalid adapter (as uploads answer).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from adapters.validate import PICKLE_SUFFIXES
from server.api.adapters import UPLOAD_FILES, counted_publish
from server.api.deps import AdminDep, ReadyServicesDep
from server.api.openai import OpenAIRoute
from server.api.schemas import ErrorResponse
from server.config import Settings
from server.errors import (
    AdapterPathNotFound,
    AdapterRejected,
    InvalidRequest,
    PathNotAllowed,
)

# OpenAIRoute: a malformed body is a 400 naming the field, as vLLM answers it.
router = APIRouter(tags=["vllm"], dependencies=[AdminDep], route_class=OpenAIRoute)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 422, 503, 507)}
TEXT_OK = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "vLLM's success message"}}


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(..., min_length=1, description="Adapter name; a new version of it if it exists.")
    lora_path: str = Field(
        ..., min_length=1,
        description="PEFT folder on the server (adapter_config.json + adapter_model.safetensors), inside "
        "--adapters-dir or an --adapter-import-dir.",
    )
    load_inplace: bool = Field(
        False, description="Accepted as vLLM does; every load publishes a version, so a same-name load always "
        "replaces the weights.",
    )


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(..., min_length=1, description="The adapter to delete (every version).")
    lora_int_id: int | None = Field(
        None, description="vLLM's numeric id, accepted as vLLM does; lora_name decides which adapter goes.",
    )


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses={**TEXT_OK, **ERRORS})
async def load_lora_adapter(body: LoadLoRAAdapterRequest, services: ReadyServicesDep) -> PlainTextResponse:
    registry, uploads = services.registry, services.metrics.adapter_uploads
    roots = allowed_roots(services.settings)
    source = _resolve_inside(body.lora_path, roots)
    if not _exists(source):
        raise AdapterPathNotFound(f"lora_path {body.lora_path!r} does not exist", param="lora_path")
    with counted_publish(uploads) as outcome, registry.store.staging() as staging:
        problems = await asyncio.to_thread(
            _copy_adapter_files, source, staging, roots, services.settings.max_upload_bytes
        )
        if problems:
            # Validation still runs, so one answer lists the folder's and the files' problems.
            problems += await registry.check(body.lora_name, staging)
            raise AdapterRejected(f"adapter {body.lora_name!r} at {body.lora_path!r} is invalid",
                                  details=problems)
        _, outcome.created = await registry.publish(body.lora_name, staging)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses={**TEXT_OK, **ERRORS})
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, services: ReadyServicesDep) -> PlainTextResponse:
    await services.registry.delete(body.lora_name, None)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def allowed_roots(settings: Settings) -> tuple[Path, ...]:
    """The folders a `lora_path` may name, resolved now (a root may itself be a symlink)."""
    return tuple(Path(os.path.realpath(p)) for p in (settings.adapters_dir, *settings.adapter_import_dir))


def _resolve_inside(path: str | Path, roots: tuple[Path, ...]) -> Path:
    try:
        resolved = Path(os.path.realpath(path))
    except ValueError as exc:  # an embedded NUL byte
        raise InvalidRequest(f"lora_path {str(path)!r} is not a valid path", param="lora_path") from exc
    if not any(resolved.is_relative_to(root) for root in roots):
        # Checked before existence, so the answer says nothing about paths outside the roots.
        raise PathNotAllowed(
            f"{str(path)!r} is outside the folders adapters may be loaded from "
            "(--adapters-dir and --adapter-import-dir)", param="lora_path",
        )
    return resolved


def _exists(path: Path) -> bool:
    try:
        path.stat()
    except OSError:  # absent, or a name too long to exist
        return False
    return True


def _copy_adapter_files(source: Path, staging: Path, roots: tuple[Path, ...], cap: int) -> list[str]:
    """Copy the files an upload may carry from `source` into `staging`; returns the problems found.

    Other files (README.md, tokenizer files, checkpoints) are not part of the adapter and stay
    behind. A file that is a symlink is followed, but must resolve inside `roots` too (a
    Hugging Face cache snapshot links each file into its blobs folder).
    """
    if not source.is_dir():
        raise _unreadable("lora_path is a file; name the adapter's folder")
    try:
        entries = sorted(source.iterdir())
    except OSError as exc:
        raise _unreadable(f"lora_path cannot be listed ({exc.strerror})") from exc
    problems: list[str] = []
    copied = 0
    for entry in entries:
        if entry.suffix.lower() in PICKLE_SUFFIXES:
            problems.append(f"{entry.name}: pickle-based weight files are refused; use safetensors")
            continue
        if entry.name not in UPLOAD_FILES:
            continue
        target = _resolve_inside(entry, roots)
        # O_NOFOLLOW: the path opened is the one checked, not a link swapped in since;
        # O_NONBLOCK: a FIFO under an adapter's file name must not hang the open.
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            problems.append(f"{entry.name}: cannot be read ({exc.strerror})")
            continue
        with open(fd, "rb") as src:
            info = os.fstat(src.fileno())
            if not stat.S_ISREG(info.st_mode):
                problems.append(f"{entry.name} is not a regular file")
                continue
            copied += info.st_size
            if copied > cap:
                raise _unreadable(f"the adapter's files are larger than {cap} bytes (max_upload_bytes)")
            with open(staging / entry.name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return problems


def _unreadable(problem: str) -> AdapterRejected:
    """Nothing to validate: the one problem, in an upload's shape."""
    return AdapterRejected(f"adapter at lora_path is invalid: {problem}", param="lora_path", details=[problem])
