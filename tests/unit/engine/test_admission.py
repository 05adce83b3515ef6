"""Admission under many adapters: the default slot count holds a full batch of distinct
adapters, and a request whose adapter finds every slot in use waits without holding back
the requests behind it, and without being overtaken by later cold adapters."""

from __future__ import annotations

import pytest

from adapters.validate import load_adapter_dir
from server.contract import AdapterBinding, ClassifyItem, GenerationRequest, SamplingParams
from server.engine.base import load_base
from server.engine.engine import MAX_SLOTS, SLOT_SIZING_RANK, TorchEngine, default_slot_count
from server.errors import AdapterLoadFailed
from tests.conftest import make_lora

BATCH = 4


@pytest.fixture
def base(tiny_llama, tmp_path_factory):
    """A fresh base per test: an engine wraps the base's linear layers in place."""
    return load_base(str(tiny_llama), tmp_path_factory.mktemp("cache"), "cpu", "float32", "none")


@pytest.fixture(scope="module")
def bindings(tiny_llama, tmp_path_factory) -> list[AdapterBinding]:
    """Six distinct adapters: more than the batch holds, and more than the small engine's slots."""
    signature = load_base(str(tiny_llama), tmp_path_factory.mktemp("cache"), "cpu", "float32", "none").signature
    store = tmp_path_factory.mktemp("many")
    found = []
    for i in range(6):
        folder = make_lora(tiny_llama, store / f"many-{i}", seed=100 + i)
        package = load_adapter_dir(folder, f"many-{i}", signature)
        found.append(AdapterBinding(f"many-{i}", package.manifest.version, package.key, package))
    return found


def request(rid: str, adapter: AdapterBinding | None, new_tokens: int) -> GenerationRequest:
    return GenerationRequest(rid, (1, 5, 9, 13, 17), SamplingParams(max_new_tokens=new_tokens), adapter)


def running(engine: TorchEngine) -> set[str]:
    return {row.request.request_id for row in engine.rows}


def test_the_default_slot_count_follows_the_budget_and_never_drops_below_the_batch(base):
    per_slot = SLOT_SIZING_RANK * 4 * sum(i + o for i, o in base.signature.linear_shapes.values())  # float32
    assert default_slot_count(base, max_batch_size=BATCH, budget_bytes=per_slot * 50) == 50
    # A budget for 2 slots still gets a full batch of distinct adapters.
    assert default_slot_count(base, max_batch_size=BATCH, budget_bytes=per_slot * 2) == BATCH
    assert default_slot_count(base, max_batch_size=BATCH, budget_bytes=per_slot * 10 * MAX_SLOTS) == MAX_SLOTS
    # The 2 GiB CPU default, for a model this small, is the cap.
    assert default_slot_count(base, max_batch_size=BATCH) == min(MAX_SLOTS, 2 * 1024**3 // per_slot)


def test_a_full_batch_of_distinct_adapters_runs_in_one_step(base, bindings):
    engine = TorchEngine(base, BATCH, 512, default_slot_count(base, BATCH, budget_bytes=1))
    for i, adapter in enumerate(bindings[:BATCH]):
        engine.add(request(f"r{i}", adapter, 4))
    engine.step()
    assert running(engine) == {f"r{i}" for i in range(BATCH)}
    assert engine.take_device_tier_activity().misses == BATCH


def test_a_cold_adapter_waits_for_a_slot_without_holding_back_others_and_is_not_overtaken(base, bindings):
    a, b, c, d = bindings[:4]
    engine = TorchEngine(base, max_batch_size=6, max_prefill_tokens=512, max_device_adapters=2)  # rows to spare
    engine.add(request("a-long", a, 12))
    engine.add(request("b-short", b, 6))
    engine.step()  # both slots now hold adapters in use
    engine.add(request("c-cold", c, 2))  # no free slot
    engine.add(request("base", None, 2))  # needs no slot
    engine.add(request("a-again", a, 2))  # its adapter is resident
    engine.add(request("d-cold", d, 2))  # arrives after c: must not take the slot c waits for
    engine.step()
    assert running(engine) == {"a-long", "b-short", "base", "a-again"}
    finished: list[str] = []
    order: list[str] = []
    while engine.has_work():
        for event in engine.step():
            assert event.error is None, event.error
            if event.finish_reason is not None:
                finished.append(event.request_id)
        order.extend(rid for rid in running(engine) if rid not in order)
    assert {"c-cold", "d-cold"} <= set(finished)
    assert order.index("c-cold") < order.index("d-cold")


def test_classify_with_every_slot_held_is_told_to_retry(base, bindings, llama_adapters):
    """A classify batch has no queue to wait in: all slots pinned is a 503 with Retry-After."""
    engine = TorchEngine(base, BATCH, 512, max_device_adapters=1)
    engine.load_adapter(bindings[0])
    assert engine.hold_adapter(bindings[0].key, True)
    package = load_adapter_dir(llama_adapters["sentiment"], "sentiment", base.signature)
    sentiment = AdapterBinding("sentiment", package.manifest.version, package.key, package)
    with pytest.raises(AdapterLoadFailed, match="held") as refused:
        engine.classify([ClassifyItem("i love it", sentiment)])
    assert refused.value.headers == {"Retry-After": "5"}


def test_a_waiting_prompt_is_hashed_for_the_prefix_cache_once_however_long_it_waits(base, bindings, monkeypatch):
    from server.engine import prefix_cache

    hashed: list[int] = []
    block_keys = prefix_cache.block_keys
    monkeypatch.setattr(prefix_cache, "block_keys", lambda root, tokens, blocks: (
        hashed.append(len(tokens)), block_keys(root, tokens, blocks))[1])
    a, b, c = bindings[:3]
    engine = TorchEngine(base, max_batch_size=4, max_prefill_tokens=512, max_device_adapters=2,
                         prefix_cache_bytes=64 * 1024**2)
    engine.add(request("a", a, 8))
    engine.add(request("b", b, 8))
    engine.step()
    long_prompt = tuple(range(3, 3 + 40))  # two full blocks
    engine.add(GenerationRequest("c-cold", long_prompt, SamplingParams(max_new_tokens=2), c))
    for _ in range(5):  # no free slot: c waits, asked again at every step
        engine.step()
        assert "c-cold" not in running(engine)
    assert hashed.count(len(long_prompt)) == 1
    while engine.has_work():
        engine.step()
