"""Pure-PyTorch references of the masked linear ops, plus mask packing and input checks.

Mask formats (the weight is ``W: [N, K]``):

- ``"bytes"``: ``bool`` or ``uint8`` ``[N, K]``; a nonzero entry keeps the weight.
- ``"bits"``: ``uint8`` ``[N, ceil(K / 8)]``; ``mask[n, k] = (packed[n, k // 8] >> (k % 8)) & 1``
  (little-endian within each byte, each row padded to whole bytes with zero bits).

The format is read from the mask's dtype and last dim (:func:`mask_format`): ``bool`` is always
bytes; ``uint8`` with last dim ``ceil(K / 8)`` is bits, otherwise with last dim ``K`` it is bytes.
The two coincide only when ``K == 1``: a ``uint8 [N, 1]`` mask is then read as bits, so pass a
``bool`` mask to mean bytes.

Gradient rules (``hard`` flag), with ``M`` the mask of the row's language:

- soft (straight-through): ``dW = dYᵀ X``, every weight gets its gradient;
- hard: ``dW = (dYᵀ X) ⊙ M``; for a mixed-language batch ``dW = Σ_l (dY_lᵀ X_l) ⊙ M_l`` (ASR
  Pathways: each pathway's update is masked by its own mask, shared weights get all of them).

``dX = dY (W ⊙ M)`` and ``db = Σ_rows dY`` in both cases; the mask gets no gradient.

Autocast does not apply to these ops (nor to the Triton kernels, which it cannot reach): both
backends compute in the inputs' dtype, so under autocast they agree. ``MaskedLinear`` casts its
inputs as autocast would before calling them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "check_masked_linear",
    "check_pathway",
    "mask_format",
    "masked_cast_ref",
    "masked_linear_ref",
    "pack_rows",
    "pathway_masked_linear_ref",
    "unpack_rows",
]


def pack_rows(mask: Tensor) -> Tensor:
    """Pack each row of a boolean mask into bytes.

    Args:
        mask: ``[N, K]`` bool (any dtype: nonzero means keep).

    Returns:
        ``[N, ceil(K / 8)]`` uint8, bit ``k % 8`` of byte ``k // 8`` holds ``mask[n, k]``; the
        padding bits of each row's last byte are zero.
    """
    if mask.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D [N, K] mask, got shape {list(mask.shape)}")
    n, k = mask.shape
    kb = -(-k // 8)
    bits = torch.zeros(n, kb * 8, dtype=torch.uint8, device=mask.device)
    bits[:, :k] = (mask != 0).to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    # Bits of one byte are disjoint, so the sum is exact in uint8.
    return (bits.reshape(n, kb, 8) << shifts).sum(dim=2, dtype=torch.uint8)


def unpack_rows(packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_rows`.

    Args:
        packed: ``[*, N, ceil(k / 8)]`` uint8.
        k: number of columns of the unpacked mask.

    Returns:
        ``[*, N, k]`` bool.
    """
    if packed.dtype != torch.uint8 or packed.dim() < 1 or packed.shape[-1] != -(-k // 8):
        raise ValueError(
            f"packed mask for K={k} must be uint8 [..., {-(-k // 8)}], got {packed.dtype} "
            f"{list(packed.shape)}"
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :k].to(torch.bool)  # no -1: N may be 0


def mask_format(mask: Tensor, k: int) -> str:
    """``"bytes"`` or ``"bits"`` for a mask of a weight with ``k`` input features (see module doc)."""
    if mask.dtype == torch.bool:
        return "bytes"
    if mask.dtype != torch.uint8:
        raise ValueError(f"mask must be bool or uint8, got {mask.dtype}")
    last = mask.shape[-1] if mask.dim() else -1
    if last == -(-k // 8):
        return "bits"
    if last == k:
        return "bytes"
    raise ValueError(
        f"uint8 mask last dim must be K={k} (bytes) or ceil(K/8)={-(-k // 8)} (bits), got "
        f"shape {list(mask.shape)}"
    )


def _check_common(x: Tensor, weight: Tensor, bias: Tensor | None, float64: bool) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got shape {list(weight.shape)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must be [*, K={k}] to match weight {list(weight.shape)}, got {list(x.shape)}")
    floats = (torch.float32, torch.bfloat16, torch.float16) + ((torch.float64,) if float64 else ())
    if weight.dtype not in floats:
        names = ", ".join(str(f).removeprefix("torch.") for f in floats)
        raise ValueError(f"weight dtype must be one of {names}, got {weight.dtype}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x dtype {x.dtype} differs from weight dtype {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must be [N={n}], got {list(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")


def _check_mask_shape(mask: Tensor, lead: tuple[int, ...], n: int, k: int, device: torch.device) -> str:
    fmt = mask_format(mask, k)
    want = (*lead, n, k if fmt == "bytes" else -(-k // 8))
    if tuple(mask.shape) != want:
        raise ValueError(f"{fmt} mask must have shape {list(want)}, got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but weight is on {device}")
    return fmt


def check_masked_linear(
    x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None, *, float64: bool = False
) -> str:
    """Validate :func:`masked_linear` inputs; returns the mask format. Raises ``ValueError``.

    ``float64`` also admits float64 (the references; the kernels take fp32/bf16/fp16 only).
    """
    _check_common(x, weight, bias, float64)
    n, k = weight.shape
    return _check_mask_shape(mask, (), n, k, weight.device)


def check_unmasked_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Validate ``unmasked_linear`` inputs (those of :func:`check_masked_linear` but the mask)."""
    _check_common(x, weight, bias, False)


def check_pathway(
    x: Tensor, weight: Tensor, masks: Tensor, lang: Tensor, bias: Tensor | None, *, float64: bool = False
) -> str:
    """Validate :func:`pathway_masked_linear` inputs; returns the mask format.

    Checks ``lang`` values against the number of masks (one device sync). Raises ``ValueError``.
    """
    _check_common(x, weight, bias, float64)
    n, k = weight.shape
    if masks.dim() != 3:
        raise ValueError(f"masks must be stacked [L, N, K] or [L, N, ceil(K/8)], got {list(masks.shape)}")
    fmt = _check_mask_shape(masks, (masks.shape[0],), n, k, weight.device)
    if masks.shape[0] < 1:
        raise ValueError("masks must hold at least one language")
    if lang.dtype.is_floating_point or lang.dtype.is_complex or lang.dtype == torch.bool:
        raise ValueError(f"lang must be an integer tensor, got {lang.dtype}")
    if tuple(lang.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"lang must have shape {list(x.shape[:-1])} (x without its last dim), got {list(lang.shape)}")
    if lang.device != weight.device:
        raise ValueError(f"lang is on {lang.device} but weight is on {weight.device}")
    if lang.numel():
        lo, hi = int(lang.min()), int(lang.max())
        if lo < 0 or hi >= masks.shape[0]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"lang value {bad} out of range: {masks.shape[0]} masks (valid 0..{masks.shape[0] - 1})")
    return fmt


def _dense_mask(mask: Tensor, k: int) -> Tensor:
    """``[N, K]`` bool keep mask of a bytes or bits mask."""
    return unpack_rows(mask, k) if mask_format(mask, k) == "bits" else mask != 0


class _StraightThroughMask(torch.autograd.Function):
    """Forward ``W ⊙ M``; backward passes ``dW`` through unmasked (soft pruning)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, keep: Tensor) -> Tensor:
        return weight.masked_fill(~keep, 0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _effective_weight(weight: Tensor, keep: Tensor, hard: bool) -> Tensor:
    # W ⊙ M by masked_fill, not a product: a NaN or inf weight at a pruned position must give
    # 0, as the kernels do (inf * 0 is NaN). Hard: autograd of masked_fill gives (dYᵀX) ⊙ M.
    return weight.masked_fill(~keep, 0) if hard else _StraightThroughMask.apply(weight, keep)


def _no_autocast(t: Tensor) -> Any:
    """Autocast off on ``t``'s device: the references compute in their inputs' dtype, as the
    Triton kernels do (autocast would run ``F.linear`` in its own dtype)."""
    return torch.autocast(t.device.type, enabled=False)


def masked_linear_ref(
    x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None = None, *, hard: bool = False
) -> Tensor:
    """Reference ``y = x (W ⊙ M)ᵀ + b`` with the soft/hard gradient rules (module doc).

    Args:
        x: ``[*, K]``. weight: ``[N, K]``. mask: ``[N, K]`` bytes or ``[N, ceil(K/8)]`` bits.
        bias: ``[N]`` or None. hard: mask the weight gradient too.

    Returns:
        ``[*, N]`` in x's dtype.
    """
    check_masked_linear(x, weight, mask, bias, float64=True)
    m = _dense_mask(mask, weight.shape[1])
    with _no_autocast(x):
        return F.linear(x, _effective_weight(weight, m, hard), bias)


def masked_cast_ref(weight: Tensor, mask: Tensor, dtype: torch.dtype, *, hard: bool = False) -> Tensor:
    """Reference ``(W ⊙ M).to(dtype)``: ``[N, K]`` weight and mask (bytes or bits) -> ``[N, K]`` in
    ``dtype``; the gradient reaches the weight straight through, or masked when ``hard``."""
    _check_mask_shape(mask, (), weight.shape[0], weight.shape[1], weight.device)
    m = _dense_mask(mask, weight.shape[1])
    with _no_autocast(weight):
        return _effective_weight(weight, m, hard).to(dtype)


def pathway_masked_linear_ref(
    x: Tensor,
    weight: Tensor,
    masks: Tensor,
    lang: Tensor,
    bias: Tensor | None = None,
    *,
    hard: bool = False,
) -> Tensor:
    """Reference mixed-language masked linear: ``y[r] = x[r] (W ⊙ M[lang[r]])ᵀ + b``.

    One ordinary masked linear per language on that language's rows.

    Args:
        x: ``[*, K]``. weight: ``[N, K]``. masks: ``[L, N, K]`` bytes or ``[L, N, ceil(K/8)]`` bits.
        lang: ``[*]`` integer language index of each row, in ``0..L-1``. bias: ``[N]`` or None.
        hard: mask each language's weight gradient by its own mask.

    Returns:
        ``[*, N]`` in x's dtype.
    """
    check_pathway(x, weight, masks, lang, bias, float64=True)
    n, k = weight.shape
    x2 = x.reshape(math.prod(x.shape[:-1]), k)  # not -1: K may be 0
    lang1 = lang.reshape(-1)
    with _no_autocast(x):
        if x2.shape[0] == 0:  # no rows: an empty output that is still part of the autograd graph
            return F.linear(x2, weight, bias).reshape(*x.shape[:-1], n)
        y = x2.new_zeros(x2.shape[0], n)
        for index in range(masks.shape[0]):
            rows = (lang1 == index).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            m = _dense_mask(masks[index], k)
            y = y.index_copy(0, rows, F.linear(x2[rows], _effective_weight(weight, m, hard), bias))
    return y.reshape(*x.shape[:-1], n)
