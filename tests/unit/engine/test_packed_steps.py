"""Packed steps over the KV slab: rows joining and leaving at any step, prompts longer than
anything running, a slab that must grow and move, adapters of two ranks plus the base, and
every request's tokens equal to what the same request gets when it runs alone."""

from __future__ import annotations

import pytest
import torch

from adapters.validate import load_adapter_dir
from server.contract import AdapterBinding, GenerationRequest, SamplingParams
from server.engine.base import load_base
from server.engine.engine import TorchEngine
from server.engine.kv import SlabKVCache

WORDS = "the quick brown fox jumps over a lazy dog while seven tired cats watch from an old wall".split()


@pytest.fixture(scope="module")
def engine(tiny_llama, tmp_path_factory) -> TorchEngine:
    base = load_base(str(tiny_llama), tmp_path_factory.mktemp("cache"), "cpu", "float32", "none")
    return TorchEngine(base, max_batch_size=6, max_prefill_tokens=64, max_device_adapters=4)


@pytest.fixture(scope="module")
def bindings(engine, llama_adapters) -> dict[str | None, AdapterBinding | None]:
    packages = {name: load_adapter_dir(llama_adapters[name], name, engine.signature) for name in ("gen-a", "gen-b")}
    found = {name: AdapterBinding(name, p.manifest.version, p.key, p) for name, p in packages.items()}
    return {None: None, **found}


def small_slab(engine: TorchEngine, columns: int) -> None:
    """Start the engine's cache over with `columns` columns (the attention modules keep the object)."""
    SlabKVCache.__init__(engine.kv, engine.kv.max_rows, engine.device, engine.threads, initial_columns=columns)


def make_requests(engine: TorchEngine, bindings) -> list[tuple[int, GenerationRequest]]:
    """(step at which it arrives, request): short and long prompts, every adapter and the base."""
    adapters = [None, "gen-a", "gen-b"]
    plan = [(0, 3, 9), (0, 5, 4), (1, 2, 12), (3, 11, 6), (4, 4, 10), (6, 17, 5), (7, 3, 14), (9, 7, 3), (12, 2, 8)]
    requests = []
    for index, (arrives, prompt_words, new_tokens) in enumerate(plan):
        words = " ".join(WORDS[(index + i) % len(WORDS)] for i in range(prompt_words))
        prompt = tuple(engine.tokenize(words, None))
        binding = bindings[adapters[index % len(adapters)]]
        requests.append((arrives, GenerationRequest(f"r{index}", prompt, SamplingParams(max_new_tokens=new_tokens),
                                                    binding)))
    return requests


def run(engine: TorchEngine, arrivals: list[tuple[int, GenerationRequest]],
        columns_seen: list[int] | None = None) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    pending = sorted(arrivals, key=lambda item: item[0])
    step = 0
    while pending or engine.has_work():
        while pending and pending[0][0] <= step:
            engine.add(pending.pop(0)[1])
        for event in engine.step():
            tokens.setdefault(event.request_id, []).extend(event.token_ids)
        if columns_seen is not None:
            columns_seen.append(engine.kv.columns)
        step += 1
    return tokens


@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["cpu-kernel", "torch-ops"])
def test_staggered_mixed_batch_equals_each_request_alone(engine, bindings, cpu_kernel, monkeypatch):
    monkeypatch.setattr(engine.context, "cpu_kernel", engine.context.cpu_kernel if cpu_kernel else None)
    arrivals = make_requests(engine, bindings)
    alone = {}
    for _, req in arrivals:
        small_slab(engine, 128)
        alone.update(run(engine, [(0, req)]))

    small_slab(engine, 8)  # the batch outgrows it: the slab grows and its window moves
    columns_seen: list[int] = []
    together = run(engine, arrivals, columns_seen)

    assert max(columns_seen) > 8
    assert engine.kv.rows == 0 and engine.stats()["running"] == 0
    assert engine.kv.keys == {} and engine.kv.columns == 8  # an empty batch gives the memory back
    for _, req in arrivals:
        assert len(together[req.request_id]) == req.params.max_new_tokens
        # Batching changes float reduction order only; on this tiny fp32 model greedy
        # choices have margins far above that noise, so every token must match.
        assert together[req.request_id] == alone[req.request_id], req.request_id


def test_cancelled_row_in_the_middle_leaves_the_others_intact(engine, bindings):
    small_slab(engine, 64)
    arrivals = make_requests(engine, bindings)[:5]
    alone = {}
    for _, req in arrivals:
        alone.update(run(engine, [(0, req)]))

    for _, req in arrivals:
        engine.add(req)
    tokens: dict[str, list[int]] = {}
    for step in range(30):
        if step == 2:
            engine.cancel(arrivals[1][1].request_id, "cancelled")  # a row that is not the last
        for event in engine.step():
            tokens.setdefault(event.request_id, []).extend(event.token_ids)
        if not engine.has_work():
            break
    assert not engine.has_work()
    for index, (_, req) in enumerate(arrivals):
        if index != 1:
            assert tokens[req.request_id] == alone[req.request_id]


def test_slab_layout_keeps_rows_right_aligned(engine):
    cache = SlabKVCache(max_rows=4, device=torch.device("cpu"), threads=engine.threads, initial_columns=4)
    layout = cache.plan_step(0, [3, 2])
    assert layout.column == 2 and [p.length for p in layout.prefills] == [3, 2]
    cache.finish_step(2)
    assert (cache.start, cache.end, cache.rows) == (0, 3, 2)
    assert cache.row_start[:2] == [0, 1]  # right-aligned: the shorter prompt starts later

    # A longer prompt than any running row moves the running rows right.
    layout = cache.plan_step(2, [6])
    assert layout.column == 5 and cache.columns >= 6
    assert layout.row_starts == (2, 3) and layout.start == 2  # the running rows, shifted by 2
    cache.begin_step(torch.tensor(layout.row_starts))
    visible = (layout.decode_mask[:, 0, 0] == 0).tolist()  # columns 2..5 for each decode row
    assert visible == [[True] * 4, [False] + [True] * 3]
    cache.finish_step(1)
    assert cache.row_start[:3] == [2, 3, 0] and (cache.start, cache.end) == (0, 6)

    moves = cache.remove_rows({0})
    assert moves == [(2, 0)] and cache.rows == 2
    assert cache.row_start[:2] == [0, 3]  # the long row now sits in row 0
    assert cache.tokens() == 6 + 3


def test_one_long_prompt_reserves_rows_only_for_what_runs(engine):
    cache = SlabKVCache(max_rows=32, device=torch.device("cpu"), threads=engine.threads, initial_columns=16)
    cache.plan_step(0, [300])
    assert cache.row_capacity == 4 and cache.columns >= 300  # not 32 rows x 300 columns
    cache.finish_step(1)
    cache.plan_step(1, [5, 5, 5, 5])
    assert cache.row_capacity == 8
    cache.finish_step(4)
    cache.remove_rows(set(range(5)))
    assert (cache.row_capacity, cache.columns, cache.rows) == (4, 16, 0)


def test_attention_the_packed_path_cannot_compute_is_refused_at_start(engine):
    from transformers import AutoModelForCausalLM, Gemma2Config

    from server.engine.kv import unsupported_reason

    assert unsupported_reason(engine.model) is None
    gemma2 = AutoModelForCausalLM.from_config(Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    ))
    assert "soft-capping" in unsupported_reason(gemma2)
