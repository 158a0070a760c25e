"""Masked cast ``(W ⊙ M).to(dtype)`` in one pass: the mask folded into autocast's weight copy.

Under bf16 autocast every training step copies each fp32 weight to bf16 before its GEMMs; that
copy exists whether or not the layer is masked. Zeroing the dropped weights in the same pass
makes it a copy of ``W ⊙ M`` for the cost of the cast alone (read W and one bit of mask per
weight, write the copy), and leaves the forward and dX GEMMs to cuBLAS. No fp32 ``W ⊙ M`` and no
expanded mask are ever made: the only copy is the one autocast makes anyway.

The backward is the same kernel run on the gradient of the copy: a soft gradient is cast back
unmasked (straight-through, ``dW = dYᵀX``), a hard one is masked on the way (``(dYᵀX) ⊙ M``).
``naive.masked_cast_ref`` is the reference.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..host import cdiv
from ..launch import DirectLauncher
from .fused import _keep_tile, _kernel_mask
from .naive import _check_mask_shape, masked_cast_ref

__all__ = ["masked_cast"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# 32 rows x 128 columns: a 128-column tile is four whole int32 words of a bit-mask row, and
# 4 warps move 16 fp32 values each per tile (a memory-bound copy; no autotuning needed).
_BLOCK_N, _BLOCK_K, _WARPS = 32, 128, 4


@triton.jit
def _round(x, DST: tl.constexpr):
    """fp32 ``x`` to ``DST``, rounding to nearest even. For bfloat16 the rounding is spelled out
    on the bits (as torch does it, NaN to 0x7FC0): the CPU interpreter truncates a plain
    fp32-to-bf16 cast, and the same bits on both is what lets the CPU test demand equality."""
    if DST.is_bf16():
        bits = x.to(tl.uint32, bitcast=True)
        up = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = tl.where(x != x, 0x7FC0, up).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(DST)
    return out


@triton.jit
def _masked_cast_kernel(src_ptr, m_ptr, dst_ptr, N, K, stride_sn, stride_sk, stride_mn, stride_dn, stride_dk,
                        MASK_MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dst[N, K] = where(M, src, 0)`` converted to dst's dtype (through fp32, which holds every
    bf16 and fp16 value exactly; then round to nearest even)."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ok = n_ok[:, None] & (offs_k[None, :] < K)
    src = tl.load(src_ptr + offs_n[:, None] * stride_sn + offs_k[None, :] * stride_sk, mask=ok, other=0.0)
    keep = _keep_tile(m_ptr, offs_n, n_ok, k0, K, stride_mn, BLOCK_N, BLOCK_K, MASK_MODE)
    out = _round(tl.where(keep, src.to(tl.float32), 0.0), dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + offs_n[:, None] * stride_dn + offs_k[None, :] * stride_dk, out, mask=ok)


# Repeated launches skip Triton's per-call argument binding (``kernels/launch.py``).
_masked_cast_launch = DirectLauncher(_masked_cast_kernel)


def _launch_masked_cast(src: Tensor, m: Tensor, mode: int, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """``[N, K]`` src -> ``[N, K]`` in ``dtype`` with the mask applied; ``m, mode`` from
    ``fused._kernel_mask`` (one mask, ``m[0]`` is read); ``out`` for tests."""
    n, k = src.shape
    dst = torch.empty(n, k, dtype=dtype, device=src.device) if out is None else out
    if n == 0 or k == 0:
        return dst
    m0 = m[0]
    _masked_cast_launch[(cdiv(n, _BLOCK_N), cdiv(k, _BLOCK_K))](
        src, m0, dst, n, k, src.stride(0), src.stride(1), m0.stride(0), dst.stride(0), dst.stride(1),
        MASK_MODE=mode, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, num_warps=_WARPS,
    )
    return dst


class _MaskedCastFn(torch.autograd.Function):
    """Autograd of the masked cast: the gradient of the copy goes back to the weight's dtype,
    through the mask when ``hard``."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, m: Tensor, mode: int, dtype: torch.dtype, hard: bool) -> Tensor:
        # The mask (an input that takes no gradient) is kept on ctx, not saved for backward: a
        # copy reused across steps (MaskedLinear) may be back-propagated more than once, and
        # saved tensors are freed by the first backward pass. Its version is kept instead, so
        # that a mask changed in place before backward raises as a saved tensor would.
        ctx.m, ctx.mode, ctx.hard, ctx.weight_dtype = m, mode, hard, weight.dtype
        ctx.m_version = m._version
        return _launch_masked_cast(weight, m, mode, dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        if ctx.hard and ctx.m._version != ctx.m_version:
            raise RuntimeError("masked_cast: the mask was modified in place after the forward pass (version "
                               f"{ctx.m._version}, expected {ctx.m_version}); its hard gradient needs the "
                               "forward's mask")
        if ctx.hard:
            g = _launch_masked_cast(grad, ctx.m, ctx.mode, ctx.weight_dtype)
        else:
            g = grad.to(ctx.weight_dtype)
        return g, None, None, None, None


def masked_cast(weight: Tensor, mask: Tensor, dtype: torch.dtype, *, hard: bool = False,
                backend: str = "triton") -> Tensor:
    """``(W ⊙ M).to(dtype)`` in one pass, differentiable.

    Args:
        weight: ``[N, K]`` float32, bfloat16 or float16.
        mask: ``[N, K]`` bool/uint8 bytes or ``[N, ceil(K/8)]`` uint8 bits (``naive.py``).
        dtype: the copy's dtype (float32, bfloat16 or float16).
        hard: the weight's gradient is ``grad ⊙ M`` instead of the straight-through ``grad``
            (both cast back to the weight's dtype).
        backend: ``"triton"`` (one kernel each way) or ``"torch"`` (the reference).

    Returns:
        ``[N, K]`` in ``dtype``, zero where the mask drops a weight. Raises ``ValueError`` on bad
        shapes, dtypes or devices.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got shape {list(weight.shape)}")
    if weight.dtype not in _FLOATS or dtype not in _FLOATS:
        raise ValueError(f"masked_cast takes float32/bfloat16/float16, got {weight.dtype} -> {dtype}")
    n, k = weight.shape
    fmt = _check_mask_shape(mask, (), n, k, weight.device)
    if backend == "torch":
        return masked_cast_ref(weight, mask, dtype, hard=hard)
    if backend != "triton":
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    m, mode = _kernel_mask(mask[None], k, fmt == "bits")
    return _MaskedCastFn.apply(weight, m, mode, dtype, hard)
