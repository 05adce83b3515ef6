"""Slot-pool LoRA over bitsandbytes base layers (nf4, int8) equals PEFT on the same quantized base.

bitsandbytes 0.50 runs both on x86 CPUs through its torch fallbacks, so this runs in CI; on
CUDA the same code path uses the fast kernels.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from adapters.validate import load_adapter_dir
from server.contract import AdapterBinding, GenerationRequest, SamplingParams
from server.engine.base import load_base
from server.engine.engine import TorchEngine


def run_engine(engine: TorchEngine, requests: list[GenerationRequest]) -> dict[str, str]:
    for request in requests:
        engine.add(request)
    texts: dict[str, str] = {}
    while engine.has_work():
        for event in engine.step():
            texts[event.request_id] = texts.get(event.request_id, "") + event.text
    return texts


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_base_with_adapter_matches_peft(tiny_llama, llama_adapters, tmp_path, quantization):
    base = load_base(str(tiny_llama), tmp_path, device="cpu", dtype="float32", quantize=quantization)
    assert base.quantization == quantization
    engine = TorchEngine(base, max_batch_size=4, max_prefill_tokens=512, max_device_adapters=2)
    package = load_adapter_dir(llama_adapters["gen-a"], "gen-a", base.signature)
    binding = AdapterBinding("gen-a", package.manifest.version, package.key, package)
    prompt = tuple(engine.tokenize("the quick brown", None))
    texts = run_engine(engine, [
        GenerationRequest("adapter", prompt, SamplingParams(max_new_tokens=8), binding),
        GenerationRequest("base", prompt, SamplingParams(max_new_tokens=8)),
    ])

    config = BitsAndBytesConfig(load_in_4bit=quantization == "nf4", load_in_8bit=quantization == "int8",
                                bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_threshold=0.0)  # the server's int8: no outlier decomposition
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    model = PeftModel.from_pretrained(model, llama_adapters["gen-a"]).eval()
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    reference = engine.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
    assert texts["adapter"] == reference
    assert texts["adapter"] != texts["base"]
