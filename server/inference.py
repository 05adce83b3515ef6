"""Turning a validated API request into engine work: caps, adapter binding, tokenizing.

Shared by the native API and the OpenAI-compatible one, so both enforce the same limits
before any work is queued. No torch, no fastapi.

A request is sent to the model as given. When the adapter's manifest records how its
training prompts were formatted (adaptserve's trainer writes it), a request in another
shape is still served, with warnings saying which shape the adapter was trained on.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal, Sequence

from adapters.images import ImagePolicy, ImageRejected, decode_image
from adapters.manifest import PromptFormat
from adapters.merge import MergeSpec
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
from server.errors import (
    AdapterNotFound,
    AdapterRejected,
    AdapterTaskMismatch,
    AdapterVersionNotFound,
    ImageTooLarge,
    InvalidImage,
    InvalidParameter,
    LimitExceeded,
    UnsupportedForBase,
    UnsupportedImageFormat,
    engine_failure,
)
from server.merges import MergeCache
from server.metrics import Metrics
from server.registry import Registry
from server.routing import BASE_FALLBACK, RouteTable
from server.scheduler import Scheduler

Kind = Literal["generate", "classify"]
# A route's target that is absent or cannot be loaded: what its fallback stands in for.
UNAVAILABLE = (AdapterNotFound, AdapterVersionNotFound, AdapterRejected)
IMAGE_ERRORS = {"unsupported_image_format": UnsupportedImageFormat, "image_too_large": ImageTooLarge,
                "invalid_image": InvalidImage}


@dataclass(frozen=True)
class Target:
    """What one request runs on, resolved once before it is queued."""

    binding: AdapterBinding | None  # None = the base model
    task: str | None = None  # the route that chose it
    fallback: bool = False  # the route's target was unavailable and its fallback served

    @property
    def label(self) -> str:
        """`name@version` for logs and responses (a merge's version is its recipe hash)."""
        return f"{self.binding.name}@{self.binding.version}" if self.binding else "__base__"


@dataclass(frozen=True)
class PromptWarning:
    """A request whose shape differs from the adapter's training prompts (answered anyway)."""

    code: Literal["prompt_format_mismatch", "system_prompt_mismatch"]
    message: str
    trained_on: Literal["prompt", "messages"]  # the request field that gets the trained behaviour


SYSTEM_PROMPT_SHOWN = 200  # characters of a recorded system prompt quoted in a warning


def prompt_warnings(binding: AdapterBinding | None, messages: Sequence[dict] | None) -> tuple[PromptWarning, ...]:
    """Where a request (`messages`, or None for a raw `prompt`) departs from the adapter's training format.

    None for the base, merges and adapters without a recorded format: nothing is known, so
    nothing is said.
    """
    prompt_format: PromptFormat | None = binding.package.manifest.prompt_format if binding is not None else None
    if prompt_format is None:
        return ()
    ref, trained_on = f"{binding.name}@{binding.version}", prompt_format.request_field
    rows = f"{prompt_format.source_keys} rows"
    if prompt_format.kind == "raw" and messages is not None:
        return (PromptWarning(
            "prompt_format_mismatch",
            f"adapter {ref} was trained on raw prompts ({rows}, no chat template); this request sent `messages`, "
            "rendered with the chat template. Send the text as `prompt` (/v1/generate or /v1/completions) "
            "for the trained behaviour.", trained_on),)
    if prompt_format.kind == "chat" and messages is None:
        return (PromptWarning(
            "prompt_format_mismatch",
            f"adapter {ref} was trained on chat messages ({rows}, through the base's chat template); this "
            "request sent a raw `prompt`, which reaches the model without the template. Send `messages` "
            "(/v1/generate or /v1/chat/completions) for the trained behaviour.", trained_on),)
    if prompt_format.kind == "chat":
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        if prompt_format.system_prompt is not None and system != prompt_format.system_prompt:
            shown = prompt_format.system_prompt[:SYSTEM_PROMPT_SHOWN]
            return (PromptWarning(
                "system_prompt_mismatch",
                f"adapter {ref} was trained with the system message {shown!r}; this request has "
                f"{'no system message' if system is None else 'a different one'}.", trained_on),)
        if "system" not in prompt_format.roles and system is not None:
            return (PromptWarning(
                "system_prompt_mismatch",
                f"adapter {ref} was trained without a system message (the chat template's default applied); "
                "this request has one.", trained_on),)
    return ()


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class InferenceService:
    def __init__(self, settings: Settings, info: EngineInfo, tokenizer_engine, registry: Registry,
                 scheduler: Scheduler, metrics: Metrics, routes: RouteTable | None = None):
        self.settings = settings
        self.info = info
        self.engine = tokenizer_engine  # only tokenize/count_tokens are used off the engine thread
        self.registry = registry
        self.scheduler = scheduler
        self.metrics = metrics
        self.routes = routes
        self.merges = MergeCache(settings.merge_cache_entries, settings.max_merge_rank)

    async def resolve_target(self, kind: Kind, *, adapter: str | None = None, task: str | None = None,
                             route_key: str | None = None, adapters: Sequence[tuple[str, float]] | None = None,
                             merge: MergeSpec | None = None) -> Target:
        """The one place a request's adapter is decided, for the native and the OpenAI API.

        At most one of `adapter` (name or name@version), `task` (a route; `route_key` keeps a
        caller on one side of a split) or `adapters` (weighted sources merged with `merge`,
        default cat). None of them: the base.
        """
        if sum(x is not None for x in (adapter, task, adapters)) > 1:
            raise InvalidParameter("give at most one of `adapter`, `task` or `adapters`", param="adapter")
        if merge is not None and adapters is None:
            raise InvalidParameter("`merge` needs `adapters` (the sources to merge)", param="merge")
        if task is not None:
            return await self._route(kind, task, route_key)
        if adapters is not None:
            sources = await self.bind_many(kind, [ref for ref, _ in adapters])
            weighted = list(zip(sources, (float(w) for _, w in adapters)))
            return Target(await self.merges.get(weighted, merge or MergeSpec()))
        return Target(await self.bind(adapter, kind))

    async def bind_many(self, kind: Kind, refs: Sequence[str]) -> list[AdapterBinding]:
        if not refs:
            raise InvalidParameter("`adapters` is empty", param="adapters")
        if len(refs) > self.settings.max_merge_adapters:
            raise LimitExceeded(f"{len(refs)} adapters; at most {self.settings.max_merge_adapters} per request",
                                param="adapters")
        return [await self.bind(ref, kind) for ref in refs]

    async def _route(self, kind: Kind, task: str, route_key: str | None) -> Target:
        route = self.routes.get(task) if self.routes is not None else None
        if route is None:
            raise AdapterNotFound(f"no route for task {task!r}", param="task")
        chosen = route.choose(route_key)
        try:
            target = Target(await self.bind(chosen.adapter, kind), task)
        except UNAVAILABLE:
            if route.fallback is None:
                self.metrics.task_requests.labels(task, "__none__", "failed").inc()
                raise
            fallback = None if route.fallback == BASE_FALLBACK else await self.bind(route.fallback, kind)
            target = Target(fallback, task, fallback=True)
        served = target.binding.name if target.binding else "__base__"
        self.metrics.task_requests.labels(task, served, "fallback" if target.fallback else "routed").inc()
        return target

    async def bind(self, ref: str | None, task: Kind) -> AdapterBinding | None:
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
                        seed: int | None, stop: list[str], param_prefix: str = "", logprobs: int | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """`logprobs` / `prompt_logprobs`: alternatives per generated / prompt token (None: none
        asked). max_new_tokens 0 scores the prompt only, so it needs prompt_logprobs."""
        s = self.settings
        for asked in (logprobs, prompt_logprobs):  # both are asked for through `logprobs`
            if asked is not None and not 0 <= asked <= s.max_logprobs:
                raise LimitExceeded(f"logprobs={asked}: at most {s.max_logprobs} alternatives per token",
                                    param=param_prefix + "logprobs")
        if max_new_tokens == 0 and prompt_logprobs is None:
            raise InvalidParameter("max_new_tokens=0 generates nothing: it needs the prompt's logprobs (echo)",
                                   param=param_prefix + "max_new_tokens")
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
            max_new_tokens=s.default_max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=tuple(stop),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    async def prepare_generation(self, prompt: str | None, messages: Sequence[dict] | None,
                                 target: Target | str | None, params: SamplingParams,
                                 prompt_ids: Sequence[int] | None = None) -> GenerationRequest:
        """`target`: resolved by resolve_target, or an adapter ref (None = the base).
        `prompt_ids`: the prompt as token ids (OpenAI completions accept them), not tokenized again."""
        if self.info.kind != "decoder":
            what = "an image classifier" if self.info.kind == "vision" else "an encoder"
            raise UnsupportedForBase(f"base {self.info.base_id} is {what}: it serves /v1/classify only", param="prompt")
        if messages is not None and not self.info.has_chat_template:
            raise UnsupportedForBase("this base has no chat template; send `prompt`", param="messages")
        if not isinstance(target, Target):
            target = Target(await self.bind(target, "generate"))
        elif target.binding is not None and target.binding.package.manifest.task != "generate":
            raise AdapterTaskMismatch(f"{target.label} is a classify adapter; use /v1/classify", param="adapter")
        if prompt_ids is not None:
            outside = next((i for i in prompt_ids if not 0 <= i < self.info.vocab_size), None)
            if outside is not None:
                raise InvalidParameter(f"token id {outside} is not in the vocabulary (0..{self.info.vocab_size - 1})",
                                       param="prompt")
        else:
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
            adapter=target.binding,
            deadline=time.monotonic() + self.settings.request_timeout_s,
        )

    async def stream(self, request: GenerationRequest, endpoint: str, log: Any = None) -> AsyncIterator[TokenEvent]:
        """Engine events with metrics recorded; closing early cancels the row.

        `log` (the HTTP request's state, if given) receives queue_ms, ttft_ms and token counts
        for the request's log line.
        """
        started = time.monotonic()
        first = True
        adapter = request.adapter.name if request.adapter else "__base__"
        async for event in self.scheduler.generate(request):
            if event.cached_tokens is not None:  # the first token: the prompt has been looked up
                self.metrics.prefix_cache_queries.labels(self.info.base_id).inc(event.prompt_tokens)
                self.metrics.prefix_cache_hits.labels(self.info.base_id).inc(event.cached_tokens)
            if event.queue_s is not None:
                self.metrics.queue_time.observe(event.queue_s)
                if log is not None:
                    log.queue_ms = round(event.queue_s * 1000, 1)
            if first and event.token_ids:
                ttft = time.monotonic() - started
                self.metrics.time_to_first_token.labels(endpoint).observe(ttft)
                if log is not None:
                    log.ttft_ms = round(ttft * 1000, 1)
                first = False
            if event.finished:
                self.metrics.prompt_tokens.labels(adapter).inc(event.prompt_tokens)
                self.metrics.generated_tokens.labels(adapter).inc(event.completion_tokens)
                if log is not None:
                    log.prompt_tokens, log.completion_tokens = event.prompt_tokens, event.completion_tokens
            yield event

    async def complete(self, request: GenerationRequest, endpoint: str, log: Any = None) -> Completion:
        parts: list[str] = []
        async for event in self.stream(request, endpoint, log):
            parts.append(event.text)
            if event.finished:
                if event.finish_reason == "error":
                    raise engine_failure(event.error_code, event.error)
                return Completion("".join(parts), event.finish_reason, event.prompt_tokens, event.completion_tokens)
        raise RuntimeError("generation ended without a final event")

    async def classify(self, texts: list[str] | None, target: Target | str | None,
                       images: list[bytes] | None = None) -> tuple[AdapterBinding | None, list[ClassifyResult]]:
        """`texts`, or `images` (encoded files) on a vision base; target None: a vision base's own head."""
        if not isinstance(target, Target):
            target = Target(await self.bind(target, "classify"))
        [results] = await self.classify_fanout(texts, [target], images)
        return target.binding, results

    async def classify_fanout(self, texts: list[str] | None, targets: Sequence[Target],
                              images: list[bytes] | None = None) -> list[list[ClassifyResult]]:
        """Every target's result for every text (or image), as one batch for the engine (rows
        may use different adapters; the backbone runs once per batch). Result [t][i]: target t,
        input i. Images are checked and decoded off the event loop before anything is queued."""
        vision = self.info.kind == "vision"
        if vision and images is None:
            raise UnsupportedForBase(f"base {self.info.base_id} classifies images: send `images`", param="inputs")
        if not vision and images is not None:
            raise UnsupportedForBase(f"base {self.info.base_id} classifies text: send `inputs`", param="images")
        inputs, param = (images, "images") if vision else (texts, "inputs")
        if not inputs:
            raise LimitExceeded(f"{param} is empty", param=param)
        rows = len(inputs) * len(targets)
        if rows > self.settings.max_classify_inputs:
            raise LimitExceeded(
                f"{len(inputs)} {param} x {len(targets)} adapters = {rows} rows; at most "
                f"{self.settings.max_classify_inputs} per call", param=param
            )
        for target in targets:
            if target.binding is None:
                if vision and self.info.base_labels:
                    continue  # the base's own head (ImageNet labels for mobilenet-v2)
                raise UnsupportedForBase("classification needs an adapter with a classifier head", param="adapter")
            if target.binding.package.manifest.task != "classify":
                raise AdapterTaskMismatch(f"{target.label} is a generate adapter; use /v1/generate", param="adapter")
        if vision:
            pixels = await asyncio.to_thread(self._decode_images, images)
            self.scheduler.check_capacity()
            items = [ClassifyItem("", target.binding, image) for target in targets for image in pixels]
            results = await self.scheduler.classify(items)
            return [results[i * len(pixels):(i + 1) * len(pixels)] for i in range(len(targets))]
        limit = min(self.settings.max_prompt_tokens, self.info.max_context)
        # A cheap character bound first, so a huge text is refused before it is tokenized;
        # then one worker-thread hop counts every text.
        for index, text in enumerate(texts):
            if len(text) > limit * 16:
                raise LimitExceeded(f"inputs[{index}] is longer than {limit} tokens", param=f"inputs.{index}")
        counts = await asyncio.to_thread(lambda: [self.engine.count_tokens(text) for text in texts])
        for index, count in enumerate(counts):
            if count > limit:
                raise LimitExceeded(f"inputs[{index}] is longer than {limit} tokens", param=f"inputs.{index}")
        self.scheduler.check_capacity()
        items = [ClassifyItem(text, target.binding) for target in targets for text in texts]
        results = await self.scheduler.classify(items)
        grouped = [results[i * len(texts):(i + 1) * len(texts)] for i in range(len(targets))]
        for target, group in zip(targets, grouped):
            self.metrics.prompt_tokens.labels(target.binding.name).inc(sum(r.prompt_tokens for r in group))
        return grouped

    def _decode_images(self, images: Sequence[bytes]) -> list[Any]:
        """Each image checked on its header, decoded, then preprocessed as the base's processor
        config says: numpy float32 [3, height, width] per image. Runs in a worker thread."""
        policy = ImagePolicy(formats=tuple(self.settings.image_formats), max_pixels=self.settings.max_image_pixels)
        pixels = []
        for index, data in enumerate(images):
            try:
                pixels.append(self.info.image_preprocessing(decode_image(data, policy)))
            except ImageRejected as exc:
                raise IMAGE_ERRORS[exc.code](f"images[{index}]: {exc}", param=f"images.{index}") from None
        return pixels
