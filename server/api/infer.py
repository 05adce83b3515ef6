"""Native inference endpoints: /v1/generate (with SSE streaming) and /v1/classify."""

from __future__ import annotations

import json
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import State

from server.api.deps import ReadyServicesDep
from server.api.disconnect import unless_disconnected
from adapters.merge import MergeSpec
from server.api.schemas import (
    AdapterRefOut,
    AdapterResultOut,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResultOut,
    ErrorResponse,
    FanoutClassifyResponse,
    FanoutResultOut,
    GenerateRequest,
    GenerateResponse,
    TargetFields,
    Usage,
)
from server.contract import AdapterBinding, GenerationRequest
from server.errors import GenerationFailed
from server.inference import InferenceService, Kind, Target

router = APIRouter(tags=["inference"])

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 422, 429, 503)}


ROUTE_KEY_HEADER = "x-route-key"  # keeps one caller on one side of a task route's split


def _adapter_out(binding: AdapterBinding | None) -> AdapterRefOut | None:
    if binding is None:
        return None
    return AdapterRefOut(name=binding.name, version=binding.version)


async def _resolve(inference: InferenceService, body: TargetFields, kind: Kind, http_request: Request) -> Target:
    target = await inference.resolve_target(
        kind, adapter=body.adapter, task=body.task, route_key=http_request.headers.get(ROUTE_KEY_HEADER),
        adapters=[(a.name, a.weight) for a in body.adapters] if body.adapters is not None else None,
        merge=MergeSpec(**body.merge.model_dump()) if body.merge is not None else None,
    )
    # For the request's metrics and log line (written by the middleware).
    http_request.state.adapter = target.binding.name if target.binding else None
    http_request.state.adapter_ref = target.label if target.binding else None
    return target


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
    target = await _resolve(inference, body, "generate", http_request)
    request = await inference.prepare_generation(body.prompt, messages, target, params)
    if body.stream:
        inference.scheduler.check_capacity()
        return StreamingResponse(
            _sse(inference, request, target, http_request.state), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    completion = await unless_disconnected(http_request, inference.complete(request, "generate", http_request.state))
    if completion.finish_reason == "error":
        raise GenerationFailed("generation failed in the engine; the request can be retried")
    return GenerateResponse(
        text=completion.text,
        finish_reason=completion.finish_reason,
        usage=Usage(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens),
        adapter=_adapter_out(request.adapter),
        task=target.task,
        fallback=target.fallback,
    )


async def _sse(inference: InferenceService, request: GenerationRequest, target: Target,
               log: State) -> AsyncIterator[str]:
    adapter = _adapter_out(request.adapter)
    async for event in inference.stream(request, "generate", log):
        if event.finished:
            final = {
                "text": event.text,
                "finish_reason": event.finish_reason,
                "usage": {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens},
                "adapter": adapter.model_dump() if adapter else None,
                "task": target.task,
                "fallback": target.fallback,
            }
            if event.error:
                final["error"] = {"code": "engine_error", "message": event.error}
            yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"
            return
        if event.text:
            yield f"data: {json.dumps({'text': event.text})}\n\n"


@router.post("/v1/classify", response_model=ClassifyResponse | FanoutClassifyResponse, responses=ERRORS)
async def classify(body: ClassifyRequest, services: ReadyServicesDep,
                   http_request: Request) -> ClassifyResponse | FanoutClassifyResponse:
    inference = services.inference
    if body.adapters is not None and body.merge is None:
        return await _fanout(inference, body)
    target = await _resolve(inference, body, "classify", http_request)
    binding, results = await inference.classify(body.texts(), target)
    return ClassifyResponse(
        results=[ClassifyResultOut(label=r.label, score=r.score, scores=r.scores) for r in results],
        adapter=_adapter_out(binding),
        usage=Usage(prompt_tokens=sum(r.prompt_tokens for r in results), completion_tokens=0),
        task=target.task,
        fallback=target.fallback,
    )


async def _fanout(inference: InferenceService, body: ClassifyRequest) -> FanoutClassifyResponse:
    """Several classifiers over the same inputs, one engine batch; weights do not apply here."""
    bindings = await inference.bind_many("classify", [a.name for a in body.adapters])
    texts = body.texts()
    grouped = await inference.classify_fanout(texts, [Target(b) for b in bindings])
    refs = [_adapter_out(b) for b in bindings]
    per_input = [
        FanoutResultOut(results=[
            AdapterResultOut(adapter=ref, label=group[i].label, score=group[i].score, scores=group[i].scores)
            for ref, group in zip(refs, grouped)
        ])
        for i in range(len(texts))
    ]
    # The backbone reads each text once per adapter row; report the tokens as processed.
    tokens = sum(r.prompt_tokens for group in grouped for r in group)
    return FanoutClassifyResponse(results=per_input, adapters=refs, usage=Usage(prompt_tokens=tokens, completion_tokens=0))
