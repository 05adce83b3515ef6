"""Probes and metrics: /healthz (alive), /readyz (base loaded and warmed), /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    if services.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if services.boot_error:
        return JSONResponse({"status": "failed", "error": services.boot_error}, status_code=503)
    if not services.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready", "base_model": services.info.base_id})


@router.get("/metrics")
async def metrics(services: ServicesDep) -> Response:
    services.refresh_gauges()
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
