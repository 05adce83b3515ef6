"""Host -> device copies of a step's small arrays, batched into one transfer.

A decode step needs a handful of short index arrays on the device (input ids, positions,
which logits to keep, each row's first KV column, the sampling rows' parameters). Built one
by one with `torch.tensor(values, device=cuda)`, each is a blocking copy from pageable memory;
here they are written into one host buffer of 64-bit words and sent with ONE copy, from
pinned memory and non-blocking on CUDA (the caching host allocator keeps the pinned block
alive until the copy is done). On CPU the "copy" is the host tensor itself.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class StepBuffer:
    """Collect arrays with `longs`/`floats`, then `send` once; handles index the results."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._kinds: list[str] = []

    def longs(self, values: Sequence[int]) -> int:
        self._parts.append(np.asarray(values, dtype=np.int64).reshape(-1))
        self._kinds.append("long")
        return len(self._parts) - 1

    def floats(self, values: Sequence[float]) -> int:
        # float64 bit patterns share the int64 buffer; viewed back as floats on the device.
        self._parts.append(np.asarray(values, dtype=np.float64).reshape(-1).view(np.int64))
        self._kinds.append("float")
        return len(self._parts) - 1

    def send(self, device: torch.device) -> list[torch.Tensor]:
        """One transfer; returns one tensor per handle (int64, or float32 for `floats`)."""
        host = torch.from_numpy(np.concatenate(self._parts) if self._parts else np.zeros(0, np.int64))
        if device.type == "cuda":
            on_device = host.pin_memory().to(device, non_blocking=True)
        else:
            on_device = host.to(device)
        tensors, offset = [], 0
        for part, kind in zip(self._parts, self._kinds):
            view = on_device[offset : offset + len(part)]
            tensors.append(view.view(torch.float64).float() if kind == "float" else view)
            offset += len(part)
        return tensors


def send_longs(device: torch.device, *arrays: Sequence[int]) -> list[torch.Tensor]:
    """Several index arrays in one transfer."""
    buffer = StepBuffer()
    for values in arrays:
        buffer.longs(values)
    return buffer.send(device)
