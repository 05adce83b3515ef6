"""Native inference endpoints: /v1/generate (with SSE streaming) and /v1/classify."""

from __future__ import annotations

import json
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.deps import ReadyServicesDep
from server.api.disconnect import unless_disconnected
from server.api.schemas import (
    AdapterRefOut,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResultOut,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Usage,
)
from server.contract import GenerationRequest
from server.inference import InferenceService

router = APIRouter(tags=["inference"])

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 422, 429, 503)}


def _adapter_out(request: GenerationRequest) -> AdapterRefOut | None:
    if request.adapter is None:
        return None
    return AdapterRefOut(name=request.adapter.name, version=request.adapter.version)


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
)
async def generate(body: GenerateRequest, services: ReadyServicesDep, http_request: Request):
    inference = services.inference
    params = inference.sampling_params(
        body.max_new_tokens, body.temperature, body.top_p, body.top_k, body.seed, body.stop_list()
    )
    messages = [m.model_dump() for m in body.messages] if body.messages is not None else None
    request = await inference.prepare_generation(body.prompt, messages, body.adapter, params)
    http_request.state.adapter = request.adapter.name if request.adapter else None
    if body.stream:
        inference.scheduler.check_capacity()
        return StreamingResponse(
            _sse(inference, request), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    completion = await unless_disconnected(http_request, inference.complete(request, "generate"))
    return GenerateResponse(
        text=completion.text,
        finish_reason=completion.finish_reason,
        usage=Usage(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens),
        adapter=_adapter_out(request),
    )


async def _sse(inference: InferenceService, request: GenerationRequest) -> AsyncIterator[str]:
    adapter = _adapter_out(request)
    async for event in inference.stream(request, "generate"):
        if event.finished:
            final = {
                "text": event.text,
                "finish_reason": event.finish_reason,
                "usage": {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens},
                "adapter": adapter.model_dump() if adapter else None,
            }
            if event.error:
                final["error"] = {"code": "engine_error", "message": event.error}
            yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"
            return
        if event.text:
            yield f"data: {json.dumps({'text': event.text})}\n\n"


@router.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS)
async def classify(body: ClassifyRequest, services: ReadyServicesDep, http_request: Request) -> ClassifyResponse:
    http_request.state.adapter = body.adapter.partition("@")[0]
    binding, results = await services.inference.classify(body.texts(), body.adapter)
    return ClassifyResponse(
        results=[ClassifyResultOut(label=r.label, score=r.score, scores=r.scores) for r in results],
        adapter=AdapterRefOut(name=binding.name, version=binding.version),
        usage=Usage(prompt_tokens=sum(r.prompt_tokens for r in results), completion_tokens=0),
    )
