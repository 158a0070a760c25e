"""Benchmark of exact magnitude re-ranking (global unstructured mask selection).

Rows for ``N`` weights (CUDA: 10M, 63M, 187M; ``quick``: 10M; CPU: 1M, torch providers only),
in float32 and bfloat16, sparsity 0.7, the weights split over 8 ``[rows, 1000]`` tensors, ``rows``
a multiple of 16 (so N is rounded down: 62,976,000 and 186,880,000; like a model's weight shapes,
every tensor gets the kernels' 16-byte vector path, which lengths not divisible by 16 do not):

- ``kthvalue``: ``torch.kthvalue`` of the flat ``|w|`` (the threshold only, no mask, no ties);
- ``topk``: ``torch.topk`` of the flat ``|w|`` + scatter into a bool mask;
- ``sort``: ``torch.sort`` of the flat ``|w|`` (what an exact sort-based ranking costs at least);
- ``triton``: ours, ``rerank_masks(..., apply=True)`` over the 8 tensors (exact, ties included,
  mask written and pruned weights zeroed); ``triton-radix``: the same with
  ``algorithm="radix"`` (per-program ``tl.histogram`` digits instead of one atomic per weight);
  ``triton-window``: ``algorithm="window"`` (one read of the weights around a sampled bracket,
  sparse writes, the window sorted; see ``kernels/rerank/window.py``); ``triton-graph``: the
  ``triton`` selection as a ``RerankPlan`` (tables and buffers made once, no host sync until the
  end) replayed from a CUDA graph, as a pruner that keeps its tensors in place can run it (the
  torch providers run eagerly: each is one to three kernels, so a graph would save them little),
  without a warm start (``warm_start=False``: every run the cold select, with the plan's default
  bracket: pass 1 bracketed by a sample for 16-bit keys, not for float32, where the H100 timed it
  slower); ``triton-graph-full``: the same with the bracket off (the exact pass 1 takes one
  atomic per candidate), timed beside it;
  ``triton-graph-warm``: the same with the warm start, which first looks for the threshold in a
  window around the previous run's. The timed runs re-rank the same weights, so the window always
  holds the threshold: the best case, a pruning run's steady state at best (a missed window costs
  the cold select plus one read of the weights);
- ``floor``: one read of the weights at the bandwidth of a measured device-to-device copy of
  the same bytes (``copy_ms / 2``: a copy reads and writes them once each).

``apply=True`` zeroes the pruned weights, so every timed call after the first ranks weights that
are already 70% zeros, as the re-ranks of a pruning run do. The torch providers get the flat
tensor for free (the concatenation is not timed), so they are
favoured. CUDA times are ``triton.testing.do_bench`` medians (L2 flushed); CPU ones the median of
``time.perf_counter`` over a few repetitions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.rows_cli import print_rows
from benchmarks.timing import median_ms

SPARSITY = 0.7
COLS = 1000
PARTS = 8


def _weights(total: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    rows = max(16, total // (COLS * PARTS) // 16 * 16)
    g = torch.Generator(device=device).manual_seed(0)
    return {
        f"layer{i}": torch.randn(rows, COLS, generator=g, device=device).to(dtype) * 0.05
        for i in range(PARTS)
    }


def run(device: str, quick: bool) -> list[dict]:
    """Benchmark rows: ``{"bench", "shape", "dtype", "provider", "ms", ...}`` (``ms``: median)."""
    cuda = device.startswith("cuda")
    if cuda:
        from sparse_rnnt.kernels.rerank import RerankPlan, rerank_masks

        sizes = [10_000_000] if quick else [10_000_000, 63_000_000, 187_000_000]
    else:
        sizes = [1_000_000]

    def timer(fn: Callable[[], object]) -> float:
        return median_ms(fn, "cuda" if cuda else "cpu", repeat=5, warmup=1)

    rows: list[dict] = []
    for total in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            ws = _weights(total, dtype, device)
            n = sum(w.numel() for w in ws.values())
            keep = n - int(SPARSITY * n + 0.5)
            flat = torch.cat([w.reshape(-1) for w in ws.values()])
            nbytes = flat.numel() * flat.element_size()

            def kth(flat: torch.Tensor = flat, n: int = n, keep: int = keep) -> object:
                return torch.kthvalue(flat.abs(), n - keep + 1)

            def topk(flat: torch.Tensor = flat, keep: int = keep) -> object:
                idx = torch.topk(flat.abs(), keep, sorted=False).indices
                return torch.zeros(flat.shape, dtype=torch.bool, device=flat.device).index_fill_(0, idx, True)

            def sort(flat: torch.Tensor = flat) -> object:
                return torch.sort(flat.abs())

            providers: dict[str, Callable[[], object]] = {"kthvalue": kth, "topk": topk, "sort": sort}
            if cuda:
                def ours(ws: dict[str, torch.Tensor] = ws) -> object:
                    return rerank_masks(ws, SPARSITY, apply=True)

                def ours_radix(ws: dict[str, torch.Tensor] = ws) -> object:
                    return rerank_masks(ws, SPARSITY, apply=True, algorithm="radix")

                def ours_window(ws: dict[str, torch.Tensor] = ws) -> object:
                    return rerank_masks(ws, SPARSITY, apply=True, algorithm="window")

                providers["triton"] = ours
                providers["triton-radix"] = ours_radix
                providers["triton-window"] = ours_window
                for name, warm, bracket in (("triton-graph", False, None), ("triton-graph-full", False, False),
                                            ("triton-graph-warm", True, None)):
                    out = {k: torch.empty(w.shape, dtype=torch.uint8, device=device) for k, w in ws.items()}
                    try:
                        plan = RerankPlan(ws, SPARSITY, out, apply=True, graph=True, warm_start=warm,
                                          bracket=bracket)
                        plan.run()  # the eager run; the graph is captured after it
                        providers[name] = plan.run
                    except Exception as e:  # recorded, as a provider that fails below is
                        rows.append({"bench": "rerank", "shape": f"{n}", "dtype": str(dtype).removeprefix("torch."),
                                     "provider": name, "ms": None, "error": str(e).splitlines()[0]})
            base = {"bench": "rerank", "shape": f"{n}", "dtype": str(dtype).removeprefix("torch."),
                    "sparsity": SPARSITY, "bytes": nbytes}
            for name, fn in providers.items():
                try:
                    ms = timer(fn)
                    rows.append({**base, "provider": name, "ms": ms, "read_gbps": nbytes / ms / 1e6})
                except Exception as e:  # kthvalue size limits, a kernel that fails to build: recorded
                    rows.append({**base, "provider": name, "ms": None, "error": str(e).splitlines()[0]})
            if cuda:
                dst = torch.empty_like(flat)
                copy_ms = timer(lambda dst=dst, flat=flat: dst.copy_(flat))
                rows.append({**base, "provider": "floor", "ms": copy_ms / 2,
                             "copy_ms": copy_ms, "read_gbps": nbytes / (copy_ms / 2) / 1e6})
                del dst
            del ws, flat
            if cuda:
                torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    print_rows(run, __doc__.split("\n")[0])
