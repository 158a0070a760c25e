"""Fused masked linear ``y = x (W ⊙ M)ᵀ + b`` (Triton), single-mask and pathway-batched.

``masked_linear`` / ``pathway_masked_linear`` take ``backend="triton"`` (fused kernels) or
``"torch"`` (the references in ``naive.py``). Masks are bytes ``[N, K]`` or row-packed bits
``[N, ceil(K/8)]`` (:func:`pack_rows`). ``masked_cast`` is ``(W ⊙ M).to(dtype)`` in one pass, the
mask folded into the weight copy bf16 autocast makes anyway (``cast.py``).
"""

from .cast import masked_cast
from .fused import masked_linear, pathway_masked_linear
from .naive import (
    mask_format,
    masked_cast_ref,
    masked_linear_ref,
    pack_rows,
    pathway_masked_linear_ref,
    unpack_rows,
)

__all__ = [
    "mask_format",
    "masked_cast",
    "masked_cast_ref",
    "masked_linear",
    "masked_linear_ref",
    "pack_rows",
    "pathway_masked_linear",
    "pathway_masked_linear_ref",
    "unpack_rows",
]
