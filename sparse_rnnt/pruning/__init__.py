"""Pruning engine: scope, exact magnitude ranking, mask sets, sparsity schedules, and the
pruners (IMP, LTH, LAP, adaptive masking, Dynamic ASR Pathways) that a trainer drives.

Faster ranking kernels replace :func:`magnitude_masks` under the same interface.
"""

from .masks import LanguageMasks, MaskSet, pack_bits, unpack_bits
from .methods import METHODS, Pruner, PruningConfig
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
    "METHODS",
    "Cubic",
    "Granularity",
    "LanguageMasks",
    "MaskSet",
    "OneShot",
    "Pruner",
    "PruningConfig",
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
