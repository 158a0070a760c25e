"""One way to time a callable, shared by every benchmark: a median in milliseconds.

CUDA: ``triton.testing.do_bench`` (median of repetitions, L2 cache flushed between them).
CPU: the median of ``time.perf_counter`` over ``repeat`` calls after ``warmup`` calls.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(fn: Callable[[], object], device: str = "cpu", *, repeat: int = 7, warmup: int = 2) -> float:
    """Median time of ``fn()`` in milliseconds on ``device`` ("cpu" or "cuda")."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
