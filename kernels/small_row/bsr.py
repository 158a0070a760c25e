"""Small-row block-sparse matmul ``y = x Wᵀ + b`` (Triton), ``W`` a :class:`BsrWeight`.

``_bsr_kernel``: one program per (block row of ``bh`` outputs, K split, block of rows of ``x``).
It walks its share of the block row's blocks (``crow_indices[i] .. crow_indices[i+1]``), loads
each ``[bh, bw]`` block (contiguous, so one coalesced read) and the matching ``[BLOCK_R, bw]``
columns of ``x``, and accumulates ``x_tile · blockᵀ`` with ``tl.dot`` in fp32. Blocks are padded
in registers to powers of two ``>= 16`` (``tl.dot``'s minimum) with masked loads, so any block
size works. The K split takes an equal share of the *possible* block columns (no host sync on
the row lengths); partial sums go through the same reduction as the bitmap kernel.

Backends of :func:`bsr_linear`: ``"triton"`` (here), ``"torch"`` (``to_dense`` + ``F.linear``),
``"torch-bsr"`` (PyTorch's own BSR matmul: ``torch.sparse._triton_ops.bsr_dense_mm`` on CUDA
when it accepts the shapes, else ``torch.sparse`` ``bsr @ dense``). Inference only.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..host import cdiv, next_power_of_2
from ..launch import DirectLauncher
from ..tuning import autotune_bench
from . import bitmap
from .bitmap import max_rows_block, pick_split, reduce_partials, store_rows
from .naive import BsrWeight, bsr_linear_ref, prepare_inference_inputs

__all__ = ["bsr_linear", "torch_bsr_linear"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if _INTERPRET:
    _CONFIGS = [triton.Config({}, num_warps=1, num_stages=1)]
else:
    _CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((1, 3), (2, 3), (4, 3), (4, 4), (8, 3))]


@triton.autotune(configs=_CONFIGS, key=["N", "K", "BLOCK_R", "SPLIT", "BH", "BW", "HAS_BIAS"], do_bench=autotune_bench)
@triton.jit
def _bsr_kernel(
    x_ptr, crow_ptr, col_ptr, val_ptr, b_ptr, out_ptr,
    R, N, K, cols_per_split, SPLIT,
    stride_xr, stride_os, stride_or,
    BH: tl.constexpr, BW: tl.constexpr, PBH: tl.constexpr, PBW: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    pid_r = tl.program_id(2).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    offs_h = tl.arange(0, PBH)
    offs_w = tl.arange(0, PBW)
    blk_mask = (offs_h[:, None] < BH) & (offs_w[None, :] < BW)
    row_start = tl.load(crow_ptr + pid_b).to(tl.int64)
    row_end = tl.load(crow_ptr + pid_b + 1).to(tl.int64)
    # Blocks of this split: block columns in [c_lo, c_hi). Columns ascend within a block row
    # (validated), so skip ahead to the first block at or past c_lo.
    c_lo = pid_s * cols_per_split
    c_hi = c_lo + cols_per_split
    acc = tl.zeros((BLOCK_R, PBH), dtype=tl.float32)
    for j in range(row_start, row_end):
        # A block outside this split is masked off, not branched around: a loop without control
        # flow can be software-pipelined (the loads of block j+1 overlap the dot of block j).
        c = tl.load(col_ptr + j).to(tl.int64)
        mine = (c >= c_lo) & (c < c_hi)
        offs_k = c * BW + offs_w
        xt = tl.load(x_ptr + offs_r[:, None] * stride_xr + offs_k[None, :],
                     mask=mine & r_ok[:, None] & (offs_w[None, :] < BW) & (offs_k[None, :] < K), other=0.0)
        wt = tl.load(val_ptr + j * (BH * BW) + offs_h[:, None] * BW + offs_w[None, :],
                     mask=mine & blk_mask, other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PREC)
    offs_n = pid_b * BH + offs_h
    n_ok = (offs_h < BH) & (offs_n < N)
    store_rows(acc, out_ptr, b_ptr, offs_r, r_ok, offs_n, n_ok, pid_s, stride_os, stride_or, HAS_BIAS, DIRECT)


# Repeated launches skip Triton's per-call argument binding (``kernels/launch.py``).
_bsr_launch = DirectLauncher(_bsr_kernel)


def _launch(x2: Tensor, w: BsrWeight, bias: Tensor | None, split_k: int | None, y: Tensor) -> Tensor:
    """``y [R, N]`` (written in place) for contiguous ``x2 [R, K]``."""
    r, k = x2.shape
    n = w.shape[0]
    bh, bw = w.blocksize
    if r == 0 or n == 0:
        return y
    nb_r, nb_c = cdiv(n, bh), cdiv(k, bw)
    block_r = max_rows_block(r)
    row_blocks = cdiv(r, block_r)
    split = split_k if split_k is not None else pick_split(
        nb_r * row_blocks, cdiv(nb_c, 4), x2.device, w.nbytes, r * n)
    cols_per_split = cdiv(nb_c, max(1, min(split, nb_c)))
    split = cdiv(nb_c, cols_per_split) if nb_c else 1
    direct = split == 1
    out = y if direct else bitmap.partials(split, r, n, x2.device)
    pbh, pbw = max(16, next_power_of_2(bh)), max(16, next_power_of_2(bw))
    _bsr_launch[(nb_r, split, row_blocks)](
        x2, w.crow_indices, w.col_indices, w.values, bias if bias is not None else y, out,
        r, n, k, max(cols_per_split, 1), split,
        x2.stride(0), out.stride(0) if not direct else 0, out.stride(-2),
        BH=bh, BW=bw, PBH=pbh, PBW=pbw, BLOCK_R=block_r, HAS_BIAS=bias is not None, DIRECT=direct,
        UPCAST=_INTERPRET or x2.dtype == torch.float32, PREC="ieee",
    )
    if not direct:
        reduce_partials(out, bias, y)
    return y


def torch_bsr_linear(x2: Tensor, w: BsrWeight, bias: Tensor | None) -> Tensor:
    """PyTorch's BSR matmul as a baseline: ``y [R, N]`` for ``x2 [R, K]``.

    CUDA: ``torch.sparse._triton_ops.bsr_dense_mm`` on ``xᵀ`` padded to the block grid and to
    ``max(16, next_pow2(R))`` columns (its tiling needs that); if it rejects the problem, or on
    CPU, ``bsr @ xᵀ`` (``torch.sparse``).
    """
    r, k = x2.shape
    n = w.shape[0]
    bh, bw = w.blocksize
    bsr = w.to_torch_bsr()
    k_pad = bsr.shape[1]
    r_pad = max(16, next_power_of_2(max(r, 1))) if x2.is_cuda else r
    xt = torch.zeros(k_pad, r_pad, dtype=x2.dtype, device=x2.device)
    xt[:k, :r] = x2.t()
    out = None
    if x2.is_cuda:
        try:
            from torch.sparse._triton_ops import bsr_dense_mm

            out = bsr_dense_mm(bsr, xt)
        except Exception:  # private API: any rejection means "use the generic path"
            out = None
    if out is None:
        try:
            out = bsr @ xt
        except RuntimeError as exc:  # e.g. MKL (CPU) rejects non-square blocks
            raise ValueError(f"bsr_linear(backend='torch-bsr'): PyTorch's BSR matmul rejected blocks "
                             f"{(bh, bw)} on {x2.device}: {exc}") from exc
    y = out[:n, :r].t()
    if bias is not None:
        y = y + bias
    return y.contiguous()


def bsr_linear(x: Tensor, w: BsrWeight, bias: Tensor | None = None, *, backend: str = "triton",
               split_k: int | None = None, out: Tensor | None = None) -> Tensor:
    """``y [*, N] = x [*, K] Wᵀ + b`` for a :class:`BsrWeight` ``W [N, K]``, inference only.

    ``backend``: ``"triton"``, ``"torch"`` (reference) or ``"torch-bsr"`` (PyTorch's BSR matmul).
    ``x``, ``bias [N]`` and the blocks share one dtype. ``split_k`` forces the Triton K split;
    ``out`` (``[R, N]``, Triton backend only) receives the result in place.
    """
    if backend == "torch":
        return bsr_linear_ref(x, w, bias)
    if backend not in ("triton", "torch-bsr"):
        raise ValueError(f"bsr_linear: backend must be 'triton', 'torch' or 'torch-bsr', got {backend!r}")
    x2, bias_c = prepare_inference_inputs(x, w, bias, "bsr_linear", "triton/torch-bsr")
    n = w.shape[0]
    if backend == "torch-bsr":
        y = torch_bsr_linear(x2, w, bias_c)
    else:
        y = _launch(x2, w, bias_c, split_k, bitmap._out_buffer(out, x2.shape[0], n, x2, "bsr_linear"))
    return y.reshape(*x.shape[:-1], n)
