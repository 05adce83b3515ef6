"""SlotLoRALinear against the plain formula: y = base(x) + scale * x A^T B^T, per row."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapters.package import LoraModule
from server.engine.cpu_threads import ThreadPolicy
from server.engine.lora import ActivePositions, LoRABatchPlan, LoRAContext, SlotLoRALinear
from server.engine.onednn import OneDNNLinear, can_pack


def reference(base: nn.Linear, x: torch.Tensor, weights: LoraModule | None) -> torch.Tensor:
    out = base(x)
    if weights is not None:
        out = out + weights.scale * (x @ weights.a.T @ weights.b.T)
    return out


def random_lora(rank: int, seed: int) -> LoraModule:
    generator = torch.Generator().manual_seed(seed)
    return LoraModule(torch.randn(rank, 12, generator=generator), torch.randn(20, rank, generator=generator),
                      scale=0.5 * seed)


def layer_with(adapters: dict[int, LoraModule], positions: int) -> tuple[nn.Linear, LoRAContext, SlotLoRALinear]:
    """A 12 -> 20 base linear wrapped with three slots, `adapters` loaded by slot."""
    base = nn.Linear(12, 20)
    context = LoRAContext(positions, ThreadPolicy(1))
    layer = SlotLoRALinear(base, 12, 20, slots=3, context=context)
    for slot, weights in adapters.items():
        layer.load_slot(slot, weights, torch.float32, torch.device("cpu"))
    return base, context, layer


@torch.inference_mode()
def test_mixed_rows_ranks_and_base_and_a_reloaded_slot():
    torch.manual_seed(0)
    adapters = {1: random_lora(4, 1), 2: random_lora(16, 2), 3: random_lora(8, 3)}
    base, context, layer = layer_with(adapters, positions=3)
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


@torch.inference_mode()
def test_packed_step_plan_decode_band_and_prompt_ranges():
    """Units are tokens: three decode tokens (two adapters and the base), then two prompts."""
    torch.manual_seed(1)
    adapters = {1: random_lora(4, 1), 2: random_lora(16, 2)}
    base, context, layer = layer_with(adapters, positions=2)
    decode_slots = [2, 0, 1]
    prompts = [(1, 4), (0, 2), (2, 3)]  # (slot, length)
    token_slots = decode_slots + [slot for slot, length in prompts for _ in range(length)]
    x = torch.randn(1, len(token_slots), 12)  # [1, tokens, in]: one packed row
    context.plan = LoRABatchPlan.for_step(decode_slots, prompts, context.positions, torch.device("cpu"))
    got = layer(x)
    for token, slot in enumerate(token_slots):
        expected = reference(base, x[0, token], adapters.get(slot))
        torch.testing.assert_close(got[0, token], expected, rtol=1e-5, atol=1e-5)


def test_active_positions_keep_adapters_in_place_and_fill_the_lowest_free():
    positions = ActivePositions(3)
    assert positions.place({5, 7}) == {5: 0, 7: 1}
    assert positions.place({7, 9}) == {7: 1, 9: 0}  # 5 left: 9 takes its position, 7 stays
    assert positions.place({9, 7, 5}) == {9: 0, 7: 1, 5: 2}
    with pytest.raises(ValueError):
        positions.place({1, 2, 3, 4})


@torch.inference_mode()
def test_onednn_linear_equals_linear():
    if not can_pack(torch.device("cpu"), torch.float32, "none"):
        pytest.skip("this torch build has no oneDNN linear")
    for bias in (True, False):
        dense = nn.Linear(24, 40, bias=bias)
        packed = OneDNNLinear(dense)
        x = torch.randn(3, 7, 24)
        torch.testing.assert_close(packed(x), dense(x), rtol=1e-5, atol=1e-5)
        assert (packed.in_features, packed.out_features) == (24, 40)


def test_thread_policy_small_ops_inside_blocks_heavy_ops_on_all_threads():
    seen = {}

    class Block(nn.Module):
        def forward(self, x):
            seen["inside"] = torch.get_num_threads()
            with policy.heavy():
                seen["heavy"] = torch.get_num_threads()
            seen["after heavy"] = torch.get_num_threads()
            return x

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        policy = ThreadPolicy(2)
        blocks = nn.ModuleList([Block(), Block()])
        policy.install(blocks)
        for block in blocks:
            block(torch.zeros(1))
        assert seen == {"inside": 1, "heavy": 2, "after heavy": 1}
        assert torch.get_num_threads() == 2  # outside the blocks (embeddings, lm_head): all threads
    finally:
        torch.set_num_threads(before)
