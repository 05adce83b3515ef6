"""Weight-only int8 on CPU: `--quantize int8` when the base runs on the CPU.

Every linear layer's weight (the vocabulary projection included) is stored as int8 with one
float32 scale per output channel (absmax / 127); activations stay float32 and the products
are summed in float32, so the only error is the weights' rounding. The embedding table is
the tied vocabulary projection's weight in most decoders, quantized the same way (one scale
per token row), and shares its int8 copy. That makes the base about a quarter of its float32
size (SmolLM2-135M: ~135 MB against ~540 MB).

Why weight-only: quantizing the activations too (int8 x int8 products, what fbgemm's and
oneDNN's dynamic linears do) was tried on the default base and changed its greedy answers
within a few tokens (max logit difference 10-23 per-tensor, 2-7 per-token), while int8
weights alone stay close to bf16 (max logit difference about 1-2).

The matmul is a numba loop over 4 x 4 tiles (4 tokens, 4 output channels): each weight row
is widened to float32 once per call and serves every token. A decode step reads a quarter of
the float32 weight bytes, which is what a memory-bound single stream gains from; at 32 rows
the arithmetic (float32 FMAs) is the limit, where float32 oneDNN is about as fast and bf16
AMX faster. torch's own weight-only kernel (aten._weight_int8pack_mm) was 2x slower than
float32 at 32 rows here.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Above this many rows a call widens the weight to float32 and uses a GEMM (measured on a
# [1536 x 576] layer, 2 threads: the loop 0.5 ms at 32 rows and 1.0 at 64, widening + GEMM
# 0.7 and 1.0; at 128 rows 1.6 against 1.1, at 512 6.8 against 3.4).
WIDEN_FROM_ROWS = 64


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [n, k] -> (int8 [n, k], float32 scale [n]) with weight ~= int8 * scale."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        # Not persistent: the engine never saves the base, and the int8 copy may be shared.
        self.register_buffer("qweight", qweight, persistent=False)  # [out, in] int8
        self.register_buffer("scale", scale, persistent=False)  # [out] float32
        self.register_buffer("bias", None if bias is None else bias.detach().float(), persistent=False)
        from server.engine.cpu_int8_kernel import matmul  # numba, loaded only where int8 layers exist

        self._matmul = matmul  # resolved once, not on each of a step's ~210 calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float().contiguous()  # [tokens, in]
        if rows.shape[0] > WIDEN_FROM_ROWS:
            # A prompt's many rows: the arithmetic dominates, and float32 GEMM does it faster
            # than the loop even after widening the whole weight for this one call.
            out = torch.nn.functional.linear(rows, self.qweight.float() * self.scale[:, None], self.bias)
            return out.view(*x.shape[:-1], self.out_features)
        out = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
        self._matmul(rows.numpy(), self.qweight.numpy(), self.scale.numpy(), out.numpy(), torch.get_num_threads())
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, padding_idx: int | None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qweight, persistent=False)  # [vocab, dim] int8
        self.register_buffer("scale", scale, persistent=False)  # [vocab] float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scale[ids].unsqueeze(-1)


@torch.no_grad()
def quantize_model(model: nn.Module) -> int:
    """Replace every nn.Linear and the input embedding of `model` in place; returns the
    number of bytes the quantized weights take."""
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # weight storage -> its int8 copy

    def quantized(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = weight.untyped_storage().data_ptr()
        if key not in shared:
            shared[key] = quantize_rows(weight)
        return shared[key]

    embeddings = model.get_input_embeddings()
    targets = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(*quantized(module.weight), module.bias))
    if isinstance(embeddings, nn.Embedding):
        model.set_input_embeddings(Int8Embedding(*quantized(embeddings.weight), embeddings.padding_idx))
    total = sum(q.numel() + s.numel() * 4 for q, s in shared.values())
    logger.info("int8 weights for %d linear layers%s: %.0f MB", len(targets),
                " and the embedding" if isinstance(embeddings, nn.Embedding) else "", total / 1e6)
    return total


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel before the first request needs it."""
    from server.engine.cpu_int8_kernel import warm_up as compile_kernel

    compile_kernel()
