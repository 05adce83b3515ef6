"""Native inference endpoints: /v1/generate (with SSE streaming) and /v1/classify.

/v1/classify reads its body itself, because it takes two: JSON (`inputs` texts, or base64
`images`) and multipart/form-data (image files in any field, plus `adapter`, `task` or
repeated `adapters` fields). Both are held to the same body cap (the middleware's) and the
same schema checks, with FastAPI's 422 shape for a malformed body.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import State, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

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
from server.config import Settings
from server.errors import InvalidImage, LimitExceeded
from server.inference import InferenceService, Kind, PromptWarning, Target, prompt_warnings

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
    warnings = prompt_warnings(request.adapter, messages)
    if body.stream:
        inference.scheduler.check_capacity()
        return StreamingResponse(
            _sse(inference, request, target, warnings, http_request.state), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    completion = await unless_disconnected(http_request, inference.complete(request, "generate", http_request.state))
    return GenerateResponse(
        text=completion.text,
        finish_reason=completion.finish_reason,
        usage=Usage(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens),
        adapter=_adapter_out(request.adapter),
        task=target.task,
        fallback=target.fallback,
        warnings=warnings,
    )


async def _sse(inference: InferenceService, request: GenerationRequest, target: Target,
               warnings: tuple[PromptWarning, ...], log: State) -> AsyncIterator[str]:
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
                "warnings": [dataclasses.asdict(w) for w in warnings],
            }
            if event.error:
                final["error"] = {"code": event.error_code or "engine_error", "message": event.error}
            yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"
            return
        if event.text:
            yield f"data: {json.dumps({'text': event.text})}\n\n"


MULTIPART = "multipart/form-data"
FORM_TARGET_FIELDS = ("adapter", "task", "adapters")


def _classify_openapi() -> dict[str, Any]:
    """Both bodies /v1/classify reads, for /docs and the schema-driven fuzz tests."""
    schema = ClassifyRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # WeightedAdapter and MergeIn: components already, through GenerateRequest
    form = {
        "type": "object",
        "properties": {
            "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "Image files (any field name works; each file part is one image)."},
            "adapter": {"type": "string"}, "task": {"type": "string"},
            "adapters": {"type": "array", "items": {"type": "string"}, "description": "Fan-out: repeat the field."},
        },
        "required": ["image"],
    }
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema}, MULTIPART: {"schema": form}}}}


@dataclasses.dataclass(frozen=True)
class ClassifyInputs:
    target: TargetFields
    texts: list[str] | None
    images: list[bytes] | None  # encoded image files, not yet opened


def _invalid(errors: list[dict[str, Any]]) -> RequestValidationError:
    # FastAPI's locations start with "body" for a request body; kept so clients see one shape.
    return RequestValidationError([{**e, "loc": ("body", *e.get("loc", ()))} for e in errors])


async def _classify_inputs(http_request: Request, settings: Settings) -> ClassifyInputs:
    if http_request.headers.get("content-type", "").lower().startswith(MULTIPART):
        return await _form_inputs(http_request, settings)
    raw = await http_request.body()
    if not raw:
        raise _invalid([{"type": "missing", "loc": (), "msg": "Field required"}])
    try:
        data = json.loads(raw)
    except ValueError as exc:  # bad JSON or bad UTF-8
        raise _invalid([{"type": "json_invalid", "loc": (), "msg": f"JSON decode error: {exc}"}]) from None
    except RecursionError:  # nested past the parser's depth: what FastAPI answers with a 400
        raise StarletteHTTPException(400, "There was an error parsing the body") from None
    try:
        body = ClassifyRequest.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc.errors(include_url=False)) from None
    encoded = body.encoded_images()
    return ClassifyInputs(body, body.texts(), _base64_images(encoded, settings) if encoded is not None else None)


def _base64_images(encoded: list[str], settings: Settings) -> list[bytes]:
    if len(encoded) > settings.max_classify_inputs:  # before decoding any of them
        raise LimitExceeded(f"{len(encoded)} images; at most {settings.max_classify_inputs} per call", param="images")
    images = []
    for index, text in enumerate(encoded):
        payload = text.split(",", 1)[1] if text.startswith("data:") else text
        try:
            # Whitespace dropped first: `base64 FILE` wraps its output every 76 characters.
            images.append(base64.b64decode("".join(payload.split()), validate=True))
        except (binascii.Error, ValueError):
            raise InvalidImage(f"images[{index}] is not valid base64", param=f"images.{index}") from None
    return images


async def _form_inputs(http_request: Request, settings: Settings) -> ClassifyInputs:
    # The parser's own limits (a 400 past them), on top of the middleware's body cap.
    form = await http_request.form(max_files=settings.max_classify_inputs,
                                   max_fields=len(FORM_TARGET_FIELDS) + settings.max_merge_adapters)
    try:
        images: list[bytes] = []
        fields: dict[str, Any] = {}
        errors = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                images.append(await value.read())
            elif key == "adapters":
                fields.setdefault("adapters", []).append({"name": value})
            elif key in FORM_TARGET_FIELDS and key not in fields:
                fields[key] = value
            else:
                errors.append({"type": "extra_forbidden", "loc": (key,), "msg": "Extra inputs are not permitted"})
    finally:
        await form.close()
    if not images:
        errors.append({"type": "missing", "loc": ("images",), "msg": "no image file in the form"})
    if errors:
        raise _invalid(errors)
    try:
        target = TargetFields.model_validate(fields)
    except ValidationError as exc:
        raise _invalid(exc.errors(include_url=False)) from None
    return ClassifyInputs(target, None, images)


@router.post("/v1/classify", response_model=ClassifyResponse | FanoutClassifyResponse,
             responses={**ERRORS, 415: {"model": ErrorResponse}}, openapi_extra=_classify_openapi())
async def classify(services: ReadyServicesDep, http_request: Request) -> ClassifyResponse | FanoutClassifyResponse:
    inference = services.inference
    inputs = await _classify_inputs(http_request, services.settings)
    body = inputs.target
    if body.adapters is not None and body.merge is None:
        return await _fanout(inference, inputs)
    target = await _resolve(inference, body, "classify", http_request)
    binding, results = await inference.classify(inputs.texts, target, inputs.images)
    return ClassifyResponse(
        results=[ClassifyResultOut(label=r.label, score=r.score, scores=r.scores) for r in results],
        adapter=_adapter_out(binding),
        usage=Usage(prompt_tokens=sum(r.prompt_tokens for r in results), completion_tokens=0),
        task=target.task,
        fallback=target.fallback,
    )


async def _fanout(inference: InferenceService, inputs: ClassifyInputs) -> FanoutClassifyResponse:
    """Several classifiers over the same inputs, one engine batch; weights do not apply here."""
    bindings = await inference.bind_many("classify", [a.name for a in inputs.target.adapters])
    grouped = await inference.classify_fanout(inputs.texts, [Target(b) for b in bindings], inputs.images)
    refs = [_adapter_out(b) for b in bindings]
    per_input = [
        FanoutResultOut(results=[
            AdapterResultOut(adapter=ref, label=group[i].label, score=group[i].score, scores=group[i].scores)
            for ref, group in zip(refs, grouped)
        ])
        for i in range(len(grouped[0]))
    ]
    # The backbone reads each text once per adapter row; report the tokens as processed.
    tokens = sum(r.prompt_tokens for group in grouped for r in group)
    return FanoutClassifyResponse(results=per_input, adapters=refs, usage=Usage(prompt_tokens=tokens, completion_tokens=0))
