"""Building the default engine from settings."""

from __future__ import annotations

import torch

from server.config import Settings
from server.engine.base import load_base
from server.engine.engine import TorchEngine


def build_engine(settings: Settings) -> TorchEngine:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    base = load_base(settings.base_model, settings.cache_dir, settings.device, settings.dtype, settings.quantize)
    return TorchEngine(base, settings.max_batch_size, settings.max_prefill_tokens, settings.max_device_adapters)
