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


def graph_ms(calls: list[Callable[[], object]], device: str = "cpu") -> float | None:
    """Device time per call of ``calls`` captured back to back in one CUDA graph and replayed:
    what each costs inside a captured step, without launch overhead. Give calls on different
    buffers (more bytes than the L2 cache holds) to time reads from memory, not from L2.

    ``None`` on CPU, or when a call cannot be captured.
    """
    if device != "cuda":
        return None
    return per_call_ms(calls, _cuda_graph, lambda replay: median_ms(replay, "cuda"))


def per_call_ms(calls: list[Callable[[], object]], capture: Callable[[list[Callable[[], object]]], Callable[[], object] | None],
                timer: Callable[[Callable[[], object]], float]) -> float | None:
    """``timer(replay) / len(calls)`` for the ``replay`` that ``capture`` makes of all ``calls``
    (``None`` for no calls, or when ``capture`` returns ``None``: they cannot be captured)."""
    if not calls:
        return None
    replay = capture(calls)
    return None if replay is None else timer(replay) / len(calls)


def _cuda_graph(calls: list[Callable[[], object]]) -> Callable[[], object] | None:
    """The replay of one CUDA graph holding ``calls`` in order, or ``None`` if one cannot be captured."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (autotuning, allocations)
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for fn in calls:
                fn()
    except Exception:  # an op that cannot be captured: no graph timing
        return None
    return graph.replay
