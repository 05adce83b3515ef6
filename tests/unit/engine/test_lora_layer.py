"""SlotLoRALinear against the plain formula: y = base(x) + scale * x A^T B^T, per row."""

from __future__ import annotations

import torch
from torch import nn

from adapters.package import LoraModule
from server.engine.lora import ActivePositions, LoRABatchPlan, LoRAContext, SlotLoRALinear


def reference(base: nn.Linear, x: torch.Tensor, weights: LoraModule | None) -> torch.Tensor:
    out = base(x)
    if weights is not None:
        out = out + weights.scale * (x @ weights.a.T @ weights.b.T)
    return out


def random_lora(rank: int, seed: int) -> LoraModule:
    generator = torch.Generator().manual_seed(seed)
    return LoraModule(torch.randn(rank, 12, generator=generator), torch.randn(20, rank, generator=generator),
                      scale=0.5 * seed)


@torch.inference_mode()
def test_mixed_rows_ranks_and_base_and_a_reloaded_slot():
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    context = LoRAContext(positions=3)
    layer = SlotLoRALinear(base, 12, 20, slots=3, context=context)
    adapters = {1: random_lora(4, 1), 2: random_lora(16, 2), 3: random_lora(8, 3)}
    for slot, weights in adapters.items():
        layer.load_slot(slot, weights, torch.float32, torch.device("cpu"))
    x = torch.randn(6, 5, 12)  # [rows, tokens, in]
    slots = [2, 0, 1, 2, 3, 2]  # groups of different sizes, and a base row
    context.plan = LoRABatchPlan.for_rows(slots, context.positions, torch.device("cpu"))
    got = layer(x)
    for row, slot in enumerate(slots):
        expected = reference(base, x[row], adapters.get(slot))
        torch.testing.assert_close(got[row], expected, rtol=1e-5, atol=1e-5)

    # New weights in a slot must never be served from the operands cached for the old ones.
    adapters[2] = random_lora(2, 9)
    layer.load_slot(2, adapters[2], torch.float32, torch.device("cpu"))
    got = layer(x)
    for row, slot in enumerate(slots):
        torch.testing.assert_close(got[row], reference(base, x[row], adapters.get(slot)), rtol=1e-5, atol=1e-5)


def test_all_base_rows_skip_lora():
    assert LoRABatchPlan.for_rows([0, 0, 0], ActivePositions(2), torch.device("cpu")) is None
