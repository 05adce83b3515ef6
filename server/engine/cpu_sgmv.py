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

bfloat16 activations are read and written as their bits: the kernel widens each token's row
to float32 and rounds the sum back (what adding a float32 delta into a bf16 tensor gives, bit
for bit), which replaced three tensor ops per layer (widen, zero a float32 delta, add it) and
made a bf16 decode step of 32 rows over 8 adapters ~10 % faster (in-process A/B, alternating
steps: median 105 vs 116 ms; a single stream ~5 %).

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
def _shrink(rows, count, a, rank, hidden):
    """hidden[t, :rank] = rows[t] @ A^T for the block's `count` tokens (rows: 4 row arrays)."""
    if count == 4:
        for j in range(rank):
            hidden[0, j], hidden[1, j], hidden[2, j], hidden[3, j] = _dot4(rows[0], rows[1], rows[2], rows[3], a[j])
    else:  # a short block (often a lone decode row): no repeated work
        for t in range(count):
            for j in range(rank):
                hidden[t, j] = _dot(rows[t], a[j])

@numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, boundscheck=False, inline="always")
def _expand(hidden, t, bt, rank, target):
    """target += hidden[t, :rank] @ (scale * B^T)."""
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

@numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, boundscheck=False, inline="always")
def _add_segment(g, x, out, pool_a, pool_bt, ranks, segment_slots, segment_starts, segment_units, hidden):
    slot = segment_slots[g]
    rank = ranks[slot]
    if rank == 0:
        return
    a, bt = pool_a[slot], pool_bt[slot]
    first, last = segment_starts[g], segment_starts[g + 1]
    for block in range(first, last, 4):
        count = min(4, last - block)
        unit = segment_units[block : block + 4]
        rows = (x[unit[0]], x[unit[min(1, count - 1)]], x[unit[min(2, count - 1)]], x[unit[min(3, count - 1)]])
        _shrink(rows, count, a, rank, hidden)
        for t in range(count):
            _expand(hidden, t, bt, rank, out[unit[t]])

@numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, boundscheck=False, inline="always")
def _add_segment_bf16(g, x, out, pool_a, pool_bt, ranks, segment_slots, segment_starts, segment_units, hidden,
                      widened, delta):
    """_add_segment over bfloat16 rows (their bits, uint16): each token's row is widened to
    float32 once (a bf16 value is the high half of a float32), its delta summed in float32,
    and the output row rounded back to bf16 to nearest-even, as torch rounds: out = bf16(out
    + delta), what adding a float32 delta into a bf16 tensor gives, without the three tensor
    ops per layer (widen, zero a delta, add) that cost a bf16 step more than the kernel."""
    slot = segment_slots[g]
    rank = ranks[slot]
    if rank == 0:
        return
    a, bt = pool_a[slot], pool_bt[slot]
    widened_bits = widened.view(np.uint32)
    delta_bits = delta.view(np.uint32)
    first, last = segment_starts[g], segment_starts[g + 1]
    for block in range(first, last, 4):
        count = min(4, last - block)
        unit = segment_units[block : block + 4]
        for t in range(count):
            source = x[unit[t]]
            for k in range(source.shape[0]):
                widened_bits[t, k] = np.uint32(source[k]) << 16
        rows = (widened[0], widened[1], widened[2], widened[3])
        _shrink(rows, count, a, rank, hidden)
        for t in range(count):
            target = out[unit[t]]
            summed = delta[0]
            summed[:] = 0.0
            _expand(hidden, t, bt, rank, summed)
            output, output_bits = delta[1], delta_bits[1]
            for k in range(target.shape[0]):
                output_bits[k] = np.uint32(target[k]) << 16
            for k in range(target.shape[0]):
                output[k] += summed[k]
            for k in range(target.shape[0]):
                bits = output_bits[k]
                target[k] = np.uint16((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16)

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

@numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, boundscheck=False)
def _serial_bf16(x, out, pool_a, pool_bt, ranks, segment_slots, segment_starts, segment_units):
    hidden = np.empty((4, pool_a.shape[1]), dtype=np.float32)
    widened = np.zeros((4, x.shape[1]), dtype=np.float32)
    delta = np.empty((2, out.shape[1]), dtype=np.float32)
    for g in range(segment_slots.shape[0]):
        _add_segment_bf16(g, x, out, pool_a, pool_bt, ranks, segment_slots, segment_starts, segment_units, hidden,
                          widened, delta)

@numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, boundscheck=False, parallel=True)
def _parallel_bf16(x, out, pool_a, pool_bt, ranks, segment_slots, segment_starts, segment_units):
    for g in numba.prange(segment_slots.shape[0]):
        hidden = np.empty((4, pool_a.shape[1]), dtype=np.float32)
        widened = np.zeros((4, x.shape[1]), dtype=np.float32)
        delta = np.empty((2, out.shape[1]), dtype=np.float32)
        _add_segment_bf16(g, x, out, pool_a, pool_bt, ranks, segment_slots, segment_starts, segment_units, hidden,
                          widened, delta)


PARALLEL_FROM_SEGMENTS = 16


def warm_up(bf16: bool = False) -> None:
    """Compile (or load from numba's on-disk cache) the drivers for the engine's activations
    (float32, or `bf16`) now, so the first adapter request does not wait ~5 s for them (a pod
    with a fresh cache compiles at every start, so only the pair it runs), and let the gate
    see which threading layer numba picked."""
    pool = np.zeros((2, 1, 4), dtype=np.float32)
    ranks, starts, units = np.array([0, 1]), np.array([0, 1]), np.array([0])
    x = np.zeros((1, 4), dtype=np.uint16 if bf16 else np.float32)
    for driver in (_serial_bf16, _parallel_bf16) if bf16 else (_serial, _parallel):
        driver(x, x.copy(), pool, pool, ranks, np.array([1]), starts, units)
    GATE.calibrate()


def add_segment_lora(x, out, pool_a, pool_bt, ranks, segment_slots, segment_starts, segment_units,
                     threads: int) -> None:
    """out[u] += (x[u] @ A_s^T) @ (scale_s * B_s^T) for every unit u of every segment.

    x [units, in] and out [units, out] both float32, or both bfloat16 as their uint16 bits;
    pool_a [slots, r_cap, in]; pool_bt [slots, r_cap, out] holds scale * B^T (float32);
    ranks [slots] (0: the slot skips this layer). Segment g is slot segment_slots[g] over
    units segment_units[starts[g]:starts[g+1]]. `threads`: the most the engine may use
    (its torch thread count).
    """
    args = (x, out, pool_a, pool_bt, ranks, segment_slots, segment_starts, segment_units)
    many = segment_slots.shape[0] >= PARALLEL_FROM_SEGMENTS
    if x.dtype == np.uint16:
        GATE.run(_parallel_bf16, _serial_bf16, args, threads if many else 1, small_calls=True)
    else:
        GATE.run(_parallel, _serial, args, threads if many else 1, small_calls=True)
