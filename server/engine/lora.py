"""Batched multi-adapter LoRA over a slot pool (the Punica / S-LoRA idea in plain torch).

Every adaptable linear layer of the backbone is wrapped once in a SlotLoRALinear that owns
a pool of adapter weights, one slot per resident adapter:

    A: [slots, r_cap, in]   B: [slots, out, r_cap]   scale: [slots]

Slot 0 is all zeros and means "the base". Before each forward the engine sets one
LoRABatchPlan (which slot each row uses); every layer reads it. Loading an adapter copies
its tensors into a free slot: no module is rebuilt, nothing is recompiled, and adapters
of different ranks share a batch (smaller ranks are zero-padded up to r_cap, which adds
exact zeros to the sums).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapters.package import LoraModule

# Slot sets whose stacked operands a layer keeps: the running batch's, and those of the
# prefills joining it (a new set appears only when the batch's adapter mix changes).
STACKED_CACHE_ENTRIES = 2

@dataclass
class LoRABatchPlan:
    """Per-forward routing, shared by every SlotLoRALinear of the model.

    Rows are grouped by adapter (the Punica SGMV idea, padded): group g holds the rows of
    slot `group_slots[g]`, padded to `rows_per_group` with a repeat of its first row. Each
    layer then does two batched matmuls over [groups, rows_per_group, ...], reading every
    active adapter once and computing only each row's own rank: constant op count whatever
    the number of distinct adapters. Base rows belong to no group and get no delta; each
    real (non-padding) entry is added into its own row of the base output.

    The stacked per-group operands depend only on which slots are in the batch, so each
    layer caches them by `group_key` (see SlotLoRALinear.stacked_operands): decode steps and
    the prefills between them reuse one copy instead of restacking every forward.
    """

    group_slots: torch.Tensor  # [groups] long: the distinct non-zero slots in the batch
    gather_rows: torch.Tensor  # [groups * rows_per_group] long: batch row of each grouped entry
    real_entries: torch.Tensor | None  # [adapter rows] long: grouped entries that are not padding (None: all are)
    entry_rows: torch.Tensor  # [adapter rows] long: the batch row each real entry adds its delta to
    rows: int
    rows_per_group: int
    group_key: tuple[int, ...]

    @classmethod
    def for_rows(cls, slots: list[int], device: torch.device) -> "LoRABatchPlan | None":
        """None when every row runs on the base: the layers then skip LoRA entirely."""
        groups = sorted({s for s in slots if s})
        if not groups:
            return None
        members = {slot: [row for row, s in enumerate(slots) if s == slot] for slot in groups}
        per_group = max(len(rows) for rows in members.values())
        gather, real_entries, entry_rows = [], [], []
        for g, slot in enumerate(groups):
            rows = members[slot]
            for p in range(per_group):
                gather.append(rows[p] if p < len(rows) else rows[0])
                if p < len(rows):
                    real_entries.append(g * per_group + p)
                    entry_rows.append(rows[p])
        padded = len(real_entries) < len(gather)

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(as_tensor(groups), as_tensor(gather), as_tensor(real_entries) if padded else None,
                   as_tensor(entry_rows), len(slots), per_group, tuple(groups))


class LoRAContext:
    """Holds the current plan; None (or no active slot) means every layer skips LoRA."""

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
        self.loaded = torch.zeros(self.slots, dtype=torch.bool)
        # Stacked operands by slot set (oldest first): the decode batch's and a prefill's.
        self.stacked: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

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
        self.loaded[slot] = True
        self.stacked.clear()  # any cached stack may hold this slot's old weights

    @torch.inference_mode()
    def clear_slot(self, slot: int) -> None:
        if self.lora_a is not None and self.loaded[slot]:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
        self.scale[slot] = 0.0
        self.loaded[slot] = False
        self.stacked.clear()

    def stacked_operands(self, plan: LoRABatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """A [groups, in, r] and scaled B [groups, r, out] of the plan's slots, cached by slot set."""
        operands = self.stacked.get(plan.group_key)
        if operands is None:
            scale = self.scale.to(self.lora_a.device).index_select(0, plan.group_slots).view(-1, 1, 1)
            a_t = self.lora_a.index_select(0, plan.group_slots).transpose(1, 2).contiguous()
            b_t = (self.lora_b.index_select(0, plan.group_slots) * scale.to(self.lora_b.dtype)).transpose(1, 2)
            operands = (a_t, b_t.contiguous())
            if len(self.stacked) >= STACKED_CACHE_ENTRIES:
                self.stacked.pop(next(iter(self.stacked)))  # oldest first
            self.stacked[plan.group_key] = operands
        return operands

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        plan = self.context.plan
        if plan is None or self.lora_a is None:
            return out
        if plan.rows != x.shape[0]:
            raise RuntimeError(f"LoRA plan has {plan.rows} rows, input has {x.shape[0]}")
        operands = self.stacked_operands(plan)
        a_t, b_t = operands
        tokens = x.shape[1]
        groups = a_t.shape[0]
        grouped = x.to(a_t.dtype).index_select(0, plan.gather_rows)  # [groups*per_group, tokens, in]
        grouped = grouped.view(groups, plan.rows_per_group * tokens, self.in_features)
        delta = torch.bmm(torch.bmm(grouped, a_t), b_t)  # [groups, per_group*tokens, out]
        delta = delta.view(groups * plan.rows_per_group, tokens, self.out_features)
        if plan.real_entries is not None:
            delta = delta.index_select(0, plan.real_entries)  # drop the padding entries
        # In place: `out` is this forward's own fresh tensor (inference only, no autograd).
        return out.index_add_(0, plan.entry_rows, delta.to(out.dtype))  # [rows, tokens, out]


LINEAR_TYPES: tuple[type, ...] = (nn.Linear,)
try:  # bitsandbytes layers subclass nn.Linear already; listed for clarity when present
    import bitsandbytes as bnb

    LINEAR_TYPES = (nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
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
