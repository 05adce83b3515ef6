"""Loading the one resident base model with the requested device, dtype and quantization."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from adapters.bases import resolve_base
from adapters.signature import BaseSignature
from server.engine import cpu_int8
from server.engine.lora import LINEAR_TYPES, linear_features
from server.engine.onednn import can_pack, pack_linears

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BaseModelError(RuntimeError):
    """The base model cannot be loaded as asked (bad name, quantization without support...)."""


@dataclass
class LoadedBase:
    model: PreTrainedModel  # *ForCausalLM for decoders, the bare encoder (with pooler) otherwise
    backbone: nn.Module  # the part LoRA adapters target
    tokenizer: PreTrainedTokenizerBase
    signature: BaseSignature
    device: torch.device
    dtype: torch.dtype
    quantization: str
    max_context: int


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise BaseModelError("--device cuda asked for, but torch sees no CUDA device")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def pick_quantization(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "nf4" if device.type == "cuda" else "none"
    return requested


def _is_decoder(config) -> bool:
    architectures = getattr(config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in architectures) or bool(getattr(config, "is_decoder", False))


def _head_layout(config) -> tuple[str, bool]:
    """Name and bias of the classifier a *ForSequenceClassification of this architecture has."""
    with torch.device("meta"):
        probe = AutoModelForSequenceClassification.from_config(config)
    for name in ("score", "classifier"):
        head = getattr(probe, name, None)
        if isinstance(head, nn.Linear):
            return name, head.bias is not None
    raise BaseModelError(f"{type(probe).__name__} has no single-linear classifier head; classify is not served")


def _detach_from_checkpoint_file(model: torch.nn.Module) -> None:
    """Copies the tensors that still point into the memory-mapped checkpoint into the process.

    transformers maps safetensors files and leaves tensors it did not convert (RMSNorm weights,
    a float32 embedding) as views of the mapping; while one of them lives, every page of the
    file read during loading stays resident: ~510 MB for SmolLM2, as much as the float32 base
    and four times the int8 one. A mapped storage is the one kind torch cannot resize.
    """
    for module in model.modules():
        for collection in (module._parameters, module._buffers):
            for name, tensor in collection.items():
                if tensor is None or tensor.device.type != "cpu":
                    continue
                try:
                    mapped = not tensor.untyped_storage().resizable()
                except NotImplementedError:  # oneDNN's packed weights: opaque, and our own copy
                    continue
                if mapped:
                    tensor.data = tensor.data.clone()


def load_base(
    base_model: str,
    cache_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "auto",
) -> LoadedBase:
    resolved = resolve_base(base_model, cache_dir / "bases")
    torch_device = pick_device(device)
    quantization = pick_quantization(quantize, torch_device)
    torch_dtype = pick_dtype(dtype, torch_device)
    if quantization == "int8" and torch_device.type == "cuda" and dtype == "auto":
        # bitsandbytes quantizes int8 activations from float16: any other compute dtype is
        # cast on every call (and logged as a warning each time).
        torch_dtype = torch.float16

    config = AutoConfig.from_pretrained(resolved.path)
    decoder = _is_decoder(config)
    # bitsandbytes quantizes on CUDA; on the CPU int8 is adaptserve's own weight-only
    # layers over a float32 model (bitsandbytes' CPU fallbacks are pure torch and slow).
    own_int8 = quantization == "int8" and torch_device.type == "cpu"
    if own_int8:
        torch_dtype = torch.float32
    kwargs: dict = {"dtype": torch_dtype}
    if quantization != "none" and not own_int8:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "nf4",
            load_in_8bit=quantization == "int8",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch_dtype,
            # No outlier decomposition: LLM.int8()'s default threshold (6.0) finds outlier
            # columns with a device->host sync in every linear layer (210-420 per decode
            # step here). Threshold 0 keeps int8 weights and activations throughout.
            llm_int8_threshold=0.0,
        )
        kwargs["device_map"] = {"": torch_device.index or 0} if torch_device.type == "cuda" else {"": "cpu"}
    model_class = AutoModelForCausalLM if decoder else AutoModel
    model = model_class.from_pretrained(resolved.path, **kwargs)
    if quantization == "none":
        model.to(torch_device)
    if own_int8:
        cpu_int8.warm_up()
        cpu_int8.quantize_model(model)
    model.eval()
    model.requires_grad_(False)

    backbone = model.get_submodule(model.base_model_prefix) if decoder else model
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    head_module, head_bias = _head_layout(config)
    shapes = {
        name: linear_features(module)
        for name, module in backbone.named_modules()
        if isinstance(module, LINEAR_TYPES)
    }
    signature = BaseSignature(
        canonical_id=resolved.canonical_id,
        kind="decoder" if decoder else "encoder",
        backbone_prefix=model.base_model_prefix,
        hidden_size=int(config.hidden_size),
        linear_shapes=shapes,
        head_module=head_module,
        head_has_bias=head_bias,
    )
    max_context = int(
        getattr(config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 2048)
    )
    if can_pack(torch_device, torch_dtype, quantization):
        pack_linears(model)
    if torch_device.type == "cpu":
        _detach_from_checkpoint_file(model)
    logger.info(
        "base %s loaded: %s, %s, quantization=%s, %d adaptable linear layers",
        resolved.canonical_id, torch_device, torch_dtype, quantization, len(shapes),
    )
    return LoadedBase(model, backbone, tokenizer, signature, torch_device, torch_dtype, quantization, max_context)
