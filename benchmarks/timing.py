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


def host_ms(fn: Callable[[], object], device: str = "cpu", *, repeat: int = 20) -> float:
    """Host time per call of ``fn()`` in milliseconds: the calls are issued back to back without
    waiting for the device, so on CUDA this is what launching costs the CPU. When it is close to
    :func:`median_ms`, the device waits for the host (the timing is launch-bound). On CPU it is
    the wall time."""
    sync = _sync(device)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    elapsed = time.perf_counter() - t0
    sync()
    return 1e3 * elapsed / repeat


def _sync(device: str) -> Callable[[], None]:
    if device == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None
