"""Host<->device traffic on the decode path, counted on CPU.

On CUDA every device->host read (.item(), .tolist(), .cpu(), int(tensor)...) blocks the
host until the GPU catches up, and every tensor built from host values is a copy. No GPU
runs in CI, so the engine's decode steps are run here on CPU with the torch-ops LoRA path
(the one CUDA takes) and those calls are counted; a regression that adds a sync per step or
per row shows up as a higher count.

Budget per steady decode step (no row joining or leaving): ONE host->device copy (the
step's index arrays, sampling parameters included) and ONE device->host read (the chosen
token ids), whatever the number of rows, adapters or sampling rows.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from adapters.validate import load_adapter_dir
from server.contract import AdapterBinding, GenerationRequest, SamplingParams
from server.engine.base import load_base
from server.engine.engine import TorchEngine

READS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")
CREATIONS = ("tensor", "as_tensor", "from_numpy")


class Traffic:
    """Counts device->host reads (Tensor methods) and tensors built from host data."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.counts: collections.Counter[str] = collections.Counter()
        for name in READS:
            self._wrap(monkeypatch, torch.Tensor, name, "read")
        for name in CREATIONS:
            self._wrap(monkeypatch, torch, name, "create")

    def _wrap(self, monkeypatch, owner, name: str, kind: str) -> None:
        original = getattr(owner, name)
        counts = self.counts

        def counted(*args, **kwargs):
            counts[kind] += 1
            counts[f"{kind}:{name}"] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    def take(self) -> collections.Counter[str]:
        taken = self.counts.copy()
        self.counts.clear()
        return taken


@pytest.fixture(scope="module")
def engine(tiny_llama, tmp_path_factory) -> TorchEngine:
    base = load_base(str(tiny_llama), tmp_path_factory.mktemp("cache"), "cpu", "float32", "none")
    return TorchEngine(base, max_batch_size=8, max_prefill_tokens=256, max_device_adapters=4)


@pytest.fixture(scope="module")
def bindings(engine, llama_adapters) -> list[AdapterBinding]:
    found = []
    for name in ("gen-a", "gen-b"):
        package = load_adapter_dir(llama_adapters[name], name, engine.signature)
        found.append(AdapterBinding(name, package.manifest.version, package.key, package))
    return found


def test_a_decode_step_costs_one_copy_each_way(engine, bindings, monkeypatch):
    monkeypatch.setattr(engine.context, "cpu_kernel", None)  # the torch-ops LoRA path, as on CUDA
    params = [SamplingParams(max_new_tokens=40), SamplingParams(max_new_tokens=40, temperature=1.0, seed=3),
              SamplingParams(max_new_tokens=40, temperature=0.8, top_p=0.9, top_k=10, seed=11)]
    words = ["the quick brown fox", "adapters change what", "one two three four five"]
    for i in range(6):  # six rows: two adapters and the base, greedy and sampled
        prompt = tuple(engine.tokenize(words[i % 3], None))
        adapter = (bindings + [None])[i % 3]
        engine.add(GenerationRequest(f"r{i}", prompt, params[i % 3], adapter))
    engine.step()  # prefill (and the first token) of every row
    engine.step()  # the first decode step builds the decode LoRA plan

    traffic = Traffic(monkeypatch)
    steps = 10
    for _ in range(steps):
        events = engine.step()
        assert len(events) == 6 and not any(e.finished for e in events)
    counts = traffic.take()
    assert counts["create"] == steps, counts
    assert counts["read"] == steps, counts
    assert counts["read:tolist"] == steps  # the chosen ids, once per step
    while engine.has_work():
        engine.step()


def test_rows_leaving_add_one_copy_not_one_per_row(engine, bindings, monkeypatch):
    monkeypatch.setattr(engine.context, "cpu_kernel", None)
    prompt = tuple(engine.tokenize("the quick brown fox", None))
    for i in range(6):
        engine.add(GenerationRequest(f"l{i}", prompt, SamplingParams(max_new_tokens=3 + (i % 2) * 20),
                                     bindings[i % 2]))
    engine.step()
    engine.step()
    traffic = Traffic(monkeypatch)
    events = engine.step()  # three rows finish and leave; the rest move into their rows
    assert sum(e.finished for e in events) == 3
    leaving = traffic.take()
    events = engine.step()  # the decode plan is rebuilt for the new adapter order
    rebuilt = traffic.take()
    # The step itself, plus one copy for the row moves / one for the new LoRA band.
    assert leaving["create"] == 2 and rebuilt["create"] == 2, (leaving, rebuilt)
    assert leaving["read"] == rebuilt["read"] == 1
    while engine.has_work():
        engine.step()


def test_numpy_bookkeeping_reads_nothing_from_the_device(engine):
    """KV bookkeeping lives on the host: its token count is plain arithmetic."""
    assert isinstance(engine.kv.tokens(), int)
    assert not any(isinstance(v, torch.Tensor) for v in vars(engine.kv).values()
                   if not isinstance(v, dict)), "KV bookkeeping must not hold device tensors"
    assert np.asarray(engine.kv.row_start).dtype.kind == "i"
