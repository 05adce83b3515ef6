"""When a numba kernel may run its parallel driver instead of its serial one.

numba's parallel drivers share one threading layer per process. OpenMP (libgomp) and TBB
keep their threads waiting cheaply between calls; the fallback layer, workqueue (no libgomp
on the machine), wakes its threads for every call, which made a decode step slower than the
serial loop here (32 adapters: 167-185 vs 135-190 ms), and it must never be entered by two
threads at once (two engines in one process: tests, tools), whichever kernel each runs.
So every kernel goes through the one process-wide gate: the parallel driver only where the
caller may use more than one thread, no other thread is inside a parallel driver and, for a
kernel whose calls are small (the LoRA loop), the layer's wake-ups are cheap; otherwise the
serial driver, which gives the same result.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numba


class ParallelGate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.wakeups_cheap = False  # decided by calibrate(), once a parallel driver has run

    def calibrate(self) -> None:
        """Call after a parallel driver has run once: numba picks its layer on first use."""
        self.wakeups_cheap = numba.threading_layer() != "workqueue"

    def run(self, parallel: Callable[..., Any], serial: Callable[..., Any], args: tuple, threads: int,
            small_calls: bool = False) -> None:
        """`threads`: the most the caller may use (the engine's torch thread count);
        `small_calls`: too little work per call to pay for workqueue's wake-ups."""
        if threads > 1 and (self.wakeups_cheap or not small_calls) and self._lock.acquire(blocking=False):
            try:
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # per calling thread
                parallel(*args)
            finally:
                self._lock.release()
        else:
            serial(*args)


GATE = ParallelGate()
