"""Small-row bitmap sparse matmul ``y = x Wᵀ + b`` (Triton), ``W`` a :class:`BitmapWeight`.

Designed for few rows (``R <= 64``: streams × frames of a chunk), where the op is memory-bound
and speed comes from reading ~30% of the weight's values plus 1.25 bits per weight instead of
the dense weight. Correct for any ``R`` (row blocks of at most 64 are a grid axis).

``_bitmap_kernel``: one program per (block of ``BLOCK_N`` output rows, K split, row block). For
each format tile of ``TILE`` columns it loads the ``[BLOCK_N, TILE/32]`` bit words and the
per-(row, tile) value offsets, expands the bits in registers, turns them into value indices with
an exclusive prefix sum along the tile (the popcount prefix), gathers the kept values (zeros
elsewhere) into a dense ``[BLOCK_N, TILE]`` tile and accumulates ``x_tile · w_tileᵀ`` with
``tl.dot`` in fp32. ``BLOCK_R`` (rows of ``x``) is the next power of two ``>= max(16, R)``
capped at 64 (``tl.dot`` needs 16). With a K split (more programs for narrow layers) every
program writes fp32 partial sums ``[S, R, N]`` and ``_reduce_kernel`` sums them, adds the bias
and casts; without one the kernel adds the bias and stores ``y`` directly.

Inference only (no autograd). Under ``TRITON_INTERPRET=1`` one config is used and dot operands
are upcast to fp32 (the interpreter's ``tl.dot`` multiplies bfloat16 tiles as raw bits).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..host import cdiv, next_power_of_2
from ..launch import DirectLauncher
from ..tuning import autotune_bench
from .naive import BitmapWeight, bitmap_linear_ref, prepare_inference_inputs

__all__ = ["bitmap_linear", "max_rows_block", "pick_split"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if _INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=1, num_stages=1)]
else:
    # Narrow N tiles keep enough programs in flight for layers of 512 outputs on 132 SMs.
    _CONFIGS = [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in ((16, 2, 3), (32, 4, 3), (32, 4, 4), (64, 4, 3), (64, 8, 3), (128, 8, 2))
    ]


@triton.jit
def store_rows(acc, out_ptr, b_ptr, offs_r, r_ok, offs_n, n_ok, pid_s, stride_os, stride_or,
               HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr):
    """Epilogue of the split-K small-row kernels: ``y[rows, cols]`` (+ bias, cast to ``y``'s
    dtype) when there is a single split, else this split's fp32 partial sums ``part[pid_s]``."""
    out_mask = r_ok[:, None] & n_ok[None, :]
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_r[:, None] * stride_or + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + pid_s * stride_os + offs_r[:, None] * stride_or + offs_n[None, :], acc, mask=out_mask)


@triton.autotune(configs=_CONFIGS, key=["N", "K", "BLOCK_R", "SPLIT", "TILE", "HAS_BIAS"], do_bench=autotune_bench)
@triton.jit
def _bitmap_kernel(
    x_ptr, bits_ptr, val_ptr, off_ptr, b_ptr, out_ptr,
    R, N, K, n_words, n_tiles, tiles_per_split, SPLIT,
    stride_xr, stride_os, stride_or,
    TILE: tl.constexpr, BLOCK_R: tl.constexpr, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    pid_r = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    shifts = tl.arange(0, 32)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    t_begin = pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    for t in range(t_begin, t_end):
        offs_w = t * (TILE // 32) + tl.arange(0, TILE // 32)
        words = tl.load(bits_ptr + offs_n[:, None] * n_words + offs_w[None, :],
                        mask=n_ok[:, None] & (offs_w[None, :] < n_words), other=0)
        # Row-major reshape puts bit j of word i at column 32 i + j: the packing order.
        bits = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 1, (BLOCK_N, TILE))
        start = tl.load(off_ptr + offs_n * n_tiles + t, mask=n_ok, other=0).to(tl.int64)
        idx = start[:, None] + (tl.cumsum(bits, axis=1) - bits).to(tl.int64)
        # Rows past N and columns past K have no set bits (validated), so nothing is read there.
        wt = tl.load(val_ptr + idx, mask=bits != 0, other=0.0)
        offs_k = t * TILE + tl.arange(0, TILE)
        xt = tl.load(x_ptr + offs_r[:, None] * stride_xr + offs_k[None, :],
                     mask=r_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PREC)
    store_rows(acc, out_ptr, b_ptr, offs_r, r_ok, offs_n, n_ok, pid_s, stride_os, stride_or, HAS_BIAS, DIRECT)


@triton.jit
def _reduce_kernel(part_ptr, b_ptr, y_ptr, S, total, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``y.flat[i] = Σ_s part[s].flat[i] (+ b[i % N])``: partials fp32 ``[S, R, N]`` -> ``y [R, N]``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + offs  # stepped by pointer: s * total in int32 could overflow
    for _ in range(0, S):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += total
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


# Repeated launches skip Triton's per-call argument binding (``kernels/launch.py``).
_bitmap_launch = DirectLauncher(_bitmap_kernel)
_reduce_launch = DirectLauncher(_reduce_kernel)


def max_rows_block(r: int) -> int:
    """``BLOCK_R`` for ``r`` rows: next power of two ``>= max(16, r)``, at most 64."""
    return min(64, max(16, next_power_of_2(max(r, 1))))


def pick_split(n_out_blocks: int, n_chunks: int, device: torch.device, weight_bytes: int, out_numel: int) -> int:
    """K split so that ``n_out_blocks × split`` programs fill about two waves of SMs.

    ``n_chunks`` is how many K steps there are to share out (at most 16 splits). The fp32
    partial sums (``4 × out_numel`` bytes per split) are kept below the weight's own bytes, so
    the split never moves more data than it saves time on.
    """
    if device.type != "cuda" or n_chunks <= 1:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    by_bytes = max(1, weight_bytes // max(4 * out_numel, 1))
    return max(1, min(n_chunks, 16, by_bytes, math.ceil(2 * sms / max(n_out_blocks, 1))))


def partials(split: int, r: int, n: int, device: torch.device) -> Tensor:
    """Uninitialized fp32 ``[split, r, n]`` buffer of K-split partial sums (every element is written)."""
    return torch.empty(split, r, n, dtype=torch.float32, device=device)


def reduce_partials(part: Tensor, bias: Tensor | None, y: Tensor) -> None:
    """``y [R, N] = part.sum(0) + bias`` in one launch (``part`` fp32 ``[S, R, N]``)."""
    total = y.numel()
    if total == 0:
        return
    block = 1024

    def grid(_meta: dict) -> tuple[int]:
        return (cdiv(total, block),)

    _reduce_launch[grid](part, bias if bias is not None else y, y, part.shape[0], total, y.shape[1],
                         HAS_BIAS=bias is not None, BLOCK=block)


def _launch(x2: Tensor, w: BitmapWeight, bias: Tensor | None, split_k: int | None, y: Tensor) -> Tensor:
    """``y [R, N]`` (written in place) for contiguous ``x2 [R, K]``."""
    r, k = x2.shape
    n = w.shape[0]
    if r == 0 or n == 0:
        return y
    block_r = max_rows_block(r)
    row_blocks = cdiv(r, block_r)
    n_tiles = w.offsets.shape[1]
    split = split_k if split_k is not None else pick_split(
        cdiv(n, 32) * row_blocks, n_tiles, x2.device, w.nbytes, r * n)
    tiles_per_split = cdiv(n_tiles, max(1, min(split, n_tiles)))
    split = cdiv(n_tiles, tiles_per_split)  # no empty splits
    direct = split == 1
    out = y if direct else partials(split, r, n, x2.device)
    upcast = _INTERPRET or x2.dtype == torch.float32
    prec = "ieee"

    def grid(meta: dict) -> tuple[int, int, int]:
        return (cdiv(n, meta["BLOCK_N"]), split, row_blocks)

    _bitmap_launch[grid](
        x2, w.bits, w.values, w.offsets, bias if bias is not None else y, out,
        r, n, k, w.bits.shape[1], n_tiles, tiles_per_split, split,
        x2.stride(0), out.stride(0) if not direct else 0, out.stride(-2),
        TILE=w.tile, BLOCK_R=block_r, HAS_BIAS=bias is not None, DIRECT=direct,
        UPCAST=upcast, PREC=prec,
    )
    if not direct:
        reduce_partials(out, bias, y)
    return y


def _out_buffer(out: Tensor | None, r: int, n: int, x2: Tensor, op: str) -> Tensor:
    """``out`` checked as a contiguous ``[r, n]`` buffer of ``x2``'s dtype/device, or a new one."""
    if out is None:
        return torch.empty(r, n, dtype=x2.dtype, device=x2.device)
    if out.shape != (r, n) or out.dtype != x2.dtype or out.device != x2.device or not out.is_contiguous():
        raise ValueError(f"{op}: out must be a contiguous [{r}, {n}] {x2.dtype} tensor on {x2.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def bitmap_linear(x: Tensor, w: BitmapWeight, bias: Tensor | None = None, *, backend: str = "triton",
                  split_k: int | None = None, out: Tensor | None = None) -> Tensor:
    """``y [*, N] = x [*, K] Wᵀ + b`` for a :class:`BitmapWeight` ``W [N, K]``, inference only.

    ``backend``: ``"triton"`` (this module), ``"cuda"`` (the CUDA extension, see ``cuda_ext``;
    ``RuntimeError`` if it cannot be built or loaded) or ``"torch"`` (``to_dense`` + ``F.linear``).
    ``x``, ``bias [N]`` and the weight's values share one dtype (float16, bfloat16, float32).
    ``split_k`` forces the Triton K split (default: picked from the SM count). ``out``
    (``[R, N]``, R = rows of ``x`` flattened; Triton backend only) receives the result in place.
    """
    if backend == "torch":
        return bitmap_linear_ref(x, w, bias)
    if backend not in ("triton", "cuda"):
        raise ValueError(f"bitmap_linear: backend must be 'triton', 'cuda' or 'torch', got {backend!r}")
    x2, bias_c = prepare_inference_inputs(x, w, bias, "bitmap_linear", "triton/cuda")
    n, k = w.shape
    if k == 0:  # empty reduction: y = b (also keeps the CUDA op away from 0-tile offsets)
        y = bias_c.expand(x2.shape[0], n).clone() if bias_c is not None else x2.new_zeros(x2.shape[0], n)
    elif backend == "cuda":
        from .cuda_ext import cuda_bitmap_linear

        y = cuda_bitmap_linear(x2, w, bias_c)
    else:
        y = _launch(x2, w, bias_c, split_k, _out_buffer(out, x2.shape[0], n, x2, "bitmap_linear"))
    return y.reshape(*x.shape[:-1], n)
