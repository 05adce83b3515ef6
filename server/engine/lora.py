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

# Above this many stacked rank-rows (distinct adapters x r_cap) the dense masked matmul
# does more work than gathering each row's own A/B; measured on SmolLM2 (DESIGN.md).
DENSE_STACK_LIMIT = 128


@dataclass
class LoRABatchPlan:
    """Per-forward routing, shared by every SlotLoRALinear of the model."""

    row_slots: torch.Tensor  # [batch] long; 0 = no adapter
    active_slots: torch.Tensor  # [n_active] long; distinct non-zero slots in the batch
    row_mask: torch.Tensor | None  # [batch, n_active] float: 1 where row uses that slot

    @classmethod
    def for_rows(cls, slots: list[int], device: torch.device) -> "LoRABatchPlan":
        row_slots = torch.tensor(slots, dtype=torch.long, device=device)
        active = sorted({s for s in slots if s})
        active_slots = torch.tensor(active, dtype=torch.long, device=device)
        row_mask = None
        if active:
            row_mask = (row_slots.unsqueeze(1) == active_slots.unsqueeze(0)).float()
        return cls(row_slots, active_slots, row_mask)


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

    def _grow(self, rank: int, dtype: torch.dtype, device: torch.device) -> None:
        """Reallocate with room for `rank`, keeping loaded slots (rare: a larger rank arrives)."""
        new_cap = max(rank, 8, self.r_cap * 2 if self.r_cap else 0)
        new_a = torch.zeros(self.slots, new_cap, self.in_features, dtype=dtype, device=device)
        new_b = torch.zeros(self.slots, self.out_features, new_cap, dtype=dtype, device=device)
        if self.lora_a is not None:
            new_a[:, : self.r_cap] = self.lora_a
            new_b[:, :, : self.r_cap] = self.lora_b
        self.lora_a, self.lora_b, self.r_cap = new_a, new_b, new_cap
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

    @torch.inference_mode()
    def clear_slot(self, slot: int) -> None:
        if self.lora_a is not None and self.loaded[slot]:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
        self.scale[slot] = 0.0
        self.loaded[slot] = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        plan = self.context.plan
        if plan is None or self.lora_a is None or plan.row_mask is None:
            return out
        if plan.row_slots.shape[0] != x.shape[0]:
            raise RuntimeError(f"LoRA plan has {plan.row_slots.shape[0]} rows, input has {x.shape[0]}")
        n_active = plan.active_slots.shape[0]
        compute = x.to(self.lora_a.dtype)
        if n_active * self.r_cap <= DENSE_STACK_LIMIT:
            delta = self._dense_delta(compute, plan)
        else:
            delta = self._gathered_delta(compute, plan)
        return out + delta.to(out.dtype)

    def _dense_delta(self, x: torch.Tensor, plan: LoRABatchPlan) -> torch.Tensor:
        """Few distinct adapters: one matmul through all of them, rows masked to their own."""
        n_active, r = plan.active_slots.shape[0], self.r_cap
        a = self.lora_a.index_select(0, plan.active_slots).reshape(n_active * r, self.in_features)  # [n*r, in]
        b = self.lora_b.index_select(0, plan.active_slots)  # [n, out, r]
        b = b.permute(0, 2, 1).reshape(n_active * r, self.out_features)  # [n*r, out]
        # Row mask with each slot's scale, spread over that slot's r columns.
        weights = plan.row_mask * self.scale.index_select(0, plan.active_slots).to(plan.row_mask.device)
        weights = weights.repeat_interleave(r, dim=1).to(x.dtype)  # [batch, n*r]
        hidden = x @ a.T  # [batch, tokens, n*r]
        hidden = hidden * weights.unsqueeze(1)
        return hidden @ b  # [batch, tokens, out]

    def _gathered_delta(self, x: torch.Tensor, plan: LoRABatchPlan) -> torch.Tensor:
        """Many distinct adapters: gather each row's own A/B, two batched matmuls."""
        a = self.lora_a.index_select(0, plan.row_slots)  # [batch, r, in]
        b = self.lora_b.index_select(0, plan.row_slots)  # [batch, out, r]
        scale = self.scale.index_select(0, plan.row_slots).to(x.dtype)  # [batch]
        hidden = torch.bmm(x, a.transpose(1, 2))  # [batch, tokens, r]
        return torch.bmm(hidden, b.transpose(1, 2)) * scale.view(-1, 1, 1)


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
