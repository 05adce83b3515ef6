"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

The shapes follow OpenAI's API as vLLM serves adapters, so code written against the
`openai` client works unchanged: `model` picks the adapter. Every request goes through
InferenceService, so the caps of the native API apply here too. Differences from the native
API are OpenAI's: invalid requests are 400 (not 422), params carry OpenAI's names, and a
parameter this server cannot honour is refused rather than ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from typing import AsyncIterator, Callable, Iterator

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute

from server.api.deps import ReadyServicesDep
from server.api.disconnect import unless_disconnected
from server.api.openai_schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    PromptFormatOut,
    UsageOut,
)
from server.api.logprobs import chat_logprobs, completion_logprobs
from server.api.schemas import ErrorResponse
from server.contract import GenerationRequest, TokenEvent, TokenLogprob
from server.errors import (
    AdapterNotFound,
    AdaptserveError,
    InvalidParameter,
    InvalidRequest,
    LimitExceeded,
    UnsupportedParameter,
    engine_failure,
)
from server.inference import PromptWarning, prompt_warnings
from server.registry import AdapterVersion
from server.services import Services

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 429, 503)}
TASK_PREFIX = "task:"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIRoute(APIRoute):
    """Body validation failures become 400 with OpenAI's `param`, as the `openai` client expects."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as exc:
                raise _invalid_request(exc) from None

        return route


router = APIRouter(tags=["openai"], route_class=OpenAIRoute)


def _invalid_request(exc: RequestValidationError) -> InvalidRequest:
    problems = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        problems.append({"field": ".".join(loc) or None, "message": error.get("msg", ""), "type": error.get("type")})
    first = problems[0] if problems else {"field": None, "type": None}
    message = "; ".join(f"{p['field']}: {p['message']}" if p["field"] else p["message"] for p in problems)
    error = InvalidRequest(message or "invalid request", param=first["field"], details=problems)
    if first["type"] == "extra_forbidden":
        error.code = "unknown_parameter"
    return error


@contextlib.contextmanager
def _openai_params(**renames: str) -> Iterator[None]:
    """Shared services name params natively (`adapter`, `max_new_tokens`); say them as OpenAI does.

    Limit violations are 400 here: the `openai` client raises BadRequestError for them.
    """
    try:
        yield
    except AdaptserveError as exc:
        if exc.param is not None:
            exc.param = renames.get(exc.param, exc.param)
        if isinstance(exc, (LimitExceeded, InvalidParameter)):
            converted = InvalidRequest(exc.message, param=exc.param, details=exc.details, headers=exc.headers)
            converted.code = exc.code
            raise converted from None
        raise


def adapter_ref_for(model: str, services: Services) -> str | None:
    """The adapter a `model` string names (None = the base).

    Accepted: "" or the base id (or the name it was configured by) -> base; `name`,
    `name@version`; `base:adapter` as SGLang and Ray Serve write it.
    """
    base_names = {services.info.base_id, services.settings.base_model}
    if not model or model in base_names:
        return None
    if model.startswith(TASK_PREFIX):
        raise AdapterNotFound(f"model {model!r} is a task route, not a model: use it in completions", param="model")
    base, colon, adapter = model.rpartition(":")
    if colon:
        if base not in base_names or not adapter:
            raise AdapterNotFound(
                f"model {model!r}: this server's base is {services.info.base_id!r}", param="model"
            )
        return adapter
    return model


# --- /v1/models -------------------------------------------------------------------------


def _base_card(services: Services) -> ModelCard:
    info = services.info
    booted = time.time() - (time.monotonic() - services.started_at)
    return ModelCard(
        id=info.base_id, created=int(booted), root=info.base_id, parent=None,
        task={"decoder": "generate", "vision": "image-classify"}.get(info.kind, "encode"), max_model_len=info.max_context,
    )


def _adapter_card(model_id: str, version: AdapterVersion, services: Services) -> ModelCard:
    manifest = version.manifest
    # root = the immutable version `model_id` resolves to now (vLLM puts a local path here;
    # server paths stay private).
    prompt_format = PromptFormatOut(**manifest.prompt_format.to_dict()) if manifest.prompt_format else None
    return ModelCard(
        id=model_id, created=int(manifest.created_at or 0), root=manifest.ref, parent=services.info.base_id,
        version=manifest.version, task=manifest.task, max_model_len=services.info.max_context,
        prompt_format=prompt_format,
    )


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def list_models(services: ReadyServicesDep) -> ModelList:
    cards = [_base_card(services)]
    for name, entry in sorted(services.registry.entries.items()):
        if entry.current is not None:
            cards.append(_adapter_card(name, entry.versions[entry.current], services))
    return ModelList(data=cards)


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERRORS)
async def retrieve_model(model: str, services: ReadyServicesDep) -> ModelCard:
    with _openai_params(adapter="model"):
        ref = adapter_ref_for(model, services)
        if ref is None:
            return _base_card(services)
        return _adapter_card(model, services.registry.lookup(ref), services)


# --- generation shared by both endpoints -------------------------------------------------


class _Run:
    """The engine requests behind one OpenAI call, and what its response and log line need."""

    def __init__(self, http_request: Request, services: Services, requests: list[GenerationRequest],
                 n: int, kind: str, user: str | None, warnings: tuple[PromptWarning, ...]):
        self.requests = requests
        self.warnings = warnings  # shown in the response body, or in a stream's first chunk
        self.n = n
        self.kind = kind  # "chat_completions" or "completions": the TTFT histogram's label
        self.inference = services.inference
        self.created = int(time.time())
        self.state = http_request.state
        binding = requests[0].adapter
        # The response echoes the exact version that answered, as OpenAI echoes a dated model.
        self.model = f"{binding.name}@{binding.version}" if binding else services.info.base_id
        prefix = "chatcmpl" if kind == "chat_completions" else "cmpl"
        self.id = f"{prefix}-{self.state.request_id}"
        self.state.adapter = binding.name if binding else None
        self.state.adapter_ref = self.model if binding else None
        self.state.choices = len(requests)
        self.state.user = user
        self.state.prompt_tokens = self.state.completion_tokens = 0

    def usage(self) -> UsageOut:
        prompt, completion = self.state.prompt_tokens, self.state.completion_tokens
        return UsageOut(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(choice index, event) from every choice as they arrive; closing it cancels the rest."""
        queue: asyncio.Queue[tuple[int, TokenEvent | Exception]] = asyncio.Queue()

        async def pump(index: int, request: GenerationRequest) -> None:
            try:
                async for event in self.inference.stream(request, self.kind):
                    queue.put_nowait((index, event))
            except Exception as exc:  # re-raised by the consumer, which owns the response
                queue.put_nowait((index, exc))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(self.requests)]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.queue_s is not None and getattr(self.state, "queue_ms", None) is None:
                    self.state.queue_ms = round(item.queue_s * 1000, 1)
                if item.token_ids and getattr(self.state, "ttft_ms", None) is None:
                    self.state.ttft_ms = round((time.monotonic() - self.state.arrived) * 1000, 1)
                if item.finished:
                    remaining -= 1
                    # Choices of one prompt share it: OpenAI counts its tokens once.
                    if index % self.n == 0:
                        self.state.prompt_tokens += item.prompt_tokens
                    self.state.completion_tokens += item.completion_tokens
                yield index, item
        finally:
            for task in tasks:
                task.cancel()  # a no-op for finished rows; the others leave the batch at the next step

    async def collect(self) -> list[_Choice]:
        """Every choice in full, for a non-streaming response."""
        choices = [_Choice() for _ in self.requests]
        async for index, event in self.events():
            choice = choices[index]
            choice.parts.append(event.text)
            choice.logprobs.extend(event.logprobs)
            if event.prompt_logprobs is not None:
                choice.prompt_logprobs = event.prompt_logprobs
            if event.finished:
                _raise_failure(event)
                choice.finish_reason = event.finish_reason
        return choices


@dataclasses.dataclass
class _Choice:
    parts: list[str] = dataclasses.field(default_factory=list)
    finish_reason: str = ""
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # of the generated tokens
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _raise_failure(event: TokenEvent) -> None:
    """Engine outcomes OpenAI has no finish_reason for become errors (stop/length pass through)."""
    if event.finish_reason == "error":
        raise engine_failure(event.error_code, event.error)
    if event.finish_reason == "timeout":
        raise AdaptserveError("generation passed the server's request deadline")
    if event.finish_reason == "cancelled":
        raise AdaptserveError("generation was cancelled by the server")


def _check_supported(body: CompletionRequest | ChatCompletionRequest, prompts: int, max_n: int) -> None:
    refused = body.unsupported()
    if refused is not None:
        raise UnsupportedParameter(refused[1], param=refused[0])
    if body.n * prompts > max_n:
        raise InvalidRequest(f"n x prompts = {body.n * prompts}; at most {max_n} choices per request", param="n")


async def _prepare(services: Services, body: CompletionRequest | ChatCompletionRequest, inputs: list[dict],
                   limit: int | None, limit_param: str, input_param: str, logprobs: int | None = None,
                   prompt_logprobs: int | None = None, logprobs_param: str = "logprobs") -> list[GenerationRequest]:
    """One engine request per choice, in OpenAI's choice order (prompt-major, then n).

    Every choice runs on the same adapter version: the target is resolved once for all of them.
    An input is {"prompt": text}, {"prompt_ids": [...]} or {"messages": [...]}.
    """
    inference = services.inference
    with _openai_params(adapter="model", task="model", prompt=input_param, max_new_tokens=limit_param,
                        logprobs=logprobs_param):
        params = inference.sampling_params(limit, body.temperature, body.top_p, 0, body.seed, body.stop_list(),
                                           logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        # `task:<name>` picks through a task route; `user` keeps one end user on one side of a split.
        task = body.model.removeprefix(TASK_PREFIX) if body.model.startswith(TASK_PREFIX) else None
        ref = None if task else adapter_ref_for(body.model, services)
        target = await inference.resolve_target("generate", adapter=ref, task=task, route_key=body.user)
        requests: list[GenerationRequest] = []
        for item in inputs:
            first = await inference.prepare_generation(item.get("prompt"), item.get("messages"), target, params,
                                                       prompt_ids=item.get("prompt_ids"))
            for index in range(body.n):
                seed = None if body.seed is None else (body.seed + index) % 2**63
                requests.append(dataclasses.replace(
                    first,
                    request_id=first.request_id if index == 0 else inference.scheduler.new_request_id(),
                    params=dataclasses.replace(params, seed=seed),
                ))
        return requests


async def _sse(run: _Run, include_usage: bool, chunk: Callable[[int, TokenEvent | None, str | None], dict],
               opening: list[dict]) -> AsyncIterator[str]:
    """OpenAI's stream: `opening` chunks, a chunk per text delta, one per finish, optional usage, [DONE]."""

    warnings = [dataclasses.asdict(w) for w in run.warnings]  # sent once, with the first chunk

    def frame(choices: list[dict], usage: UsageOut | None = None) -> str:
        data = {"id": run.id, "object": _CHUNK_OBJECT[run.kind], "created": run.created, "model": run.model,
                "choices": choices}
        if include_usage:
            data["usage"] = usage.model_dump() if usage else None
        if warnings:
            data["warnings"] = warnings.copy()
            warnings.clear()
        return f"data: {json.dumps(data)}\n\n"

    if opening:
        yield frame(opening)
    try:
        async for index, event in run.events():
            if event.finished:
                _raise_failure(event)
            if event.text or event.logprobs or event.prompt_logprobs:
                yield frame([chunk(index, event, None)])
            if event.finished:
                yield frame([chunk(index, None, event.finish_reason)])
    except AdaptserveError as exc:
        # Headers are gone; the `openai` client raises APIError on an `error` event.
        run.state.error = exc.code
        error = {"code": exc.code, "message": exc.message, "type": "server_error", "param": None}
        yield f"data: {json.dumps({'error': error})}\n\n"
    else:
        if include_usage:
            yield frame([], run.usage())
    yield "data: [DONE]\n\n"


_CHUNK_OBJECT = {"chat_completions": "chat.completion.chunk", "completions": "text_completion"}
_STREAM_RESPONSES = {**ERRORS, 200: {"content": {"text/event-stream": {}}}}


def _stream_response(services: Services, stream: AsyncIterator[str]) -> StreamingResponse:
    # Refuse before the 200 goes out; once streaming, overload can only be an error event.
    services.inference.scheduler.check_capacity()
    return StreamingResponse(stream, media_type="text/event-stream", headers=STREAM_HEADERS)


# --- endpoints ---------------------------------------------------------------------------


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_STREAM_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, services: ReadyServicesDep, http_request: Request):
    http_request.state.model = body.model
    _check_supported(body, 1, services.settings.max_n)
    limit, limit_param = body.token_limit()
    if body.max_tokens is not None and body.max_completion_tokens not in (None, body.max_tokens):
        raise InvalidRequest("max_tokens and max_completion_tokens disagree; give one", param="max_tokens")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    requests = await _prepare(services, body, [{"messages": messages}], limit, limit_param, "messages",
                              logprobs=logprobs, logprobs_param="top_logprobs")
    strings = services.inference.engine.token_strings
    run = _Run(http_request, services, requests, body.n, "chat_completions", body.user,
               prompt_warnings(requests[0].adapter, messages))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int, event: TokenEvent | None, finish: str | None) -> dict:
            delta = {"content": event.text} if event is not None and event.text else {}
            found = chat_logprobs(event.logprobs, strings).model_dump() if event is not None and logprobs is not None else None
            return {"index": index, "delta": delta, "logprobs": found, "finish_reason": finish}

        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(len(requests))]
        return _stream_response(services, _sse(run, include_usage, chunk, opening))
    choices = await unless_disconnected(http_request, run.collect())
    return ChatCompletionResponse(
        id=run.id, created=run.created, model=run.model, usage=run.usage(),
        choices=[ChatChoice(index=i, message=ChatMessageOut(content=c.text), finish_reason=c.finish_reason,
                            logprobs=chat_logprobs(c.logprobs, strings) if logprobs is not None else None)
                 for i, c in enumerate(choices)],
        warnings=run.warnings,
    )


@router.post("/v1/completions", response_model=CompletionResponse, responses=_STREAM_RESPONSES)
async def completions(body: CompletionRequest, services: ReadyServicesDep, http_request: Request):
    http_request.state.model = body.model
    prompts = body.prompts()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InvalidRequest("prompt is empty", param="prompt")
    _check_supported(body, len(prompts), services.settings.max_n)
    if body.max_tokens == 0 and not body.echo:
        raise InvalidRequest("max_tokens=0 returns nothing without echo", param="max_tokens")
    # Echo with logprobs scores the prompt (every position's logits); max_tokens 0 means only that.
    prompt_logprobs = (body.logprobs or 0) if body.echo and (body.logprobs is not None or body.max_tokens == 0) else None
    inputs = [{"prompt": p} if isinstance(p, str) else {"prompt_ids": p} for p in prompts]
    requests = await _prepare(services, body, inputs, body.max_tokens, "max_tokens", "prompt",
                              logprobs=body.logprobs, prompt_logprobs=prompt_logprobs)
    run = _Run(http_request, services, requests, body.n, "completions", body.user,
               prompt_warnings(requests[0].adapter, None))
    inference = services.inference
    # What echo puts before each choice's completion: its prompt's text.
    echoes = [""] * len(requests)
    if body.echo:
        texts = [p if isinstance(p, str) else await asyncio.to_thread(inference.engine.decode, p) for p in prompts]
        echoes = [texts[i // body.n] for i in range(len(requests))]
    strings = inference.engine.token_strings

    def prompt_entries(request: GenerationRequest, found) -> list:
        return list(zip(request.prompt_ids, found)) if found is not None else []

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        offsets = [0] * len(requests)  # characters of each choice's text streamed so far
        echoed = [not body.echo] * len(requests)

        def chunk(index: int, event: TokenEvent | None, finish: str | None) -> dict:
            text, entries = (event.text, list(event.logprobs)) if event is not None else ("", [])
            entries = [(e.token_id, e) for e in entries]
            if not echoed[index]:  # the first chunk of a choice carries its prompt (a finish chunk too)
                echoed[index] = True
                text = echoes[index] + text
                if event is not None:
                    entries = prompt_entries(requests[index], event.prompt_logprobs) + entries
            found = None
            if body.logprobs is not None and event is not None:
                found = completion_logprobs(entries, strings, offsets[index]).model_dump()
            offsets[index] += len(text)
            return {"index": index, "text": text, "logprobs": found, "finish_reason": finish}

        return _stream_response(services, _sse(run, include_usage, chunk, []))
    choices = await unless_disconnected(http_request, run.collect())
    out = []
    for i, choice in enumerate(choices):
        found = None
        if body.logprobs is not None:
            entries = prompt_entries(requests[i], choice.prompt_logprobs) if body.echo else []
            entries += [(e.token_id, e) for e in choice.logprobs]
            found = completion_logprobs(entries, strings)
        out.append(CompletionChoice(index=i, text=echoes[i] + choice.text, finish_reason=choice.finish_reason,
                                    logprobs=found))
    return CompletionResponse(id=run.id, created=run.created, model=run.model, usage=run.usage(), choices=out,
                              warnings=run.warnings)
