"""Automatic prefix caching: a hit gives exactly the tokens of the same request uncached, a
cached prefix never crosses adapters or versions, and eviction or memory pressure never
corrupts a running row."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adapters.package import AdapterPackage, LoraModule
from adapters.validate import load_adapter_dir
from server.contract import AdapterBinding, GenerationRequest, SamplingParams
from server.engine.base import load_base
from server.engine.engine import TorchEngine
from server.engine.prefix_cache import BLOCK_TOKENS, PrefixCache

SYSTEM = "you are a helpful assistant . answer in one short line and never say more than you need to : "
QUESTIONS = ["what is the capital of france", "select name from users", "one two three", "i love this product",
             "the quick brown fox", "adapters change what a small model says"]


def make_engine(tiny_llama, tmp_path_factory, prefix_cache_bytes: int) -> TorchEngine:
    base = load_base(str(tiny_llama), tmp_path_factory.mktemp("cache"), "cpu", "float32", "none")
    return TorchEngine(base, max_batch_size=6, max_prefill_tokens=512, max_device_adapters=4,
                       prefix_cache_bytes=prefix_cache_bytes)


@pytest.fixture(scope="module")
def cached(tiny_llama, tmp_path_factory) -> TorchEngine:
    return make_engine(tiny_llama, tmp_path_factory, 64 * 1024**2)


@pytest.fixture(scope="module")
def uncached(tiny_llama, tmp_path_factory) -> TorchEngine:
    return make_engine(tiny_llama, tmp_path_factory, 0)


@pytest.fixture(scope="module")
def bindings(cached, llama_adapters) -> dict[str | None, AdapterBinding | None]:
    found: dict[str | None, AdapterBinding | None] = {None: None}
    for name in ("gen-a", "gen-b"):
        package = load_adapter_dir(llama_adapters[name], name, cached.signature)
        found[name] = AdapterBinding(name, package.manifest.version, package.key, package)
    return found


def request(engine, rid: str, text: str, adapter=None, new_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(rid, tuple(engine.tokenize(text, None)), SamplingParams(max_new_tokens=new_tokens), adapter)


def run(engine: TorchEngine, arrivals: list[tuple[int, GenerationRequest]]) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Tokens and cached prompt tokens per request; (step, request) arrivals."""
    tokens: dict[str, list[int]] = {}
    hits: dict[str, int] = {}
    pending = sorted(arrivals, key=lambda item: item[0])
    step = 0
    while pending or engine.has_work():
        while pending and pending[0][0] <= step:
            engine.add(pending.pop(0)[1])
        for event in engine.step():
            assert event.error is None, event.error
            tokens.setdefault(event.request_id, []).extend(event.token_ids)
            if event.cached_tokens is not None:
                hits[event.request_id] = event.cached_tokens
        step += 1
    return tokens, hits


def alone(engine: TorchEngine, req: GenerationRequest) -> list[int]:
    return run(engine, [(0, req)])[0][req.request_id]


def test_hits_give_the_uncached_tokens_in_mixed_staggered_batches(cached, uncached, bindings):
    assert len(cached.tokenize(SYSTEM, None)) > 2 * BLOCK_TOKENS
    names = [None, "gen-a", "gen-b"]
    arrivals = []
    for i, question in enumerate(QUESTIONS * 2):
        name = names[i % 3]
        arrivals.append((i // 2, request(cached, f"r{i}", SYSTEM + question, bindings[name])))
    expected = {req.request_id: alone(uncached, req) for _, req in arrivals}
    tokens, hits = run(cached, arrivals)
    assert tokens == expected
    # The first request of each adapter computes the shared prefix; later ones read it.
    assert sum(1 for count in hits.values() if count >= 2 * BLOCK_TOKENS) >= len(arrivals) - 6
    assert all(count % BLOCK_TOKENS == 0 for count in hits.values())


def test_a_repeated_prompt_still_computes_its_last_token(cached, uncached):
    text = SYSTEM + "one two three four five six seven eight nine ten"
    first = request(cached, "again-1", text)
    length = len(first.prompt_ids)
    run(cached, [(0, first)])
    tokens, hits = run(cached, [(0, request(cached, "again-2", text))])
    assert hits["again-2"] == (length - 1) // BLOCK_TOKENS * BLOCK_TOKENS
    assert tokens["again-2"] == alone(uncached, request(uncached, "u", text))


def test_a_prefix_never_crosses_adapters(cached, bindings):
    text = "nothing cached starts like this . " + SYSTEM + "a prompt seen once per adapter"
    _, hits = run(cached, [(0, request(cached, "base-first", text))])
    assert hits["base-first"] == 0
    _, hits = run(cached, [(0, request(cached, "gen-a-first", text, bindings["gen-a"]))])
    assert hits["gen-a-first"] == 0  # the base's KV is not the adapter's
    _, hits = run(cached, [(0, request(cached, "gen-a-again", text, bindings["gen-a"]))])
    assert hits["gen-a-again"] > 0


def test_a_new_version_under_the_same_name_never_hits_the_old_one(cached, uncached, bindings):
    old = bindings["gen-a"]
    package: AdapterPackage = old.package
    modules = {name: LoraModule(m.a, m.b * 1.5, m.scale) for name, m in package.modules.items()}
    manifest = dataclasses.replace(package.manifest, version="v2", sha256="f" * 64)
    new = AdapterBinding(old.name, "v2", manifest.sha256, dataclasses.replace(package, manifest=manifest, modules=modules))
    text = "two versions of one name . " + SYSTEM + "the same words under two versions"
    run(cached, [(0, request(cached, "v1", text, old))])
    tokens, hits = run(cached, [(0, request(cached, "v2", text, new))])
    assert hits["v2"] == 0
    assert tokens["v2"] == alone(uncached, request(uncached, "u", text, new))


def test_eviction_while_rows_run_never_corrupts_them(tiny_llama, tmp_path_factory, uncached, bindings, monkeypatch):
    """A budget of four blocks: admissions evict what earlier prompts stored (other adapters'
    chains, or the base's own) while rows that read those blocks are still decoding."""
    engine = make_engine(tiny_llama, tmp_path_factory, 0)
    engine.kv.prefix = PrefixCache(4 * kv_block_bytes(engine), kv_block_bytes(engine))
    evictions = []
    real_evict = engine.kv.prefix._evict_one
    monkeypatch.setattr(engine.kv.prefix, "_evict_one", lambda: evictions.append(1) or real_evict())
    names = [None, None, "gen-a", None, "gen-b", None]
    arrivals = [(i, request(engine, f"e{i}", SYSTEM + QUESTIONS[i % len(QUESTIONS)], bindings[names[i % 6]], 12))
                for i in range(12)]
    expected = {req.request_id: alone(uncached, req) for _, req in arrivals}
    tokens, hits = run(engine, arrivals)
    assert tokens == expected
    assert len(engine.kv.prefix.blocks) <= 4 and evictions and sum(1 for c in hits.values() if c) >= 3


def test_memory_pressure_gives_the_cache_up_before_any_row(tiny_llama, tmp_path_factory, uncached, monkeypatch):
    engine = make_engine(tiny_llama, tmp_path_factory, 64 * 1024**2)
    run(engine, [(0, request(engine, "fill", SYSTEM + "first"))])
    assert engine.kv.prefix.nbytes() > 0
    real_grow = engine.kv._grow_slabs
    calls = []

    def grow_once_out_of_memory(rows, columns):
        calls.append((rows, columns))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("simulated")
        return real_grow(rows, columns)

    monkeypatch.setattr(engine.kv, "_grow_slabs", grow_once_out_of_memory)
    many = [(0, request(engine, f"m{i}", SYSTEM + QUESTIONS[i])) for i in range(6)]  # the slab grows its rows
    tokens, hits = run(engine, many)
    assert len(calls) >= 2 and not any(hits.values())  # the cache was cleared before the hit could be used
    assert tokens == {req.request_id: alone(uncached, req) for _, req in many}


def kv_block_bytes(engine: TorchEngine) -> int:
    from server.engine.kv import kv_bytes_per_token

    return kv_bytes_per_token(engine.model, torch.float32) * BLOCK_TOKENS


# --- the cache's own bookkeeping ---------------------------------------------------------


def test_eviction_takes_leaves_first_so_no_chain_has_a_hole():
    cache = PrefixCache(budget_bytes=4, bytes_per_block=1)  # four blocks
    long_prompt = list(range(3 * BLOCK_TOKENS + 1))
    cache.plan(cache.match("", long_prompt))
    cache.finish_step()
    assert cache.match("", long_prompt).hits == 3
    other = [7] * (2 * BLOCK_TOKENS + 1)
    cache.plan(cache.match("", other))  # needs two blocks: one free, one evicted (the deepest)
    cache.finish_step()
    assert cache.match("", long_prompt).hits == 2
    assert cache.match("", other).hits == 2
    for block in cache.blocks.values():
        assert block.parent is None or block.parent in cache.blocks


def test_a_failed_step_returns_what_it_reserved():
    cache = PrefixCache(budget_bytes=8, bytes_per_block=1)
    prompt = list(range(2 * BLOCK_TOKENS + 3))
    plan = cache.plan(cache.match("adapter-key", prompt))
    assert len(plan.write) == 2
    cache.abandon_step()
    assert not cache.blocks and cache.match("adapter-key", prompt).hits == 0
    again = cache.plan(cache.match("adapter-key", prompt))
    assert sorted(again.write) == sorted(plan.write)


def test_a_budget_below_one_block_is_off_and_serves(tiny_llama, tmp_path_factory):
    engine = make_engine(tiny_llama, tmp_path_factory, 1)
    assert engine.kv.prefix is None
    tokens = alone(engine, request(engine, "tiny-budget", SYSTEM + QUESTIONS[0]))
    assert len(tokens) == 8
