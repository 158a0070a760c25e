"""Exact magnitude masks: score weights, rank them, keep the largest.

This is the PyTorch reference of the ranking step. Faster kernels (Triton radix select) replace
:func:`magnitude_masks` under the same interface and must give bit-identical masks, so every rule
below is part of the contract.

Rules
-----
- A weight is *kept* where its mask is ``True``. Sparsity ``s`` = fraction of *pruned* weights
  among the in-scope weights (the tensors passed in).
- **Rounding.** For ``total`` weights the number pruned is ``P = floor(s * total + 0.5)`` computed
  in double precision (round half up; see :func:`pruned_count`), and ``K = total - P`` are kept.
  ``total`` is the size of the whole scope (``scope="global"``) or of each tensor
  (``scope="per_tensor"``).
- **Ties.** The ranking order is (score descending, flat index ascending): among equal scores the
  lower flat index is kept first (``0.0`` and ``-0.0`` weights tie). In global scope the flat index runs over the tensors concatenated in the
  order of the ``weights`` dict, each flattened row-major (C order).
- **Unstructured.** Score = ``|w|``. Exactly ``K`` weights are kept: the achieved pruned count
  equals ``P`` exactly.
- **Block (bh x bw).** The weight, viewed as ``[out, in]`` (``[shape[0], prod(shape[1:])]``), is
  tiled by ``bh x bw`` blocks from the top-left; the last block row/column may be partial.
  Score of a block = L2 norm of the weights it covers; the ranking key is the squared norm (same
  order), its squares summed sequentially in row-major order within the block, without a
  ``sqrt``, so it is identical on every device (see :func:`block_sq_norms`). Blocks are taken in rank order until the
  kept *element* count reaches ``K``: the kept count is the smallest prefix sum ``>= K``, so the
  pruned count is in ``(P - bh*bw, P]`` ("exact to one block"). Masks are returned per element.
- **N:M.** Along the input dimension (the last axis of the ``[out, in]`` view) each row is cut
  into consecutive groups of ``m`` weights and exactly ``n`` with the largest ``|w|`` are kept
  in each group. When ``in % m != 0`` the last group has ``L < m`` weights and keeps
  ``ceil(n * L / m)`` of them. ``s`` must equal ``1 - n/m`` (the pattern fixes the sparsity);
  ``scope`` does not matter.
- **Candidates.** ``candidates[name]`` (bool, same shape) restricts which weights may be kept:
  non-candidates are always pruned. ``K`` is still computed from the full size, so
  ``K`` weights are chosen among the candidates (for N:M: the group quota among the group's
  candidates); too few candidates raise :class:`UserError`. A tensor missing from the dict is
  all candidates. (Dynamic ASR Pathways: language z re-ranks with
  ``candidates = LanguageMasks.selectable_zone(z)``, its free zone plus its own pathway.)
- **Always keep.** ``always_keep[name]`` weights are kept unconditionally and count towards
  ``K`` (or the group quota); they must be candidates, and more of them than ``K`` raises.
- **Block granularity with candidates/always_keep:** both masks must be constant on every block
  (block-aligned), else :class:`UserError`.
- NaN weights raise :class:`UserError` (a diverged model should not be pruned silently).

How: unstructured finds the K-th largest score with one ``torch.topk`` on the smaller side (K or
total - K + 1), keeps everything above it and the lowest-index ties at it; blocks use a stable
descending sort of the block scores and a prefix sum of block sizes; N:M sorts within each group.
In global scope the scores are concatenated, so peak memory is a few times the scope size; the
kernels replace this at scale. ``torch.kthvalue``/``torch.quantile`` are not used (one thread
block / 2^24 limit). Results are identical on CPU and CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import is_int
from ..errors import UserError

GRANULARITIES: tuple[str, ...] = ("unstructured", "nm", "block")
SCOPES: tuple[str, ...] = ("global", "per_tensor")

# Priorities of the lexicographic ranking: forced before candidates before the rest.
_FORCED, _CANDIDATE, _OTHER, _PAD = 2, 1, 0, -1


@dataclass(frozen=True)
class Granularity:
    """What is pruned as a unit: single weights, N:M groups along the input dim, or bh x bw blocks."""

    kind: str = "unstructured"
    n: int = 2
    m: int = 4
    block: tuple[int, int] = (4, 4)

    def __post_init__(self) -> None:
        if isinstance(self.block, list):
            object.__setattr__(self, "block", tuple(self.block))

    def validate(self) -> None:
        """Raise :class:`UserError` on a malformed value."""
        if self.kind not in GRANULARITIES:
            raise UserError(f"pruning.granularity must be one of {', '.join(GRANULARITIES)}, got {self.kind!r}")
        if self.kind == "nm" and not (is_int(self.n) and is_int(self.m) and 1 <= self.n <= self.m):
            raise UserError(f"pruning N:M needs integers 1 <= n <= m, got n={self.n!r}, m={self.m!r}")
        if self.kind == "block":
            ok = isinstance(self.block, tuple) and len(self.block) == 2 and all(
                is_int(b) and b >= 1 for b in self.block
            )
            if not ok:
                raise UserError(f"pruning block size must be two integers >= 1, got {self.block!r}")



def pruned_count(sparsity: float, total: int) -> int:
    """Number of weights pruned at ``sparsity`` out of ``total``: ``floor(s * total + 0.5)``."""
    return math.floor(float(sparsity) * total + 0.5)


def _as_matrix(t: Tensor) -> Tensor:
    """``[out, ...]`` -> ``[out, in]`` (``in`` = product of the remaining dims)."""
    if t.dim() < 2:
        raise ValueError(f"N:M and block granularity need a weight with >= 2 dims, got shape {list(t.shape)}")
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))  # not -1: t may have no rows


def _abs_scores(weight: Tensor) -> Tensor:
    w = weight.detach()
    # Half-precision magnitudes are exact in float32; ranking there avoids dtype-specific paths.
    if w.dtype in (torch.float16, torch.bfloat16):
        w = w.float()
    return w.abs()


def block_sq_norms(weight: Tensor, block: tuple[int, int]) -> Tensor:
    """Squared L2 norm of every ``bh x bw`` block: ``[out, in]`` -> ``[ceil(out/bh), ceil(in/bw)]``.

    This is the block ranking key. The squares are summed one by one in row-major order within
    the block (elementwise adds in a fixed order, not a reduction whose order varies by device)
    and no ``sqrt`` is taken (``torch.sqrt`` differs by an ulp between CPU and CUDA), so keys --
    hence masks -- are bit-identical on every device. Partial edge blocks sum what they cover.
    Half-precision inputs are summed in float32.
    """
    mat = _as_matrix(_abs_scores(weight))
    bh, bw = block
    rows, cols = mat.shape
    nbr, nbc = -(-rows // bh), -(-cols // bw)
    # Zero padding adds exact zeros.
    sq = F.pad(mat, (0, nbc * bw - cols, 0, nbr * bh - rows)).reshape(nbr, bh, nbc, bw).square()
    acc = sq[:, 0, :, 0].clone()
    for i in range(bh):
        for j in range(bw):
            if i or j:
                acc += sq[:, i, :, j]
    return acc


def scores(weight: Tensor, granularity: Granularity | None = None) -> Tensor:
    """Magnitude scores of one weight.

    ``weight [out, in]`` (more dims are flattened into ``in`` for blocks) ->
    unstructured / nm: ``|w|`` with the weight's shape; block: ``[ceil(out/bh), ceil(in/bw)]`` L2
    norms of the (possibly partial) blocks, ``sqrt(block_sq_norms)`` (ranking uses the squared
    norms, which order blocks the same way). Half-precision inputs score in float32.
    """
    g = Granularity() if granularity is None else granularity
    g.validate()
    if g.kind != "block":
        return _abs_scores(weight)
    return block_sq_norms(weight, g.block).sqrt()


def _grid(shape: torch.Size | tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Number of block rows and columns covering the ``[out, in]`` view of ``shape``."""
    return -(-shape[0] // block[0]), -(-math.prod(shape[1:]) // block[1])


def block_sizes(shape: torch.Size | tuple[int, ...], block: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
    """Element count of every block of a weight of ``shape``: int64 ``[ceil(out/bh), ceil(in/bw)]``."""
    rows, cols = shape[0], math.prod(shape[1:])
    bh, bw = block
    r = torch.full((-(-rows // bh),), bh, dtype=torch.int64, device=device)
    c = torch.full((-(-cols // bw),), bw, dtype=torch.int64, device=device)
    if r.numel() and rows % bh:
        r[-1] = rows % bh
    if c.numel() and cols % bw:
        c[-1] = cols % bw
    return r[:, None] * c[None, :]


def expand_blocks(block_mask: Tensor, shape: torch.Size | tuple[int, ...], block: tuple[int, int]) -> Tensor:
    """Block mask ``[ceil(out/bh), ceil(in/bw)]`` -> element mask of ``shape`` (edge blocks cropped)."""
    rows, cols = shape[0], math.prod(shape[1:])
    bh, bw = block
    nbr, nbc = block_mask.shape
    full = block_mask[:, None, :, None].expand(nbr, bh, nbc, bw).reshape(nbr * bh, nbc * bw)
    return full[:rows, :cols].reshape(shape)


def _top_mask(s: Tensor, k: int) -> Tensor:
    """Exactly the ``k`` largest of flat ``s [n]`` (lower index first among ties) as ``[n]`` bool.

    Finds the k-th largest value with one ``topk`` on the smaller side (no full sort), keeps every
    value above it and the lowest-index ties at it.
    """
    n = s.numel()
    if k == 0:
        return torch.zeros(n, dtype=torch.bool, device=s.device)
    if k == n:
        return torch.ones(n, dtype=torch.bool, device=s.device)
    if k <= n - k:
        kth = torch.topk(s, k, largest=True, sorted=False).values.min()
    else:  # the k-th largest is the (n - k + 1)-th smallest
        kth = torch.topk(s, n - k + 1, largest=False, sorted=False).values.max()
    mask = s > kth
    ties = torch.nonzero(s == kth).squeeze(1)  # ascending indices
    mask[ties[: k - int(mask.sum())]] = True
    return mask


def _select(scores: Tensor, priority: Tensor | None, keep: int, sizes: Tensor | None, what: str) -> Tensor:
    """Core ranking over flat ``scores [U]`` of units with ``priority [U]`` and element ``sizes [U]``.

    ``priority`` None means every unit is a candidate and none is forced. Keeps every forced
    unit, then candidate units in descending score order (lower index first on ties) until
    ``keep`` elements are kept (the smallest prefix reaching ``keep`` when units have sizes).
    Returns ``[U]`` bool.
    """
    if priority is None:
        forced = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        n_forced = 0
        cand: Tensor | None = None
        cand_scores = scores
    else:
        forced = priority == _FORCED
        n_forced = int(forced.sum()) if sizes is None else int(sizes[forced].sum())
        cand = torch.nonzero(priority == _CANDIDATE).squeeze(1)  # ascending flat indices
        cand_scores = scores[cand]
    if n_forced > keep:
        raise UserError(f"{what}: always_keep holds {n_forced} weights, more than the {keep} to keep")
    need = keep - n_forced
    out = forced
    if need == 0:
        return out
    if sizes is None:
        if need > cand_scores.numel():
            raise UserError(
                f"{what}: {keep} weights must be kept but only {cand_scores.numel() + n_forced} "
                f"are candidates"
            )
        chosen = _top_mask(cand_scores, need)
        if cand is None:
            return out | chosen
        out[cand[chosen]] = True
        return out
    # Sized units (blocks): walk the ranking; a stable descending sort of candidates listed in
    # index order breaks ties by the lower index.
    order = torch.sort(cand_scores, descending=True, stable=True).indices
    ranked = order if cand is None else cand[order]
    cum = torch.cumsum(sizes[ranked], dim=0)
    available = int(cum[-1]) if cum.numel() else 0
    if available < need:
        raise UserError(
            f"{what}: {keep} weights must be kept but only {available + n_forced} are candidates"
        )
    count = int(torch.searchsorted(cum, torch.tensor(need, dtype=cum.dtype, device=cum.device))) + 1
    out[ranked[:count]] = True
    return out


def topk_mask(scores: Tensor, keep: int, candidates: Tensor | None = None) -> Tensor:
    """Keep exactly ``keep`` largest ``scores`` (any shape) among ``candidates`` (all if None).

    Ties: among equal scores the lower flat (row-major) index is kept first. Returns a bool
    tensor shaped like ``scores``. Raises :class:`UserError` if ``keep`` exceeds the number of
    candidates, ``ValueError`` on a bad argument.
    """
    if not is_int(keep) or keep < 0:
        raise ValueError(f"keep must be an integer >= 0, got {keep!r}")
    priority = None
    if candidates is not None:
        if candidates.shape != scores.shape or candidates.dtype != torch.bool:
            raise ValueError(
                f"candidates must be a bool tensor of shape {list(scores.shape)}, got "
                f"{candidates.dtype} {list(candidates.shape)}"
            )
        priority = candidates.to(device=scores.device, dtype=torch.int8)
    _check_finite(scores, "topk_mask")
    flat_prio = None if priority is None else priority.reshape(-1)
    out = _select(scores.reshape(-1), flat_prio, keep, None, "topk_mask")
    return out.reshape(scores.shape)


def _check_finite(t: Tensor, name: str) -> None:
    if bool(torch.isnan(t).any()):
        raise UserError(f"cannot rank {name}: it contains NaN (did training diverge?)")


def _check_mask(mask: Tensor, weight: Tensor, name: str, label: str) -> Tensor:
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(
            f"{label}[{name!r}] must be a bool tensor of shape {list(weight.shape)}, got "
            f"{mask.dtype} {list(mask.shape)}"
        )
    return mask.to(weight.device)


def _priorities(
    weights: dict[str, Tensor],
    candidates: dict[str, Tensor] | None,
    always_keep: dict[str, Tensor] | None,
) -> dict[str, Tensor | None]:
    """Per-weight int8 priority: 2 always kept, 1 candidate, 0 never kept; None = all candidates."""
    for label, extra in (("candidates", candidates), ("always_keep", always_keep)):
        unknown = sorted(set(extra or {}) - set(weights))
        if unknown:
            raise ValueError(f"{label} names tensors not being pruned: {unknown}")
    out: dict[str, Tensor | None] = {}
    for name, w in weights.items():
        has_cand = candidates is not None and name in candidates
        has_forced = always_keep is not None and name in always_keep
        if not (has_cand or has_forced):
            out[name] = None
            continue
        if candidates is not None and name in candidates:
            cand = _check_mask(candidates[name], w, name, "candidates")
            prio = cand.to(torch.int8)
        else:
            cand = None
            prio = torch.full(w.shape, _CANDIDATE, dtype=torch.int8, device=w.device)
        if always_keep is not None and name in always_keep:
            forced = _check_mask(always_keep[name], w, name, "always_keep")
            if cand is not None and bool((forced & ~cand).any()):
                raise UserError(f"{name}: always_keep marks weights that are not candidates")
            prio = prio.masked_fill(forced, _FORCED)
        out[name] = prio
    return out


def _block_priority(prio: Tensor, shape: torch.Size, block: tuple[int, int], name: str) -> Tensor:
    mat = _as_matrix(prio)
    bp = mat[:: block[0], :: block[1]]
    if not torch.equal(expand_blocks(bp, shape, block).reshape(mat.shape), mat):
        raise UserError(f"{name}: candidates/always_keep are not aligned to {block[0]}x{block[1]} blocks")
    return bp


def _nm_mask(score: Tensor, prio: Tensor, n: int, m: int, name: str) -> Tensor:
    """Exact N:M mask of one tensor; ``score``/``prio`` shaped like the weight."""
    mat, pmat = _as_matrix(score), _as_matrix(prio)
    rows, cols = mat.shape
    groups = -(-cols // m)
    pad = groups * m - cols
    s = F.pad(mat, (0, pad)).reshape(rows, groups, m)
    p = F.pad(pmat, (0, pad), value=_PAD).reshape(rows, groups, m)
    quota = torch.full((groups,), n, dtype=torch.int64, device=mat.device)
    if pad:
        tail = m - pad
        quota[-1] = -(-n * tail // m)
    # Lexicographic order (priority desc, score desc, index asc) by two stable sorts.
    by_score = torch.sort(s, dim=-1, descending=True, stable=True).indices
    p1 = p.gather(-1, by_score)
    by_prio = torch.sort(p1, dim=-1, descending=True, stable=True).indices
    perm = by_score.gather(-1, by_prio)
    sorted_prio = p1.gather(-1, by_prio)
    keep_sorted = torch.arange(m, device=mat.device) < quota[:, None]  # [G, m]
    keep_sorted = keep_sorted.expand(rows, groups, m).contiguous()
    if bool((sorted_prio[keep_sorted] < _CANDIDATE).any()):
        raise UserError(f"{name}: an N:M group has fewer candidates than its {n}:{m} quota")
    if bool(((p == _FORCED).sum(-1) > quota).any()):
        raise UserError(f"{name}: an N:M group has more always_keep weights than its {n}:{m} quota")
    mask = torch.zeros_like(keep_sorted).scatter_(-1, perm, keep_sorted)  # undo the sort
    return mask.reshape(rows, groups * m)[:, :cols].reshape(score.shape)


def magnitude_masks(
    weights: dict[str, Tensor],
    sparsity: float,
    granularity: Granularity | None = None,
    *,
    scope: str = "global",
    candidates: dict[str, Tensor] | None = None,
    always_keep: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Magnitude-pruning masks (``True`` = kept) for ``weights`` at ``sparsity``.

    ``weights``: name -> ``[out, in]`` tensor (unstructured accepts any shape); ``candidates`` /
    ``always_keep``: name -> bool mask of the same shape. Returns name -> bool mask of each
    weight's shape, on its device, in the order of ``weights``. The exact rules (rounding, ties,
    blocks, N:M tails, candidates) are in this module's docstring.
    """
    g = Granularity() if granularity is None else granularity
    g.validate()
    if not weights:
        raise ValueError("magnitude_masks needs at least one tensor")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise UserError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    if scope not in SCOPES:
        raise UserError(f"pruning scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    prios = _priorities(weights, candidates, always_keep)

    if g.kind == "nm":
        if not math.isclose(sparsity, 1.0 - g.n / g.m, rel_tol=0.0, abs_tol=1e-9):
            raise UserError(
                f"{g.n}:{g.m} pruning fixes the sparsity at {1 - g.n / g.m:g}, got sparsity={sparsity}"
            )
        out: dict[str, Tensor] = {}
        for name, w in weights.items():
            sc = _abs_scores(w)
            _check_finite(sc, name)
            pr = prios[name]
            if pr is None:
                pr = torch.full(w.shape, _CANDIDATE, dtype=torch.int8, device=w.device)
            out[name] = _nm_mask(sc, pr, g.n, g.m, name)
        return out

    # Units: single weights (sizes None) or blocks (with element counts). NaN weights give NaN
    # scores (|w| or a block norm), so checking the scores covers them.
    units: dict[str, tuple[Tensor, Tensor | None, Tensor | None]] = {}
    for name, w in weights.items():
        pr = prios[name]
        if g.kind == "block":
            sc = block_sq_norms(w, g.block)
            bp = None if pr is None else _block_priority(pr, w.shape, g.block, name)
            units[name] = (
                sc.reshape(-1),
                None if bp is None else bp.reshape(-1),
                block_sizes(w.shape, g.block, device=w.device).reshape(-1),
            )
        else:
            sc = _abs_scores(w)
            units[name] = (sc.reshape(-1), None if pr is None else pr.reshape(-1), None)
        _check_finite(sc, name)

    def unit_to_mask(name: str, flat: Tensor) -> Tensor:
        w = weights[name]
        if g.kind == "block":
            return expand_blocks(flat.reshape(_grid(w.shape, g.block)), w.shape, g.block)
        return flat.reshape(w.shape)

    if scope == "per_tensor":
        out = {}
        for name, (sc, pr, sz) in units.items():
            total = weights[name].numel()
            keep = total - pruned_count(sparsity, total)
            out[name] = unit_to_mask(name, _select(sc, pr, keep, sz, name))
        return out

    names = list(units)
    total = sum(weights[n].numel() for n in names)
    keep = total - pruned_count(sparsity, total)
    device = next(iter(weights.values())).device
    all_sc = torch.cat([units[n][0].to(device) for n in names])
    all_pr = None
    if any(units[n][1] is not None for n in names):
        all_pr = torch.cat([
            torch.full_like(units[n][0], _CANDIDATE, dtype=torch.int8, device=device)
            if units[n][1] is None else units[n][1].to(device)  # type: ignore[union-attr]
            for n in names
        ])
    all_sz = torch.cat([units[n][2].to(device) for n in names]) if g.kind == "block" else None  # type: ignore[union-attr]
    flat = _select(all_sc, all_pr, keep, all_sz, "global scope")
    out = {}
    start = 0
    for n in names:
        count = units[n][0].numel()
        out[n] = unit_to_mask(n, flat[start : start + count].to(weights[n].device))
        start += count
    return out
