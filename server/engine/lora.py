"""Batched multi-adapter LoRA over a slot pool (the Punica / S-LoRA idea in plain torch).

Every adaptable linear layer of the backbone is wrapped once in a SlotLoRALinear that owns
a pool of adapter weights, one slot per resident adapter:

    A: [slots, r_cap, in]   scale * B^T: [slots, r_cap, out]

Slot 0 is all zeros and means "the base". Before each forward the engine sets one
LoRABatchPlan (which slot each row or token uses); every layer reads it. Loading an adapter
copies its tensors into a free slot: no module is rebuilt, nothing is recompiled, and
adapters of different ranks share a batch (smaller ranks are zero-padded up to the largest
rank in the batch, which adds exact zeros to the sums).

On CPU in float32 a packed step's LoRA is one compiled loop per layer that reads the pool
directly (cpu_sgmv). Everywhere else it is torch ops, and batched matmuls need their
operands side by side, so each layer also keeps an *active* buffer in matmul layout
(A^T: [positions, in, r_cap], scaled B^T: [positions, r_cap, out]).
ActivePositions decides which slot sits at which position; an adapter keeps its position
while it stays in use, so a step copies only the adapters that just joined the batch
(restacking every active adapter whenever the mix changed cost more than the matmuls
themselves at 32 distinct adapters).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from adapters.package import LoraModule
from server.engine.cpu_int8 import Int8Linear
from server.engine.cpu_threads import ThreadPolicy
from server.engine.onednn import OneDNNLinear
from server.engine.staging import send_longs


class ActivePositions:
    """Slot held at each position of every layer's active buffer (shared by all layers)."""

    def __init__(self, count: int):
        self.slot_at = [0] * count  # 0: nothing placed yet

    def place(self, slots: set[int]) -> dict[int, int]:
        """Positions for `slots` (at most `count`): kept where they are, newcomers take the
        lowest positions no slot of this batch needs (keeping the used range short)."""
        if len(slots) > len(self.slot_at):
            raise ValueError(f"{len(slots)} adapters in one batch; the active buffer holds {len(self.slot_at)}")
        placed = {slot: p for p, slot in enumerate(self.slot_at) if slot in slots}
        free = (p for p, slot in enumerate(self.slot_at) if slot not in slots)
        for slot in sorted(slots - placed.keys()):
            position = next(free)
            self.slot_at[position] = slot
            placed[slot] = position
        return placed


@dataclass(frozen=True)
class LoRABand:
    """Units grouped by adapter (the Punica SGMV idea, padded).

    Group p is active position p and holds the units of slot `position_slots[p]` (0: no unit
    of this batch uses the position), padded to `per_group` with a repeat of some unit. A
    layer does two batched matmuls over [positions, per_group, ...], reading each active
    adapter once and computing only its own rank: a constant op count whatever the number
    of distinct adapters. Each real (non-padding) entry is added into its unit.
    """

    position_slots: tuple[int, ...]  # [positions in use]
    gather_units: torch.Tensor  # [positions * per_group] long: the unit each grouped entry reads
    real_entries: torch.Tensor | None  # [real] long: grouped entries that are not padding (None: all are)
    entry_units: torch.Tensor  # [real] long: the unit each real entry adds its delta to
    per_group: int

    @classmethod
    def build(cls, slots: Sequence[int], positions: ActivePositions, device: torch.device) -> "LoRABand | None":
        """Unit i runs on slot `slots[i]`; None when all are on the base (slot 0)."""
        members = units_by_slot(slots)
        if not members:
            return None
        placed = positions.place(set(members))
        groups = max(placed.values()) + 1
        position_slots = [0] * groups
        for slot, position in placed.items():
            position_slots[position] = slot
        per_group = max(len(units) for units in members.values())
        gather, real_entries, entry_units = [], [], []
        for position, slot in enumerate(position_slots):
            units = members.get(slot, [])
            gather.extend(units + [units[0] if units else 0] * (per_group - len(units)))
            real_entries.extend(range(position * per_group, position * per_group + len(units)))
            entry_units.extend(units)

        padded = len(real_entries) < len(gather)
        gather_units, real, entries = send_longs(device, gather, real_entries, entry_units)  # one copy
        return cls(tuple(position_slots), gather_units, real if padded else None, entries, per_group)


def units_by_slot(slots: Sequence[int]) -> dict[int, list[int]]:
    """Unit i runs on slot `slots[i]`: the units of each adapter slot (the base, 0, left out)."""
    members: dict[int, list[int]] = {}
    for unit, slot in enumerate(slots):
        if slot:
            members.setdefault(slot, []).append(unit)
    return members


@dataclass(frozen=True)
class LoRARange:
    """Consecutive units on one adapter: a prompt in a packed step."""

    slot: int
    start: int
    length: int


@dataclass(frozen=True)
class LoRASegments:
    """Every unit of a step that has an adapter, grouped by slot and unpadded: the CPU
    kernel's view of the plan (cpu_sgmv). Segment g is slot `slots[g]` over the units
    `units[starts[g]:starts[g + 1]]`: a decode group lists its rows, a prompt its tokens."""

    slots: np.ndarray  # [segments] int64
    starts: np.ndarray  # [segments + 1] int64
    units: np.ndarray  # [units with an adapter] int64

    @classmethod
    def build(cls, groups: Sequence[tuple[int, Sequence[int]]]) -> "LoRASegments":
        """`groups`: (slot, its units) in order."""
        lengths = [len(units) for _, units in groups]
        return cls(
            slots=np.array([slot for slot, _ in groups], dtype=np.int64),
            starts=np.cumsum([0] + lengths, dtype=np.int64),
            units=np.fromiter((u for _, units in groups for u in units), dtype=np.int64, count=sum(lengths)),
        )


@dataclass(frozen=True)
class LoRABatchPlan:
    """Per-forward routing, shared by every SlotLoRALinear of the model.

    A layer views its input as [units, tokens per unit, in]: a unit is a batch row (a
    classify batch: every token of a row on one adapter) or a single token (the engine's
    packed steps, where decode tokens and whole prompts share one forward). Decode tokens
    form a band; a prompt is a range, whose delta is two plain matmuls over views of the
    pool (a prompt has enough tokens to keep them efficient, and a range needs no gather,
    no scatter and no copy). Slot 0 is the base and gets no delta. On CPU in float32, a
    step's band and ranges are instead one kernel call over `segments`, and the band (its
    index tensors and active positions) is never built.
    """

    units: int
    band_slots: tuple[int, ...]  # slot of each unit of the band (decode rows / classify rows)
    positions: ActivePositions
    device: torch.device
    ranges: tuple[LoRARange, ...] = ()
    segments: LoRASegments | None = None  # packed steps only (one token per unit)

    @functools.cached_property
    def band(self) -> LoRABand | None:
        """Built on first use (torch-ops layers only): places the band's adapters in the
        active buffer and sends its index tensors in one copy."""
        return LoRABand.build(self.band_slots, self.positions, self.device)

    @classmethod
    def for_rows(cls, slots: Sequence[int], positions: ActivePositions, device: torch.device) -> "LoRABatchPlan | None":
        """One unit per batch row: row i runs on adapter slot `slots[i]`. None: all on the base."""
        return cls(len(slots), tuple(slots), positions, device) if any(slots) else None

    @classmethod
    def for_step(
        cls,
        decode_slots: Sequence[int],
        prompts: Sequence[tuple[int, int]],
        positions: ActivePositions,
        device: torch.device,
    ) -> "LoRABatchPlan | None":
        """Units are tokens: one per decode row, then each prompt's (slot, length) in order."""
        ranges, start = [], len(decode_slots)
        for slot, length in prompts:
            if slot:
                ranges.append(LoRARange(slot, start, length))
            start += length
        if not any(decode_slots) and not ranges:
            return None
        groups = list(units_by_slot(decode_slots).items())
        groups += [(span.slot, range(span.start, span.start + span.length)) for span in ranges]
        return cls(start, tuple(decode_slots), positions, device, tuple(ranges), LoRASegments.build(groups))


# The CPU kernel's entry (cpu_sgmv.add_segment_lora), passed in where it is chosen.
SegmentKernel = Callable[..., None]


class LoRAContext:
    """The current plan (None: every layer skips LoRA), the shared active positions, the
    thread policy (base matmuls are heavy ops, the LoRA stays on one thread unless the CPU
    kernel finds it worth both), and the compiled kernel that packed float32 steps on CPU
    run instead of torch ops (None elsewhere)."""

    def __init__(self, positions: int, threads: ThreadPolicy, device: torch.device,
                 cpu_kernel: SegmentKernel | None = None) -> None:
        self.plan: LoRABatchPlan | None = None
        self.device = device
        self.positions = ActivePositions(positions)
        self.threads = threads
        self.cpu_kernel = cpu_kernel


def _bf16_bits(tensor: torch.Tensor) -> np.ndarray:
    """A bfloat16 tensor's storage as uint16 numpy (numpy has no bfloat16; no copy)."""
    return tensor.view(torch.int16).numpy().view(np.uint16)


class SlotLoRALinear(nn.Module):
    """A base linear layer plus its slice of every resident adapter.

    The pools are allocated when the first adapter targeting this module is loaded and grow
    by doubling, in rank (a larger rank arrives) and in slots (the highest slot in use), so
    memory follows what is resident rather than the configured slot count.
    """

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, slots: int, context: LoRAContext):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.slots = slots + 1  # + the zero slot
        self.context = context
        self.r_cap = 0
        self.slot_cap = 0  # pool rows allocated (slot 0 included)
        self.lora_a: torch.Tensor | None = None  # [slot_cap, r_cap, in]
        self.lora_bt: torch.Tensor | None = None  # [slot_cap, r_cap, out]: scale * B^T
        # numpy views of the pools (same memory) for the CPU kernel; None off CPU float32.
        self._pool_a_array: np.ndarray | None = None
        self._pool_bt_array: np.ndarray | None = None
        # This module's rank in each slot (0: the adapter skips it); an array for the kernel.
        self.ranks = np.zeros(self.slots, dtype=np.int64)
        # Allocated on the first torch-ops band (never on the CPU kernel path).
        self.active_a: torch.Tensor | None = None  # [positions, in, r_cap]: A^T
        self.active_b: torch.Tensor | None = None  # [positions, r_cap, out]: scale * B^T
        self.active_held: list[int] = []  # slot copied at each position (-1: none)

    def nbytes(self) -> dict[str, int]:
        """Bytes allocated: the slot pool and the active buffer."""
        def size(*tensors: torch.Tensor | None) -> int:
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)

        return {"lora_pool": size(self.lora_a, self.lora_bt), "lora_active": size(self.active_a, self.active_b)}

    def _grow(self, rank: int, slot: int, dtype: torch.dtype, device: torch.device) -> None:
        """Reallocate with room for `rank` and `slot`, keeping loaded slots."""
        new_cap = max(rank, 8, self.r_cap * 2 if rank > self.r_cap else self.r_cap)
        new_slots = min(self.slots, max(slot + 1, 4, self.slot_cap * 2 if slot >= self.slot_cap else self.slot_cap))
        new_a = torch.zeros(new_slots, new_cap, self.in_features, dtype=dtype, device=device)
        new_bt = torch.zeros(new_slots, new_cap, self.out_features, dtype=dtype, device=device)
        if self.lora_a is not None:
            new_a[: self.slot_cap, : self.r_cap] = self.lora_a
            new_bt[: self.slot_cap, : self.r_cap] = self.lora_bt
        self.lora_a, self.lora_bt, self.slot_cap = new_a, new_bt, new_slots
        if device.type == "cpu" and dtype == torch.float32:
            self._pool_a_array, self._pool_bt_array = new_a.numpy(), new_bt.numpy()
        if new_cap != self.r_cap:
            self.active_a = self.active_b = None  # reallocated at the new rank on next use
            self.active_held = []
        self.r_cap = new_cap

    # Inference mode, not no_grad: the engine steps in inference mode, so a pool grown during
    # admission holds inference tensors, which only inference mode may update in place (an
    # eviction from the registry's budget pass would otherwise raise).
    @torch.inference_mode()
    def load_slot(self, slot: int, a: torch.Tensor, bt: torch.Tensor) -> None:
        """a: [r, in], bt: [r, out] (scale * B^T), already in the pool's dtype; on CUDA they
        are views of a pinned buffer, so the copies are queued without blocking the host."""
        rank = a.shape[0]
        if self.lora_a is None or rank > self.r_cap or slot >= self.slot_cap:
            self._grow(rank, slot, a.dtype, self.context.device)
        self.clear_slot(slot)
        self.lora_a[slot, :rank].copy_(a, non_blocking=True)
        self.lora_bt[slot, :rank].copy_(bt, non_blocking=True)
        self.ranks[slot] = rank

    @torch.inference_mode()
    def clear_slot(self, slot: int) -> None:
        if self.lora_a is not None and self.ranks[slot]:
            self.lora_a[slot].zero_()
            self.lora_bt[slot].zero_()
        self.ranks[slot] = 0
        # An active copy of the old weights must never be served again.
        self.active_held = [-1 if held == slot else held for held in self.active_held]

    def _activate(self, band: LoRABand) -> int:
        """Copy the band's newly placed slots into the active buffer; returns the rank to use:
        the largest this module has among them (0: none of them targets this module)."""
        if self.active_a is None:
            positions = len(self.context.positions.slot_at)
            self.active_a = self.lora_a.new_zeros(positions, self.in_features, self.r_cap)
            self.active_b = self.lora_a.new_zeros(positions, self.r_cap, self.out_features)
            self.active_held = [-1] * positions
        rank = 0
        for position, slot in enumerate(band.position_slots):
            if not slot:
                continue
            if self.active_held[position] != slot:
                self.active_a[position].copy_(self.lora_a[slot].t())
                self.active_b[position].copy_(self.lora_bt[slot])
                self.active_held[position] = slot
            rank = max(rank, int(self.ranks[slot]))
        return rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.context.threads.heavy():
            out = self.base_layer(x)
        plan = self.context.plan
        if plan is None or self.lora_a is None:
            return out
        # A unit is a batch row (classify) or a token of the one packed row (engine steps).
        if plan.units not in (x.shape[0], x.shape[0] * x.shape[1]):
            raise RuntimeError(f"LoRA plan has {plan.units} units, input is {tuple(x.shape)}")
        units = x.reshape(plan.units, -1, self.in_features)  # [units, tokens per unit, in]
        self._add_lora(plan, units, out.view(plan.units, units.shape[1], self.out_features))
        return out

    def _add_lora(self, plan: LoRABatchPlan, units: torch.Tensor, out_units: torch.Tensor) -> None:
        """Adds every unit's delta into out_units [units, tokens, out] in place (`out` is this
        forward's own fresh tensor; inference only, no autograd)."""
        if plan.segments is not None and self._kernel_applies(units, out_units):
            segments = plan.segments
            rows, out_rows = units.view(-1, self.in_features), out_units.view(-1, self.out_features)
            # float32 activations as they are; bf16 ones as their bits, which the kernel widens
            # itself (its pools and sums are float32) and rounds back into `out`.
            if rows.dtype == torch.bfloat16 and out_rows.dtype == torch.bfloat16:
                x, target = _bf16_bits(rows), _bf16_bits(out_rows)
            else:
                x, target = rows.float().numpy(), out_rows.numpy()
            self.context.cpu_kernel(
                x, target,
                self._pool_a_array, self._pool_bt_array, self.ranks, segments.slots, segments.starts, segments.units,
                threads=self.context.threads.heavy_threads)
            return
        if plan.band is not None:
            self._add_band(plan.band, units, out_units)
        for span in plan.ranges:
            rank = int(self.ranks[span.slot])
            if not rank:
                continue
            rows = slice(span.start, span.start + span.length)
            hidden = units[rows].reshape(-1, self.in_features).to(self.lora_a.dtype)  # [tokens, in]
            hidden = hidden @ self.lora_a[span.slot, :rank].t()  # [tokens, r]
            target = out_units[rows].view(-1, self.out_features)  # [tokens, out], a view of `out`
            if target.dtype == hidden.dtype:
                target.addmm_(hidden, self.lora_bt[span.slot, :rank])
            else:  # a base computing in another dtype than the pools (bf16, quantized)
                target += (hidden @ self.lora_bt[span.slot, :rank]).to(target.dtype)

    def _kernel_applies(self, units: torch.Tensor, out_units: torch.Tensor) -> bool:
        """The CPU kernel reads float32 pools (CUDA pools have no numpy view) and contiguous
        rows of float32 activations, or bfloat16 in and out."""
        return (self.context.cpu_kernel is not None and self._pool_a_array is not None
                and (out_units.dtype == torch.float32 or units.dtype == out_units.dtype == torch.bfloat16)
                and units.dtype in (torch.float32, torch.bfloat16)
                and units.is_contiguous() and out_units.is_contiguous())

    def _add_band(self, band: LoRABand, units: torch.Tensor, out_units: torch.Tensor) -> None:
        rank = self._activate(band)
        if not rank:
            return
        groups, tokens = len(band.position_slots), units.shape[1]
        # The shrink reads at least 16 columns of A^T (zero padding past the rank): MKL's
        # kernels for narrower outputs are slower than for 16 (measured, 32 rows: x @ A^T
        # 23 us at r=8 against 9 us at r=16), while the expand is cheapest at the true rank.
        shrink_rank = min(self.r_cap, -(-rank // 16) * 16)
        a_t = self.active_a[:groups, :, :shrink_rank]  # [groups, in, r']
        b_t = self.active_b[:groups, :rank]  # [groups, r, out]
        grouped = units.to(a_t.dtype).index_select(0, band.gather_units)  # [groups*per_group, tokens, in]
        grouped = grouped.view(groups, band.per_group * tokens, self.in_features)
        hidden = torch.bmm(grouped, a_t)[..., :rank]  # [groups, per_group*tokens, r]
        delta = torch.bmm(hidden, b_t)  # [groups, per_group*tokens, out]
        delta = delta.view(groups * band.per_group, tokens, self.out_features)
        if band.real_entries is not None:
            delta = delta.index_select(0, band.real_entries)  # drop the padding entries
        out_units.index_add_(0, band.entry_units, delta.to(out_units.dtype))


def slot_tensors(weights: LoraModule, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's weights in pool layout on the host: A [r, in] and scale * B^T [r, out]
    (scaled in float32, then cast to the pool's dtype)."""
    return weights.a.to(dtype), (weights.b.t().float() * weights.scale).to(dtype)


def stage_adapter(modules: dict[str, LoraModule], dtype: torch.dtype, device: torch.device
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every module of an adapter in pool layout. For CUDA they are views of ONE pinned
    host buffer, so the slot copies are queued without blocking the engine thread (from
    pageable memory each of the ~2 x modules copies would be synchronous)."""
    prepared = {name: slot_tensors(weights, dtype) for name, weights in modules.items()}
    if device.type != "cuda":
        return prepared
    total = sum(a.numel() + bt.numel() for a, bt in prepared.values())
    pinned = torch.empty(total, dtype=dtype, pin_memory=True)
    staged, offset = {}, 0
    for name, pair in prepared.items():
        views = []
        for tensor in pair:
            view = pinned[offset : offset + tensor.numel()].view(tensor.shape)
            view.copy_(tensor)
            views.append(view)
            offset += tensor.numel()
        staged[name] = (views[0], views[1])
    return staged


LINEAR_TYPES: tuple[type, ...] = (nn.Linear, OneDNNLinear, Int8Linear)
try:  # bitsandbytes layers subclass nn.Linear already; listed for clarity when present
    import bitsandbytes as bnb

    LINEAR_TYPES = (nn.Linear, OneDNNLinear, Int8Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
except Exception:  # pragma: no cover - bitsandbytes missing or without a backend
    pass


def linear_features(module: nn.Module) -> tuple[int, int]:
    return int(module.in_features), int(module.out_features)


def inject_slot_lora(backbone: nn.Module, slots: int, context: LoRAContext) -> dict[str, SlotLoRALinear]:
    """Wrap every linear layer of `backbone` in place; returns canonical name -> wrapper."""
    wrapped: dict[str, SlotLoRALinear] = {}
    targets = [(name, module) for name, module in backbone.named_modules() if isinstance(module, LINEAR_TYPES)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        in_features, out_features = linear_features(module)
        wrapper = SlotLoRALinear(module, in_features, out_features, slots, context)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped
