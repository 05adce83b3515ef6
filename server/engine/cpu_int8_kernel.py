"""The numba loop behind cpu_int8.Int8Linear (kept apart so numba is imported only where it runs).

Two drivers over the same 4-channel blocks: the parallel one where numba_parallel's gate
allows it, else the serial one (the same sums, so the same result).
"""

from __future__ import annotations

import numba
import numpy as np

from server.engine.numba_parallel import GATE

_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


@numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, boundscheck=False, inline="always")
def _block(block, x, w, scale, out):
    """Output channels 4 * block .. 4 * block + 3 of every row (blocks write disjoint columns)."""
    m_all, k_all = x.shape
    n_all = w.shape[0]
    n0 = block * 4
    width = min(4, n_all - n0)
    rows = np.zeros((4, k_all), np.float32)  # this block's weight rows, widened once
    for j in range(width):
        for k in range(k_all):
            rows[j, k] = w[n0 + j, k]
    m = 0
    while m + 4 <= m_all:
        a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
        a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0.0)
        for k in range(k_all):
            x0, x1, x2, x3 = x[m, k], x[m + 1, k], x[m + 2, k], x[m + 3, k]
            w0, w1, w2, w3 = rows[0, k], rows[1, k], rows[2, k], rows[3, k]
            a00 += x0 * w0
            a01 += x0 * w1
            a02 += x0 * w2
            a03 += x0 * w3
            a10 += x1 * w0
            a11 += x1 * w1
            a12 += x1 * w2
            a13 += x1 * w3
            a20 += x2 * w0
            a21 += x2 * w1
            a22 += x2 * w2
            a23 += x2 * w3
            a30 += x3 * w0
            a31 += x3 * w1
            a32 += x3 * w2
            a33 += x3 * w3
        tile = ((a00, a01, a02, a03), (a10, a11, a12, a13), (a20, a21, a22, a23), (a30, a31, a32, a33))
        for i in range(4):
            for j in range(width):
                out[m + i, n0 + j] = tile[i][j] * scale[n0 + j]
        m += 4
    while m < m_all:
        b0 = b1 = b2 = b3 = np.float32(0.0)
        for k in range(k_all):
            v = x[m, k]
            b0 += v * rows[0, k]
            b1 += v * rows[1, k]
            b2 += v * rows[2, k]
            b3 += v * rows[3, k]
        single = (b0, b1, b2, b3)
        for j in range(width):
            out[m, n0 + j] = single[j] * scale[n0 + j]
        m += 1


@numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, boundscheck=False)
def _serial(x, w, scale, out):
    """out [m, n] = (x [m, k] @ w [n, k]^T) * scale [n]; w int8, the rest float32."""
    for block in range((w.shape[0] + 3) // 4):
        _block(block, x, w, scale, out)


@numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, boundscheck=False, parallel=True)
def _parallel(x, w, scale, out):
    for block in numba.prange((w.shape[0] + 3) // 4):
        _block(block, x, w, scale, out)


def matmul(x: np.ndarray, w: np.ndarray, scale: np.ndarray, out: np.ndarray, threads: int) -> None:
    """out = (x @ w^T) * scale on up to `threads` threads (the engine's torch thread count)."""
    GATE.run(_parallel, _serial, (x, w, scale, out), threads)


def warm_up() -> None:
    x = np.zeros((5, 4), np.float32)
    for driver in (_serial, _parallel):
        driver(x, np.zeros((5, 4), np.int8), np.ones(5, np.float32), np.zeros((5, 5), np.float32))
    GATE.calibrate()
