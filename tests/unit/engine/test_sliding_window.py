"""Sliding-window attention (Mistral-style): the packed engine attends each query to the
last `sliding_window` keys, in decode rows and in prompts, with and without a prefix read
from the cache, exactly as transformers' own generate does."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from server.contract import GenerationRequest, SamplingParams
from server.engine.base import load_base
from server.engine.engine import TorchEngine
from tests.conftest import build_tiny_decoder

WINDOW = 8


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    return build_tiny_decoder(tmp_path_factory.mktemp("tiny-mistral"), MistralConfig, MistralForCausalLM,
                              sliding_window=WINDOW)


def test_sliding_window_attention_equals_transformers(tiny_mistral, tmp_path):
    prompt = tuple(range(5, 5 + 37))  # several windows long, two full prefix-cache blocks and more
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral, dtype=torch.float32)
    with torch.no_grad():
        expected = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    # The window must matter, or this test could not tell a missing window from a right one.
    model.config.sliding_window = None
    with torch.no_grad():
        unwindowed = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):]
    assert unwindowed.tolist() != expected

    base = load_base(str(tiny_mistral), tmp_path, "cpu", "float32", "none")
    engine = TorchEngine(base, max_batch_size=4, max_prefill_tokens=512, max_device_adapters=2,
                         prefix_cache_bytes=16 * 1024**2)
    for attempt in ("computed", "from the prefix cache"):
        engine.add(GenerationRequest(attempt, prompt, SamplingParams(max_new_tokens=16)))
        events = []
        while engine.has_work():
            events.extend(engine.step())
        assert [t for e in events for t in e.token_ids] == expected, attempt
        if attempt == "from the prefix cache":
            assert events[0].cached_tokens > 0
