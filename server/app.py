"""The FastAPI app factory: create_app(settings) builds everything in its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api import adapters, health, infer, merges, openai, routes, ui, vllm_adapters
from server.api.deps import InferenceKeyDep
from server.api.disconnect import ClientGone
from server.auth import Authenticator, is_loopback_host
from server.config import Settings
from server.errors import AdaptserveError, status_for
from server.services import EngineFactory, Services, default_engine_factory

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("adaptserve.access")

Surface = Literal["all", "public", "admin"]
# Paths that stay open while draining (probes and scrapes must keep working).
ALWAYS_OPEN = ("/healthz", "/readyz", "/metrics")
# Fields handlers may leave on request.state for the request's log line.
REQUEST_LOG_FIELDS = (
    "model", "prompt_tokens", "completion_tokens", "queue_ms", "ttft_ms", "choices", "user", "error",
)
# How much of a body answered before it was read (a 413) is read and dropped, so the client
# can finish writing and read the answer: a little over a 256 MB upload cap, for up to 30 s.
DISCARD_LIMIT_BYTES = 320 * 1024 * 1024
DISCARD_TIMEOUT_S = 30.0


def error_body(code: str, message: str, status: int, param: str | None = None, details=None) -> dict:
    """One error shape for every endpoint; it is also OpenAI's (message, type, param, code)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    error = {"code": code, "message": message, "type": kind, "param": param}
    if details is not None:
        error["details"] = details
    return {"error": error}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AdaptserveError)
    async def _domain(_: Request, exc: AdaptserveError) -> JSONResponse:
        status = status_for(exc)
        return JSONResponse(error_body(exc.code, exc.message, status, exc.param, exc.details), status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        first = problems[0] if problems else {"field": None, "message": "invalid request"}
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return JSONResponse(error_body("invalid_parameter", message, 422, first["field"], problems), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # 400: a body FastAPI could not parse at all (JSON nested past the parser's depth).
        codes = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        return JSONResponse(
            error_body(codes.get(exc.status_code, "http_error"), str(exc.detail), exc.status_code),
            exc.status_code, getattr(exc, "headers", None),
        )

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, exc: ClientGone) -> JSONResponse:
        # Nobody reads this; 499 (nginx's "client closed request") keeps the metrics honest.
        return JSONResponse(error_body("client_closed_request", "client disconnected", 499), 499)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(error_body("internal_error", "internal server error", 500), 500)


class RequestMiddleware:
    """Request id, Host check, body cap, drain gate, per-request metrics and one JSON log line.

    Plain ASGI (not BaseHTTPMiddleware) so streaming responses and client disconnects pass
    through untouched.
    """

    def __init__(self, app: ASGIApp, services: Services, upload_paths: tuple[str, ...] = (),
                 loopback_hosts_only: bool = False):
        # Exact paths: only the upload endpoint streams to disk under its own (larger) cap.
        self.app = app
        self.services = services
        self.upload_paths = upload_paths
        # DNS rebinding: a page on evil.example resolved to 127.0.0.1 still sends its own Host.
        self.loopback_hosts_only = loopback_hosts_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        services = self.services
        path: str = scope["path"]
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        started = time.monotonic()
        status_holder = {"status": 500}
        # Handlers read the id (OpenAI response ids) and arrival time, and leave log fields beside them.
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["arrived"] = started
        request_body = _RequestBody(receive, headers)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body") and request_body.unread:
                # Answered before the body was read (413, 401 on an upload...): the answer goes
                # out whole now, but completes only once the rest of the body is read, so the
                # server never closes on unread bytes, whose RST can destroy the answer in flight.
                await send({**message, "more_body": True})
                await request_body.discard_rest()
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        async def reply(status: int, body: dict, extra: dict | None = None) -> None:
            payload = json.dumps(body).encode()
            response_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
            response_headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
            await send_with_id({"type": "http.response.start", "status": status, "headers": response_headers})
            await send_with_id({"type": "http.response.body", "body": payload})

        try:
            host = headers.get(b"host", b"").decode("latin-1")
            if self.loopback_hosts_only and host and not is_loopback_host(host):
                await reply(403, error_body(
                    "host_not_allowed", f"Host {host[:100]!r} is not a loopback name; this server listens on "
                    "loopback only (configure an admin token to serve other names)", 403))
                return
            if services.draining and not path.startswith(ALWAYS_OPEN):
                await reply(503, error_body("draining", "server is shutting down", 503), {"Retry-After": "5"})
                return
            limit = services.settings.max_body_bytes
            if path in self.upload_paths:
                limit = None  # uploads stream to disk under their own cap
            length = headers.get(b"content-length")
            if limit is not None and length is not None and length.isdigit() and int(length) > limit:
                await reply(413, error_body("payload_too_large", f"body larger than {limit} bytes", 413))
                return
            await self.app(scope, _capped(request_body.receive, limit) if limit else request_body.receive, send_with_id)
        except _BodyTooLarge:
            await reply(413, error_body("payload_too_large", f"body larger than {limit} bytes", 413))
        finally:
            self._record(scope, status_holder["status"], started, request_id)

    def _record(self, scope: Scope, status: int, started: float, request_id: str) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        if endpoint in ALWAYS_OPEN:
            return
        state = scope.get("state") or {}
        adapter = state.get("adapter") or "__base__"
        elapsed = time.monotonic() - started
        self.services.metrics.requests.labels(endpoint, adapter, str(status)).inc()
        self.services.metrics.request_latency.labels(endpoint).observe(elapsed)
        line = {
            "request_id": request_id, "method": scope["method"], "path": scope["path"],
            "endpoint": endpoint, "adapter": state.get("adapter_ref") or adapter, "status": status,
            "total_ms": round(elapsed * 1000, 1),
        }
        line.update({k: state[k] for k in REQUEST_LOG_FIELDS if state.get(k) is not None})
        access_logger.info(json.dumps(line))


class _BodyTooLarge(StarletteHTTPException):
    """An HTTPException so FastAPI's body parsing re-raises it instead of turning it into a 400."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class _RequestBody:
    """The request's receive channel, knowing whether the body has been read to its end.

    `discard_rest` reads and drops what is left, up to DISCARD_LIMIT_BYTES and DISCARD_TIMEOUT_S:
    enough for a client that sent one oversized body (it writes it all before it reads).
    Past that the HTTP server's own handling applies: uvicorn drops the rest on a keep-alive
    connection and closes any other.
    """

    def __init__(self, receive: Receive, headers: dict[bytes, bytes]):
        self._receive = receive
        length = headers.get(b"content-length", b"")
        self._length = int(length) if length.isdigit() else None
        self._ended = self._length in (None, 0) and b"transfer-encoding" not in headers
        # Expecting 100-continue, a client sends nothing until the first read asks for it.
        self._waits_for_continue = headers.get(b"expect", b"").lower() == b"100-continue"
        self._started = False

    @property
    def unread(self) -> bool:
        return not self._ended and (self._started or not self._waits_for_continue)

    async def receive(self) -> Message:
        self._started = True
        message = await self._receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self._ended = True
        return message

    async def discard_rest(self) -> None:
        if self._length is not None and self._length > DISCARD_LIMIT_BYTES:
            return
        dropped = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DISCARD_TIMEOUT_S):
                while not self._ended and dropped <= DISCARD_LIMIT_BYTES:
                    dropped += len((await self.receive()).get("body", b""))


def _capped(receive: Receive, limit: int) -> Receive:
    """Counts body bytes as they stream in; a chunked body past the cap stops at once."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge()
        return message

    return wrapped


def create_app(
    settings: Settings | None = None,
    *,
    engine_factory: EngineFactory = default_engine_factory,
    services: Services | None = None,
    surface: Surface = "all",
) -> FastAPI:
    """`surface` picks the routers: "public" (inference), "admin" (management), or both.

    A second app sharing `services` serves the admin surface on its own port; only the app
    that created the services boots and shuts them down.
    """
    owns_services = services is None
    services = services or Services(settings or Settings())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.authenticator.prepare()  # the generated admin token exists before any listener serves
        boot = asyncio.create_task(services.boot(engine_factory)) if owns_services else None
        app.state.boot_task = boot
        try:
            yield
        finally:
            if boot is not None:
                boot.cancel()
                with contextlib.suppress(BaseException):
                    await boot
                services.shutdown()

    app = FastAPI(
        title="adaptserve",
        version="0.1.0",
        summary="Many task adapters on one resident base model.",
        lifespan=lifespan,
    )
    app.state.services = services
    authenticator = app.state.authenticator = Authenticator(services.settings)
    install_error_handlers(app)
    app.include_router(health.router)
    if surface in ("all", "public"):
        app.include_router(infer.router, dependencies=[InferenceKeyDep])
        app.include_router(openai.router, dependencies=[InferenceKeyDep])
        app.include_router(ui.router)
    if surface in ("all", "admin"):
        app.include_router(adapters.router)
        app.include_router(vllm_adapters.router)
        app.include_router(merges.router)
        app.include_router(routes.router)
    bind = services.settings.admin_host if surface == "admin" else services.settings.host
    guard_hosts = authenticator.generated_token_path is not None and is_loopback_host(bind)
    app.add_middleware(RequestMiddleware, services=services, upload_paths=("/v1/adapters",),
                       loopback_hosts_only=guard_hosts)
    return app
