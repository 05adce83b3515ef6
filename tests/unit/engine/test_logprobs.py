"""Log-probabilities from the engine equal PEFT's log-softmax for the same prompt and adapter
(fp32, atol 1e-4): the prompt's tokens, the chosen ones and the top-k, in a mixed batch
where other rows ask for none, and a prompt scored without generating anything."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.validate import load_adapter_dir
from server.contract import AdapterBinding, GenerationRequest, SamplingParams
from server.engine.base import load_base
from server.engine.engine import TorchEngine

ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_llama, tmp_path_factory) -> TorchEngine:
    base = load_base(str(tiny_llama), tmp_path_factory.mktemp("cache"), "cpu", "float32", "none")
    return TorchEngine(base, max_batch_size=8, max_prefill_tokens=512, max_device_adapters=4,
                       prefix_cache_bytes=16 * 1024**2)


@pytest.fixture(scope="module")
def adapter(engine, llama_adapters) -> AdapterBinding:
    package = load_adapter_dir(llama_adapters["gen-b"], "gen-b", engine.signature)
    return AdapterBinding("gen-b", package.manifest.version, package.key, package)


@pytest.fixture(scope="module")
def references(tiny_llama, llama_adapters):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                     llama_adapters["gen-b"]).eval()
    return {None: base, "gen-b": peft}


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row i = log p(. | ids[: i + 1])."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def run(engine: TorchEngine, requests: list[GenerationRequest]) -> dict[str, list]:
    for request in requests:
        engine.add(request)
    events: dict[str, list] = {}
    while engine.has_work():
        for event in engine.step():
            assert event.error is None, event.error
            events.setdefault(event.request_id, []).append(event)
    return events


def check(found, expected_row: torch.Tensor, token: int, k: int) -> None:
    assert found.token_id == token
    assert abs(found.logprob - float(expected_row[token])) < ATOL
    values, ids = expected_row.topk(k)
    assert [i for i, _ in found.top] == ids.tolist()
    assert all(abs(v - float(e)) < ATOL for (_, v), e in zip(found.top, values))


def test_prompt_and_generated_logprobs_equal_peft_in_a_mixed_batch(engine, adapter, references):
    words = "the quick brown fox jumps over the lazy dog while seven tired cats watch"
    prompt = tuple(engine.tokenize(words, None))
    scored = SamplingParams(max_new_tokens=6, logprobs=3, prompt_logprobs=2)
    events = run(engine, [
        GenerationRequest("plain", prompt, SamplingParams(max_new_tokens=6)),  # asks for nothing
        GenerationRequest("base", prompt, scored),
        GenerationRequest("adapter", prompt, scored, adapter),
        GenerationRequest("sampled", prompt, SamplingParams(max_new_tokens=6, temperature=1.0, seed=5, logprobs=0),
                          adapter),
    ])
    assert all(e.logprobs == () and e.prompt_logprobs is None for e in events["plain"])
    for rid, name in (("base", None), ("adapter", "gen-b"), ("sampled", "gen-b")):
        generated = [t for e in events[rid] for t in e.token_ids]
        expected = reference_logprobs(references[name], list(prompt) + generated)
        logprobs = [lp for e in events[rid] for lp in e.logprobs]
        assert len(logprobs) == len(generated)
        k = 0 if rid == "sampled" else 3
        for step, (found, token) in enumerate(zip(logprobs, generated)):
            check(found, expected[len(prompt) - 1 + step], token, k)
        if rid != "sampled":
            prompt_logprobs = events[rid][0].prompt_logprobs
            assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
            for position in range(1, len(prompt)):
                check(prompt_logprobs[position], expected[position - 1], prompt[position], 2)


def test_a_prompt_is_scored_without_generating(engine, adapter, references):
    """max_tokens 0 with echo (lm-evaluation-harness's loglikelihood): one event, no token."""
    prompt = tuple(engine.tokenize("one two three four five six", None))
    events = run(engine, [GenerationRequest("score", prompt, SamplingParams(max_new_tokens=0, prompt_logprobs=1),
                                            adapter)])
    [event] = events["score"]
    assert event.token_ids == () and event.finish_reason == "length" and event.completion_tokens == 0
    expected = reference_logprobs(references["gen-b"], list(prompt))
    for position in range(1, len(prompt)):
        check(event.prompt_logprobs[position], expected[position - 1], prompt[position], 1)
    assert not engine.has_work() and engine.stats()["running"] == 0


def test_prompt_logprobs_are_computed_even_when_the_prefix_is_cached(engine, references):
    words = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)
    prompt = tuple(engine.tokenize(words, None))
    assert len(prompt) > 32
    run(engine, [GenerationRequest("warm", prompt, SamplingParams(max_new_tokens=1))])
    events = run(engine, [GenerationRequest("scored", prompt, SamplingParams(max_new_tokens=1, prompt_logprobs=0))])
    assert events["scored"][0].cached_tokens == 0
    expected = reference_logprobs(references[None], list(prompt))
    for position in range(1, len(prompt)):
        check(events["scored"][0].prompt_logprobs[position], expected[position - 1], prompt[position], 0)
