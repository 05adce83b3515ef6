"""Linear layers with their weights pre-packed for oneDNN, the CPU fast path (float32, bfloat16).

It is the kernel torch.compile's CPU backend (inductor) uses for frozen float32 linears,
called directly. Measured on the 2-core CPUs this project runs on, against ATen's default
sgemm (F.linear), for SmolLM2-135M's shapes: the [49152 x 576] lm_head at 32 rows 0.42x
the time, the MLP's [1536 x 576] at 32 rows 0.73x and at 88 rows 0.81x, the small
[192 x 576] k/v projections about the same. Decode steps are exactly these sizes.
The packed copy replaces the dense weight (a tied lm_head keeps its embedding), so memory
stays the same. Weights are frozen: the engine only ever runs inference.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

DECODE_ROWS_HINT = 32


class OneDNNLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Packed for a 32-row batch (the layout hint; any row count works). Not persistent:
        # a packed tensor has no dense storage to save.
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), DECODE_ROWS_HINT)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def can_pack(device: torch.device, dtype: torch.dtype, quantization: str) -> bool:
    """float32, and bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX), for
    which oneDNN's packed kernels are what make bf16 faster than float32 at all."""
    if dtype == torch.bfloat16 and not cpu_has_bf16():
        return False
    return (
        device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and quantization == "none"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def cpu_has_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cpu_features() -> str:
    """What the CPU offers the kernels that matter here (logged at start)."""
    names = {"AVX512-BF16": torch.cpu._is_avx512_bf16_supported, "AMX": torch.cpu._is_amx_tile_supported,
             "VNNI": torch.cpu._is_vnni_supported}
    found = [name for name, supported in names.items() if supported()]
    return f"{torch.backends.cpu.get_cpu_capability()}" + (f" + {', '.join(found)}" if found else "")


@torch.no_grad()
def pack_linears(model: nn.Module) -> int:
    """Replace every plain nn.Linear of `model` in place; returns how many were packed."""
    targets = [
        (name, module) for name, module in model.named_modules() if type(module) is nn.Linear
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, OneDNNLinear(module))
    logger.info("packed %d linear layers for oneDNN", len(targets))
    return len(targets)
