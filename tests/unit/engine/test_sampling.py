"""Sampling against its definitions, and the engine sampling mixed batches on any device.

The distribution checks draw many tokens from fixed logits and compare the empirical
frequencies with the distribution the parameters define (softmax of logits / temperature,
cut to the top k, cut to the nucleus of mass top_p, renormalised). With N draws a frequency
has standard deviation at most sqrt(0.25 / N); the bound used is 5 of those, so a correct
sampler fails about once in a million runs while an argmax-only, temperature-blind or
cut-ignoring sampler misses by far more (each case below differs from its wrong variants
by at least 0.1 in some token's probability).
"""

from __future__ import annotations

import math

import pytest
import torch

from adapters.validate import load_adapter_dir
from server.contract import AdapterBinding, GenerationRequest, SamplingParams
from server.engine.base import load_base
from server.engine.engine import TorchEngine
from server.engine.sampling import SampledRows, UniformStream, choose_tokens
from server.engine.staging import StepBuffer

DRAWS = 20_000
BOUND = 5 * math.sqrt(0.25 / DRAWS)  # ~0.018
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def draw(params: SamplingParams, draws: int = DRAWS, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    """Empirical token frequencies: `draws` rows of the same logits, each its own stream."""
    buffer = StepBuffer()
    staged = SampledRows.stage(buffer, [params] * draws, [UniformStream(seed) for seed in range(draws)])
    sampled = staged.on_device(buffer.send(torch.device("cpu")))
    tokens = choose_tokens(logits.expand(draws, -1).contiguous(), sampled)
    return torch.bincount(tokens, minlength=logits.numel()).float() / draws


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The definition: the smallest set of most likely tokens whose mass reaches top_p."""
    order = probs.argsort(descending=True)
    kept, mass = [], 0.0
    for token in order.tolist():
        kept.append(token)
        mass += float(probs[token])
        if mass >= top_p:
            break
    cut = torch.zeros_like(probs)
    cut[kept] = probs[kept]
    return cut / cut.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_frequencies_match_softmax_at_each_temperature(temperature):
    expected = (LOGITS / temperature).softmax(-1)
    got = draw(SamplingParams(temperature=temperature))
    assert (got - expected).abs().max() < BOUND, (got, expected)


def test_top_k_keeps_the_k_most_likely_renormalised():
    probs = LOGITS.softmax(-1)
    expected = torch.zeros_like(probs)
    expected[:3] = probs[:3] / probs[:3].sum()
    got = draw(SamplingParams(temperature=1.0, top_k=3))
    assert (got - expected).abs().max() < BOUND and got[3:].sum() == 0


@pytest.mark.parametrize("top_p", [0.5, 0.8, 0.95])
def test_top_p_keeps_the_smallest_nucleus_reaching_its_mass(top_p):
    expected = nucleus(LOGITS.softmax(-1), top_p)
    got = draw(SamplingParams(temperature=1.0, top_p=top_p))
    assert (got - expected).abs().max() < BOUND and got[expected == 0].sum() == 0


def test_top_k_and_top_p_together_cut_in_that_order():
    probs = LOGITS.softmax(-1)
    top4 = torch.zeros_like(probs)
    top4[:4] = probs[:4] / probs[:4].sum()
    expected = nucleus(top4, 0.7)
    got = draw(SamplingParams(temperature=1.0, top_k=4, top_p=0.7))
    assert (got - expected).abs().max() < BOUND and got[expected == 0].sum() == 0


def test_rows_with_different_parameters_in_one_pass():
    """Each row gets its own parameters even when rows are batched with others."""
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=1),
              SamplingParams(temperature=1.0, top_p=0.5), SamplingParams()]  # the last is greedy
    rows = params * 5000
    buffer = StepBuffer()
    streams = [None if p.greedy else UniformStream(i) for i, p in enumerate(rows)]
    staged = SampledRows.stage(buffer, rows, streams)
    logits = LOGITS.roll(1).expand(len(rows), -1).contiguous()  # most likely token: 1
    tokens = choose_tokens(logits, staged.on_device(buffer.send(torch.device("cpu")))).view(5000, 4)
    plain = torch.bincount(tokens[:, 0], minlength=8).float() / 5000
    assert (plain - logits[0].softmax(-1)).abs().max() < 5 * math.sqrt(0.25 / 5000)
    assert (tokens[:, 1] == 1).all() and (tokens[:, 3] == 1).all()  # top_k=1 and greedy: the argmax
    assert set(tokens[:, 2].tolist()) == {1, 2}  # the nucleus of mass 0.5: p = 0.40 and 0.25


def test_tiny_top_p_and_top_k_one_equal_greedy():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    for params in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)):
        buffer = StepBuffer()
        staged = SampledRows.stage(buffer, [params] * 64, [UniformStream(i) for i in range(64)])
        assert torch.equal(choose_tokens(logits, staged.on_device(buffer.send(torch.device("cpu")))), greedy)


def test_a_masked_token_is_never_drawn_even_at_the_top_of_the_unit_interval():
    """u close to 1 must land on the last token that has mass, never on a cut one."""
    sampled = SampledRows(rows=torch.tensor([0]), temperature=torch.ones(1, 1), top_k=torch.tensor([2]),
                          top_p=torch.ones(1, 1), uniform=torch.tensor([1.0 - 2**-24]), max_top_k=2,
                          any_top_p=False)
    assert choose_tokens(LOGITS[None], sampled).tolist() == [1]


# --- the engine ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_llama, tmp_path_factory) -> TorchEngine:
    base = load_base(str(tiny_llama), tmp_path_factory.mktemp("cache"), "cpu", "float32", "none")
    return TorchEngine(base, max_batch_size=8, max_prefill_tokens=256, max_device_adapters=4)


@pytest.fixture(scope="module")
def adapter(engine, llama_adapters) -> AdapterBinding:
    package = load_adapter_dir(llama_adapters["gen-a"], "gen-a", engine.signature)
    return AdapterBinding("gen-a", package.manifest.version, package.key, package)


def run(engine: TorchEngine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    for request in requests:
        engine.add(request)
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for event in engine.step():
            assert event.error is None, event.error
            tokens.setdefault(event.request_id, []).extend(event.token_ids)
    return tokens


def request(engine, rid: str, params: SamplingParams, adapter=None, words: str = "the quick brown fox") -> GenerationRequest:
    return GenerationRequest(rid, tuple(engine.tokenize(words, None)), params, adapter)


def test_mixed_batch_of_greedy_seeded_and_unseeded_rows(engine, adapter, monkeypatch):
    """Greedy rows keep their solo output, a seed gives the same tokens alone or batched, and
    no torch generator or global RNG takes part (a CPU generator cannot drive CUDA sampling:
    that was every sampled request failing on GPUs, and the whole batch with it)."""
    def refuse(*args, **kwargs):
        raise AssertionError("sampling must not use a torch.Generator or torch.multinomial")

    greedy = SamplingParams(max_new_tokens=12)
    seeded = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    unseeded = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20)
    alone_greedy = run(engine, [request(engine, "g", greedy, adapter)])["g"]
    alone_seeded = run(engine, [request(engine, "s", seeded, adapter, "adapters change what")])["s"]

    monkeypatch.setattr(torch, "Generator", refuse)
    monkeypatch.setattr(torch, "multinomial", refuse)
    rng_before = torch.get_rng_state()
    mixed = run(engine, [
        request(engine, "u1", unseeded), request(engine, "g", greedy, adapter),
        request(engine, "u2", unseeded, adapter), request(engine, "s", seeded, adapter, "adapters change what"),
        request(engine, "s-base", seeded),
    ])
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert mixed["g"] == alone_greedy
    assert mixed["s"] == alone_seeded
    assert mixed["s-base"] != mixed["s"]  # same seed, other adapter and prompt: another answer
    assert all(len(mixed[r]) >= 1 for r in ("u1", "u2"))


def test_temperature_one_samples_rather_than_taking_the_argmax(engine):
    """Over many seeds a temperature-1 row must not always give the greedy answer."""
    greedy = run(engine, [request(engine, "g", SamplingParams(max_new_tokens=6))])["g"]
    sampled = run(engine, [request(engine, f"s{seed}", SamplingParams(max_new_tokens=6, temperature=1.0, seed=seed))
                           for seed in range(8)])
    assert sum(tokens != greedy for tokens in sampled.values()) >= 4
    assert len({tuple(tokens) for tokens in sampled.values()}) >= 4
