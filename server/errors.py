"""Domain errors and the one table that maps them to HTTP.

Handlers and services raise these; `install_error_handlers` turns each into
`{"error": {"code", "message", ...}}` with the status from ERROR_STATUS. Nothing else in
the server picks status codes for domain failures.
"""

from __future__ import annotations

from typing import Any


class AdaptserveError(Exception):
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, details: Any = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details
        self.headers = headers or {}


class AdapterNotFound(AdaptserveError):
    code = "adapter_not_found"


class AdapterVersionNotFound(AdaptserveError):
    code = "adapter_version_not_found"


class AdapterRejected(AdaptserveError):
    """Validation found problems; `details` lists every one."""

    code = "adapter_invalid"


class AdapterTaskMismatch(AdaptserveError):
    code = "adapter_task_mismatch"


class UnsupportedForBase(AdaptserveError):
    code = "unsupported_for_base"


class InvalidParameter(AdaptserveError):
    code = "invalid_parameter"


class LimitExceeded(AdaptserveError):
    code = "limit_exceeded"


class InvalidRequest(AdaptserveError):
    """A malformed request on the OpenAI surface, whose clients expect 400 where ours says 422."""

    code = "invalid_request"


class UnsupportedParameter(AdaptserveError):
    """An OpenAI parameter this server does not implement: refused, never silently ignored."""

    code = "unsupported_parameter"


class PayloadTooLarge(AdaptserveError):
    code = "payload_too_large"


class QueueFull(AdaptserveError):
    code = "queue_full"


class NotReady(AdaptserveError):
    code = "not_ready"


class Unauthorized(AdaptserveError):
    code = "unauthorized"


class Forbidden(AdaptserveError):
    code = "forbidden"


class AdapterConflict(AdaptserveError):
    code = "adapter_conflict"


class PathNotAllowed(AdaptserveError):
    """A server-side path (vLLM's `lora_path`) that resolves outside the folders adapters may be read from."""

    code = "path_not_allowed"


class AdapterPathNotFound(AdaptserveError):
    code = "adapter_path_not_found"


class InvalidImage(AdaptserveError):
    """Not decodable: bad base64, an empty file, a corrupt header or pixel data."""

    code = "invalid_image"


class UnsupportedImageFormat(AdaptserveError):
    code = "unsupported_image_format"


class ImageTooLarge(AdaptserveError):
    """The header declares more pixels than --max-image-pixels: refused before decoding."""

    code = "image_too_large"


class InsufficientStorage(AdaptserveError):
    code = "insufficient_storage"


class GenerationFailed(AdaptserveError):
    """The engine step running this request failed; the server itself keeps serving."""

    code = "generation_failed"


class AdapterLoadFailed(AdaptserveError):
    """The adapter could not be brought into memory (host or device out of memory).

    503, not 507: the store is fine and the base keeps serving; retrying once other adapters
    are evicted (or on another replica) may succeed.
    """

    code = "adapter_load_failed"


def engine_failure(code: str | None, message: str | None) -> AdaptserveError:
    """The domain error for a request the engine ended with finish_reason "error"."""
    if code == "adapter_load_failed":
        return AdapterLoadFailed(f"{message}; retry later", param="adapter", headers={"Retry-After": "5"})
    return GenerationFailed("generation failed in the engine; the request can be retried")


class AdapterStoreUnavailable(AdaptserveError):
    """The adapter store cannot be reached (object storage down, credentials refused).

    503 with Retry-After: adapters already in this replica's memory or disk cache keep
    serving; one that must be read from the store, and every change to the store, waits
    for the store to come back.
    """

    code = "adapter_store_unavailable"


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError (host) or torch.OutOfMemoryError (device), matched by class name so the
    API side never imports torch."""
    return isinstance(exc, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__)


ERROR_STATUS: dict[type[AdaptserveError], int] = {
    AdapterNotFound: 404,
    AdapterVersionNotFound: 404,
    AdapterRejected: 422,
    AdapterTaskMismatch: 400,
    UnsupportedForBase: 400,
    InvalidParameter: 422,
    LimitExceeded: 422,
    InvalidRequest: 400,
    UnsupportedParameter: 400,
    PayloadTooLarge: 413,
    QueueFull: 429,
    NotReady: 503,
    Unauthorized: 401,
    Forbidden: 403,
    AdapterConflict: 409,
    PathNotAllowed: 403,
    AdapterPathNotFound: 404,
    InvalidImage: 400,
    UnsupportedImageFormat: 415,
    ImageTooLarge: 413,
    InsufficientStorage: 507,
    AdapterLoadFailed: 503,
    AdapterStoreUnavailable: 503,
    GenerationFailed: 500,
}


def status_for(error: AdaptserveError) -> int:
    for cls in type(error).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 500
