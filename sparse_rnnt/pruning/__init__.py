"""Pruning engine foundations: scope, exact magnitude ranking, mask sets, sparsity schedules.

The pruning methods (IMP, LTH, LAP, ASR Pathways, adaptive masking, Dynamic ASR Pathways) build on
these; faster ranking kernels replace :func:`magnitude_masks` under the same interface.
"""

from .masks import LanguageMasks, MaskSet, pack_bits, unpack_bits
from .ranking import (
    Granularity,
    block_sizes,
    block_sq_norms,
    expand_blocks,
    magnitude_masks,
    pruned_count,
    scores,
    topk_mask,
)
from .schedules import Cubic, OneShot, SparsitySchedule, Staircase, schedule_from_config
from .scope import ScopeConfig, select_parameters

__all__ = [
    "Cubic",
    "Granularity",
    "LanguageMasks",
    "MaskSet",
    "OneShot",
    "ScopeConfig",
    "SparsitySchedule",
    "Staircase",
    "block_sizes",
    "block_sq_norms",
    "expand_blocks",
    "magnitude_masks",
    "pack_bits",
    "pruned_count",
    "schedule_from_config",
    "scores",
    "select_parameters",
    "topk_mask",
    "unpack_bits",
]
