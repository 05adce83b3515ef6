"""Fine-tuning methods: building the trainable model for each, and what the server can do with it.

LoRA and rsLoRA are batched by the server (many adapters in one batch). DoRA, IA3 and prompt
tuning are refused by its validator (PEFT cannot route them per row); last-N-layers produces
a partial copy of the base, not an adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from peft import IA3Config, LoraConfig, PromptTuningConfig, TaskType, get_peft_model

from trainer.config import TrainConfig

Serving = Literal["batched", "not-served"]


@dataclass(frozen=True)
class ServingSupport:
    level: Serving
    reason: str


SERVING_SUPPORT: dict[str, ServingSupport] = {
    "lora": ServingSupport("batched", "LoRA: hot-loaded into a slot and mixed with other adapters in one batch"),
    "rslora": ServingSupport("batched", "rsLoRA: same as LoRA with scale alpha/sqrt(r); batched"),
    "dora": ServingSupport("not-served", "DoRA: refused by the server (PEFT cannot batch it; no magnitude vector in the slot engine); merge it into the base offline to use it"),
    "ia3": ServingSupport("not-served", "IA3: refused by the server (PEFT ignores per-row adapter names for IA3)"),
    "prompt-tuning": ServingSupport("not-served", "prompt tuning: refused by the server (PEFT ignores per-row adapter names for it)"),
    "last-n-layers": ServingSupport("not-served", "last-N-layers: a partial copy of the base, not an adapter; load it with transformers, one model per process"),
}


def serving_summary() -> str:
    batched = [m for m, s in SERVING_SUPPORT.items() if s.level == "batched"]
    refused = [m for m, s in SERVING_SUPPORT.items() if s.level == "not-served"]
    return f"server batches: {', '.join(batched)}; server cannot serve: {', '.join(refused)}"


def classification_head_name(model: torch.nn.Module) -> str:
    """The attribute holding the label head: `score` on Llama-family decoders, `classifier` on BERT."""
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has neither a 'score' nor a 'classifier' head")


def apply_method(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """Wrap or freeze `model` for `config.method`; returns the model to train."""
    classify = config.task == "classify"
    task_type = TaskType.SEQ_CLS if classify else TaskType.CAUSAL_LM
    # The randomly initialised head must be trained and saved with the adapter.
    modules_to_save = [classification_head_name(model)] if classify else None
    if config.method == "last-n-layers":
        return _unfreeze_last_layers(model, config.last_n_layers, modules_to_save or [])
    if config.method in ("lora", "rslora", "dora"):
        peft_config = LoraConfig(
            task_type=task_type,
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=config.target_modules,
            use_rslora=config.method == "rslora",
            use_dora=config.method == "dora",
            modules_to_save=modules_to_save,
        )
    elif config.method == "ia3":
        # PEFT's per-architecture defaults pick the attention and feed-forward modules.
        peft_config = IA3Config(task_type=task_type, modules_to_save=modules_to_save)
    elif config.method == "prompt-tuning":
        peft_config = PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=config.num_virtual_tokens, modules_to_save=modules_to_save
        )
    else:
        raise ValueError(f"unknown method {config.method!r}")
    return get_peft_model(model, peft_config)


def _unfreeze_last_layers(model: torch.nn.Module, n: int, extra_modules: list[str]) -> torch.nn.Module:
    layers = _transformer_layers(model)
    if not 0 < n <= len(layers):
        raise ValueError(f"last_n_layers must be between 1 and {len(layers)}, got {n}")
    for parameter in model.parameters():
        parameter.requires_grad = False
    for layer in layers[-n:]:
        for parameter in layer.parameters():
            parameter.requires_grad = True
    for name in extra_modules:
        for parameter in getattr(model, name).parameters():
            parameter.requires_grad = True
    return model


def _transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    # The longest ModuleList is the stack of transformer blocks in every HF architecture here
    # (Llama: model.layers, BERT: bert.encoder.layer).
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no layer stack to unfreeze")
    return max(lists, key=len)


def parameter_count(parameter: torch.nn.Parameter) -> int:
    """Elements of the weight it stands for: a bitsandbytes 4-bit parameter stores two
    values per byte (numel() counts the packed bytes); its quant_state keeps the real shape."""
    quant_state = getattr(parameter, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return math.prod(shape) if shape is not None else parameter.numel()


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    return trainable, total
