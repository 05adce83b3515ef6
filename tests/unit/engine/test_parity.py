"""Served outputs equal PEFT's own, token for token (fp32, greedy): alone, in mixed batches of
prompts of different lengths, and at every scaling PEFT allows (lora_alpha != 2r, rsLoRA at
another alpha, rank_pattern and alpha_pattern, with short and full-name pattern keys).

Token ids come from the engine (driven on its own thread, so the rows provably share every
step); over HTTP only text comes back, so those tests compare PEFT's ids decoded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from adapters.validate import load_adapter_dir
from server.contract import GenerationRequest, SamplingParams
from tests.conftest import make_lora, start_server, stop_server, tiny_settings

PROMPTS = ["the quick brown fox", "paris is the", "one two three", "select name from"]
NEW_TOKENS = 12
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Each differs from what a loader that ignored lora_alpha (or assumed alpha = 2r) would compute.
SCALING = {
    "alpha-3": dict(r=4, alpha=3, targets=("q_proj", "v_proj", "o_proj"), seed=31),  # scale 0.75, not 2
    "rslora-5": dict(r=8, alpha=5, use_rslora=True, targets=ALL_LINEAR, seed=32),  # 5/sqrt(8), not 16/sqrt(8)
    "patterns": dict(  # PEFT matches pattern keys against the module's full name, or any dotted suffix of it
        r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), seed=33,
        rank_pattern={"k_proj": 2, "model.layers.1.self_attn.q_proj": 8},
        alpha_pattern={"v_proj": 1, "model.layers.0.self_attn.o_proj": 32, "down_proj": 20},
    ),
}
_request_ids = itertools.count()


@pytest.fixture(scope="module")
def scaling_store(tiny_llama, llama_adapters, tmp_path_factory):
    import shutil

    store = tmp_path_factory.mktemp("scaling-store")
    for name in ("gen-a", "gen-b"):
        shutil.copytree(llama_adapters[name], store / name)
    for name, options in SCALING.items():
        make_lora(tiny_llama, store / name, weight_scale=3.0, **options)
    return store


@pytest.fixture(scope="module")
def scaling_server(tiny_llama, scaling_store, tmp_path_factory):
    running = start_server(tiny_settings(tiny_llama, scaling_store, tmp_path_factory.mktemp("scaling-srv")))
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def peft_all(tiny_llama, scaling_store):
    """One PeftModel holding every adapter of the store (PEFT's own mixed-batch reference)."""
    names = ["gen-a", "gen-b", *SCALING]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), scaling_store / names[0],
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(scaling_store / name, adapter_name=name)
    return model.eval()


def until_eos(ids: list[int], eos_id: int) -> list[int]:
    """What the engine emits: tokens up to and including the first EOS (PEFT pads after it)."""
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


def peft_generate(model, tokenizer, jobs: list[tuple[str, str | None]]) -> list[list[int]]:
    """PEFT's greedy ids for (prompt, adapter) jobs as ONE left-padded batch; None = the base."""
    tokenizer.padding_side = "left"
    batch = tokenizer([prompt for prompt, _ in jobs], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             adapter_names=[adapter or "__base__" for _, adapter in jobs])
    width = batch["input_ids"].shape[1]
    return [until_eos(row[width:].tolist(), tokenizer.eos_token_id) for row in out]


def peft_alone(model, tokenizer, prompt: str, adapter: str | None) -> list[int]:
    return peft_generate(model, tokenizer, [(prompt, adapter)])[0]


def engine_generate(server, jobs: list[tuple[str, str | None]]) -> tuple[list[list[int]], int]:
    """The engine's ids for every job, all added before one step; also the rows of that first step."""
    services = server.services
    engine = services.engine

    async def bindings():
        return [await services.registry.bind(adapter) if adapter else None for _, adapter in jobs]

    binds = asyncio.run(bindings())
    ids = [f"parity-{next(_request_ids)}" for _ in jobs]

    def run():
        for request_id, (prompt, _), binding in zip(ids, jobs, binds):
            prompt_ids = tuple(engine.tokenize(prompt, None))
            engine.add(GenerationRequest(request_id, prompt_ids, SamplingParams(max_new_tokens=NEW_TOKENS), binding))
        tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
        first_rows = None
        while engine.has_work():
            for event in engine.step():
                tokens[event.request_id].extend(event.token_ids)
            first_rows = engine.stats()["running"] if first_rows is None else first_rows
        return [tokens[request_id] for request_id in ids], first_rows

    return services.scheduler.call_blocking(run, timeout=60)


def served_text(client, prompt: str, adapter: str | None) -> dict:
    body = {"prompt": prompt, "max_new_tokens": NEW_TOKENS}
    if adapter:
        body["adapter"] = adapter
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# --- scaling: what the loader computes equals PEFT's own layers --------------------------------


@pytest.mark.parametrize("name", sorted(SCALING))
def test_loaded_ranks_and_scales_equal_peft_layers(name, scaling_store, scaling_server, peft_all):
    package = load_adapter_dir(scaling_store / name, name, scaling_server.services.engine.signature)
    layers = {path.removeprefix("base_model.model.model."): module for path, module in peft_all.named_modules()
              if isinstance(module, LoraLayer) and name in module.r}
    assert set(package.modules) == set(layers)
    for module, layer in layers.items():
        assert package.modules[module].rank == layer.r[name], module
        assert package.modules[module].scale == pytest.approx(layer.scaling[name], rel=1e-6), module
        torch.testing.assert_close(package.modules[module].a, layer.lora_A[name].weight, rtol=0, atol=0)
    alpha_2r = {module: (2 * layer.r[name]) / (layer.r[name] ** 0.5 if SCALING[name].get("use_rslora")
                                                else layer.r[name]) for module, layer in layers.items()}
    assert any(package.modules[m].scale != pytest.approx(s) for m, s in alpha_2r.items()), "must differ from 2r"


@pytest.mark.parametrize("name", sorted(SCALING))
def test_scaled_adapters_equal_peft_token_for_token(name, scaling_server, peft_all, tokenizer):
    jobs = [(prompt, name) for prompt in PROMPTS[:2]]
    ours, _ = engine_generate(scaling_server, jobs)
    references = [peft_alone(peft_all, tokenizer, prompt, name) for prompt, _ in jobs]
    assert ours == references
    assert references != [peft_alone(peft_all, tokenizer, prompt, None) for prompt, _ in jobs], \
        "the adapter must change the output"
    with scaling_server.client() as client:
        for (prompt, _), reference in zip(jobs, references):
            served = served_text(client, prompt, name)
            assert served["text"] == tokenizer.decode(reference, skip_special_tokens=True)
            assert served["adapter"]["name"] == name


# --- mixed batches --------------------------------------------------------------------------


def test_mixed_batch_of_different_lengths_equals_peft_mixed_batch(scaling_server, peft_all, tokenizer):
    """One step holds the base, five adapters (ranks 2-8, rsLoRA, patterns) and prompts of 1-9
    tokens; PEFT runs the same rows as one left-padded batch with adapter_names."""
    jobs = [("the quick brown fox jumps over the lazy dog", None), ("paris", "gen-a"),
            ("one two three four five six", "gen-b"), ("select name from users", "alpha-3"),
            ("i love", "rslora-5"), ("adapters change what a small model says", "patterns"),
            ("this is terrible", "gen-a")]
    lengths = {len(tokenizer(prompt)["input_ids"]) for prompt, _ in jobs}
    assert len(lengths) >= 5, lengths
    ours, first_rows = engine_generate(scaling_server, jobs)
    assert first_rows == len(jobs)
    # Padding changes float reduction order; on this tiny fp32 model the greedy margins are
    # far above that noise, so every token must match.
    assert ours == peft_generate(peft_all, tokenizer, jobs)
    assert ours == [peft_alone(peft_all, tokenizer, prompt, adapter) for prompt, adapter in jobs]


def test_generate_over_http_equals_peft(scaling_server, peft_all, tokenizer):
    with scaling_server.client() as client:
        for prompt in PROMPTS[:2]:
            for adapter in ("gen-a", "gen-b", None):
                reference = peft_alone(peft_all, tokenizer, prompt, adapter)
                result = served_text(client, prompt, adapter)
                assert result["text"] == tokenizer.decode(reference, skip_special_tokens=True), (prompt, adapter)


def test_mixed_concurrent_http_requests_return_each_requests_own_output(scaling_server, peft_all, tokenizer):
    jobs = [(p, a) for p in PROMPTS for a in (None, "gen-a", "gen-b", "patterns")]
    references = {job: tokenizer.decode(peft_alone(peft_all, tokenizer, *job), skip_special_tokens=True)
                  for job in jobs}
    with scaling_server.client() as client, concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: served_text(client, *job)["text"], jobs))
    mismatches = [(job, got) for job, got in zip(jobs, results) if got != references[job]]
    assert not mismatches


# --- classification ---------------------------------------------------------------------------


def test_classify_equals_peft_sequence_classification(llama_server, tiny_llama, llama_adapters):
    texts = ["i love this product", "this is terrible", "one two"]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=3)
    model = PeftModel.from_pretrained(model, llama_adapters["sentiment"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    with llama_server.client() as client:
        response = client.post("/v1/classify", json={"inputs": texts, "adapter": "sentiment"})
    assert response.status_code == 200, response.text
    labels = ["negative", "neutral", "positive"]
    for text, result in zip(texts, response.json()["results"]):
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
        probs = logits.softmax(-1)
        assert result["label"] == labels[int(probs.argmax())]
        for label, p in zip(labels, probs.tolist()):
            assert result["scores"][label] == pytest.approx(p, abs=1e-5)
