"""The CPU's other precisions against PEFT on the same precision.

int8 (weight-only): PEFT over the very weights the engine holds (each int8 row times its
scale, in float32) must give the same greedy tokens and logprobs within 5e-4: both sum
float32 products of the same numbers, only in another order (the measured worst, a prompt
of ~180 tokens, is 1.4e-4; a wrong scale or an unquantized layer is off by more than 0.05).

bf16: the engine's linears run through oneDNN's packed bf16 kernels and its attention in
float32, PEFT's bf16 model through ATen's; both round every linear output to bf16 (8 bits
of mantissa, a relative 2^-8 per value), in different places. The bound on the prompt's
logprobs is 0.15 nats, several times what the tiny model shows (about 0.03) and far below
what a wrong adapter or a wrong scale gives (more than 1); tokens are not compared, since
two near-tied logits may flip under any bf16 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.validate import load_adapter_dir
from server.contract import AdapterBinding, GenerationRequest, SamplingParams
from server.engine.base import load_base
from server.engine.cpu_int8 import WIDEN_FROM_ROWS, Int8Linear
from server.engine.engine import TorchEngine
from server.engine.numba_parallel import GATE
from server.engine.onednn import cpu_has_bf16

WORDS = "the quick brown fox jumps over the lazy dog while seven tired cats watch from an old wall"


def engine_for(tiny_llama, tmp_path, dtype: str, quantize: str) -> TorchEngine:
    base = load_base(str(tiny_llama), tmp_path, "cpu", dtype, quantize)
    return TorchEngine(base, max_batch_size=4, max_prefill_tokens=512, max_device_adapters=2)


def binding(engine: TorchEngine, folder, name: str) -> AdapterBinding:
    package = load_adapter_dir(folder, name, engine.signature)
    return AdapterBinding(name, package.manifest.version, package.key, package)


def served(engine: TorchEngine, adapter: AdapterBinding | None, prompt: tuple[int, ...]):
    engine.add(GenerationRequest("r", prompt, SamplingParams(max_new_tokens=8, prompt_logprobs=0), adapter))
    events = []
    while engine.has_work():
        events.extend(engine.step())
    tokens = [t for e in events for t in e.token_ids]
    return tokens, [lp.logprob for lp in events[0].prompt_logprobs[1:]]


def reference(model, prompt: tuple[int, ...]):
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    return out[0, len(prompt):].tolist(), [float(logprobs[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]


@pytest.mark.parametrize("adapter_name,repeat", [(None, 1), ("gen-b", 1), ("gen-b", 3)],
                         ids=["base", "adapter", "adapter-long-prompt"])
def test_int8_equals_peft_over_the_same_int8_weights(tiny_llama, llama_adapters, tmp_path, adapter_name, repeat):
    """A long prompt takes the other int8 path (more rows than WIDEN_FROM_ROWS)."""
    engine = engine_for(tiny_llama, tmp_path, "auto", "int8")
    assert engine.info.quantization == "int8" and isinstance(engine.layers["layers.0.mlp.up_proj"].base_layer,
                                                             Int8Linear)
    prompt = tuple(engine.tokenize(" ".join([WORDS] * repeat), None))
    assert (len(prompt) > WIDEN_FROM_ROWS) == (repeat > 1)
    adapter = binding(engine, llama_adapters[adapter_name], adapter_name) if adapter_name else None
    tokens, logprobs = served(engine, adapter, prompt)

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    # The engine's int8 layers, by the name PEFT's model gives the linear they replaced.
    quantized = {name.removesuffix(".base_layer"): m for name, m in engine.model.named_modules()
                 if isinstance(m, Int8Linear)}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert quantized.keys() == linears.keys()
    with torch.no_grad():
        for name, module in linears.items():
            module.weight.copy_(quantized[name].qweight.float() * quantized[name].scale[:, None])
        embedding = engine.model.get_input_embeddings()
        model.get_input_embeddings().weight.copy_(embedding.qweight.float() * embedding.scale[:, None])
    if adapter_name:
        model = PeftModel.from_pretrained(model, llama_adapters[adapter_name])
    expected_tokens, expected_logprobs = reference(model.eval(), prompt)
    assert tokens == expected_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, expected_logprobs)) < 5e-4


def test_int8_base_takes_a_quarter_of_float32(tiny_llama, tmp_path):
    def weight_bytes(engine: TorchEngine) -> int:
        tensors = {id(t): t for t in (*engine.model.parameters(), *engine.model.buffers())}  # shared once
        return sum(t.numel() * t.element_size() for t in tensors.values())

    full = weight_bytes(engine_for(tiny_llama, tmp_path, "float32", "none"))
    int8 = weight_bytes(engine_for(tiny_llama, tmp_path, "auto", "int8"))
    assert int8 <= 0.35 * full, (int8, full)


@pytest.mark.parametrize("dtype, quantize", [("float32", "none"), ("auto", "int8")])
def test_no_tensor_stays_a_view_of_the_mapped_checkpoint(tiny_llama, tmp_path, dtype, quantize):
    """A norm weight left pointing into the mmap-ed safetensors file keeps every page of the file
    resident (for SmolLM2 as much memory as the float32 base): the loader copies such tensors."""
    base = load_base(str(tiny_llama), tmp_path, "cpu", dtype, quantize)
    mapped = []
    for name, tensor in (*base.model.named_parameters(), *base.model.named_buffers()):
        try:
            if not tensor.untyped_storage().resizable():
                mapped.append(name)
        except NotImplementedError:  # oneDNN's packed weights are opaque and never mapped
            continue
    assert not mapped, mapped


@pytest.mark.skipif(not cpu_has_bf16(), reason="the CPU computes no bf16 natively")
@pytest.mark.parametrize("adapter_name", [None, "gen-b"])
def test_bf16_prompt_logprobs_within_bf16_rounding_of_peft_bf16(tiny_llama, llama_adapters, tmp_path, adapter_name):
    engine = engine_for(tiny_llama, tmp_path, "bfloat16", "none")
    prompt = tuple(engine.tokenize(WORDS, None))
    adapter = binding(engine, llama_adapters[adapter_name], adapter_name) if adapter_name else None
    _, logprobs = served(engine, adapter, prompt)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    if adapter_name:
        model = PeftModel.from_pretrained(model, llama_adapters[adapter_name])
    _, expected = reference(model.eval(), prompt)
    worst = max(abs(a - b) for a, b in zip(logprobs, expected))
    assert worst < 0.15, worst
    if adapter_name:  # the adapter is applied: the base alone is far off
        base_model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
        _, base_logprobs = reference(base_model, prompt)
        assert max(abs(a - b) for a, b in zip(logprobs, base_logprobs)) > 1.0


def test_int8_kernel_goes_serial_while_another_thread_is_in_a_parallel_driver(monkeypatch):
    """numba's workqueue layer must not be entered by two threads at once, whichever kernel
    each runs: with the process-wide gate held (another engine inside the LoRA kernel, say),
    the int8 matmul runs its serial driver, and both drivers give the same result."""
    from server.engine import cpu_int8_kernel

    cpu_int8_kernel.warm_up()
    generator = np.random.default_rng(0)
    x = generator.standard_normal((3, 40)).astype(np.float32)
    weight = generator.integers(-127, 128, (10, 40)).astype(np.int8)
    scale = generator.random(10).astype(np.float32)
    expected = (x.astype(np.float64) @ weight.T.astype(np.float64)) * scale
    parallel_calls = []
    parallel = cpu_int8_kernel._parallel
    monkeypatch.setattr(cpu_int8_kernel, "_parallel", lambda *args: (parallel_calls.append(1), parallel(*args)))
    monkeypatch.setattr(GATE, "wakeups_cheap", True)

    free = np.zeros((3, 10), np.float32)
    cpu_int8_kernel.matmul(x, weight, scale, free, threads=2)
    assert len(parallel_calls) == 1
    with GATE._lock:
        held = np.zeros((3, 10), np.float32)
        cpu_int8_kernel.matmul(x, weight, scale, held, threads=2)
    assert len(parallel_calls) == 1
    one_thread = np.zeros((3, 10), np.float32)
    cpu_int8_kernel.matmul(x, weight, scale, one_thread, threads=1)
    assert len(parallel_calls) == 1
    for out in (free, held, one_thread):
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
