"""CPU thread policy for engine forwards: heavy ops on every thread, the many small ones on one.

A decoder layer runs a few heavy ops (its matmuls, attention) and many small ones (norms,
rotary, activations, residual adds, the LoRA of each projection, tens of
microseconds each). Every op run on two threads is an OpenMP region whose end waits for
both, and while serving, the event loop and other processes keep the other core busy part
of the time, so those waits add up. Measured with the real server on 2 cores (C=32, 64 new
tokens, SmolLM2-135M): with every op on 2 threads, one LoRA adapter ran at 93 tok/s
against 195 for the base; with small ops on one thread and heavy ones on two, 186 against
241. On CUDA the policy is not installed (kernels are asynchronous).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class ThreadPolicy:
    def __init__(self, heavy_threads: int):
        self.heavy_threads = heavy_threads
        self.enabled = heavy_threads > 1

    @contextlib.contextmanager
    def heavy(self) -> Iterator[None]:
        """Around a big matmul or attention inside a layer: every thread, then back to one."""
        if not self.enabled:
            yield
            return
        torch.set_num_threads(self.heavy_threads)
        try:
            yield
        finally:
            torch.set_num_threads(1)

    def install(self, layers: nn.ModuleList) -> None:
        """Inside each of `layers` the default is one thread; outside (embeddings, lm_head) all."""
        if not self.enabled:
            return

        def enter(module: nn.Module, args: object) -> None:
            torch.set_num_threads(1)

        def leave(module: nn.Module, args: object, output: object) -> None:
            torch.set_num_threads(self.heavy_threads)

        for layer in layers:
            layer.register_forward_pre_hook(enter)
            layer.register_forward_hook(leave)


def block_list(backbone: nn.Module) -> nn.ModuleList | None:
    """The backbone's stack of transformer blocks: its longest ModuleList."""
    lists = [m for m in backbone.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len, default=None)
