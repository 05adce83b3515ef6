"""TorchEngine: one resident base, a slot pool of LoRA adapters, iteration-level batching.

Requests join the running batch at step boundaries. A step is ONE forward over a packed
row of tokens: a decode token for every running row, then the prompts of the requests
admitted under the per-step token budget, less any prefix the prefix cache already holds
(see server/engine/kv.py for the cache and the attention that keeps them apart). Reading the weights once per step whether or
not prompts join is what makes prefill cheap next to decoding on a memory-bound CPU.
Finished, cancelled or expired rows leave at the next step. Every token carries its row's
adapter slot; the LoRA layers read the per-forward plan, so one forward serves any mix of
adapters and the base.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from adapters.package import AdapterPackage
from server.contract import (
    AdapterBinding,
    ClassifyItem,
    ClassifyResult,
    EngineInfo,
    FinishReason,
    GenerationRequest,
    TokenEvent,
    TokenLogprob,
)
from server.engine.base import BaseModelError, LoadedBase
from server.engine.cpu_int8 import Int8Linear
from server.engine.cpu_threads import ThreadPolicy, block_list
from server.engine.kv import PASSTHROUGH_MASK, SlabKVCache, StepLayout, attach, kv_bytes_per_token, unsupported_reason
from server.engine.logprobs import token_logprobs
from server.engine.lora import LoRABatchPlan, LoRAContext, inject_slot_lora, stage_adapter
from server.engine.onednn import OneDNNLinear, cpu_features
from server.engine.prefix_cache import BLOCK_TOKENS, PrefixCache, PrefixMatch
from server.engine.slots import AdapterSlots, NoFreeSlot, SlotTableEngine
from server.engine.sampling import Detokenizer, SampledRows, UniformStream, choose_tokens, finish_reason_for
from server.engine.staging import StepBuffer

logger = logging.getLogger(__name__)


# The default slot count is sized for adapters of this rank on every adaptable linear layer.
SLOT_SIZING_RANK = 16
MAX_SLOTS = 1024


def lora_pool_dtype(base: LoadedBase) -> torch.dtype:
    """On CPU adapters stay float32 whatever the base computes in (the compiled loop reads
    float32; an adapter is a few MB): bf16 rounding applies only to the sum it adds."""
    return torch.float32 if base.device.type == "cpu" else base.dtype


def default_slot_count(base: LoadedBase, max_batch_size: int, budget_bytes: int | None = None) -> int:
    """Slots that `budget_bytes` of pool memory holds (default: 2 GiB on CPU, 10 % of the GPU),
    and never fewer than max_batch_size, so a full batch of distinct adapters fits."""
    if budget_bytes is None:
        on_gpu = base.device.type == "cuda"
        budget_bytes = torch.cuda.get_device_properties(base.device).total_memory // 10 if on_gpu else 2 * 1024**3
    element = lora_pool_dtype(base).itemsize
    per_slot = SLOT_SIZING_RANK * element * sum(i + o for i, o in base.signature.linear_shapes.values())
    slots = max(max_batch_size, min(MAX_SLOTS, budget_bytes // max(per_slot, 1)))
    logger.info("%d adapter slots: %.1f GiB of slot memory at %.1f MB per adapter (r=%d on every linear layer), "
                "at least max_batch_size=%d", slots, budget_bytes / 1024**3, per_slot / 1e6, SLOT_SIZING_RANK,
                max_batch_size)
    return slots


@dataclass
class _Waiting:
    """A request in the queue, from add() until it is admitted or leaves."""

    request: GenerationRequest
    since: float  # time.monotonic() of add()
    # The prompt's prefix-cache block keys, hashed once: a request may wait many steps.
    prefix_keys: tuple[bytes, ...] | None = None


@dataclass(eq=False)
class _Row:
    request: GenerationRequest
    slot: int
    detokenizer: Detokenizer
    uniforms: UniformStream | None  # None: greedy
    prefix: PrefixMatch | None = None  # what the prefix cache holds of the prompt at admission
    generated: list[int] = field(default_factory=list)
    # Reported on the first token only:
    queue_s: float | None = None
    cached_tokens: int = 0
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @property
    def pending(self) -> int:
        return self.generated[-1]


class TorchEngine(SlotTableEngine):
    def __init__(self, base: LoadedBase, max_batch_size: int, max_prefill_tokens: int, max_device_adapters: int,
                 prefix_cache_bytes: int = 0, device_budget_bytes: int | None = None):
        self.base = base
        self.signature = base.signature
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.device = base.device
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.threads = ThreadPolicy(torch.get_num_threads() if self.device.type == "cpu" else 1)
        blocks = block_list(base.backbone)
        if blocks is not None:
            self.threads.install(blocks)
        # A decode batch or a classify batch never has more distinct adapters than rows or slots.
        self.context = LoRAContext(min(max_batch_size, max_device_adapters), self.threads, self.device,
                                   cpu_kernel=self._cpu_kernel(base))
        self.pool_dtype = lora_pool_dtype(base)
        self.layers = inject_slot_lora(base.backbone, max_device_adapters, self.context)
        self.slots = AdapterSlots(max_device_adapters, self.device, device_budget_bytes, self._copy_in,
                                  self._clear_slot, self._slots_changed)
        self.waiting: collections.deque[_Waiting] = collections.deque()
        self.rows: list[_Row] = []  # row i of the batch is row i of the KV cache
        kv_dtype = torch.float32 if self.device.type == "cpu" else base.dtype  # see SlabKVCache.dtype
        prefix = None
        if base.signature.kind == "decoder":
            block_bytes = kv_bytes_per_token(self.model, kv_dtype) * BLOCK_TOKENS
            # A budget below one block holds nothing: the same as 0, off.
            if prefix_cache_bytes >= block_bytes:
                prefix = PrefixCache(prefix_cache_bytes, block_bytes)
        self.kv = SlabKVCache(max_batch_size, self.device, self.threads, prefix=prefix, dtype=kv_dtype)
        if base.signature.kind == "decoder":
            reason = unsupported_reason(self.model)
            if reason is not None:
                raise BaseModelError(f"{base.signature.canonical_id} cannot be served for generation: {reason}")
            attach(self.model, self.kv)
        self._passthrough_mask = PASSTHROUGH_MASK.to(self.device)
        self.cancelled: dict[str, FinishReason] = {}
        self._stats: dict[str, Any] = {}
        # Valid while the rows' slots are unchanged and no slot is (re)loaded: see _lora_plan.
        self._decode_plan: LoRABatchPlan | None = None
        self._decode_plan_slots: list[int] = []
        self._lora_bytes: dict[str, int] | None = None  # recounted after a load or an eviction
        # Fast tokenizers refuse concurrent calls that change padding/truncation state.
        self.tokenizer_lock = threading.Lock()
        self._token_texts: dict[int, str] = {}  # token id -> its own text (token_strings)
        self.eos_ids = self._eos_ids()
        self.info = EngineInfo(
            base_id=base.signature.canonical_id,
            kind=base.signature.kind,
            max_context=base.max_context,
            device=str(base.device),
            dtype=str(base.dtype).removeprefix("torch."),
            quantization=base.quantization,
            max_device_adapters=max_device_adapters,
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
            vocab_size=len(self.tokenizer),
        )
        self._update_stats()
        logger.info("engine kernels: %s", self.kernels())

    def kernels(self) -> str:
        """Which kernel serves each part here (logged at start)."""
        linears = {type(m) for m in self.model.modules()}
        if OneDNNLinear in linears:
            linear = f"oneDNN packed {self.info.dtype}"
        elif Int8Linear in linears:
            linear = "weight-only int8 (numba tiles; float32 GEMM for prompts)"
        elif self.base.quantization != "none":
            linear = f"bitsandbytes {self.base.quantization}, compute {self.info.dtype}"
        else:
            linear = f"torch {self.info.dtype}"
        lora = "numba loop over float32 pools" if self.context.cpu_kernel is not None else f"torch ops ({self.pool_dtype})"
        where = cpu_features() if self.device.type == "cpu" else str(self.device)
        attention = str(self.kv.dtype or self.base.dtype).removeprefix("torch.")
        return f"{where}; linears: {linear}; LoRA: {lora}; attention: {attention} over the slab"

    @staticmethod
    def _cpu_kernel(base: LoadedBase):
        """The compiled LoRA loop for CPU steps, float32 or bfloat16 activations over float32
        pools (None elsewhere: numba is imported only where it runs)."""
        if base.device.type != "cpu":
            return None
        from server.engine import cpu_sgmv

        cpu_sgmv.warm_up(bf16=base.dtype == torch.bfloat16)
        return cpu_sgmv.add_segment_lora

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        generation_config = getattr(self.model, "generation_config", None)
        configured = getattr(generation_config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return {i for i in ids if i is not None}

    # --- tokens ------------------------------------------------------------------------

    def tokenize(self, prompt: str | None, messages: Sequence[dict[str, str]] | None) -> list[int]:
        with self.tokenizer_lock:
            if messages is not None:
                text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
                return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            return list(self.tokenizer(prompt or "")["input_ids"])

    def count_tokens(self, text: str) -> int:
        with self.tokenizer_lock:
            return len(self.tokenizer(text)["input_ids"])

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        # Decoded one by one: a token that is part of a multi-byte character shows as U+FFFD.
        # Remembered (at most the vocabulary): logprobs name ~20 tokens per position, mostly the
        # same few thousand, and this runs on the event loop's thread (~4 us per decode).
        missing = [token_id for token_id in dict.fromkeys(token_ids) if token_id not in self._token_texts]
        if missing:
            with self.tokenizer_lock:
                for token_id in missing:
                    self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return [self._token_texts[token_id] for token_id in token_ids]

    def decode(self, token_ids: Sequence[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(list(token_ids))

    # --- adapters -----------------------------------------------------------------------

    def load_adapter(self, adapter: AdapterBinding) -> int:
        return self.slots.load(adapter)

    def _copy_in(self, slot: int, package: AdapterPackage) -> None:
        for name, (a, bt) in stage_adapter(package.modules, self.pool_dtype, self.device).items():
            self.layers[name].load_slot(slot, a, bt)

    def _clear_slot(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)

    def _slots_changed(self) -> None:
        self._decode_plan = None  # pool contents changed: cached operands may be stale
        self._lora_bytes = None
        self._update_stats()

    # --- generation ---------------------------------------------------------------------

    def add(self, request: GenerationRequest) -> None:
        self.waiting.append(_Waiting(request, time.monotonic()))

    def cancel(self, request_id: str, reason: FinishReason) -> None:
        # Only requests still here: a late cancel of a finished one must not linger.
        known = any(w.request.request_id == request_id for w in self.waiting) or any(
            row.request.request_id == request_id for row in self.rows
        )
        if known:
            self.cancelled[request_id] = reason

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def stats(self) -> dict[str, Any]:
        # Rebuilt at the end of each step on the engine thread; readers elsewhere get a snapshot.
        return dict(self._stats)

    def _memory(self) -> dict[str, int]:
        """Bytes the engine has allocated beyond the base model's weights."""
        if self._lora_bytes is None:  # pools change only on a load or an eviction
            totals = collections.Counter()
            for layer in self.layers.values():
                totals.update(layer.nbytes())
            self._lora_bytes = dict(totals)
        prefix = self.kv.prefix.nbytes() if self.kv.prefix is not None else 0
        return {"lora_pool": self._lora_bytes.get("lora_pool", 0), "lora_active": self._lora_bytes.get("lora_active", 0),
                "kv_cache": self.kv.nbytes(), "prefix_cache": prefix}

    def _update_stats(self) -> None:
        self._stats = {
            "memory_bytes": self._memory(),
            "running": len(self.rows),
            "waiting": len(self.waiting),
            "kv_tokens": self.kv.tokens(),
            "kv_capacity_tokens": self.max_batch_size * self.base.max_context,
            "running_adapters": sorted({r.request.adapter.name for r in self.rows if r.request.adapter}),
            "waiting_adapters": sorted({w.request.adapter.name for w in self.waiting if w.request.adapter}),
            "resident_adapter_keys": list(self.slots.by_key),
        }

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        self._drop_cancelled_waiting(events)
        self._retire(events, self._expired_or_cancelled_rows())
        admitted = self._admit(events)
        if self.rows or admitted:
            self._forward(admitted, events)
        self._update_stats()
        return events

    def abort_all(self, error: str) -> list[TokenEvent]:
        requests = [w.request for w in self.waiting] + [row.request for row in self.rows]
        for row in self.rows:
            if row.request.adapter is not None:
                self.slots.users[row.request.adapter.key] -= 1
        self.waiting.clear()
        self.rows = []
        self.kv.reset()
        self.cancelled.clear()
        self._update_stats()
        return [TokenEvent(r.request_id, "", (), "error", len(r.prompt_ids), 0, error=error, error_code="engine_error")
                for r in requests]

    def _drop_cancelled_waiting(self, events: list[TokenEvent]) -> None:
        now = time.monotonic()
        kept: collections.deque[_Waiting] = collections.deque()
        for waiting in self.waiting:
            request = waiting.request
            reason = self.cancelled.pop(request.request_id, None)
            if reason is None and request.deadline is not None and now > request.deadline:
                reason = "timeout"
            if reason is None:
                kept.append(waiting)
            else:
                events.append(TokenEvent(request.request_id, "", (), reason, len(request.prompt_ids), 0))
        self.waiting = kept

    def _expired_or_cancelled_rows(self) -> dict[int, FinishReason]:
        now = time.monotonic()
        leaving: dict[int, FinishReason] = {}
        for index, row in enumerate(self.rows):
            reason = self.cancelled.pop(row.request.request_id, None)
            if reason is None and row.request.deadline is not None and now > row.request.deadline:
                reason = "timeout"
            if reason is not None:
                leaving[index] = reason
        return leaving

    def _admit(self, events: list[TokenEvent]) -> list[_Row]:
        """Waiting requests that join this step, in arrival order, under the prefill token budget.

        A request whose adapter finds no free slot waits without holding back the requests
        behind it that need no new slot (resident adapters, the base); none of those may take
        a slot it is waiting for, so it gets the next one freed and is never starved.
        """
        admitted: list[_Row] = []
        budget = self.max_prefill_tokens
        remaining: collections.deque[_Waiting] = collections.deque()
        full = slot_wait = False
        for waiting in self.waiting:
            request = waiting.request
            if full or len(self.rows) + len(admitted) >= self.max_batch_size:
                remaining.append(waiting)
                continue
            prefix = self._prefix_match(waiting)
            cost = len(request.prompt_ids) - (prefix.cached_tokens if prefix else 0)
            if admitted and cost > budget:
                full = True  # arrival order is kept under the token budget
                remaining.append(waiting)
                continue
            slot = 0
            if request.adapter is not None:
                slot = self.slots.lookup(request.adapter.key)
                if slot is not None:
                    self.slots.activity.count("hits")
                else:
                    if slot_wait:
                        remaining.append(waiting)
                        continue
                    try:
                        slot = self.load_adapter(request.adapter)
                    except NoFreeSlot:
                        slot_wait = True  # waits until a running row releases its adapter
                        remaining.append(waiting)
                        continue
                    except Exception as exc:
                        # This request's adapter cannot be loaded (out of memory): fail it alone,
                        # rather than the whole step and every running row with it.
                        logger.warning("adapter %s@%s failed to load: %s", request.adapter.name,
                                       request.adapter.version, exc)
                        events.append(TokenEvent(request.request_id, "", (), "error", len(request.prompt_ids), 0,
                                                 error=f"adapter {request.adapter.name}@{request.adapter.version} "
                                                 f"could not be copied into a device slot: {type(exc).__name__}",
                                                 error_code="adapter_load_failed"))
                        continue
                self.slots.users[request.adapter.key] += 1
            budget -= cost
            params = request.params
            uniforms = None if params.greedy else UniformStream(params.seed)
            row = _Row(request, slot, Detokenizer(self.tokenizer, params.stop), uniforms, prefix)
            row.queue_s = time.monotonic() - waiting.since
            admitted.append(row)
        self.waiting = remaining
        return admitted

    def _prefix_match(self, waiting: _Waiting) -> PrefixMatch | None:
        prefix = self.kv.prefix
        if prefix is None:
            return None
        request = waiting.request
        match = prefix.match(request.adapter.key if request.adapter is not None else "", request.prompt_ids,
                             waiting.prefix_keys)
        waiting.prefix_keys = match.keys
        if request.params.prompt_logprobs is not None:
            # Every prompt position's logits are needed: nothing is read from the cache (what
            # this prompt computes is still stored for later requests).
            match = PrefixMatch(match.keys, 0)
        return match

    def _set_plan(self, slots: list[int]) -> None:
        self.context.plan = LoRABatchPlan.for_rows(slots, self.context.positions, self.device)

    def _lora_plan(self, admitted: list[_Row], layout: StepLayout) -> LoRABatchPlan | None:
        """A decode-only plan is reused while the rows' slots stay put. A new plan may build
        active buffers (torch-ops layers), so the memory count is redone after it."""
        slots = [r.slot for r in self.rows]
        if admitted:
            self._lora_bytes = None
            prompts = [(r.slot, prefill.computed) for r, prefill in zip(admitted, layout.prefills)]
            return LoRABatchPlan.for_step(slots, prompts, self.context.positions, self.device)
        if self._decode_plan is None or self._decode_plan_slots != slots:
            self._lora_bytes = None
            self._decode_plan = LoRABatchPlan.for_step(slots, [], self.context.positions, self.device)
            self._decode_plan_slots = slots
        return self._decode_plan

    def _forward(self, admitted: list[_Row], events: list[TokenEvent]) -> None:
        """One packed forward: every running row's next token and every admitted prompt.

        Device traffic per step: one host->device copy (every index array of the step, see
        staging.StepBuffer) and one device->host read (the chosen token ids); a LoRA plan
        built on torch ops adds one copy when the running rows' adapters change.
        """
        running = len(self.rows)
        layout = self.kv.plan_step(running, [len(r.request.prompt_ids) for r in admitted])
        plans = [self.kv.prefix.plan(r.prefix) for r in admitted] if self.kv.prefix is not None else []
        if plans:
            layout.use_prefix(plans)
        token_ids = [r.pending for r in self.rows]
        positions = [len(r.request.prompt_ids) + len(r.generated) - 1 for r in self.rows]
        logit_at = list(range(running))  # packed tokens whose logits the vocabulary projection computes
        last_logit = list(range(running))  # each stepping row's next-token logits among them
        prompt_spans: dict[int, tuple[int, int, int]] = {}  # row -> (first logit, packed offset, length)
        for index, (row, prefill) in enumerate(zip(admitted, layout.prefills), start=running):
            prompt = row.request.prompt_ids
            row.cached_tokens = prefill.cached
            offset = len(token_ids)
            token_ids.extend(prompt[prefill.cached :])
            positions.extend(range(prefill.cached, len(prompt)))
            if row.request.params.prompt_logprobs is not None:  # never cached: see _prefix_match
                prompt_spans[index] = (len(logit_at), offset, len(prompt))
                logit_at.extend(range(offset, offset + len(prompt)))
            else:
                logit_at.append(len(token_ids) - 1)
            last_logit.append(len(logit_at) - 1)
        stepping = self.rows + admitted
        wants = [i for i, r in enumerate(stepping) if r.request.params.logprobs is not None]
        buffer = StepBuffer()
        handles = [buffer.longs(token_ids), buffer.longs(positions), buffer.longs(logit_at),
                   buffer.longs(layout.row_starts), buffer.longs(last_logit), buffer.longs(wants)]
        block_handles = [(buffer.longs(plan.read) if plan.read else None, buffer.longs(plan.write) if plan.write else None)
                         for plan in plans]
        sampling = SampledRows.stage(buffer, [r.request.params for r in stepping], [r.uniforms for r in stepping])
        sent = buffer.send(self.device)
        input_ids, position_ids, keep, row_starts, last, wanted = (sent[h] for h in handles)
        blocks = [tuple(None if h is None else sent[h] for h in pair) for pair in block_handles]
        self.kv.begin_step(row_starts, blocks)
        self.context.plan = self._lora_plan(admitted, layout)
        try:
            logits = self.model(
                input_ids=input_ids[None],  # [1, tokens]
                position_ids=position_ids[None],
                attention_mask=self._passthrough_mask,
                use_cache=False,
                logits_to_keep=keep,
            ).logits[0].float()  # [kept, vocab]: sampling and logprobs in float32 whatever the base computes in
        except BaseException:
            self.kv.abandon_step()
            for row in admitted:  # the caller fails every request of this step
                self.rows.append(row)
            raise
        finally:
            self.context.plan = None
        self.kv.finish_step(len(admitted))
        self.rows.extend(admitted)
        next_logits = logits.index_select(0, last) if prompt_spans else logits  # [rows, vocab]
        chosen = choose_tokens(next_logits, sampling.on_device(sent) if sampling is not None else None)
        chosen_logprobs: dict[int, TokenLogprob] = {}
        if wants:
            top = max(stepping[i].request.params.logprobs for i in wants)
            found = token_logprobs(next_logits.index_select(0, wanted), chosen.index_select(0, wanted), top)
            chosen_logprobs = {i: self._cut(found_one, stepping[i].request.params.logprobs)
                               for i, found_one in zip(wants, found)}
        for index, (first, offset, length) in prompt_spans.items():
            # Position i's logits predict prompt token i + 1; the first token has no logprob.
            k = stepping[index].request.params.prompt_logprobs
            found = token_logprobs(logits[first : first + length - 1], input_ids[offset + 1 : offset + length], k)
            stepping[index].prompt_logprobs = (None, *found)
        self._emit(chosen.tolist(), chosen_logprobs, events)

    @staticmethod
    def _cut(found: TokenLogprob, top: int) -> TokenLogprob:
        """The step computes the largest top-k asked; each row keeps its own k."""
        return found if len(found.top) == top else TokenLogprob(found.token_id, found.logprob, found.top[:top])

    def _emit(self, tokens: list[int], logprobs: dict[int, TokenLogprob], events: list[TokenEvent]) -> None:
        """tokens: one per running row in order (logprobs: for the rows that asked); finished rows leave."""
        rows = list(self.rows)
        finished: dict[int, FinishReason] = {}
        for index, (row, token) in enumerate(zip(rows, tokens)):
            first = row.queue_s is not None
            params = row.request.params
            prompt_tokens = len(row.request.prompt_ids)
            if params.max_new_tokens == 0:  # scoring the prompt only (echo with max_tokens 0)
                finished[index] = "length"
                events.append(TokenEvent(row.request.request_id, "", (), "length", prompt_tokens, 0,
                                         queue_s=row.queue_s, cached_tokens=row.cached_tokens,
                                         prompt_logprobs=row.prompt_logprobs))
                continue
            row.generated.append(token)
            reason = finish_reason_for(
                token, self.eos_ids, len(row.generated), prompt_tokens + len(row.generated),
                params, self.base.max_context,
            )
            text, stopped = row.detokenizer.push(None if reason == "stop" else token)
            if stopped:
                reason = "stop"
            if reason is not None:
                text += row.detokenizer.flush()
                finished[index] = reason
            events.append(
                TokenEvent(row.request.request_id, text, (token,), reason, prompt_tokens, len(row.generated),
                           queue_s=row.queue_s, cached_tokens=row.cached_tokens if first else None,
                           logprobs=(logprobs[index],) if index in logprobs else (),
                           prompt_logprobs=row.prompt_logprobs if first else None)
            )
            row.queue_s = None  # reported once
        if finished:
            self._remove_rows(finished)

    def _retire(self, events: list[TokenEvent], leaving: dict[int, FinishReason]) -> None:
        for index, reason in leaving.items():
            row = self.rows[index]
            events.append(
                TokenEvent(
                    row.request.request_id, row.detokenizer.flush(), (), reason,
                    len(row.request.prompt_ids), len(row.generated),
                )
            )
        if leaving:
            self._remove_rows(leaving)

    def _remove_rows(self, indices: dict[int, FinishReason]) -> None:
        for index in indices:
            adapter = self.rows[index].request.adapter
            if adapter is not None:
                self.slots.users[adapter.key] -= 1
        # The cache fills each hole with one of the last rows; the row list follows it.
        for source, target in self.kv.remove_rows(set(indices)):
            self.rows[target] = self.rows[source]
        del self.rows[self.kv.rows :]

    # --- classification -----------------------------------------------------------------

    @torch.inference_mode()
    def classify(self, items: Sequence[ClassifyItem]) -> list[ClassifyResult]:
        results: list[ClassifyResult] = []
        for start in range(0, len(items), self.max_batch_size):
            results.extend(self._classify_batch(items[start : start + self.max_batch_size]))
        return results

    def _classify_batch(self, items: Sequence[ClassifyItem]) -> list[ClassifyResult]:
        by_key = {item.adapter.key: item.adapter for item in items}
        slot_of: dict[str, int] = {}
        try:
            for key, binding in by_key.items():  # each adapter once; held so a later one cannot take its slot
                slot_of[key] = self.slot_without_waiting(binding)
                self.slots.users[key] += 1
            return self._classify_rows(items, [slot_of[item.adapter.key] for item in items])
        finally:
            for key in slot_of:
                self.slots.users[key] -= 1

    def _classify_rows(self, items: Sequence[ClassifyItem], slots: list[int]) -> list[ClassifyResult]:
        with self.tokenizer_lock:
            encoded = self.tokenizer(
                [item.text for item in items],
                padding=True,
                truncation=True,
                max_length=self.base.max_context,
                return_tensors="pt",
                padding_side="right",
            )
        input_ids = encoded["input_ids"].to(self.device)
        mask = encoded["attention_mask"].to(self.device)
        self._set_plan(slots)
        try:
            out = self.base.backbone(input_ids=input_ids, attention_mask=mask)
        finally:
            self.context.plan = None
        lengths = mask.sum(-1)  # [batch]
        if self.base.signature.kind == "decoder":
            # The last real token sees the whole text (causal attention): HF's *ForSequenceClassification pooling.
            pooled = out.last_hidden_state[torch.arange(len(items), device=self.device), lengths - 1]
        else:
            pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
        pooled = pooled.float()  # [batch, hidden]
        results = []
        for row, item in enumerate(items):
            weight, bias, labels = self.slots.heads[item.adapter.key]
            logits = pooled[row] @ weight.T + (bias if bias is not None else 0)  # [num_labels]
            probs = logits.softmax(-1).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            results.append(
                ClassifyResult(
                    label=labels[best],
                    score=probs[best],
                    scores=dict(zip(labels, probs)),
                    prompt_tokens=int(lengths[row]),
                )
            )
        return results
