"""Turning a validated API request into engine work: caps, adapter binding, tokenizing.

Shared by the native API and the OpenAI-compatible one, so both enforce the same limits
before any work is queued. No torch, no fastapi.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from server.config import Settings
from server.contract import (
    AdapterBinding,
    ClassifyItem,
    ClassifyResult,
    EngineInfo,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from server.errors import AdapterTaskMismatch, LimitExceeded, UnsupportedForBase
from server.metrics import Metrics
from server.registry import Registry
from server.scheduler import Scheduler


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class InferenceService:
    def __init__(self, settings: Settings, info: EngineInfo, tokenizer_engine, registry: Registry,
                 scheduler: Scheduler, metrics: Metrics):
        self.settings = settings
        self.info = info
        self.engine = tokenizer_engine  # only tokenize/count_tokens are used off the engine thread
        self.registry = registry
        self.scheduler = scheduler
        self.metrics = metrics

    async def bind(self, ref: str | None, task: str) -> AdapterBinding | None:
        if ref is None:
            return None
        binding = await self.registry.bind(ref)
        manifest = binding.package.manifest
        if manifest.task != task:
            endpoint = "/v1/classify" if manifest.task == "classify" else "/v1/generate"
            raise AdapterTaskMismatch(
                f"adapter {manifest.ref} is a {manifest.task} adapter; use {endpoint}", param="adapter"
            )
        return binding

    def sampling_params(self, max_new_tokens: int | None, temperature: float, top_p: float, top_k: int,
                        seed: int | None, stop: list[str], param_prefix: str = "") -> SamplingParams:
        s = self.settings
        if max_new_tokens is not None and max_new_tokens > s.max_new_tokens_limit:
            raise LimitExceeded(
                f"max_new_tokens={max_new_tokens} exceeds the server limit {s.max_new_tokens_limit}",
                param=param_prefix + "max_new_tokens",
            )
        if len(stop) > s.max_stop_sequences:
            raise LimitExceeded(f"at most {s.max_stop_sequences} stop strings", param=param_prefix + "stop")
        if any(len(x) > s.max_stop_length or not x for x in stop):
            raise LimitExceeded(
                f"stop strings must be 1..{s.max_stop_length} characters", param=param_prefix + "stop"
            )
        return SamplingParams(
            max_new_tokens=max_new_tokens or s.default_max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=tuple(stop),
        )

    async def prepare_generation(self, prompt: str | None, messages: Sequence[dict] | None,
                                 adapter_ref: str | None, params: SamplingParams) -> GenerationRequest:
        if self.info.kind != "decoder":
            raise UnsupportedForBase(
                f"base {self.info.base_id} is an encoder: it serves /v1/classify only", param="prompt"
            )
        if messages is not None and not self.info.has_chat_template:
            raise UnsupportedForBase("this base has no chat template; send `prompt`", param="messages")
        binding = await self.bind(adapter_ref, "generate")
        prompt_ids = await asyncio.to_thread(self.engine.tokenize, prompt, messages)
        limit = min(self.settings.max_prompt_tokens, self.info.max_context - 1)
        if len(prompt_ids) > limit:
            raise LimitExceeded(f"prompt is {len(prompt_ids)} tokens; the limit is {limit}", param="prompt")
        if not prompt_ids:
            raise LimitExceeded("prompt is empty", param="prompt")
        return GenerationRequest(
            request_id=self.scheduler.new_request_id(),
            prompt_ids=tuple(prompt_ids),
            params=params,
            adapter=binding,
            deadline=time.monotonic() + self.settings.request_timeout_s,
        )

    async def stream(self, request: GenerationRequest, endpoint: str) -> AsyncIterator[TokenEvent]:
        """Engine events with metrics recorded; closing early cancels the row."""
        started = time.monotonic()
        first = True
        adapter = request.adapter.name if request.adapter else "__base__"
        async for event in self.scheduler.generate(request):
            if first and event.token_ids:
                self.metrics.time_to_first_token.labels(endpoint).observe(time.monotonic() - started)
                first = False
            if event.finished:
                self.metrics.prompt_tokens.labels(adapter).inc(event.prompt_tokens)
                self.metrics.generated_tokens.labels(adapter).inc(event.completion_tokens)
            yield event

    async def complete(self, request: GenerationRequest, endpoint: str) -> Completion:
        parts: list[str] = []
        async for event in self.stream(request, endpoint):
            parts.append(event.text)
            if event.finished:
                return Completion("".join(parts), event.finish_reason, event.prompt_tokens, event.completion_tokens)
        raise RuntimeError("generation ended without a final event")

    async def classify(self, texts: list[str], adapter_ref: str) -> tuple[AdapterBinding, list[ClassifyResult]]:
        if not texts:
            raise LimitExceeded("inputs is empty", param="inputs")
        if len(texts) > self.settings.max_classify_inputs:
            raise LimitExceeded(
                f"{len(texts)} inputs; at most {self.settings.max_classify_inputs} per call", param="inputs"
            )
        binding = await self.bind(adapter_ref, "classify")
        limit = min(self.settings.max_prompt_tokens, self.info.max_context)
        for index, text in enumerate(texts):
            # A cheap character bound first, so a huge text is refused before it is tokenized.
            if len(text) > limit * 16 or await asyncio.to_thread(self.engine.count_tokens, text) > limit:
                raise LimitExceeded(f"inputs[{index}] is longer than {limit} tokens", param=f"inputs.{index}")
        self.scheduler.check_capacity()
        results = await self.scheduler.classify([ClassifyItem(t, binding) for t in texts])
        self.metrics.prompt_tokens.labels(binding.name).inc(sum(r.prompt_tokens for r in results))
        return binding, results
