"""Batched multi-adapter LoRA over a slot pool (the Punica / S-LoRA idea in plain torch).

Every adaptable linear layer of the backbone is wrapped once in a SlotLoRALinear that owns
a pool of adapter weights, one slot per resident adapter:

    A: [slots, r_cap, in]   B: [slots, out, r_cap]   scale: [slots]

Slot 0 is all zeros and means "the base". Before each forward the engine sets one
LoRABatchPlan (which slot each row or token uses); every layer reads it. Loading an adapter
copies its tensors into a free slot: no module is rebuilt, nothing is recompiled, and
adapters of different ranks share a batch (they are bucketed by rank, and within a bucket
smaller ranks are zero-padded, which adds exact zeros to the sums).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from adapters.package import LoraModule
from server.engine.onednn import OneDNNLinear

# Stacked operand sets a layer keeps: a step's decode and prefill bands, each possibly split
# in two rank buckets. A new set appears only when the batch's adapter mix changes.
STACKED_CACHE_ENTRIES = 4


def rank_bucket(rank: int) -> int:
    """Adapters are grouped by the next power of two of their rank, so a band of r=8 adapters
    never carries the zero padding that an r=16 neighbour would force on it."""
    return 1 << max(rank - 1, 0).bit_length()


@dataclass(frozen=True)
class LoRABand:
    """Units of one rank bucket, grouped by adapter (the Punica SGMV idea, padded).

    Group g holds the units of slot `group_slots[g]`, padded to `per_group` with a repeat of
    its first unit. A layer does two batched matmuls over [groups, per_group, ...], reading
    each active adapter once and computing only its own rank: a constant op count whatever
    the number of distinct adapters. Each real (non-padding) entry is added into its unit.
    """

    group_slots: torch.Tensor  # [groups] long: distinct non-zero slots
    gather_units: torch.Tensor  # [groups * per_group] long: the unit each grouped entry reads
    real_entries: torch.Tensor | None  # [real] long: grouped entries that are not padding (None: all are)
    entry_units: torch.Tensor  # [real] long: the unit each real entry adds its delta to
    per_group: int
    key: tuple[int, ...]  # the slot set: stacked operands are cached by it

    @classmethod
    def build(cls, members: dict[int, list[int]], device: torch.device) -> "LoRABand":
        groups = sorted(members)
        per_group = max(len(units) for units in members.values())
        gather, real_entries, entry_units = [], [], []
        for g, slot in enumerate(groups):
            units = members[slot]
            gather.extend(units + [units[0]] * (per_group - len(units)))
            real_entries.extend(range(g * per_group, g * per_group + len(units)))
            entry_units.extend(units)

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        padded = len(real_entries) < len(gather)
        return cls(as_tensor(groups), as_tensor(gather), as_tensor(real_entries) if padded else None,
                   as_tensor(entry_units), per_group, tuple(groups))


@dataclass(frozen=True)
class LoRABatchPlan:
    """Per-forward routing, shared by every SlotLoRALinear of the model.

    A layer views its input as [units, tokens per unit, in]: a unit is a batch row (a
    classify batch, every token of a row on one adapter) or a single token (the engine's
    packed steps, where decode tokens and whole prompts share one forward). Units with slot 0
    run on the base and belong to no band. Bands come from segments the caller keeps apart
    (a step's decode tokens and its prompt tokens), so one prompt's length never pads the
    decode groups, and from rank buckets.
    """

    units: int
    bands: tuple[LoRABand, ...]

    @classmethod
    def for_segments(
        cls,
        units: int,
        segments: Sequence[Sequence[tuple[int, int]]],
        device: torch.device,
        slot_ranks: Mapping[int, int] | None = None,
    ) -> "LoRABatchPlan | None":
        """segments: lists of (unit, slot). slot_ranks: an adapter's largest rank, for bucketing.

        None when every unit runs on the base: the layers then skip LoRA entirely."""
        bands = []
        for segment in segments:
            by_bucket: dict[int, dict[int, list[int]]] = {}
            for unit, slot in segment:
                if slot:
                    bucket = rank_bucket(slot_ranks[slot]) if slot_ranks else 0
                    by_bucket.setdefault(bucket, {}).setdefault(slot, []).append(unit)
            bands.extend(LoRABand.build(members, device) for _, members in sorted(by_bucket.items()))
        return cls(units, tuple(bands)) if bands else None

    @classmethod
    def for_rows(
        cls, slots: Sequence[int], device: torch.device, slot_ranks: Mapping[int, int] | None = None
    ) -> "LoRABatchPlan | None":
        """One unit per batch row: row i runs on adapter slot `slots[i]`."""
        return cls.for_segments(len(slots), [list(enumerate(slots))], device, slot_ranks)


class LoRAContext:
    """Holds the current plan; None means every layer skips LoRA."""

    def __init__(self) -> None:
        self.plan: LoRABatchPlan | None = None


class SlotLoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, slots: int, context: LoRAContext):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.slots = slots + 1  # + the zero slot
        self.context = context
        self.r_cap = 0
        # Allocated on first use: a module no loaded adapter targets costs nothing.
        self.lora_a: torch.Tensor | None = None  # [slots, r_cap, in]
        self.lora_b: torch.Tensor | None = None  # [slots, out, r_cap]
        self.scale = torch.zeros(self.slots)  # [slots]
        self.ranks = [0] * self.slots  # this module's rank in each slot (0: the adapter skips it)
        # Stacked operands by slot set (oldest first); None: no adapter of the set targets this module.
        self.stacked: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor] | None] = {}

    def _grow(self, rank: int, dtype: torch.dtype, device: torch.device) -> None:
        """Reallocate with room for `rank`, keeping loaded slots (rare: a larger rank arrives)."""
        new_cap = max(rank, 8, self.r_cap * 2 if self.r_cap else 0)
        new_a = torch.zeros(self.slots, new_cap, self.in_features, dtype=dtype, device=device)
        new_b = torch.zeros(self.slots, self.out_features, new_cap, dtype=dtype, device=device)
        if self.lora_a is not None:
            new_a[:, : self.r_cap] = self.lora_a
            new_b[:, :, : self.r_cap] = self.lora_b
        self.lora_a, self.lora_b, self.r_cap = new_a, new_b, new_cap
        self.stacked.clear()
        self.scale = self.scale.to(device)

    # Inference mode, not no_grad: the engine steps in inference mode, so a pool grown during
    # admission holds inference tensors, which only inference mode may update in place (an
    # eviction from the registry's budget pass would otherwise raise).
    @torch.inference_mode()
    def load_slot(self, slot: int, weights: LoraModule, dtype: torch.dtype, device: torch.device) -> None:
        if self.lora_a is None or weights.rank > self.r_cap:
            self._grow(weights.rank, dtype, device)
        self.clear_slot(slot)
        self.lora_a[slot, : weights.rank] = weights.a.to(device=device, dtype=dtype)
        self.lora_b[slot, :, : weights.rank] = weights.b.to(device=device, dtype=dtype)
        self.scale[slot] = weights.scale
        self.ranks[slot] = weights.rank
        self.stacked.clear()  # any cached stack may hold this slot's old weights

    @torch.inference_mode()
    def clear_slot(self, slot: int) -> None:
        if self.lora_a is not None and self.ranks[slot]:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
        self.scale[slot] = 0.0
        self.ranks[slot] = 0
        self.stacked.clear()

    def stacked_operands(self, band: LoRABand) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A [groups, in, r] and scaled B [groups, r, out] of the band's slots, cached by slot set.

        r is the largest rank any of those slots has in this module, not the pool's r_cap."""
        if band.key in self.stacked:
            return self.stacked[band.key]
        rank = max(self.ranks[slot] for slot in band.key)
        operands = None
        if rank:
            scale = self.scale.to(self.lora_a.device).index_select(0, band.group_slots).view(-1, 1, 1)
            a_t = self.lora_a[:, :rank].index_select(0, band.group_slots).transpose(1, 2).contiguous()
            b_t = self.lora_b[:, :, :rank].index_select(0, band.group_slots) * scale.to(self.lora_b.dtype)
            operands = (a_t, b_t.transpose(1, 2).contiguous())
        if len(self.stacked) >= STACKED_CACHE_ENTRIES:
            self.stacked.pop(next(iter(self.stacked)))  # oldest first
        self.stacked[band.key] = operands
        return operands

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        plan = self.context.plan
        if plan is None or self.lora_a is None:
            return out
        units = x.reshape(plan.units, -1, self.in_features)  # [units, tokens per unit, in]
        if units.shape[0] * units.shape[1] != x.numel() // self.in_features:
            raise RuntimeError(f"LoRA plan has {plan.units} units, input is {tuple(x.shape)}")
        tokens = units.shape[1]
        # In place: `out` is this forward's own fresh tensor (inference only, no autograd).
        out_units = out.view(plan.units, tokens, self.out_features)
        for band in plan.bands:
            operands = self.stacked_operands(band)
            if operands is None:
                continue
            a_t, b_t = operands
            groups = a_t.shape[0]
            grouped = units.to(a_t.dtype).index_select(0, band.gather_units)  # [groups*per_group, tokens, in]
            grouped = grouped.view(groups, band.per_group * tokens, self.in_features)
            delta = torch.bmm(torch.bmm(grouped, a_t), b_t)  # [groups, per_group*tokens, out]
            delta = delta.view(groups * band.per_group, tokens, self.out_features)
            if band.real_entries is not None:
                delta = delta.index_select(0, band.real_entries)  # drop the padding entries
            out_units.index_add_(0, band.entry_units, delta.to(out.dtype))
        return out


LINEAR_TYPES: tuple[type, ...] = (nn.Linear, OneDNNLinear)
try:  # bitsandbytes layers subclass nn.Linear already; listed for clarity when present
    import bitsandbytes as bnb

    LINEAR_TYPES = (nn.Linear, OneDNNLinear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
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
