"""Fused masked linear Triton kernels: ``y = x (W ⊙ M)ᵀ + b`` with the mask applied in-kernel.

``W ⊙ M`` is never materialized: every kernel loads a weight tile and the matching mask tile
(bytes, or bits expanded in registers) and zeroes the dropped weights before ``tl.dot``. Bit
masks whose rows are whole int32 words (``K % 32 == 0``, 4-byte aligned) are read a word at a time
so that Triton still pipelines the K loop with ``cp.async``; other bit masks are read bytewise. The
pathway variant runs a mixed-language batch in one launch: rows are stably sorted by language
(a permutation, never a copy of ``x``), each row tile lies inside one language's segment and uses
that language's mask, and the kernels read and write rows through the permutation.

Kernels (fp32 accumulation in all of them):

- ``_fwd_kernel``: ``y[rows] = x[rows] (W ⊙ M_l)ᵀ + b`` on (row tile, N tile);
- ``_dx_kernel``: ``dx[rows] = dy[rows] (W ⊙ M_l)`` on (row tile, K tile);
  the forward and dX configs each come in two orientations (``W_AS_A``), see ``_FWD_CONFIGS``;
- ``_dw_kernel``: ``dW = Σ_l (dy_lᵀ x_l) [⊙ M_l]`` on (N tile, K tile), looping over each
  language's rows; soft gradients loop over all rows once, unmasked. Used for pathway batches and
  fp32; a single-mask bf16/fp16 weight gradient is a plain matmul, so it is cuBLAS's ``dyᵀ x``
  (``_mask_grad_kernel`` then zeroes the dropped weights of a hard gradient in place).

Each kernel runs its output tiles on a 1-D grid in groups of ``GROUP`` tile rows
(``_grouped_tile``), for L2 reuse. ``db`` is a plain ``dy.sum(0)`` (in dy's dtype, accumulated in fp32). Gradient rules and
mask formats: see ``naive.py``.
Under ``TRITON_INTERPRET=1`` one small config is used and dot operands are upcast to fp32 first,
because the interpreter's ``tl.dot`` multiplies bfloat16 tiles as their raw uint16 bit patterns.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..host import cdiv, next_power_of_2
from ..launch import DirectLauncher
from ..tuning import autotune_bench
from .naive import (
    check_masked_linear,
    check_pathway,
    check_unmasked_linear,
    masked_linear_ref,
    pathway_masked_linear_ref,
)

__all__ = ["masked_linear", "pathway_masked_linear", "unmasked_linear"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(shapes: list[tuple[int, int, int, int, int]], names: tuple[str, str, str]) -> list[triton.Config]:
    return [
        triton.Config({names[0]: a, names[1]: b, names[2]: c}, num_warps=w, num_stages=s)
        for a, b, c, w, s in shapes
    ]


if _INTERPRET:
    _MMA = [(32, 32, 32, 4, 1)]
else:
    # (tile0, tile1, reduction tile, warps, stages): H100-sized tiles plus smaller ones so that
    # narrow layers still fill the SMs. Masking costs a few ALU ops per weight element and K step,
    # against tile0 tensor-core MACs per element in the forward and dX (x rows); H100's published
    # rates give about 16 bf16 MACs per ALU op, hence a 256-row tile: it halves the mask's share.
    _MMA = [
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 256, 64, 8, 3),
        (64, 64, 32, 4, 5),
    ]

# Forward configs come in two orientations (``W_AS_A``): ``x Wᵀ`` as written, or ``(W xᵀ)ᵀ`` with
# the masked weight tile as the left operand. On Hopper a left operand may stay in registers
# (wgmma's register-A form, as in dequantizing GEMMs), so the masked tile need not go back through
# shared memory; the autotuner keeps whichever is faster per shape.
_FWD_CONFIGS = [
    triton.Config({**c.kwargs, "W_AS_A": w_as_a}, num_warps=c.num_warps, num_stages=c.num_stages)
    for c in _configs(_MMA, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    for w_as_a in ((False,) if _INTERPRET else (False, True))
]
# dX = dY (W ⊙ M) has the masked tile on the right; its ``W_AS_A`` form computes
# dXᵀ = (W ⊙ M)ᵀ dYᵀ so that the masked tile is the left operand here too.
_DX_CONFIGS = [
    triton.Config({**c.kwargs, "W_AS_A": w_as_a}, num_warps=c.num_warps, num_stages=c.num_stages)
    for c in _configs(_MMA, ("BLOCK_M", "BLOCK_K", "BLOCK_N"))
    for w_as_a in ((False,) if _INTERPRET else (False, True))
]
_DW_CONFIGS = _configs(_MMA, ("BLOCK_N", "BLOCK_K", "BLOCK_M"))
_KEY = ["N", "K", "R_BUCKET", "MASK_MODE", "PATHWAY", "PREC"]
# Shared memory per block on Hopper (227 KB), less a margin for what the pipeline adds to its
# operand buffers (a config over it cannot launch).
_SMEM_BYTES = 232448 - 8192


def _pruner(tiles: tuple[str, str, str], elem_arg: str) -> Any:
    """``early_config_prune`` for a kernel whose configs name (output tile 0, output tile 1,
    reduction tile) ``tiles``, with operands of ``elem_arg``'s dtype.

    Drops what compiling for sm_90 shows cannot work (``tests/kernels/sm90_compile.py``): pipeline
    buffers (stages × both operand tiles) over the shared memory, which is every fp32 config with a
    256-wide tile; and for fp32 without TF32, whose dot is a chain of FMAs with two accumulators
    in registers (the partial sum and the total, ``SPLIT_ACC``), tiles over 32 accumulator
    elements per thread and the orientation with the weight tile on the right, which spill
    kilobytes per thread. One config always stays.
    """

    def smem(c: triton.Config, elem: int) -> int:
        a, b, r = (c.kwargs[t] for t in tiles)
        return c.num_stages * (a + b) * r * elem

    def prune(configs: list[triton.Config], nargs: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
        elem = nargs[elem_arg].element_size()
        fma = elem == 4 and kwargs.get("PREC") == "ieee"
        kept = [
            c for c in configs
            if smem(c, elem) <= _SMEM_BYTES and not (
                fma and (c.kwargs[tiles[0]] * c.kwargs[tiles[1]] > 32 * 32 * c.num_warps
                         or c.kwargs.get("W_AS_A") is False))
        ]
        return kept or [min(configs, key=lambda c: smem(c, elem))]

    return prune


@triton.jit
def _keep_tile(m_ptr, offs_n, n_ok, k0, K, stride_mn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               MASK_MODE: tl.constexpr):
    """Bool ``[BLOCK_N, BLOCK_K]``: the mask at rows ``offs_n`` and columns ``k0 .. k0+BLOCK_K``.

    ``MASK_MODE``: 0 bytes; 1 bits read byte by byte; 2 the same bits read as little-endian int32
    words (``m_ptr`` and ``stride_mn`` in words); 3 no mask, every weight kept (the benchmarks'
    ``triton-nomask`` row: the same kernels without the mask, to separate its cost from the
    matmul's). ``k0`` is a multiple of ``BLOCK_K``, itself a multiple of 32, so a bits tile starts
    on a word.
    """
    if MASK_MODE == 3:
        keep = tl.full((BLOCK_N, BLOCK_K), 1, tl.int1)
    elif MASK_MODE == 2:
        n_words = (K + 31) // 32
        offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32).to(tl.int64)
        packed = tl.load(
            m_ptr + offs_n[:, None] * stride_mn + offs_w[None, :],
            mask=n_ok[:, None] & (offs_w[None, :] < n_words),
            other=0,
        )
        shifts = tl.arange(0, 32)
        bits = (packed[:, :, None] >> shifts[None, None, :]) & 1
        # Row-major reshape puts bit j of word i at column 32 i + j: the packing order.
        keep = tl.reshape(bits, (BLOCK_N, BLOCK_K)) != 0
    elif MASK_MODE == 1:
        n_bytes = (K + 7) // 8
        offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8).to(tl.int64)
        packed = tl.load(
            m_ptr + offs_n[:, None] * stride_mn + offs_b[None, :],
            mask=n_ok[:, None] & (offs_b[None, :] < n_bytes),
            other=0,
        ).to(tl.int32)
        shifts = tl.arange(0, 8)
        bits = (packed[:, :, None] >> shifts[None, None, :]) & 1
        keep = tl.reshape(bits, (BLOCK_N, BLOCK_K)) != 0
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        keep = tl.load(
            m_ptr + offs_n[:, None] * stride_mn + offs_k[None, :],
            mask=n_ok[:, None] & (offs_k[None, :] < K),
            other=0,
        ) != 0
    return keep


@triton.jit
def _keep_tile_t(m_ptr, offs_n, n_ok, k0, K, stride_mn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 MASK_MODE: tl.constexpr):
    """:func:`_keep_tile` transposed, ``[BLOCK_K, BLOCK_N]``. A byte mask is loaded transposed
    (with the weight tile loaded the same way, masking them is an elementwise op on two loaded
    tiles, which Triton applies in the MMA operand's registers); bits are expanded, then
    transposed."""
    if MASK_MODE == 0:
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        keep = tl.load(m_ptr + offs_k[:, None] + offs_n[None, :] * stride_mn,
                       mask=(offs_k[:, None] < K) & n_ok[None, :], other=0) != 0
    elif MASK_MODE == 3:
        keep = tl.full((BLOCK_K, BLOCK_N), 1, tl.int1)
    else:
        keep = tl.trans(_keep_tile(m_ptr, offs_n, n_ok, k0, K, stride_mn, BLOCK_N, BLOCK_K, MASK_MODE))
    return keep


@triton.jit
def _masked_w(w_ptr, m_ptr, offs_n, n_ok, offs_k, k_ok, k0, K, stride_wn, stride_wk, stride_mn,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MASK_MODE: tl.constexpr):
    """``(W ⊙ M)[offs_n, offs_k]``, ``[BLOCK_N, BLOCK_K]`` (zero outside the weight)."""
    wt = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                 mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    return tl.where(_keep_tile(m_ptr, offs_n, n_ok, k0, K, stride_mn, BLOCK_N, BLOCK_K, MASK_MODE), wt, 0.0)


@triton.jit
def _masked_w_t(w_ptr, m_ptr, offs_n, n_ok, offs_k, k_ok, k0, K, stride_wn, stride_wk, stride_mn,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MASK_MODE: tl.constexpr):
    """:func:`_masked_w` transposed, ``[BLOCK_K, BLOCK_N]``, loaded that way rather than transposed
    in registers (see :func:`_keep_tile_t`)."""
    wt_t = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                   mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    return tl.where(_keep_tile_t(m_ptr, offs_n, n_ok, k0, K, stride_mn, BLOCK_N, BLOCK_K, MASK_MODE), wt_t, 0.0)


@triton.jit
def _row_tile(pid_m, seg_ptr, L, R, BLOCK_M: tl.constexpr, PATHWAY: tl.constexpr):
    """(language, first row, end of segment) of row tile ``pid_m``, in sorted-row coordinates.

    Tiles are numbered language by language, ``ceil(count_l / BLOCK_M)`` per language, so no
    tile straddles two languages.
    """
    pid = pid_m.to(tl.int64)
    if PATHWAY:
        lang = pid * 0 - 1
        start = pid * 0
        end = pid * 0
        first_tile = pid * 0
        for idx in range(0, L):
            seg_start = tl.load(seg_ptr + idx)
            seg_end = tl.load(seg_ptr + idx + 1)
            n_tiles = (seg_end - seg_start + BLOCK_M - 1) // BLOCK_M
            hit = (pid >= first_tile) & (pid < first_tile + n_tiles)
            lang = tl.where(hit, idx, lang)
            start = tl.where(hit, seg_start + (pid - first_tile) * BLOCK_M, start)
            end = tl.where(hit, seg_end, end)
            first_tile += n_tiles
    else:
        lang = pid * 0
        start = pid * BLOCK_M
        end = pid * 0 + R
    return lang, start, end


@triton.jit
def _rows(perm_ptr, start, end, BLOCK_M: tl.constexpr, PATHWAY: tl.constexpr):
    """Original row indices (int64) of sorted rows ``start .. start+BLOCK_M`` and their validity."""
    offs = start + tl.arange(0, BLOCK_M).to(tl.int64)
    ok = offs < end
    if PATHWAY:  # noqa: SIM108 (a constexpr branch, not a runtime select)
        rows = tl.load(perm_ptr + offs, mask=ok, other=0)
    else:
        rows = offs
    return rows, ok


@triton.jit
def _grouped_tile(n_tiles1, GROUP: tl.constexpr):
    """(tile0, tile1) of this program in a 1-D grid of ``n_tiles0 * n_tiles1`` output tiles.

    Programs run in groups of ``GROUP`` consecutive tile0 indices, tile0 fastest within a
    group, so the programs resident at one time share a few tiles of each operand in L2 instead
    of all reading the same tile1 column and streaming the other operand through L2 once per
    column (an operand larger than L2 would then come from memory once per column).
    """
    pid = tl.program_id(0)
    per_group = GROUP * n_tiles1
    group = pid // per_group
    first = group * GROUP
    size = tl.minimum(tl.num_programs(0) // n_tiles1 - first, GROUP)
    local = pid - group * per_group
    return first + local % size, local // size


# Reduction elements per partial sum when ``SPLIT_ACC`` (float32 without TF32, whose dot is a
# chain of FMAs per output element): a sum over ``L`` elements is then a rounding chain
# of about ``_ACC_LEN + L / _ACC_LEN`` terms instead of ``L``, like a split-K sum. One running sum
# over 4099 rows had 6x cuBLAS's error in fp32 (weight gradient, H200); about sqrt(L) is the
# best length for the L of these layers (hundreds to tens of thousands).
_ACC_LEN: tl.constexpr = tl.constexpr(256)


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr):
    """``acc + a @ b``, accumulated in place (the MMA's or the FMA chain's own accumulator).

    Partial sums must be loop-carried values, reset per group of tiles (see ``_fwd_tile``):
    ``acc + tl.dot(a, b)`` is not one, since Triton's combine pass rewrites it to
    ``tl.dot(a, b, acc)`` (``tests/kernels/sm90_compile.py --split`` checks the compiled IR)."""
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, do_bench=autotune_bench,
                 prune_configs_by={"early_config_prune": _pruner(("BLOCK_M", "BLOCK_N", "BLOCK_K"), "w_ptr")})
@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, m_ptr, b_ptr, y_ptr, perm_ptr, seg_ptr,
    R, N, K, L, R_BUCKET,
    stride_xr, stride_xk, stride_wn, stride_wk, stride_ml, stride_mn, stride_yr, stride_yn,
    MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, PATHWAY: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, SPLIT_ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, W_AS_A: tl.constexpr, GROUP: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.cdiv(N, BLOCK_N), GROUP)
    lang, start, end = _row_tile(pid_m, seg_ptr, L, R, BLOCK_M, PATHWAY)
    rows, r_ok = _rows(perm_ptr, start, end, BLOCK_M, PATHWAY)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    m_base = m_ptr + lang * stride_ml
    acc = _fwd_tile(x_ptr, w_ptr, m_base, rows, r_ok, offs_n, n_ok, K, stride_xr, stride_xk, stride_wn,
                    stride_wk, stride_mn, MASK_MODE, PREC, UPCAST, SPLIT_ACC, W_AS_A, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_yr + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])


@triton.jit
def _fwd_step(acc, x_ptr, w_ptr, m_base, rows, r_ok, offs_n, n_ok, k0, K, stride_xr, stride_xk, stride_wn,
              stride_wk, stride_mn, MASK_MODE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
              W_AS_A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc`` plus the product of the ``BLOCK_K`` reduction columns from ``k0``."""
    offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    k_ok = offs_k < K
    xt = tl.load(x_ptr + rows[:, None] * stride_xr + offs_k[None, :] * stride_xk,
                 mask=r_ok[:, None] & k_ok[None, :], other=0.0)
    wt = _masked_w(w_ptr, m_base, offs_n, n_ok, offs_k, k_ok, k0, K, stride_wn, stride_wk, stride_mn,
                   BLOCK_N, BLOCK_K, MASK_MODE)
    if UPCAST:
        xt = xt.to(tl.float32)
        wt = wt.to(tl.float32)
    if W_AS_A:  # noqa: SIM108 (a constexpr branch, not a runtime select)
        out = _mma(wt, tl.trans(xt), acc, PREC)
    else:
        out = _mma(xt, tl.trans(wt), acc, PREC)
    return out


@triton.jit
def _fwd_tile(x_ptr, w_ptr, m_base, rows, r_ok, offs_n, n_ok, K, stride_xr, stride_xk, stride_wn, stride_wk,
              stride_mn, MASK_MODE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
              SPLIT_ACC: tl.constexpr, W_AS_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` tile of ``x (W ⊙ M)ᵀ``; ``W_AS_A``: computed as ``((W ⊙ M) xᵀ)ᵀ``,
    the masked weight tile being the left operand. ``SPLIT_ACC``: partial sums over groups of
    ``_ACC_LEN`` columns (a multiple of every reduction tile of the configs), then added."""
    if W_AS_A:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SPLIT_ACC:
        tl.static_assert(_ACC_LEN % BLOCK_K == 0)
        for g0 in range(0, K, _ACC_LEN):
            part = tl.zeros_like(acc)
            for k0 in range(g0, tl.minimum(g0 + _ACC_LEN, K), BLOCK_K):
                part = _fwd_step(part, x_ptr, w_ptr, m_base, rows, r_ok, offs_n, n_ok, k0, K, stride_xr, stride_xk,
                                 stride_wn, stride_wk, stride_mn, MASK_MODE, PREC, UPCAST, W_AS_A, BLOCK_N, BLOCK_K)
            acc += part
    else:
        for k0 in range(0, K, BLOCK_K):
            acc = _fwd_step(acc, x_ptr, w_ptr, m_base, rows, r_ok, offs_n, n_ok, k0, K, stride_xr, stride_xk,
                            stride_wn, stride_wk, stride_mn, MASK_MODE, PREC, UPCAST, W_AS_A, BLOCK_N, BLOCK_K)
    if W_AS_A:  # noqa: SIM108 (a constexpr branch, not a runtime select)
        out = tl.trans(acc)
    else:
        out = acc
    return out


@triton.jit
def _dx_step(acc, dy_ptr, w_ptr, m_base, rows, r_ok, n0, N, offs_k, k_ok, k0, K, stride_dyr, stride_dyn,
             stride_wn, stride_wk, stride_mn, MASK_MODE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
             W_AS_A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc`` plus the product over the ``BLOCK_N`` rows of W from ``n0``."""
    offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    n_ok = offs_n < N
    dyt = tl.load(dy_ptr + rows[:, None] * stride_dyr + offs_n[None, :] * stride_dyn,
                  mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    if W_AS_A:
        wt_t = _masked_w_t(w_ptr, m_base, offs_n, n_ok, offs_k, k_ok, k0, K, stride_wn, stride_wk, stride_mn,
                           BLOCK_N, BLOCK_K, MASK_MODE)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            wt_t = wt_t.to(tl.float32)
        out = _mma(wt_t, tl.trans(dyt), acc, PREC)
    else:
        wt = _masked_w(w_ptr, m_base, offs_n, n_ok, offs_k, k_ok, k0, K, stride_wn, stride_wk, stride_mn,
                       BLOCK_N, BLOCK_K, MASK_MODE)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            wt = wt.to(tl.float32)
        out = _mma(dyt, wt, acc, PREC)
    return out


@triton.autotune(configs=_DX_CONFIGS, key=_KEY, do_bench=autotune_bench,
                 prune_configs_by={"early_config_prune": _pruner(("BLOCK_M", "BLOCK_K", "BLOCK_N"), "w_ptr")})
@triton.jit
def _dx_kernel(
    dy_ptr, w_ptr, m_ptr, dx_ptr, perm_ptr, seg_ptr,
    R, N, K, L, R_BUCKET,
    stride_dyr, stride_dyn, stride_wn, stride_wk, stride_ml, stride_mn, stride_dxr, stride_dxk,
    MASK_MODE: tl.constexpr, PATHWAY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    SPLIT_ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    W_AS_A: tl.constexpr, GROUP: tl.constexpr,
):
    pid_m, pid_k = _grouped_tile(tl.cdiv(K, BLOCK_K), GROUP)
    lang, start, end = _row_tile(pid_m, seg_ptr, L, R, BLOCK_M, PATHWAY)
    rows, r_ok = _rows(perm_ptr, start, end, BLOCK_M, PATHWAY)
    k0 = pid_k.to(tl.int64) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    m_base = m_ptr + lang * stride_ml
    if W_AS_A:
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if SPLIT_ACC:  # partial sums over groups of _ACC_LEN rows of W (see _fwd_tile)
        tl.static_assert(_ACC_LEN % BLOCK_N == 0)
        for g0 in range(0, N, _ACC_LEN):
            part = tl.zeros_like(acc)
            for n0 in range(g0, tl.minimum(g0 + _ACC_LEN, N), BLOCK_N):
                part = _dx_step(part, dy_ptr, w_ptr, m_base, rows, r_ok, n0, N, offs_k, k_ok, k0, K, stride_dyr,
                                stride_dyn, stride_wn, stride_wk, stride_mn, MASK_MODE, PREC, UPCAST, W_AS_A,
                                BLOCK_N, BLOCK_K)
            acc += part
    else:
        for n0 in range(0, N, BLOCK_N):
            acc = _dx_step(acc, dy_ptr, w_ptr, m_base, rows, r_ok, n0, N, offs_k, k_ok, k0, K, stride_dyr,
                           stride_dyn, stride_wn, stride_wk, stride_mn, MASK_MODE, PREC, UPCAST, W_AS_A,
                           BLOCK_N, BLOCK_K)
    if W_AS_A:  # noqa: SIM108 (a constexpr branch, not a runtime select)
        out = tl.trans(acc)
    else:
        out = acc
    tl.store(dx_ptr + rows[:, None] * stride_dxr + offs_k[None, :] * stride_dxk,
             out.to(dx_ptr.dtype.element_ty), mask=r_ok[:, None] & k_ok[None, :])


@triton.jit
def _dw_rows(dy_ptr, x_ptr, perm_ptr, start, end, offs_n, n_ok, offs_k, k_ok,
             stride_dyr, stride_dyn, stride_xr, stride_xk, PATHWAY: tl.constexpr, PREC: tl.constexpr,
             UPCAST: tl.constexpr, SPLIT_ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """``dy[rows]ᵀ x[rows]`` tile ``[BLOCK_N, BLOCK_K]`` over sorted rows ``start .. end``
    (``SPLIT_ACC``: see :func:`_fwd_tile`)."""
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if SPLIT_ACC:  # partial sums over groups of _ACC_LEN rows (see _fwd_tile)
        tl.static_assert(_ACC_LEN % BLOCK_M == 0)
        for g0 in range(start, end, _ACC_LEN):
            part = tl.zeros_like(acc)
            for r0 in range(g0, tl.minimum(g0 + _ACC_LEN, end), BLOCK_M):
                part = _dw_tile(dy_ptr, x_ptr, perm_ptr, r0, end, offs_n, n_ok, offs_k, k_ok, stride_dyr,
                                stride_dyn, stride_xr, stride_xk, part, PATHWAY, PREC, UPCAST, BLOCK_M)
            acc += part
    else:
        for r0 in range(start, end, BLOCK_M):
            acc = _dw_tile(dy_ptr, x_ptr, perm_ptr, r0, end, offs_n, n_ok, offs_k, k_ok, stride_dyr, stride_dyn,
                           stride_xr, stride_xk, acc, PATHWAY, PREC, UPCAST, BLOCK_M)
    return acc


@triton.jit
def _dw_tile(dy_ptr, x_ptr, perm_ptr, r0, end, offs_n, n_ok, offs_k, k_ok, stride_dyr, stride_dyn,
             stride_xr, stride_xk, acc, PATHWAY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
             BLOCK_M: tl.constexpr):
    """``acc + dy[rows]ᵀ x[rows]`` for the ``BLOCK_M`` sorted rows from ``r0``."""
    rows, r_ok = _rows(perm_ptr, r0, end, BLOCK_M, PATHWAY)
    dyt = tl.load(dy_ptr + rows[:, None] * stride_dyr + offs_n[None, :] * stride_dyn,
                  mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    xt = tl.load(x_ptr + rows[:, None] * stride_xr + offs_k[None, :] * stride_xk,
                 mask=r_ok[:, None] & k_ok[None, :], other=0.0)
    if UPCAST:
        dyt = dyt.to(tl.float32)
        xt = xt.to(tl.float32)
    return _mma(tl.trans(dyt), xt, acc, PREC)


@triton.autotune(configs=_DW_CONFIGS, key=[*_KEY, "HARD"], do_bench=autotune_bench,
                 prune_configs_by={"early_config_prune": _pruner(("BLOCK_N", "BLOCK_K", "BLOCK_M"), "x_ptr")})
@triton.jit
def _dw_kernel(
    dy_ptr, x_ptr, m_ptr, dw_ptr, perm_ptr, seg_ptr,
    R, N, K, L, R_BUCKET,
    stride_dyr, stride_dyn, stride_xr, stride_xk, stride_ml, stride_mn, stride_dwn, stride_dwk,
    MASK_MODE: tl.constexpr, HARD: tl.constexpr, PATHWAY: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, SPLIT_ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    pid_n, pid_k = _grouped_tile(tl.cdiv(K, BLOCK_K), GROUP)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k0 = pid_k.to(tl.int64) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    if PATHWAY:
        # Hard pathway: each language's sum is masked by its own mask before they are added.
        total = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        m_lang = m_ptr  # advanced by one language per pass: 64-bit pointer arithmetic
        for idx in range(0, L):
            acc = _dw_rows(dy_ptr, x_ptr, perm_ptr, tl.load(seg_ptr + idx), tl.load(seg_ptr + idx + 1),
                           offs_n, n_ok, offs_k, k_ok, stride_dyr, stride_dyn, stride_xr, stride_xk,
                           PATHWAY, PREC, UPCAST, SPLIT_ACC, BLOCK_M, BLOCK_N, BLOCK_K)
            keep = _keep_tile(m_lang, offs_n, n_ok, k0, K, stride_mn, BLOCK_N, BLOCK_K, MASK_MODE)
            total += tl.where(keep, acc, 0.0)
            m_lang += stride_ml
    else:
        # One pass over all rows in their original order; hard masks in the epilogue.
        total = _dw_rows(dy_ptr, x_ptr, perm_ptr, 0, R, offs_n, n_ok, offs_k, k_ok, stride_dyr,
                         stride_dyn, stride_xr, stride_xk, PATHWAY, PREC, UPCAST, SPLIT_ACC, BLOCK_M, BLOCK_N,
                         BLOCK_K)
        if HARD:
            keep = _keep_tile(m_ptr, offs_n, n_ok, k0, K, stride_mn, BLOCK_N, BLOCK_K, MASK_MODE)
            total = tl.where(keep, total, 0.0)
    tl.store(dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk,
             total.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def _mask_grad_kernel(g_ptr, m_ptr, N, K, stride_gn, stride_gk, stride_mn, MASK_MODE: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``g[N, K] *= M`` in place (zeros where the mask drops a weight): the hard-mask epilogue of
    a weight gradient computed by cuBLAS."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ok = n_ok[:, None] & (offs_k[None, :] < K)
    keep = _keep_tile(m_ptr, offs_n, n_ok, k0, K, stride_mn, BLOCK_N, BLOCK_K, MASK_MODE)
    ptrs = g_ptr + offs_n[:, None] * stride_gn + offs_k[None, :] * stride_gk
    tl.store(ptrs, tl.zeros((BLOCK_N, BLOCK_K), dtype=g_ptr.dtype.element_ty), mask=ok & ~keep)


# Repeated launches skip Triton's per-call argument binding (``kernels/launch.py``).
_fwd_launch = DirectLauncher(_fwd_kernel)
_dx_launch = DirectLauncher(_dx_kernel)
_dw_launch = DirectLauncher(_dw_kernel)
_mask_grad_launch = DirectLauncher(_mask_grad_kernel)


class _Plan:
    """How rows map to kernel tiles: identity (one mask) or sorted by language (pathway)."""

    def __init__(self, n_rows: int, lang: Tensor | None, n_lang: int) -> None:
        self.n_rows = n_rows
        self.n_lang = n_lang
        self.perm: Tensor | None = None
        self.seg: Tensor | None = None
        self.counts = [n_rows]
        if lang is not None:
            # Stable sort keeps each language's rows in their original order.
            self.perm = torch.argsort(lang, stable=True)
            counts = torch.bincount(lang, minlength=n_lang)
            self.seg = torch.zeros(n_lang + 1, dtype=torch.int64, device=lang.device)
            self.seg[1:] = torch.cumsum(counts, 0)
            self.counts = [int(c) for c in counts.tolist()]

    @property
    def pathway(self) -> bool:
        return self.perm is not None

    def row_tiles(self, block_m: int) -> int:
        return sum(cdiv(c, block_m) for c in self.counts)

    @property
    def bucket(self) -> int:
        # Autotune once per power-of-two row count, not once per batch size.
        return next_power_of_2(max(self.n_rows, 1))


def _prec(x: Tensor, allow_tf32: bool) -> str:
    return "tf32" if allow_tf32 and x.dtype == torch.float32 and not _INTERPRET else "ieee"


def _split_acc(x: Tensor, allow_tf32: bool) -> bool:
    # float32 without TF32: the dot is an FMA chain per output element, so split it (_ACC_LEN).
    # TF32 MMAs round their inputs to 10 mantissa bits, an error the chain's cannot approach, and
    # a second accumulator made most TF32 tiles spill; bf16/fp16 met the accuracy rule unsplit.
    return _prec(x, allow_tf32) == "ieee" and x.dtype == torch.float32


def _upcast(x: Tensor) -> bool:
    # The interpreter's tl.dot multiplies bfloat16 tiles as raw uint16 bits; fp32 products of
    # bf16 values are exact, so upcasting there gives what tensor cores compute.
    return _INTERPRET and x.dtype == torch.bfloat16


# Output tiles per launch-order group (``_grouped_tile``): 8 row tiles of 128-256 rows keep the
# resident programs' operand tiles within a few MB of L2.
_GROUP = 8


def _meta(config: dict[str, Any] | None) -> dict[str, Any]:
    """Launch meta-parameters: the fixed ``GROUP``, and a test's explicit config (which may set
    ``GROUP`` too) in place of the autotuner's."""
    return {"GROUP": _GROUP, **(config or {})}


def _launch_fwd(x2: Tensor, w: Tensor, m: Tensor, mode: int, bias: Tensor | None, plan: _Plan,
                allow_tf32: bool, out: Tensor | None = None, config: dict[str, Any] | None = None) -> Tensor:
    """``[R, K] x [N, K] -> [R, N]``; ``m, mode`` from :func:`_kernel_mask`; ``out`` for tests.

    ``config`` (tests): explicit meta-parameters (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``,
    ``W_AS_A``, optionally ``GROUP``) instead of the autotuner's choice, so that every variant
    runs on CPU too.
    """
    r, k = x2.shape
    n = w.shape[0]
    y = torch.empty(r, n, dtype=x2.dtype, device=x2.device) if out is None else out
    if r == 0 or n == 0:
        return y

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (plan.row_tiles(meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)

    kernel = _fwd_launch if config is None else _fwd_kernel.fn
    kernel[grid](
        x2, w, m, bias, y, plan.perm, plan.seg,
        r, n, k, plan.n_lang, plan.bucket,
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), m.stride(0), m.stride(1),
        y.stride(0), y.stride(1),
        MASK_MODE=mode, HAS_BIAS=bias is not None, PATHWAY=plan.pathway,
        PREC=_prec(x2, allow_tf32), UPCAST=_upcast(w), SPLIT_ACC=_split_acc(x2, allow_tf32), **_meta(config),
    )
    return y


def _launch_dx(dy: Tensor, w: Tensor, m: Tensor, mode: int, plan: _Plan, allow_tf32: bool,
               out: Tensor | None = None, config: dict[str, Any] | None = None) -> Tensor:
    """``[R, N] x [N, K] -> [R, K]`` with the mask applied to ``w``; ``config`` as in
    :func:`_launch_fwd`."""
    r, n = dy.shape
    k = w.shape[1]
    dx = torch.empty(r, k, dtype=dy.dtype, device=dy.device) if out is None else out
    if r == 0 or k == 0:
        return dx

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (plan.row_tiles(meta["BLOCK_M"]) * cdiv(k, meta["BLOCK_K"]),)

    kernel = _dx_launch if config is None else _dx_kernel.fn
    kernel[grid](
        dy, w, m, dx, plan.perm, plan.seg,
        r, n, k, plan.n_lang, plan.bucket,
        dy.stride(0), dy.stride(1), w.stride(0), w.stride(1), m.stride(0), m.stride(1),
        dx.stride(0), dx.stride(1),
        MASK_MODE=mode, PATHWAY=plan.pathway, PREC=_prec(dy, allow_tf32), UPCAST=_upcast(w),
        SPLIT_ACC=_split_acc(dy, allow_tf32), **_meta(config),
    )
    return dx


def _launch_dw(dy: Tensor, x2: Tensor, m: Tensor, mode: int, hard: bool, plan: _Plan,
               allow_tf32: bool, dtype: torch.dtype, out: Tensor | None = None,
               config: dict[str, Any] | None = None) -> Tensor:
    """``[R, N]ᵀ x [R, K] -> [N, K]``, summed per language and masked when ``hard``; ``config``
    as in :func:`_launch_fwd` (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``GROUP``)."""
    r, n = dy.shape
    k = x2.shape[1]
    dw = torch.empty(n, k, dtype=dtype, device=dy.device) if out is None else out
    if n == 0 or k == 0:
        return dw
    # Soft gradients ignore languages: one pass over all rows in their original order.
    pathway = plan.pathway and hard

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (cdiv(n, meta["BLOCK_N"]) * cdiv(k, meta["BLOCK_K"]),)

    kernel = _dw_launch if config is None else _dw_kernel.fn
    kernel[grid](
        dy, x2, m, dw, plan.perm if pathway else None, plan.seg if pathway else None,
        r, n, k, plan.n_lang, plan.bucket,
        dy.stride(0), dy.stride(1), x2.stride(0), x2.stride(1), m.stride(0), m.stride(1),
        dw.stride(0), dw.stride(1),
        MASK_MODE=mode, HARD=hard, PATHWAY=pathway, PREC=_prec(dy, allow_tf32), UPCAST=_upcast(x2),
        SPLIT_ACC=_split_acc(x2, allow_tf32), **_meta(config),
    )
    return dw


def _dw_cublas(dy: Tensor, x2: Tensor, m: Tensor, mode: int, hard: bool) -> Tensor:
    """Single-mask weight gradient ``dYᵀX`` by cuBLAS (a plain matmul: the mask only enters a
    hard gradient, zeroed afterwards in place by one small kernel)."""
    dw = dy.t() @ x2
    if hard and dw.numel():
        n, k = dw.shape
        block_n, block_k = 32, 64
        _mask_grad_launch[(cdiv(n, block_n), cdiv(k, block_k))](
            dw, m, n, k, dw.stride(0), dw.stride(1), m.stride(0),
            MASK_MODE=mode, BLOCK_N=block_n, BLOCK_K=block_k,
        )
    return dw


def _kernel_mask(masks: Tensor, k: int, bits: bool) -> tuple[Tensor, int]:
    """``[L, N, *]`` masks as the kernels read them, and the kernels' ``MASK_MODE``."""
    m = (masks.view(torch.uint8) if masks.dtype == torch.bool else masks).contiguous()
    if not bits:
        return m, 0
    if k % 32 == 0 and m.data_ptr() % 4 == 0:
        # Whole int32 words per row: one-byte loads keep Triton from pipelining the K loop
        # (no cp.async under 4 bytes), word loads do not.
        return m.view(torch.int32), 2
    return m, 1


_NO_MASK = 3  # MASK_MODE of unmasked_linear


def _forward(x2: Tensor, w: Tensor, bias: Tensor | None, masks: Tensor | None, lang: Tensor | None, bits: bool,
             allow_tf32: bool) -> tuple[Tensor, Tensor, int, _Plan]:
    """The forward launch; also the kernel mask, its mode and the row plan (for the backward)."""
    if masks is None:
        m, mode = torch.ones(1, 1, 1, dtype=torch.uint8, device=w.device), _NO_MASK
    else:
        m, mode = _kernel_mask(masks, w.shape[1], bits)
    plan = _Plan(x2.shape[0], lang, m.shape[0])
    # The kernel reads the bias with unit stride.
    y = _launch_fwd(x2, w, m, mode, None if bias is None else bias.contiguous(), plan, allow_tf32)
    return y, m, mode, plan


def _apply(x2: Tensor, w: Tensor, bias: Tensor | None, masks: Tensor | None, lang: Tensor | None, bits: bool,
           hard: bool, allow_tf32: bool) -> Tensor:
    """``_MaskedLinearFn.apply``, or the forward alone when no gradient can be asked for (custom
    autograd functions cost about 10 µs of host time per call even then)."""
    if torch.is_grad_enabled() and (x2.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad)):
        return _MaskedLinearFn.apply(x2, w, bias, masks, lang, bits, hard, allow_tf32)
    return _forward(x2, w, bias, masks, lang, bits, allow_tf32)[0]


class _MaskedLinearFn(torch.autograd.Function):
    """Autograd of the fused kernels; ``masks`` is ``[L, N, *]`` (None: no mask, ``MASK_MODE``
    3) and ``lang`` is None when ``L == 1``."""

    @staticmethod
    def forward(ctx: Any, x2: Tensor, w: Tensor, bias: Tensor | None, masks: Tensor | None, lang: Tensor | None,
                bits: bool, hard: bool, allow_tf32: bool) -> Tensor:
        y, m, mode, plan = _forward(x2, w, bias, masks, lang, bits, allow_tf32)
        ctx.save_for_backward(x2, w, m)
        ctx.plan, ctx.mode, ctx.hard, ctx.allow_tf32 = plan, mode, hard, allow_tf32
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable: say so, not "no grad_fn"
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x2, w, m = ctx.saved_tensors
        plan: _Plan = ctx.plan
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _launch_dx(dy, w, m, ctx.mode, plan, ctx.allow_tf32)
        if ctx.needs_input_grad[1]:
            if plan.pathway or w.dtype == torch.float32:
                # Pathway: one launch sums every language's masked gradient. fp32: our kernel keeps
                # the allow_tf32 choice (cuBLAS follows torch's global TF32 flag instead).
                dw = _launch_dw(dy, x2, m, ctx.mode, ctx.hard, plan, ctx.allow_tf32, w.dtype)
            else:
                dw = _dw_cublas(dy, x2, m[0], ctx.mode, ctx.hard)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)  # in dy's dtype, accumulated in fp32 and rounded once: as torch's own linear
        return dx, dw, db, None, None, None, None, None


def masked_linear(
    x: Tensor,
    weight: Tensor,
    mask: Tensor,
    bias: Tensor | None = None,
    *,
    hard: bool = False,
    backend: str = "triton",
    allow_tf32: bool = False,
) -> Tensor:
    """``y = x (W ⊙ M)ᵀ + b`` with the mask applied inside the kernel.

    Args:
        x: ``[*, K]`` float32, bfloat16 or float16.
        weight: ``[N, K]``, same dtype and device as x.
        mask: ``[N, K]`` bool/uint8 bytes or ``[N, ceil(K/8)]`` uint8 bits (format rules in
            ``naive.py``; for ``K == 1`` a uint8 ``[N, 1]`` mask is bits, use bool for bytes).
        bias: ``[N]`` or None.
        hard: weight gradient ``(dYᵀX) ⊙ M`` instead of the straight-through ``dYᵀX``.
        backend: ``"triton"`` (fused kernels) or ``"torch"`` (the reference).
        allow_tf32: float32 matmuls on TF32 tensor cores (GPU only).

    Returns:
        ``[*, N]`` in x's dtype. Raises ``ValueError`` on bad shapes, dtypes or devices.
    """
    fmt = check_masked_linear(x, weight, mask, bias)
    if backend == "torch":
        return masked_linear_ref(x, weight, mask, bias, hard=hard)
    if backend != "triton":
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    n, k = weight.shape
    x2 = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), k)
    y = _apply(x2, weight, bias, mask[None], None, fmt == "bits", hard, allow_tf32)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def unmasked_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, allow_tf32: bool = False) -> Tensor:
    """``y = x Wᵀ + b`` through the fused kernels with the mask compiled out (``MASK_MODE`` 3).

    A diagnostic for the benchmarks: beside ``masked_linear`` and cuBLAS it separates what the
    mask costs from how far the kernels' matmul is from cuBLAS's. Shapes as in
    :func:`masked_linear`; the weight gradient is the dense ``dYᵀX``.
    """
    n, k = weight.shape
    check_unmasked_linear(x, weight, bias)  # no mask to build: the benchmark would time its allocation
    y = _apply(x.reshape(math.prod(x.shape[:-1]), k), weight, bias, None, None, False, False, allow_tf32)
    return y.reshape(*x.shape[:-1], n)


def pathway_masked_linear(
    x: Tensor,
    weight: Tensor,
    masks: Tensor,
    lang: Tensor,
    bias: Tensor | None = None,
    *,
    hard: bool = False,
    backend: str = "triton",
    allow_tf32: bool = False,
) -> Tensor:
    """Mixed-language batch in one launch: ``y[r] = x[r] (W ⊙ M[lang[r]])ᵀ + b``.

    Args:
        x: ``[*, K]`` float32, bfloat16 or float16.
        weight: ``[N, K]``, same dtype and device as x.
        masks: ``[L, N, K]`` bool/uint8 bytes or ``[L, N, ceil(K/8)]`` uint8 bits.
        lang: ``[*]`` (x's leading dims) integer language of each row, in ``0..L-1``.
        bias: ``[N]`` or None.
        hard: weight gradient ``Σ_l (dY_lᵀ X_l) ⊙ M_l`` instead of ``Σ_l dY_lᵀ X_l``.
        backend: ``"triton"`` (fused kernels) or ``"torch"`` (per-language reference loop).
        allow_tf32: float32 matmuls on TF32 tensor cores (GPU only).

    Returns:
        ``[*, N]`` in x's dtype. Raises ``ValueError`` on bad inputs, including lang out of range
        (checking it costs one device sync).
    """
    fmt = check_pathway(x, weight, masks, lang, bias)
    if backend == "torch":
        return pathway_masked_linear_ref(x, weight, masks, lang, bias, hard=hard)
    if backend != "triton":
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    n, k = weight.shape
    y = _apply(x.reshape(math.prod(x.shape[:-1]), k), weight, bias, masks, lang.reshape(-1).to(torch.int64),
               fmt == "bits", hard, allow_tf32)
    return y.reshape(*x.shape[:-1], n)
