"""Building the engine from settings: a VisionEngine for image classifiers, else the TorchEngine."""

from __future__ import annotations

import torch
from transformers import AutoConfig

from adapters.bases import is_image_classifier, resolve_base
from server.config import Settings
from server.contract import Engine
from server.engine.base import load_base
from server.engine.engine import TorchEngine, default_slot_count
from server.engine.vision import VisionEngine, load_vision_base


def build_engine(settings: Settings) -> Engine:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    resolved = resolve_base(settings.base_model, settings.cache_dir / "bases")
    if is_image_classifier(AutoConfig.from_pretrained(resolved.path)):
        vision = load_vision_base(settings.base_model, settings.cache_dir, settings.device, settings.dtype,
                                  settings.quantize)
        return VisionEngine(vision, settings.max_batch_size, settings.max_device_adapters or settings.max_batch_size,
                            device_budget_bytes=settings.device_cache_bytes)
    base = load_base(settings.base_model, settings.cache_dir, settings.device, settings.dtype, settings.quantize)
    slots = settings.max_device_adapters or default_slot_count(
        base, settings.max_batch_size, settings.device_adapter_memory_bytes)
    return TorchEngine(base, settings.max_batch_size, settings.max_prefill_tokens, slots,
                       prefix_cache_bytes=settings.prefix_cache_bytes, device_budget_bytes=settings.device_cache_bytes)
