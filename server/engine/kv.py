"""A preallocated KV cache for packed engine steps, and the attention function that reads it.

Each engine step runs ONE forward over a packed row of tokens: one decode token for every
running sequence, then the prompt of every sequence joining this step (less the blocks
read from the prefix cache). Linear
layers (and their LoRA deltas) see all of them as one [1, tokens, hidden] batch, so a step
reads the weights once however many prompts join it; only attention needs to know which
token belongs to which sequence, and that is what this module provides through
transformers' AttentionInterface.

The cache is a slab per layer, K and V: [rows, kv_heads, columns, head_dim], grown by
doubling (rows as the batch fills, columns as the longest sequence needs) and released when
the batch empties, so one long prompt never reserves its length for every possible row.
Running sequences are rows 0..n-1, right-aligned so that every
row's newest token sits in column `end - 1`: a decode step writes every row's new K/V into
the one column `end`, and a joining prompt of length L fills columns [end + 1 - L, end + 1)
of a fresh row. Nothing is concatenated per step; a leaving row is replaced by the last
row (a copy of one row's used columns), and the used window moves only when it would run
off either edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from server.engine.cpu_threads import ThreadPolicy
from server.engine.prefix_cache import BLOCK_TOKENS, PrefixCache, PrefixPlan
from server.engine.staging import send_longs

ATTENTION_NAME = "adaptserve_packed"
# Handed to the model as its attention mask: a 4D mask is passed through to the attention
# function untouched, so transformers builds no [tokens, tokens] mask that would be ignored.
PASSTHROUGH_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


class UnsupportedAttention(RuntimeError):
    """The architecture asks attention for something the packed path does not compute."""


@dataclass
class Prefill:
    """A joining prompt: its first `cached` tokens come from the prefix cache, the rest are
    computed in this step (packed tokens offset .. offset + length - cached)."""

    row: int
    offset: int  # first computed token of this prompt in the packed step
    length: int  # the whole prompt
    cached: int = 0
    write_from: int = 0  # first block of the prompt this step stores in the prefix cache
    read: torch.Tensor | None = None  # [cached / BLOCK_TOKENS] prefix-cache blocks (set by begin_step)
    write: torch.Tensor | None = None  # [blocks stored] prefix-cache blocks for blocks write_from...
    # Built by the first layer that asks, per sliding window (layers may differ in theirs).
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict, repr=False)

    @property
    def computed(self) -> int:
        return self.length - self.cached

    def mask(self, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
        """[computed, length] bool: query i sits at position cached + i and sees keys
        0 .. cached + i (within the window); None where plain causal attention says it."""
        if sliding_window not in self._masks:
            mask = None
            if self.cached or (sliding_window is not None and self.length > sliding_window):
                distance = (torch.arange(self.cached, self.length, device=device)[:, None]
                            - torch.arange(self.length, device=device)[None, :])
                mask = distance >= 0
                if sliding_window is not None:
                    mask &= distance < sliding_window
            self._masks[sliding_window] = mask
        return self._masks[sliding_window]


@dataclass
class StepLayout:
    """Where this step's tokens go: packed tokens [0, decode_rows) are rows 0..n-1's decode
    tokens, written to `column`; each prefill's tokens follow, right-aligned to `column`.
    Built on the host by plan_step; `decode_mask` is added by begin_step on the device."""

    decode_rows: int
    column: int
    start: int  # first column any decode row attends to
    row_starts: tuple[int, ...]  # [decode_rows] each decode row's first used column
    prefills: tuple[Prefill, ...]
    decode_mask: torch.Tensor | None = None  # [decode_rows, 1, 1, column + 1 - start] additive float

    def use_prefix(self, plans: Sequence[PrefixPlan]) -> None:
        """Each prefill's leading tokens that come from the prefix cache: they are not
        computed, so the packed offsets of the later prefills move down."""
        offset = self.decode_rows
        for prefill, plan in zip(self.prefills, plans):
            prefill.offset = offset
            prefill.cached, prefill.write_from = plan.cached_tokens, plan.write_from
            offset += prefill.computed


class SlabKVCache:
    def __init__(self, max_rows: int, device: torch.device, threads: ThreadPolicy, initial_columns: int = 128,
                 initial_rows: int = 4, prefix: PrefixCache | None = None, dtype: torch.dtype | None = None):
        self.max_rows = max_rows
        # K/V and attention in this dtype (None: the model's). On CPU a bf16 model keeps its
        # cache in float32: measured on AVX512-BF16/AMX cores, decode attention's small bf16
        # batched matmuls ran at half the speed of float32 ones (and copied every strided
        # slab view first), while the linear layers are where bf16 pays.
        self.dtype = dtype
        self.prefix = prefix  # automatic prefix caching (None: off)
        self.threads = threads  # attention is a heavy op
        self.device = device
        self.initial_shape = (min(initial_rows, max_rows), initial_columns)
        self.keys: dict[int, torch.Tensor] = {}  # layer -> [row capacity, kv_heads, columns, head_dim]
        self.values: dict[int, torch.Tensor] = {}
        self.rows = 0
        self.end = 0  # used columns are [start, end); every row's newest token is in end - 1
        self.start = 0
        # Host bookkeeping (no device reads): row i holds tokens in columns [row_start[i], end).
        self.row_start: list[int] = [0] * max_rows
        self.layout: StepLayout | None = None  # set for the length of one packed forward
        self._release()

    def _release(self) -> None:
        """Back to the initial size: the slabs are reallocated on the next step's first write."""
        self.keys.clear()
        self.values.clear()
        self.row_capacity, self.columns = self.initial_shape

    # --- the engine's side -------------------------------------------------------------

    def plan_step(self, decode_rows: int, prompt_lengths: list[int]) -> StepLayout:
        """Make room for this step (moving or growing the slab if needed) and describe it.
        Host only; the engine then sets each prompt's use of the prefix cache (use_prefix)
        and sends `row_starts` and the cache's block indices to begin_step."""
        if decode_rows != self.rows:
            raise RuntimeError(f"cache holds {self.rows} rows, step decodes {decode_rows}")
        if self.rows + len(prompt_lengths) > self.max_rows:
            raise RuntimeError("more rows than the cache was built for")
        if self.rows + len(prompt_lengths) > self.row_capacity:
            self._grow(max(self.rows + len(prompt_lengths), min(2 * self.row_capacity, self.max_rows)), self.columns)
        longest = max(prompt_lengths, default=0)
        if not self.rows:
            self.start = self.end = max(longest - 1, 0)
        column = max(self.end, longest - 1)  # where the decode tokens go
        shift = column - self.end  # a longer prompt than any row: running rows move right
        low = min(self.start + shift, column + 1 - longest) if self.rows else column + 1 - longest
        if column + 1 - low > self.columns:
            self._grow(self.row_capacity, max(column + 1 - low, 2 * self.columns))
        if column + 1 > self.columns:  # at the right edge: the window moves back to column 0
            shift -= low
            column -= low
        if shift and self.rows:
            self._shift(shift)
        self.end = column
        prefills = []
        offset = decode_rows
        for i, length in enumerate(prompt_lengths):
            prefills.append(Prefill(decode_rows + i, offset, length))
            offset += length
        self.layout = StepLayout(decode_rows, column, self.start, tuple(self.row_start[:decode_rows]),
                                 tuple(prefills))
        return self.layout

    def begin_step(self, row_starts: torch.Tensor | None,
                   blocks: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]] = ()) -> None:
        """row_starts: [decode_rows] long on the device (the layout's, sent by the engine);
        blocks: each prefill's (read, write) prefix-cache block indices on the device."""
        layout = self.layout
        for prefill, (read, write) in zip(layout.prefills, blocks):
            prefill.read, prefill.write = read, write
        if layout.decode_rows:
            columns = torch.arange(layout.start, layout.column + 1, device=self.device)
            hidden = columns[None, :] < row_starts[:, None]  # [decode_rows, columns]: another row's past
            # float32: decode attention takes its softmax in float32 whatever the base's dtype.
            mask = torch.zeros(hidden.shape, dtype=torch.float32, device=self.device).masked_fill_(hidden, float("-inf"))
            layout.decode_mask = mask[:, None, None, :]

    def finish_step(self, new_rows: int) -> None:
        """The forward ran: the step's column is used, the joined rows are running."""
        layout = self.layout
        self.layout = None
        if layout is None:
            return
        if self.prefix is not None:
            self.prefix.finish_step()
        for prefill in layout.prefills[:new_rows]:
            self.row_start[prefill.row] = layout.column + 1 - prefill.length
        self.rows += new_rows
        self.end = layout.column + 1
        self.start = min(self.row_start[: self.rows]) if self.rows else 0

    def abandon_step(self) -> None:
        """The forward failed: the step's writes are ignored (its column and rows stay unused)."""
        self.layout = None
        if self.prefix is not None:
            self.prefix.abandon_step()

    def remove_rows(self, leaving: set[int]) -> list[tuple[int, int]]:
        """Drop rows; the last kept rows move into the holes. Returns the (from, to) moves."""
        kept = self.rows - len(leaving)
        holes = sorted(i for i in leaving if i < kept)
        movers = [i for i in range(kept, self.rows) if i not in leaving]
        if holes:
            src, dst = send_longs(self.device, movers, holes)
            used = slice(self.start, self.end)
            for slab in (*self.keys.values(), *self.values.values()):
                slab[dst, :, used] = slab[src, :, used]
            for source, target in zip(movers, holes):
                self.row_start[target] = self.row_start[source]
        self.rows = kept
        if not kept:
            self.reset()
        else:
            # Columns every remaining row leaves empty cost attention time for nothing.
            self.start = min(self.row_start[:kept])
        return list(zip(movers, holes))

    def reset(self) -> None:
        self.rows = self.start = self.end = 0
        self.layout = None
        self._release()

    def tokens(self) -> int:
        return sum(self.end - start for start in self.row_start[: self.rows])

    def _grow(self, rows: int, columns: int) -> None:
        try:
            self._grow_slabs(rows, columns)
        except (torch.OutOfMemoryError, MemoryError):
            if self.prefix is None or not self.prefix.nbytes():
                raise
            # Running rows come first: the prefix cache is given up, then the slab grows.
            self.prefix.clear()
            self._grow_slabs(rows, columns)
        self.row_capacity, self.columns = rows, columns

    def _grow_slabs(self, rows: int, columns: int) -> None:
        # Layer by layer, so the transient is one layer's old slab, not the whole cache twice.
        for slabs in (self.keys, self.values):
            for layer, slab in slabs.items():
                if (slab.shape[0], slab.shape[2]) == (rows, columns):
                    continue  # grown before an out-of-memory retry
                grown = slab.new_zeros(rows, slab.shape[1], columns, slab.shape[3])
                grown[: self.row_capacity, :, : self.columns] = slab
                slabs[layer] = grown
                del slab

    def _shift(self, delta: int) -> None:
        """Move the used columns [start, end) of the running rows by delta."""
        if delta == 0:
            return
        rows, old, new = slice(0, self.rows), slice(self.start, self.end), slice(self.start + delta, self.end + delta)
        for slab in (*self.keys.values(), *self.values.values()):
            slab[rows, :, new] = slab[rows, :, old].clone()
        for row in range(self.rows):
            self.row_start[row] += delta
        self.start += delta
        self.end += delta

    def nbytes(self) -> int:
        """Bytes the slabs hold now."""
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    # --- the attention side ------------------------------------------------------------

    def _slabs(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.keys:
            shape = (self.row_capacity, like.shape[1], self.columns, like.shape[3])
            self.keys[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.values[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.keys[layer], self.values[layer]

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """query [1, heads, tokens, dim], key/value [1, kv_heads, tokens, dim] -> [1, tokens, heads, dim]."""
        layout = self.layout
        model_dtype = query.dtype
        if self.dtype is not None and model_dtype != self.dtype:
            query, key, value = query.to(self.dtype), key.to(self.dtype), value.to(self.dtype)
        keys, values = self._slabs(layer, key)
        n, column = layout.decode_rows, layout.column
        outputs = []
        if n:
            keys[:n, :, column] = key[0, :, :n].transpose(0, 1)  # [n, kv_heads, dim]
            values[:n, :, column] = value[0, :, :n].transpose(0, 1)
            start = layout.start
            mask = layout.decode_mask
            if sliding_window is not None and column + 1 - start > sliding_window:
                start = column + 1 - sliding_window
                mask = mask[..., start - layout.start :]
            # One query per row: plain matmuls over the slab views beat the flash kernel,
            # which is built for long queries (measured 267 vs 361 us per layer, 32 rows x
            # 110 columns, 2 threads). Query heads are grouped by the KV head they share.
            kv_heads, dim = keys.shape[1], keys.shape[3]
            grouped = query[0, :, :n].transpose(0, 1).reshape(n, kv_heads, -1, dim)  # [n, kv_heads, group, dim]
            scores = grouped @ keys[:n, :, start : column + 1].transpose(-1, -2)  # [n, kv_heads, group, columns]
            scores = scores.float().mul_(dim**-0.5 if scaling is None else scaling).add_(mask)
            weights = scores.softmax(-1).to(values.dtype)
            decoded = weights @ values[:n, :, start : column + 1]  # [n, kv_heads, group, dim]
            outputs.append(decoded.reshape(n, -1, dim).transpose(0, 1))  # [heads, n, dim]
        for prefill in layout.prefills:
            outputs.append(self._attend_prefill(layer, prefill, column, query, key, value, scaling, sliding_window))
        return torch.cat(outputs, dim=1).transpose(0, 1).unsqueeze(0).to(model_dtype)  # [1, tokens, heads, dim]

    def _attend_prefill(self, layer: int, prefill: Prefill, column: int, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, scaling: float | None, sliding_window: int | None) -> torch.Tensor:
        """One joining prompt -> [heads, computed tokens, dim]. Its row of the slab gets the
        cached prefix (if any) and the computed tokens' K/V; new full blocks go to the cache."""
        keys, values = self.keys[layer], self.values[layer]
        tokens = slice(prefill.offset, prefill.offset + prefill.computed)
        first = column + 1 - prefill.length  # the prompt's first column
        row_keys, row_values = keys[prefill.row, :, first : column + 1], values[prefill.row, :, first : column + 1]
        if prefill.read is not None:
            self.prefix.read(layer, prefill.read, row_keys[:, : prefill.cached], row_values[:, : prefill.cached])
        row_keys[:, prefill.cached :] = key[0, :, tokens]
        row_values[:, prefill.cached :] = value[0, :, tokens]
        if prefill.write is not None:
            stored = slice(prefill.write_from * BLOCK_TOKENS, (prefill.write_from + len(prefill.write)) * BLOCK_TOKENS)
            self.prefix.write(layer, prefill.write, row_keys[:, stored], row_values[:, stored])
        mask = prefill.mask(sliding_window, query.device)
        if prefill.cached:
            attended_keys, attended_values = row_keys[None], row_values[None]
        else:  # the prompt's own K/V, as computed (no slab read)
            attended_keys, attended_values = key[:, :, tokens], value[:, :, tokens]
        prompt = F.scaled_dot_product_attention(
            query[:, :, tokens], attended_keys, attended_values,
            attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=True,
        )
        return prompt[0]  # [heads, computed, dim]


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The AttentionInterface entry: packed steps read the engine's slab, anything else
    (classification, a plain model call) is ordinary SDPA attention."""
    cache: SlabKVCache | None = getattr(module, "adaptserve_kv", None)
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    with cache.threads.heavy():
        if cache.layout is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        for feature in ("softcap", "s_aux", "position_bias"):
            if kwargs.get(feature) is not None:
                raise UnsupportedAttention(f"attention with {feature} is not supported by adaptserve's engine")
        return cache.attend(module.layer_idx, query, key, value, scaling, kwargs.get("sliding_window")), None


AttentionInterface.register(ATTENTION_NAME, packed_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the packed attention cannot serve `model`, found at start rather than at the
    first request: features it does not compute, or attention that bypasses the interface."""
    if getattr(model.config, "attn_logit_softcapping", None):
        return "its attention uses logit soft-capping, which the packed attention does not compute"
    modules = _attention_modules(model)
    if any(getattr(m, "sinks", None) is not None for m in modules):
        return "its attention uses attention sinks, which the packed attention does not compute"
    if not modules or not getattr(model, "_supports_attention_backend", False):
        return "its attention does not go through transformers' AttentionInterface"
    return None


def kv_bytes_per_token(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """K and V of one token in every attention layer (what a prefix-cache token costs)."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element = torch.empty((), dtype=dtype).element_size()
    return len(_attention_modules(model)) * 2 * kv_heads * head_dim * element


def attach(model: torch.nn.Module, cache: SlabKVCache) -> None:
    """Route `model`'s attention through packed_attention over `cache` (check
    unsupported_reason first)."""
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        raise UnsupportedAttention("transformers refused the packed attention implementation")
    for module in _attention_modules(model):
        module.adaptserve_kv = cache
