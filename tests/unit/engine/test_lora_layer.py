"""SlotLoRALinear against the plain formula: y = base(x) + scale * x A^T B^T, per row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from adapters.package import LoraModule
from server.engine import cpu_sgmv
from server.engine.cpu_threads import ThreadPolicy
from server.engine.numba_parallel import GATE
from server.engine.lora import ActivePositions, LoRABatchPlan, LoRAContext, LoRASegments, SlotLoRALinear, slot_tensors
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


def layer_with(adapters: dict[int, LoraModule], positions: int,
               cpu_kernel: bool = True) -> tuple[nn.Linear, LoRAContext, SlotLoRALinear]:
    """A 12 -> 20 base linear wrapped with three slots, `adapters` loaded by slot."""
    base = nn.Linear(12, 20)
    context = LoRAContext(positions, ThreadPolicy(1), torch.device("cpu"),
                          cpu_kernel=cpu_sgmv.add_segment_lora if cpu_kernel else None)
    layer = SlotLoRALinear(base, 12, 20, slots=3, context=context)
    for slot, weights in adapters.items():
        layer.load_slot(slot, *slot_tensors(weights, torch.float32))
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
    layer.load_slot(2, *slot_tensors(adapters[2], torch.float32))
    got = layer(x)
    for row, slot in enumerate(slots):
        torch.testing.assert_close(got[row], reference(base, x[row], adapters.get(slot)), rtol=1e-5, atol=1e-5)


def test_all_base_rows_skip_lora():
    assert LoRABatchPlan.for_rows([0, 0, 0], ActivePositions(2), torch.device("cpu")) is None


@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["cpu-kernel", "torch-ops"])
@torch.inference_mode()
def test_packed_step_plan_decode_band_and_prompt_ranges(cpu_kernel, monkeypatch):
    """Units are tokens: decode tokens (two adapters, one in a group of five, and the base),
    then three prompts; the same plan through the CPU kernel and through torch ops."""
    kernel_calls = []
    monkeypatch.setattr(cpu_sgmv, "add_segment_lora", spy(cpu_sgmv.add_segment_lora, kernel_calls))
    torch.manual_seed(1)
    adapters = {1: random_lora(4, 1), 2: random_lora(16, 2)}
    base, context, layer = layer_with(adapters, positions=2, cpu_kernel=cpu_kernel)
    decode_slots = [2, 0, 1, 2, 2, 2, 2]
    prompts = [(1, 4), (0, 2), (2, 3)]  # (slot, length)
    token_slots = decode_slots + [slot for slot, length in prompts for _ in range(length)]
    x = torch.randn(1, len(token_slots), 12)  # [1, tokens, in]: one packed row
    context.plan = LoRABatchPlan.for_step(decode_slots, prompts, context.positions, torch.device("cpu"))
    got = layer(x)
    for token, slot in enumerate(token_slots):
        expected = reference(base, x[0, token], adapters.get(slot))
        torch.testing.assert_close(got[0, token], expected, rtol=1e-5, atol=1e-5)
    assert len(kernel_calls) == (1 if cpu_kernel else 0)


def spy(function, calls: list):
    def wrapper(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)
    return wrapper


def test_step_segments_group_decode_rows_by_slot_then_list_each_prompt():
    plan = LoRABatchPlan.for_step([2, 0, 1, 2], [(1, 3), (0, 2), (2, 2)], ActivePositions(2), torch.device("cpu"))
    assert plan.segments.slots.tolist() == [2, 1, 1, 2]
    assert plan.segments.starts.tolist() == [0, 2, 3, 6, 8]
    assert plan.segments.units.tolist() == [0, 3, 2, 4, 5, 6, 9, 10]  # the base's units are left out


SHAPES_UNITS = 23


def segment_shapes(generator, b_scale: float = 1.0):
    """Ranks that are not multiples of four, a rank of 0 (the adapter skips the layer), lone
    rows, blocks of four with a remainder, units in any order, units of no segment:
    (ranks, pool_a, pool_bt, groups, segments) over SHAPES_UNITS units of 33 in, 18 out."""
    slots, r_cap, n_in, n_out = 5, 7, 33, 18
    ranks = np.array([0, 5, 7, 3, 0], dtype=np.int64)
    pool_a = np.zeros((slots, r_cap, n_in), dtype=np.float32)
    pool_bt = np.zeros((slots, r_cap, n_out), dtype=np.float32)
    for slot, rank in enumerate(ranks):
        pool_a[slot, :rank] = generator.standard_normal((rank, n_in))
        pool_bt[slot, :rank] = generator.standard_normal((rank, n_out)) * b_scale
    groups = [(1, [4]), (2, [0, 9, 3, 17, 11, 6]), (3, list(range(12, 16))), (4, [20, 21]), (1, [1, 2])]
    return ranks, pool_a, pool_bt, groups, LoRASegments.build(groups)


@pytest.mark.parametrize("driver", ["_serial", "_parallel"])
def test_cpu_kernel_equals_the_formula_for_every_segment_shape(driver):
    """Ranks that are not multiples of four, a rank of 0 (adapter skips the layer), lone rows,
    blocks of four with a remainder, units in any order; rows of no segment stay untouched."""
    generator = np.random.default_rng(3)
    ranks, pool_a, pool_bt, groups, segments = segment_shapes(generator)
    units, n_in, n_out = SHAPES_UNITS, pool_a.shape[2], pool_bt.shape[2]
    x = generator.standard_normal((units, n_in)).astype(np.float32)
    out = generator.standard_normal((units, n_out)).astype(np.float32)
    expected = out.astype(np.float64)
    for slot, members in groups:
        for unit in members:
            rank = ranks[slot]
            expected[unit] += (x[unit].astype(np.float64) @ pool_a[slot, :rank].T) @ pool_bt[slot, :rank]
    getattr(cpu_sgmv, driver)(x, out, pool_a, pool_bt, ranks, segments.slots, segments.starts, segments.units)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("driver", ["_serial_bf16", "_parallel_bf16"])
def test_bf16_kernel_rounds_as_torch_adds_a_float32_delta_into_bf16(driver):
    """On bf16 bits the kernel must give exactly bf16(out + delta), what `out.add_(delta)`
    gives a bf16 tensor (round to nearest, ties to even), with the delta the float32 kernel
    sums: bit for bit, over the same segment shapes; rows of no segment stay untouched."""
    generator = np.random.default_rng(4)
    ranks, pool_a, pool_bt, groups, segments = segment_shapes(generator, b_scale=0.01)  # deltas near an ulp of out
    units, n_in, n_out = SHAPES_UNITS, pool_a.shape[2], pool_bt.shape[2]
    x = torch.from_numpy(generator.standard_normal((units, n_in)).astype(np.float32)).bfloat16()
    out = torch.from_numpy(generator.standard_normal((units, n_out)).astype(np.float32)).bfloat16()
    delta = torch.zeros(units, n_out)
    cpu_sgmv._serial(x.float().numpy(), delta.numpy(), pool_a, pool_bt, ranks, segments.slots, segments.starts,
                     segments.units)
    expected = out.clone().add_(delta)
    assert (expected != out).any() and (expected == out).any()  # some deltas round away, some do not

    bits = lambda t: t.view(torch.int16).numpy().view(np.uint16)  # noqa: E731
    got = out.clone()
    getattr(cpu_sgmv, driver)(bits(x), bits(got), pool_a, pool_bt, ranks, segments.slots, segments.starts,
                              segments.units)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))

    # Exact ties: a delta of half a bf16 step (2^-8 at 1.0) rounds to the even neighbour.
    x = torch.zeros(1, n_in, dtype=torch.bfloat16)
    x[0, 0] = 1.0
    out = torch.tensor([[1.0, 1.0078125] + [0.0] * (n_out - 2)], dtype=torch.bfloat16)  # even, odd mantissa
    pool_a[1, :] = 0.0
    pool_a[1, 0, 0] = 1.0
    pool_bt[1, :] = 0.0
    pool_bt[1, 0, :2] = 2.0**-8
    tie = LoRASegments.build([(1, [0])])
    getattr(cpu_sgmv, driver)(bits(x), bits(out), pool_a, pool_bt, np.array([0, 1, 0, 0, 0]), tie.slots,
                              tie.starts, tie.units)
    assert out[0, :2].tolist() == [1.0, 1.015625]


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


def test_many_adapters_run_on_both_threads_with_the_serial_result_and_never_reenter_numba(monkeypatch):
    """From PARALLEL_FROM_SEGMENTS adapters on, segments run in parallel: each writes only its
    own rows, so the result is bit-identical to the serial loop. A second caller while one
    holds the parallel path (two engines in one process) runs serially instead."""
    generator = np.random.default_rng(5)
    segments_count = cpu_sgmv.PARALLEL_FROM_SEGMENTS + 4
    pool_a = generator.standard_normal((segments_count + 1, 8, 16)).astype(np.float32)
    pool_bt = generator.standard_normal((segments_count + 1, 8, 24)).astype(np.float32)
    ranks = np.full(segments_count + 1, 8, dtype=np.int64)
    segments = LoRASegments.build([(slot, [slot - 1]) for slot in range(1, segments_count + 1)])
    x = generator.standard_normal((segments_count, 16)).astype(np.float32)
    args = (pool_a, pool_bt, ranks, segments.slots, segments.starts, segments.units)

    cpu_sgmv.warm_up()
    serial = np.zeros((segments_count, 24), dtype=np.float32)
    cpu_sgmv._serial(x, serial, *args)
    parallel_calls = []
    monkeypatch.setattr(cpu_sgmv, "_parallel", spy(cpu_sgmv._parallel, parallel_calls))
    parallel = np.zeros_like(serial)
    cpu_sgmv.add_segment_lora(x, parallel, *args, threads=2)
    np.testing.assert_array_equal(parallel, serial)
    # Without OpenMP/TBB (numba's workqueue layer) the serial loop is the faster one.
    assert len(parallel_calls) == (1 if GATE.wakeups_cheap else 0)

    with GATE._lock:  # another thread inside a parallel driver
        while_held = np.zeros_like(serial)
        cpu_sgmv.add_segment_lora(x, while_held, *args, threads=2)
    np.testing.assert_array_equal(while_held, serial)
    one_thread = np.zeros_like(serial)
    cpu_sgmv.add_segment_lora(x, one_thread, *args, threads=1)
    np.testing.assert_array_equal(one_thread, serial)
    assert len(parallel_calls) == (1 if GATE.wakeups_cheap else 0)
