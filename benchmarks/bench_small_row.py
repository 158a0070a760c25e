"""Small-row sparse matmul ``y = x Wᵀ + b`` (``x [R, K]``, R <= 64) with compact sparse weights.

    python -m benchmarks.bench_small_row [--device cuda] [--quick]

Shapes: the Emformer feed-forward layers of ``base`` (``[2048 x 512]`` up, ``[512 x 2048]``
down) and ``paper-187m`` (``[3072 x 768]``, ``[768 x 3072]``), weights ``[N, K]``, for R in
{1, 8, 32, 64} rows (streams × frames of a chunk); ``quick``: the base layers at R in {1, 32}.
bfloat16, 70% sparsity: an unstructured mask for the bitmap format, 16x16 blocks for BSR.

Providers on CUDA (``triton.testing.do_bench``, median, L2 flushed):

- ``cublas``: dense ``F.linear`` (the baseline every ratio refers to);
- ``torch-2:4``: ``torch.sparse.to_sparse_semi_structured`` at 2:4 (50% sparsity, not 70%:
  noted in the row), with the backend torch picks (cuSPARSELt when built with it);
  ``torch-2:4-cutlass``: the same weight as ``SparseSemiStructuredTensorCUTLASS`` (torch's CUTLASS
  kernels, no cuSPARSELt plan per call);
- ``torch-bsr``: PyTorch's BSR matmul (``torch.sparse._triton_ops.bsr_dense_mm``);
- ``ours-bsr``, ``ours-bitmap`` (Triton) and ``ours-bitmap-cuda`` (the CUDA extension, when it
  builds).

Each row gives ``format_bytes`` (bytes the provider's weight stores), ``ideal_ratio`` = dense
weight bytes / ``format_bytes`` (the speed-up a purely memory-bound kernel could reach) and
``achieved_fraction`` = (``dense_ms`` / ``ms``) / ``ideal_ratio``. On CUDA two more timings say
where the time goes: ``host_ms``, the host time per call (near ``ms``: launch-bound), and
``graph_ms``, the time per call inside a CUDA graph of back-to-back calls on copies of the weight
that together exceed twice the L2 cache (the regime of a graph-captured streaming step: no
launch overhead, weights read from memory), with ``graph_speedup`` = dense ``graph_ms`` / ``graph_ms``
and ``graph_achieved_fraction`` its share of ``ideal_ratio``.

On CPU (float32, median of ``time.perf_counter`` repetitions, at ``torch.get_num_threads()``
threads): the ``base`` layers ``[2048 x 512]``, ``[512 x 2048]`` and ``[512 x 512]`` (attention) at
R in {1, 5, 8, 40, 160} (joiner and predictor calls, one stream's chunk, 8 and 32 streams);
``quick``: ``tiny``'s FFN at R in {1, 8}. Providers: ``dense`` (``F.linear``, MKL), ``torch-csr``
(PyTorch's CSR matmul of the same unstructured weight), ``torch-bsr`` (PyTorch's BSR matmul),
``bitmap-torch`` (the reference: ``to_dense`` + ``F.linear``) and ``ours-cpu`` (the C++ kernel of
``csrc/cpu_spmm.cpp``, when it builds; its ``format_bytes`` count the uint16 column indices it
keeps beside the bitmap weight). ``ms`` times one weight called again and again (hot in cache);
``cold_ms`` rotates through copies of it totalling ``CPU_COLD_BYTES`` of dense weights, so each
call reads its weight from memory as a streaming step does, with ``cold_speedup`` against dense
timed the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.rows_cli import print_rows
from benchmarks.timing import graph_ms, host_ms, median_ms
from sparse_rnnt.kernels.small_row import BitmapWeight, BsrWeight, bitmap_linear, bsr_linear
from sparse_rnnt.model.configs import MODEL_SIZES

DENSITY = 0.3
BLOCK = (16, 16)


def _shapes(quick: bool, device: str) -> list[tuple[str, int, int, int]]:
    """(label, R, N, K) rows of the benchmark; the weight is ``[N, K]``."""
    if device == "cpu":
        if quick:
            cfg = MODEL_SIZES["tiny"]
            return [(f"tiny ffn-up R={r} [{cfg.transformer_ffn_dim}x{cfg.width}]", r, cfg.transformer_ffn_dim,
                     cfg.width) for r in (1, 8)]
        cfg = MODEL_SIZES["base"]
        width, ffn = cfg.width, cfg.transformer_ffn_dim
        return [(f"base {name} R={r} [{n}x{k}]", r, n, k) for r in (1, 5, 8, 40, 160)
                for name, n, k in (("ffn-up", ffn, width), ("ffn-down", width, ffn), ("attn-out", width, width))]
    out = []
    for name in ("base", "paper-187m"):
        cfg = MODEL_SIZES[name]
        width, ffn = cfg.width, cfg.transformer_ffn_dim
        for r in (1, 32) if quick else (1, 8, 32, 64):
            out.append((f"{name} ffn-up R={r} [{ffn}x{width}]", r, ffn, width))
            out.append((f"{name} ffn-down R={r} [{width}x{ffn}]", r, width, ffn))
        if quick:
            break
    return out


def _time(fn: Callable[[], object], device: str) -> float:
    return median_ms(fn, device)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _semi_structured(w: torch.Tensor, cutlass: bool = False
                     ) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], int] | None:
    """``(fn(x, b), format_bytes)`` for ``w`` pruned 2:4 (largest 2 of every 4), or None if
    unsupported; ``cutlass``: torch's CUTLASS backend instead of its default choice."""
    try:
        from torch.sparse import SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured

        n, k = w.shape
        groups = w.reshape(n, k // 4, 4)
        top = groups.abs().topk(2, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
        pruned = (groups * keep).reshape(n, k)
        ws = SparseSemiStructuredTensorCUTLASS.from_dense(pruned) if cutlass else to_sparse_semi_structured(pruned)
        parts = [getattr(ws, a) for a in ("packed", "meta") if isinstance(getattr(ws, a, None), torch.Tensor)]
        size = _nbytes(*parts) if parts else n * k // 2 * w.element_size() + n * k // 8

        def fn(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            r = x.shape[0]
            pad = (-r) % 16  # its kernels want a few rows more than one; pad to 16
            xp = F.pad(x, (0, 0, 0, pad)) if pad else x
            return F.linear(xp, ws, b)[:r]

        fn(torch.zeros(1, k, dtype=w.dtype, device=w.device), torch.zeros(n, dtype=w.dtype, device=w.device))
        return fn, size
    except Exception:  # unsupported GPU / dtype / build: the provider is skipped
        return None


def _providers(device: str, w: torch.Tensor, mask: torch.Tensor, bmask: torch.Tensor) -> dict[str, Any]:
    """name -> (fn(x, b) -> y, format_bytes, note)."""
    bitmap = BitmapWeight.from_dense(w, mask)
    bsr = BsrWeight.from_dense(w, bmask, BLOCK)
    dense = w * mask
    provs: dict[str, Any] = {
        "cublas" if device != "cpu" else "dense": (lambda x, b: F.linear(x, dense, b), _nbytes(w), "dense weight"),
        "torch-bsr": (lambda x, b: bsr_linear(x, bsr, b, backend="torch-bsr"), bsr.nbytes,
                      f"blocks {BLOCK}, {DENSITY:.0%} of blocks kept"),
    }
    if device == "cpu":
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            csr = dense.to_sparse_csr()
        provs["torch-csr"] = (lambda x, b: (csr @ x.t()).t() + b,
                              _nbytes(csr.crow_indices(), csr.col_indices(), csr.values()), "torch CSR @ x^T")
        provs["bitmap-torch"] = (lambda x, b: bitmap_linear(x, bitmap, b, backend="torch"), bitmap.nbytes,
                                 "to_dense + F.linear")
        from sparse_rnnt.kernels.small_row.cpu import (
            CpuSparseWeight,
            get_cpu_extension,
            sparse_linear_op,
        )

        if get_cpu_extension() is not None:
            cw = CpuSparseWeight.from_bitmap(bitmap)
            # The op as exported layers call it (cpu_sparse_linear's per-call Python checks cost a
            # few us, which a streaming step never pays).
            provs["ours-cpu"] = (lambda x, b: sparse_linear_op(x, cw, b), cw.nbytes, "C++ kernel (csrc/cpu_spmm.cpp)")
        return provs
    for name, cutlass in (("torch-2:4", False), ("torch-2:4-cutlass", True)):
        semi = _semi_structured(w, cutlass)
        if semi is not None:
            provs[name] = (semi[0], semi[1], "2:4 semi-structured = 50% sparsity (not 70%)")
    provs["ours-bsr"] = (lambda x, b: bsr_linear(x, bsr, b), bsr.nbytes, f"blocks {BLOCK}")
    provs["ours-bitmap"] = (lambda x, b: bitmap_linear(x, bitmap, b), bitmap.nbytes, f"tile {bitmap.tile}")
    from sparse_rnnt.kernels.small_row.cuda_ext import get_extension

    if get_extension() is not None:
        provs["ours-bitmap-cuda"] = (lambda x, b: bitmap_linear(x, bitmap, b, backend="cuda"), bitmap.nbytes,
                                     "CUDA extension")
    return provs


def run(device: str, quick: bool) -> list[dict]:
    """Benchmark rows ``{"bench", "shape", "provider", "ms", ...}`` (see module doc)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows: list[dict] = []
    for label, r, n, k in _shapes(quick, device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(r, k, generator=g).to(device, dtype)
        w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
        b = torch.randn(n, generator=g).to(device, dtype)
        mask = (torch.rand(n, k, generator=g) < DENSITY).to(device)
        keep = torch.rand((n + BLOCK[0] - 1) // BLOCK[0], (k + BLOCK[1] - 1) // BLOCK[1], generator=g) < DENSITY
        bmask = keep.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)[:n, :k].to(device)
        dense_bytes = _nbytes(w)
        providers = _providers(device, w, mask, bmask)
        copies = [_providers(device, w.clone(), mask, bmask) for _ in range(_graph_copies(device, dense_bytes, quick))]
        dense_ms = dense_graph_ms = dense_cold_ms = None
        for provider, (fn, fmt_bytes, note) in providers.items():
            call = partial(_no_grad, fn, x, b)
            ms = _time(call, device)
            # A provider that failed to build on a copy (2:4 on some shapes) is timed on the rest.
            in_graph = graph_ms([partial(_no_grad, c[provider][0], x, b) for c in copies if provider in c], device)
            cold = _cold_ms([partial(_no_grad, c[provider][0], x, b) for c in copies if provider in c], device)
            if dense_ms is None:  # the dense provider comes first
                dense_ms, dense_graph_ms, dense_cold_ms = ms, in_graph, cold
            ideal = dense_bytes / fmt_bytes
            graph_speedup = dense_graph_ms / in_graph if in_graph and dense_graph_ms else None
            rows.append({
                "bench": "small_row_linear", "shape": label, "provider": provider, "ms": ms,
                "dtype": str(dtype).removeprefix("torch."), "R": r, "N": n, "K": k,
                "density": 0.5 if provider.startswith("torch-2:4") else DENSITY,
                "format_bytes": fmt_bytes, "dense_bytes": dense_bytes, "ideal_ratio": ideal,
                "speedup": dense_ms / ms, "achieved_fraction": dense_ms / ms / ideal,
                "gb_per_s": (fmt_bytes + _nbytes(x, b) + r * n * x.element_size()) / (ms * 1e-3) / 1e9,
                "host_ms": host_ms(call, device) if device == "cuda" else None,
                "graph_ms": in_graph, "graph_speedup": graph_speedup,
                "graph_achieved_fraction": graph_speedup / ideal if graph_speedup else None,
                "cold_ms": cold, "cold_speedup": dense_cold_ms / cold if cold and dense_cold_ms else None,
                "note": note,
            })
    return rows


# CPU: dense bytes of the copies a cold call rotates through (far past this machine's per-core
# L2; a streaming step of `base` reads 282 MB of float32 weights).
CPU_COLD_BYTES = 256 << 20


def _graph_copies(device: str, weight_bytes: int, quick: bool = False) -> int:
    """Copies of a weight that together exceed twice the L2 cache on CUDA, or ``CPU_COLD_BYTES``
    on CPU (4 with ``quick``, which only checks the harness); at least 4."""
    if device != "cuda":
        return 4 if quick else max(4, -(-CPU_COLD_BYTES // max(weight_bytes, 1)))
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(4, -(-2 * l2 // weight_bytes))


def _cold_ms(calls: list[Callable[[], object]], device: str) -> float | None:
    """CPU: milliseconds per call when ``calls`` (one per copy of the weight) run in turn, so each
    reads its weight from memory, as a streaming step reads every layer's once; None on CUDA
    (``graph_ms`` is its counterpart there) or without calls."""
    if device == "cuda" or not calls:
        return None

    def replay() -> None:
        for fn in calls:
            fn()

    return median_ms(replay, "cpu", repeat=3, warmup=1) / len(calls)


def _no_grad(fn: Callable, x: torch.Tensor, b: torch.Tensor) -> object:
    with torch.no_grad():
        return fn(x, b)


if __name__ == "__main__":
    print_rows(run, __doc__.split("\n")[0])
