"""The trainer on the machine it has: the device of its torchrun rank, the precision of that
device, and parameter counts that do not shrink when the base is stored in 4 bits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapters.bases import resolve_base
from trainer import models
from trainer.methods import trainable_parameters
from trainer.models import load_base_model, load_tokenizer, process_device


def test_an_nf4_base_counts_the_parameters_it_stands_for(tiny_llama):
    resolved = resolve_base(str(tiny_llama))
    tokenizer = load_tokenizer(resolved)
    plain = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())
    quantized = load_base_model(resolved, "generate", tokenizer, quantize="nf4")
    packed = sum(p.numel() for p in quantized.parameters())
    assert packed < plain  # numel() of the 4-bit weights counts packed bytes
    assert trainable_parameters(quantized)[1] == plain


def test_each_torchrun_rank_loads_the_base_onto_its_own_gpu(tiny_llama, monkeypatch):
    """bitsandbytes without a device map puts every rank's weights on GPU 0 (accelerate then
    refuses ranks >= 1): rank 1 must ask for cuda:1. Checked by what reaches from_pretrained,
    since no GPU runs here."""
    seen: dict = {}

    class Stop(Exception):
        pass

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    assert process_device() == torch.device("cuda", 1)
    with pytest.raises(Stop):
        load_base_model(resolve_base(str(tiny_llama)), "generate", None, quantize="nf4")
    assert seen["device_map"] == {"": 1}
    assert seen["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
