"""Loading a base model and tokenizer for a task, optionally 4-bit (QLoRA) and with an adapter."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from adapters.bases import ResolvedBase
from trainer.features import ensure_pad_token

logger = logging.getLogger(__name__)


def load_tokenizer(base: ResolvedBase):
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    ensure_pad_token(tokenizer)
    return tokenizer


def process_device() -> torch.device:
    """This process's GPU when CUDA is there (under torchrun each rank has its own:
    LOCAL_RANK), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def load_base_model(base: ResolvedBase, task: str, tokenizer, labels: Sequence[str] | None = None, quantize: str = "none"):
    """The base as a causal LM, or as a sequence classifier with a fresh head over `labels`,
    on this process's device (so evaluation before and after training runs there too)."""
    device = process_device()
    kwargs: dict = {}
    if quantize == "nf4":
        kwargs["quantization_config"] = _nf4_config()
        if device.type == "cuda":
            # Without a device map bitsandbytes puts every rank's weights on GPU 0, and
            # accelerate refuses the model on ranks >= 1.
            kwargs["device_map"] = {"": device.index}
    if task == "classify":
        if not labels:
            raise ValueError("a classification model needs its label names")
        model = AutoModelForSequenceClassification.from_pretrained(
            base.path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            **kwargs,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(base.path, **kwargs)
    ensure_pad_token(tokenizer, model.config)
    if quantize != "nf4":
        model.to(device)
    if quantize == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return model


def _nf4_config():
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        logger.warning("--quantize nf4 without CUDA: bitsandbytes falls back to slow pure-torch kernels")
    compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_adapter(model, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
