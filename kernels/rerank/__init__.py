"""Exact magnitude re-ranking (mask selection): Triton radix select and its torch reference.

``rerank_masks(weights, sparsity, kind=..., scope=..., candidates=..., apply=..., backend=...)``
gives masks bit-identical to ``sparse_rnnt.pruning.ranking.magnitude_masks``.
"""

from .naive import rerank_masks_torch
from .select import (
    RerankPlan,
    Segment,
    block_sq_norms,
    magnitude_threshold,
    rerank_masks,
    rerank_masks_into,
    select_units,
)

__all__ = [
    "RerankPlan",
    "Segment",
    "block_sq_norms",
    "magnitude_threshold",
    "rerank_masks",
    "rerank_masks_into",
    "rerank_masks_torch",
    "select_units",
]
