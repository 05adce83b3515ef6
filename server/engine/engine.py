"""TorchEngine: one resident base, a slot pool of LoRA adapters, iteration-level batching.

Requests join the running batch at step boundaries: a step first decodes one token for
every running row, then prefills the requests admitted under the per-step token budget
and merges their KV cache into the running one (both left-padded, so every row's newest
token sits in the last column). Finished, cancelled or expired rows leave at the next
step and their cache rows are dropped. Every row carries its adapter slot; the LoRA
layers read the per-forward plan, so one forward serves any mix of adapters and the base.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from adapters.package import AdapterPackage
from server.contract import (
    AdapterBinding,
    ClassifyItem,
    ClassifyResult,
    EngineInfo,
    FinishReason,
    GenerationRequest,
    TokenEvent,
)
from server.engine.base import LoadedBase
from server.engine.lora import LoRABatchPlan, LoRAContext, inject_slot_lora
from server.engine.sampling import Detokenizer, choose_tokens, finish_reason_for

logger = logging.getLogger(__name__)


class NoFreeSlot(Exception):
    """Every device slot holds an adapter that a running row still uses."""


@dataclass(eq=False)
class _Row:
    request: GenerationRequest
    slot: int
    detokenizer: Detokenizer
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    queue_s: float | None = None  # reported on the first token only

    @property
    def pending(self) -> int:
        return self.generated[-1]


class SlotTable:
    """Adapter content key -> device slot, LRU among slots no request holds."""

    def __init__(self, slots: int):
        self.free = list(range(slots, 0, -1))  # slot 0 is the base
        self.by_key: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.users: collections.Counter[str] = collections.Counter()

    def lookup(self, key: str) -> int | None:
        slot = self.by_key.get(key)
        if slot is not None:
            self.by_key.move_to_end(key)
        return slot

    def victim(self) -> str | None:
        return next((k for k in self.by_key if self.users[k] == 0), None)


class TorchEngine:
    def __init__(self, base: LoadedBase, max_batch_size: int, max_prefill_tokens: int, max_device_adapters: int):
        self.base = base
        self.signature = base.signature
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.device = base.device
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.context = LoRAContext()
        self.layers = inject_slot_lora(base.backbone, max_device_adapters, self.context)
        self.slots = SlotTable(max_device_adapters)
        self.heads: dict[str, tuple[torch.Tensor, torch.Tensor | None, tuple[str, ...]]] = {}
        self.waiting: collections.deque[GenerationRequest] = collections.deque()
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.attention: torch.Tensor | None = None  # [rows, kv_len] 1 = real token
        self.cancelled: dict[str, FinishReason] = {}
        self._stats: dict[str, Any] = {}
        self.enqueued_at: dict[str, float] = {}  # request id -> time.monotonic() of add()
        # Valid while the rows' slots are unchanged and no slot is (re)loaded: see _set_decode_plan.
        self._decode_plan: LoRABatchPlan | None = None
        self._decode_plan_slots: list[int] = []
        # Fast tokenizers refuse concurrent calls that change padding/truncation state.
        self.tokenizer_lock = threading.Lock()
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
        )
        self._update_stats()

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

    # --- adapters -----------------------------------------------------------------------

    def load_adapter(self, adapter: AdapterBinding) -> int:
        """Slot of `adapter`, copying it in (evicting the least recently used idle one) if needed."""
        slot = self.slots.lookup(adapter.key)
        if slot is not None:
            return slot
        if not self.slots.free:
            victim = self.slots.victim()
            if victim is None:
                raise NoFreeSlot(adapter.key)
            self.evict_adapter(victim)
        slot = self.slots.free.pop()
        package: AdapterPackage = adapter.package
        try:
            for name, weights in package.modules.items():
                self.layers[name].load_slot(slot, weights, self.base.dtype, self.device)
            if package.head is not None:
                weight = package.head.weight.to(self.device, torch.float32)
                bias = package.head.bias.to(self.device, torch.float32) if package.head.bias is not None else None
                self.heads[adapter.key] = (weight, bias, package.manifest.labels or ())
        except BaseException:
            # Out of memory halfway through the copy: the slot goes back empty, not lost.
            for layer in self.layers.values():
                layer.clear_slot(slot)
            self.slots.free.append(slot)
            raise
        self.slots.by_key[adapter.key] = slot
        self._decode_plan = None  # pool contents changed: cached operands may be stale
        self._update_stats()
        logger.debug("adapter %s@%s loaded into slot %d", adapter.name, adapter.version, slot)
        return slot

    def evict_adapter(self, key: str) -> None:
        slot = self.slots.by_key.get(key)
        if slot is None or self.slots.users[key]:
            return
        for layer in self.layers.values():
            layer.clear_slot(slot)
        del self.slots.by_key[key]
        self.heads.pop(key, None)
        self.slots.free.append(slot)
        self._decode_plan = None
        self._update_stats()

    def hold_adapter(self, key: str, held: bool) -> bool:
        """Pin a resident adapter: it counts as one more user, so LRU and evict pass it by."""
        if key not in self.slots.by_key:
            return False
        self.slots.users[key] += 1 if held else -1
        return True

    def resident_adapters(self) -> dict[str, bool]:
        return {key: self.slots.users[key] > 0 for key in self.slots.by_key}

    # --- generation ---------------------------------------------------------------------

    def add(self, request: GenerationRequest) -> None:
        self.waiting.append(request)
        self.enqueued_at[request.request_id] = time.monotonic()

    def cancel(self, request_id: str, reason: FinishReason) -> None:
        # Only requests still here: a late cancel of a finished one must not linger.
        known = any(r.request_id == request_id for r in self.waiting) or any(
            row.request.request_id == request_id for row in self.rows
        )
        if known:
            self.cancelled[request_id] = reason

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def stats(self) -> dict[str, Any]:
        # Rebuilt at the end of each step on the engine thread; readers elsewhere get a snapshot.
        return dict(self._stats)

    def _update_stats(self) -> None:
        self._stats = {
            "running": len(self.rows),
            "waiting": len(self.waiting),
            "kv_tokens": int(self.attention.sum()) if self.attention is not None else 0,
            "kv_capacity_tokens": self.max_batch_size * self.base.max_context,
            "running_adapters": sorted({r.request.adapter.name for r in self.rows if r.request.adapter}),
            "waiting_adapters": sorted({r.adapter.name for r in self.waiting if r.adapter}),
            "resident_adapter_keys": list(self.slots.by_key),
        }

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        self._drop_cancelled_waiting(events)
        self._retire(events, self._expired_or_cancelled_rows())
        if self.rows:
            self._decode(events)
        admitted = self._admit(events)
        if admitted:
            self._prefill(admitted, events)
        self._update_stats()
        return events

    def abort_all(self, error: str) -> list[TokenEvent]:
        requests = list(self.waiting) + [row.request for row in self.rows]
        for row in self.rows:
            if row.request.adapter is not None:
                self.slots.users[row.request.adapter.key] -= 1
        self.waiting.clear()
        self.rows, self.cache, self.attention = [], None, None
        self.cancelled.clear()
        self.enqueued_at.clear()
        self._update_stats()
        return [TokenEvent(r.request_id, "", (), "error", len(r.prompt_ids), 0, error=error) for r in requests]

    def _drop_cancelled_waiting(self, events: list[TokenEvent]) -> None:
        now = time.monotonic()
        kept: collections.deque[GenerationRequest] = collections.deque()
        for request in self.waiting:
            reason = self.cancelled.pop(request.request_id, None)
            if reason is None and request.deadline is not None and now > request.deadline:
                reason = "timeout"
            if reason is None:
                kept.append(request)
            else:
                self.enqueued_at.pop(request.request_id, None)
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
        admitted: list[_Row] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.rows) + len(admitted) < self.max_batch_size:
            request = self.waiting[0]
            cost = len(request.prompt_ids)
            if admitted and cost > budget:
                break
            slot = 0
            if request.adapter is not None:
                try:
                    slot = self.load_adapter(request.adapter)
                except NoFreeSlot:
                    break  # waits until a running row releases its adapter
                except Exception as exc:
                    # This request's adapter cannot be loaded (out of memory): fail it alone,
                    # rather than the whole step and every running row with it.
                    logger.warning("adapter %s@%s failed to load: %s", request.adapter.name,
                                   request.adapter.version, exc)
                    self.waiting.popleft()
                    self.enqueued_at.pop(request.request_id, None)
                    events.append(TokenEvent(request.request_id, "", (), "error", cost, 0,
                                             error=f"adapter_load_failed: {type(exc).__name__}"))
                    continue
                self.slots.users[request.adapter.key] += 1
            self.waiting.popleft()
            budget -= cost
            params = request.params
            generator = None
            if not params.greedy:
                generator = torch.Generator(device="cpu")
                generator.manual_seed(params.seed if params.seed is not None else torch.seed())
            row = _Row(request, slot, Detokenizer(self.tokenizer, params.stop), generator)
            row.queue_s = time.monotonic() - self.enqueued_at.pop(request.request_id, time.monotonic())
            admitted.append(row)
        return admitted

    def _set_plan(self, slots: list[int]) -> None:
        self.context.plan = LoRABatchPlan.for_rows(slots, self.device)

    def _set_decode_plan(self) -> None:
        """Reuse the last decode plan (and the operands cached in it) while rows and slots stay put."""
        slots = [r.slot for r in self.rows]
        if self._decode_plan is None or self._decode_plan_slots != slots:
            self._decode_plan = LoRABatchPlan.for_rows(slots, self.device)
            self._decode_plan_slots = slots
        self.context.plan = self._decode_plan

    def _prefill(self, rows: list[_Row], events: list[TokenEvent]) -> None:
        length = max(len(r.request.prompt_ids) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids = row.request.prompt_ids
            input_ids[i, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[i, length - len(ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [rows, length]
        cache = DynamicCache(config=self.model.config)
        self._set_plan([r.slot for r in rows])
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            self.context.plan = None
        self._merge_cache(out.cache, mask)
        self.rows.extend(rows)
        self._sample(rows, out.logits[:, -1, :], events, first=True)

    def _decode(self, events: list[TokenEvent]) -> None:
        input_ids = torch.tensor([[r.pending] for r in self.rows], dtype=torch.long, device=self.device)
        ones = torch.ones((len(self.rows), 1), dtype=torch.long, device=self.device)
        attention = torch.cat([self.attention, ones], dim=1)  # [rows, kv_len + 1]
        position_ids = attention.sum(-1, keepdim=True) - 1  # [rows, 1]
        self._set_decode_plan()
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=position_ids,
                cache=self.cache,
                use_cache=True,
            )
        finally:
            self.context.plan = None
        self.attention = attention
        self.cache = out.cache
        self._sample(list(self.rows), out.logits[:, -1, :], events, first=False)

    def _sample(self, rows: list[_Row], logits: torch.Tensor, events: list[TokenEvent], first: bool) -> None:
        tokens = choose_tokens(logits, [r.request.params for r in rows], [r.generator for r in rows])
        finished: dict[int, FinishReason] = {}
        for row, token in zip(rows, tokens):
            row.generated.append(token)
            prompt_tokens = len(row.request.prompt_ids)
            reason = finish_reason_for(
                token, self.eos_ids, len(row.generated), prompt_tokens + len(row.generated),
                row.request.params, self.base.max_context,
            )
            ids = row.generated[:-1] if reason == "stop" else row.generated
            text, stopped = row.detokenizer.push(ids)
            if stopped:
                reason = "stop"
            if reason is not None:
                text += row.detokenizer.flush()
                finished[self.rows.index(row)] = reason
            events.append(
                TokenEvent(row.request.request_id, text, (token,), reason, prompt_tokens, len(row.generated),
                           queue_s=row.queue_s if first else None)
            )
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
        keep = [i for i in range(len(self.rows)) if i not in indices]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.attention = None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.attention = self.attention.index_select(0, index)
        # Columns that are padding for every remaining row only cost attention time.
        first_real = int(self.attention.argmax(dim=1).min())
        if first_real > 0:
            self.attention = self.attention[:, first_real:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[..., first_real:, :]
                layer.values = layer.values[..., first_real:, :]

    def _merge_cache(self, new_cache: DynamicCache, new_mask: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.attention = new_cache, new_mask
            return
        old_len, new_len = self.attention.shape[1], new_mask.shape[1]
        total = max(old_len, new_len)
        for old_layer, new_layer in zip(self.cache.layers, new_cache.layers):
            old_layer.keys = torch.cat([_left_pad(old_layer.keys, total), _left_pad(new_layer.keys, total)], dim=0)
            old_layer.values = torch.cat(
                [_left_pad(old_layer.values, total), _left_pad(new_layer.values, total)], dim=0
            )
        self.attention = torch.cat(
            [F.pad(self.attention, (total - old_len, 0)), F.pad(new_mask, (total - new_len, 0))], dim=0
        )

    # --- classification -----------------------------------------------------------------

    @torch.inference_mode()
    def classify(self, items: Sequence[ClassifyItem]) -> list[ClassifyResult]:
        results: list[ClassifyResult] = []
        for start in range(0, len(items), self.max_batch_size):
            results.extend(self._classify_batch(items[start : start + self.max_batch_size]))
        return results

    def _classify_batch(self, items: Sequence[ClassifyItem]) -> list[ClassifyResult]:
        slots = [self.load_adapter(item.adapter) for item in items]
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
            weight, bias, labels = self.heads[item.adapter.key]
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


def _left_pad(states: torch.Tensor, total: int) -> torch.Tensor:
    """[rows, heads, seq, dim] -> [rows, heads, total, dim], zeros on the left."""
    return F.pad(states, (0, 0, total - states.shape[-2], 0))
