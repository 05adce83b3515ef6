"""adapters.merge on real adapters: cat is exact (== PEFT's cat == base + both deltas); the svd
family works on delta-W and reports its relative error; every method yields a PEFT folder that
validates and serves. Each method's values against its definition: test_merge_definitions.py.

Relative errors are printed (run with -s) so the figures in the report can be reproduced.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.merge import (
    MergeError,
    MergeSource,
    MergeSpec,
    delta_weight,
    exact_delta,
    merge_adapters,
    recipe_for,
    recipe_key,
    write_peft_dir,
)
from adapters.validate import load_adapter_dir
from server.contract import AdapterBinding, GenerationRequest, SamplingParams
from server.engine.base import load_base
from server.engine.engine import TorchEngine
from server.engine.lora import LoRABatchPlan
from tests.conftest import make_lora

WEIGHTS = (0.6, 0.9)
PROMPT = "the quick brown fox jumps"
# fp32 throughout; the three computations differ only in summation order (B@A@x vs (W+dW)@x).
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_llama, tmp_path_factory) -> TorchEngine:
    base = load_base(str(tiny_llama), tmp_path_factory.mktemp("cache"), "cpu", "float32", "none")
    return TorchEngine(base, max_batch_size=4, max_prefill_tokens=512, max_device_adapters=8)


@pytest.fixture(scope="module")
def sources(engine, llama_adapters) -> list[MergeSource]:
    """gen-a: r=4 on q/v; gen-b: r=8 rsLoRA on all 7 kinds: different ranks, scales and targets."""
    packages = [load_adapter_dir(llama_adapters[n], n, engine.signature) for n in ("gen-a", "gen-b")]
    return [MergeSource(p, w) for p, w in zip(packages, WEIGHTS)]


def bind(package) -> AdapterBinding:
    return AdapterBinding(package.manifest.name, package.manifest.version, package.key, package)


def served_logits(engine: TorchEngine, package, text: str = PROMPT) -> torch.Tensor:
    slot = engine.load_adapter(bind(package))
    ids = torch.tensor([engine.tokenize(text, None)])
    engine.context.plan = LoRABatchPlan.for_rows([slot], engine.context.positions, engine.device)
    try:
        with torch.inference_mode():  # as the engine runs it
            return engine.model(input_ids=ids).logits[0]
    finally:
        engine.context.plan = None


def served_text(engine: TorchEngine, package, text: str = PROMPT) -> list[int]:
    request = GenerationRequest(f"merge-{package.key[:8]}", tuple(engine.tokenize(text, None)),
                                SamplingParams(max_new_tokens=8), bind(package))
    engine.add(request)
    tokens: list[int] = []
    while engine.has_work():
        for event in engine.step():
            tokens.extend(event.token_ids)
    return tokens


def plain_logits(model, engine: TorchEngine, text: str = PROMPT) -> torch.Tensor:
    ids = torch.tensor([engine.tokenize(text, None)])
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_cat_equals_peft_cat_and_base_plus_both_deltas(engine, sources, tiny_llama, llama_adapters, tmp_path):
    merged = merge_adapters("mix", sources, MergeSpec("cat")).package
    assert merged.manifest.rank == 4 + 8
    ours = served_logits(engine, merged)

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), llama_adapters["gen-a"],
                                          adapter_name="a")
    reference.load_adapter(llama_adapters["gen-b"], adapter_name="b")
    reference.add_weighted_adapter(["a", "b"], list(WEIGHTS), "m", combination_type="cat")
    reference.set_adapter("m")
    peft_cat = plain_logits(reference.eval(), engine)

    # The definition: the base's own weights with w_1 dW_1 + w_2 dW_2 added in place.
    summed = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        for name, delta in exact_delta(sources).items():
            summed.model.get_submodule(name).weight += delta
    base_plus_deltas = plain_logits(summed, engine)

    base_only = plain_logits(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), engine)
    print(f"\ncat: rel. logit diff vs PEFT cat {relative(ours, peft_cat):.2e}, "
          f"vs base+deltas {relative(ours, base_plus_deltas):.2e}, max abs {float((ours - peft_cat).abs().max()):.2e}")
    assert relative(base_only, base_plus_deltas) > 0.05, "the deltas must matter for this test to mean anything"
    torch.testing.assert_close(ours, peft_cat, rtol=0, atol=LOGIT_TOLERANCE)
    torch.testing.assert_close(ours, base_plus_deltas, rtol=0, atol=LOGIT_TOLERANCE)

    # Written as a PEFT folder it validates to the same tensors, and PEFT itself reads it the same.
    write_peft_dir(merged, tmp_path / "mix", engine.signature)
    loaded = load_adapter_dir(tmp_path / "mix", "mix", engine.signature)
    assert loaded.manifest.extra["merge"]["method"] == "cat"
    for name, module in merged.modules.items():
        torch.testing.assert_close(delta_weight(loaded.modules[name]), delta_weight(module), rtol=0, atol=1e-6)
    from_folder = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "mix")
    torch.testing.assert_close(plain_logits(from_folder.eval(), engine), peft_cat, rtol=0, atol=LOGIT_TOLERANCE)


def test_cat_error_is_zero_and_svd_at_full_rank_is_within_float_tolerance(sources):
    assert merge_adapters("m", sources, MergeSpec("cat")).relative_error < 1e-6
    full = merge_adapters("m", sources, MergeSpec("svd", rank=12))
    linear = merge_adapters("m", sources, MergeSpec("linear"))  # default rank = sum r_i
    truncated = merge_adapters("m", sources, MergeSpec("svd"))  # default rank = max r_i
    print(f"\nsvd rank 12 (full): {full.relative_error:.2e}; linear (default, rank 12): "
          f"{linear.relative_error:.2e}; svd rank 8 (default): {truncated.relative_error:.3f}")
    assert full.relative_error < 1e-5 and linear.relative_error < 1e-5
    assert truncated.package.manifest.rank == 8 and 0 < truncated.relative_error < 1


@pytest.mark.parametrize("method", ["svd", "ties", "dare_linear", "dare_ties"])
def test_approximate_methods_give_adapters_that_validate_and_serve(method, engine, sources, tmp_path):
    result = merge_adapters(f"m-{method}", sources, MergeSpec(method, density=None, rank=None))
    print(f"\n{method}: relative error of delta-W vs the exact weighted sum = {result.relative_error:.3f} "
          f"(rank {result.package.manifest.rank})")
    write_peft_dir(result.package, tmp_path / method, engine.signature)
    loaded = load_adapter_dir(tmp_path / method, f"m-{method}", engine.signature)
    assert loaded.manifest.extra["merge"]["method"] == method
    # Values are checked against each method's definition in test_merge_definitions.py; here
    # the folder must mean the same delta-W as the merge it was written from.
    for name, module in result.package.modules.items():
        torch.testing.assert_close(delta_weight(loaded.modules[name]), delta_weight(module), rtol=0, atol=1e-6)
    tokens = served_text(engine, loaded)
    assert len(tokens) == 8
    engine.evict_adapter(loaded.key)


def test_density_one_ties_and_dare_equal_the_linear_sum(sources):
    # With nothing trimmed and signs agreeing (one source), ties reduces to the weighted delta.
    single = [sources[1]]
    for method in ("ties", "dare_linear"):
        result = merge_adapters("m", single, MergeSpec(method, density=1.0, rank=8))
        assert result.relative_error < 1e-5, method


def test_dare_is_seeded(sources):
    first = merge_adapters("m", sources, MergeSpec("dare_ties", density=0.3, seed=7)).package
    again = merge_adapters("m", sources, MergeSpec("dare_ties", density=0.3, seed=7)).package
    other = merge_adapters("m", sources, MergeSpec("dare_ties", density=0.3, seed=8)).package
    name = "layers.0.self_attn.q_proj"
    assert first.key == again.key
    torch.testing.assert_close(first.modules[name].a, again.modules[name].a)
    assert first.key != other.key and not torch.equal(first.modules[name].a, other.modules[name].a)


def test_recipe_key_changes_with_a_new_source_version(sources):
    key = recipe_key(recipe_for(sources, MergeSpec("cat")))
    newer = dataclasses.replace(sources[0].package.manifest, sha256="f" * 64, version="f" * 12)
    changed = [MergeSource(dataclasses.replace(sources[0].package, manifest=newer), WEIGHTS[0]), sources[1]]
    assert recipe_key(recipe_for(changed, MergeSpec("cat"))) != key
    assert recipe_key(recipe_for(sources, MergeSpec("cat"))) == key
    assert recipe_key(recipe_for(sources, MergeSpec("svd", rank=4))) != key


def test_classifier_heads_merge_only_when_labels_agree(engine, tiny_llama, tmp_path):
    labels = ["negative", "neutral", "positive"]
    one = load_adapter_dir(make_lora(tiny_llama, tmp_path / "c1", task="SEQ_CLS", r=4, seed=11, labels=labels),
                           "c1", engine.signature)
    two = load_adapter_dir(make_lora(tiny_llama, tmp_path / "c2", task="SEQ_CLS", r=2, seed=12, labels=labels),
                           "c2", engine.signature)
    result = merge_adapters("cmix", [MergeSource(one, 3.0), MergeSource(two, 1.0)], MergeSpec("cat"))
    head = result.package.head
    torch.testing.assert_close(head.weight, 0.75 * one.head.weight + 0.25 * two.head.weight)
    assert result.package.manifest.labels == tuple(labels) and result.package.manifest.task == "classify"
    write_peft_dir(result.package, tmp_path / "cmix", engine.signature)
    assert load_adapter_dir(tmp_path / "cmix", "cmix", engine.signature).manifest.labels == tuple(labels)

    other = load_adapter_dir(make_lora(tiny_llama, tmp_path / "c3", task="SEQ_CLS", r=4, seed=13,
                                       labels=["a", "b", "c"]), "c3", engine.signature)
    with pytest.raises(MergeError, match="heads disagree"):
        merge_adapters("bad", [MergeSource(one, 1.0), MergeSource(other, 1.0)], MergeSpec("cat"))


def test_bad_specs_and_mixed_tasks_are_refused(sources, engine, tiny_llama, tmp_path):
    with pytest.raises(MergeError, match="density"):
        merge_adapters("m", sources, MergeSpec("ties", density=0.0))
    with pytest.raises(MergeError, match="rank"):
        merge_adapters("m", sources, MergeSpec("cat", rank=4))
    classifier = load_adapter_dir(make_lora(tiny_llama, tmp_path / "c", task="SEQ_CLS", r=4, seed=3),
                                  "c", engine.signature)
    with pytest.raises(MergeError, match="mix generation and classification"):
        merge_adapters("m", [sources[0], MergeSource(classifier, 1.0)], MergeSpec("cat"))
