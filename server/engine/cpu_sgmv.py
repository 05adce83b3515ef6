"""A packed step's LoRA on CPU as one compiled loop per layer (numba), over float32 pools.

This is Punica's SGMV kernel (segmented gather matrix-vector) written for a CPU: for each
adapter in the step, read its A and B once, at its own rank, and apply them in place to
that adapter's tokens wherever they sit in the packed batch (a group of decode rows, or a
prompt's consecutive tokens). One call per layer replaces torch's gather, two padded
batched matmuls, a padding drop and a scatter-add for the decode rows plus two matmuls
per prompt, and needs no stacked copy of the active adapters.

Measured on the 2-core CPUs this runs on (SmolLM2-135M, 32 decode rows, adapters of rank
8 and 16 on all seven projections, the LoRA of all 210 layers of one step): 8 adapters
28 ms with torch ops -> 12.5 ms; one adapter 14 -> 4.3 ms; 32 adapters 62 -> ~33 ms. What
remains is reading the adapters (at 8 adapters ~117 MB per step in float32, a fifth of
the base model's bytes) and, for one adapter, the arithmetic.

Segments run one after another on the calling thread, except from PARALLEL_FROM_SEGMENTS
distinct adapters on, where numba_parallel's gate allows it: there a step reads so many
adapter bytes that both cores' memory bandwidth pays for the second thread (decode step at
32 adapters: 141 -> 124 ms). At 8 adapters it made no difference, and each parallel call is
a wake-up that other work on the machine (the event loop, clients) can delay, so fewer
adapters stay serial.

Used only where it applies (CPU, float32 or bfloat16 activations, contiguous rows); the
torch band in lora.py covers everything else (CUDA, classify batches).
"""

from __future__ import annotations

import numba
import numpy as np

from server.engine.numba_parallel import GATE

# Vectorised reductions need reassociation and FMA contraction; NaN/Inf semantics are kept.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


@numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, boundscheck=False, inline="always")
def _dot4(x0, x1, x2, x3, a_row):
    """Four tokens against one row of A: the row is loaded once for all four."""
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for k in range(a_row.shape[0]):
        a = a_row[k]
        s0 += x0[k] * a
        s1 += x1[k] * a
        s2 += x2[k] * a
        s3 += x3[k] * a
    return s0, s1, s2, s3

@numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, boundscheck=False, inline="always")
def _dot(x, a_row):
    s = np.float32(0.0)
    for k in range(a_row.shape[0]):
        s += x[k] * a_row[k]
    return s

@numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, boundscheck=False, inline="always")
def _add_segment(g, x, out, pool_a, pool_bt, ranks, segment_slots, segment_starts, segment_units, hidden):
    slot = segment_slots[g]
    rank = ranks[slot]
    if rank == 0:
        return
    a = pool_a[slot]
    bt = pool_bt[slot]
    first, last = segment_starts[g], segment_starts[g + 1]
    for block in range(first, last, 4):
        count = min(4, last - block)
        if count == 4:
            x0, x1 = x[segment_units[block]], x[segment_units[block + 1]]
            x2, x3 = x[segment_units[block + 2]], x[segment_units[block + 3]]
            for j in range(rank):
                hidden[0, j], hidden[1, j], hidden[2, j], hidden[3, j] = _dot4(x0, x1, x2, x3, a[j])
        else:  # a short block (often a lone decode row): no repeated work
            for t in range(count):
                xt = x[segment_units[block + t]]
                for j in range(rank):
                    hidden[t, j] = _dot(xt, a[j])
        for t in range(count):
            target = out[segment_units[block + t]]
            j = 0
            while j + 4 <= rank:  # four rows of B^T per pass over the output row
                h0, h1, h2, h3 = hidden[t, j], hidden[t, j + 1], hidden[t, j + 2], hidden[t, j + 3]
                b0, b1, b2, b3 = bt[j], bt[j + 1], bt[j + 2], bt[j + 3]
                for k in range(target.shape[0]):
                    target[k] += h0 * b0[k] + h1 * b1[k] + h2 * b2[k] + h3 * b3[k]
                j += 4
            while j < rank:
                h, b = hidden[t, j], bt[j]
                for k in range(target.shape[0]):
                    target[k] += h * b[k]
                j += 1

@numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, boundscheck=False)
def _serial(x, out, pool_a, pool_bt, ranks, segment_slots, segment_starts, segment_units):
    hidden = np.empty((4, pool_a.shape[1]), dtype=np.float32)
    for g in range(segment_slots.shape[0]):
        _add_segment(g, x, out, pool_a, pool_bt, ranks, segment_slots, segment_starts, segment_units, hidden)

@numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, boundscheck=False, parallel=True)
def _parallel(x, out, pool_a, pool_bt, ranks, segment_slots, segment_starts, segment_units):
    for g in numba.prange(segment_slots.shape[0]):  # segments write disjoint rows
        hidden = np.empty((4, pool_a.shape[1]), dtype=np.float32)
        _add_segment(g, x, out, pool_a, pool_bt, ranks, segment_slots, segment_starts, segment_units, hidden)


PARALLEL_FROM_SEGMENTS = 16


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) both drivers now, so the first adapter
    request does not wait ~3 s for it, and let the gate see which threading layer numba picked."""
    x = np.zeros((1, 4), dtype=np.float32)
    pool = np.zeros((2, 1, 4), dtype=np.float32)
    ranks, starts, units = np.array([0, 1]), np.array([0, 1]), np.array([0])
    _serial(x, x.copy(), pool, pool, ranks, np.array([1]), starts, units)
    _parallel(x, x.copy(), pool, pool, ranks, np.array([1]), starts, units)
    GATE.calibrate()


def add_segment_lora(x, out, pool_a, pool_bt, ranks, segment_slots, segment_starts, segment_units,
                     threads: int) -> None:
    """out[u] += (x[u] @ A_s^T) @ (scale_s * B_s^T) for every unit u of every segment.

    x [units, in] and out [units, out] float32; pool_a [slots, r_cap, in]; pool_bt
    [slots, r_cap, out] holds scale * B^T; ranks [slots] (0: the slot skips this layer).
    Segment g is slot segment_slots[g] over units segment_units[starts[g]:starts[g+1]].
    `threads`: the most the engine may use (its torch thread count).
    """
    args = (x, out, pool_a, pool_bt, ranks, segment_slots, segment_starts, segment_units)
    many = segment_slots.shape[0] >= PARALLEL_FROM_SEGMENTS
    GATE.run(_parallel, _serial, args, threads if many else 1)
