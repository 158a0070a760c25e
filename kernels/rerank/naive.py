"""Pure-PyTorch reference of exact magnitude re-ranking (mask selection).

Same contract as :func:`sparse_rnnt.kernels.rerank.select.rerank_masks` (which mirrors
``sparse_rnnt.pruning.ranking.magnitude_masks``), written the plain way: every unit (weight or
block) gets a priority (2 always kept, 1 candidate, 0 never kept) and a score; one lexicographic
order (priority desc, score desc, flat index asc) is built with two stable sorts, and the kept set
is the shortest prefix of that order holding ``K`` elements. Memory is a few times the scope size;
this is the oracle for tests and the ``backend="torch"`` path, not the fast path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sparse_rnnt.errors import UserError

KINDS: tuple[str, ...] = ("unstructured", "nm", "block")
SCOPES: tuple[str, ...] = ("global", "per_tensor")


def pruned_count(sparsity: float, total: int) -> int:
    """``floor(s * total + 0.5)`` in double precision (round half up)."""
    return math.floor(float(sparsity) * total + 0.5)


def check_args(
    weights: dict[str, Tensor],
    sparsity: float,
    kind: str,
    n: int,
    m: int,
    block: tuple[int, int],
    scope: str,
    masks: dict[str, dict[str, Tensor] | None],
) -> None:
    """Validate the arguments shared by both backends; raise ``ValueError`` on a bad one."""
    if not weights:
        raise ValueError("rerank_masks needs at least one tensor")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    for name, w in weights.items():
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: dtype {w.dtype} is not float32/float16/bfloat16")
        if kind != "unstructured" and w.dim() < 2:
            raise ValueError(f"{name}: {kind} granularity needs >= 2 dims, got shape {list(w.shape)}")
    if kind == "nm":
        if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m):
            raise ValueError(f"N:M needs integers 1 <= n <= m, got n={n!r}, m={m!r}")
        if not math.isclose(sparsity, 1.0 - n / m, rel_tol=0.0, abs_tol=1e-9):
            raise ValueError(f"{n}:{m} fixes the sparsity at {1 - n / m:g}, got {sparsity}")
    if kind == "block" and not (
        isinstance(block, (tuple, list)) and len(block) == 2 and all(isinstance(b, int) and b >= 1 for b in block)
    ):
        raise ValueError(f"block must be two integers >= 1, got {block!r}")
    for label, d in masks.items():
        if d is None:
            continue
        unknown = sorted(set(d) - set(weights))
        if unknown:
            raise ValueError(f"{label} names tensors not being pruned: {unknown}")
        for name, mk in d.items():
            w = weights[name]
            if mk.dtype != torch.bool or mk.shape != w.shape or mk.device != w.device:
                raise ValueError(
                    f"{label}[{name!r}] must be a bool tensor of shape {list(w.shape)} on {w.device}, "
                    f"got {mk.dtype} {list(mk.shape)} on {mk.device}"
                )


def _priority(w: Tensor, cand: Tensor | None, forced: Tensor | None, name: str) -> Tensor:
    """int8 priority shaped like ``w``: 2 always kept, 1 candidate, 0 never kept."""
    p = torch.ones(w.shape, dtype=torch.int8, device=w.device) if cand is None else cand.to(torch.int8)
    if forced is not None:
        if cand is not None and bool((forced & ~cand).any()):
            raise UserError(f"{name}: always_keep marks weights that are not candidates")
        p = p.masked_fill(forced, 2)
    return p


def block_scores(w: Tensor, block: tuple[int, int]) -> Tensor:
    """Squared L2 norms of ``bh x bw`` blocks of ``w [out, ...]`` viewed as ``[out, in]``.

    Returns float32 ``[ceil(out/bh), ceil(in/bw)]``. Squares are summed one at a time in row-major
    order within a block (partial edge blocks sum what they cover), so the keys are exact and
    device-independent.
    """
    mat = w.detach().reshape(w.shape[0], math.prod(w.shape[1:])).float()  # not -1: w may have no rows
    bh, bw = block
    rows, cols = mat.shape
    nbr, nbc = -(-rows // bh), -(-cols // bw)
    acc = torch.zeros(nbr, nbc, dtype=torch.float32, device=w.device)
    for i in range(bh):
        for j in range(bw):
            part = mat[i::bh, j::bw]  # element (i, j) of every block that has one
            tmp = torch.zeros_like(acc)
            tmp[: part.shape[0], : part.shape[1]] = part * part
            acc = acc + tmp
    return acc


def _block_sizes(shape: torch.Size, block: tuple[int, int], device: torch.device) -> Tensor:
    rows, cols = shape[0], math.prod(shape[1:])
    r = torch.arange(0, rows, block[0], device=device)
    c = torch.arange(0, cols, block[1], device=device)
    hr = (rows - r).clamp(max=block[0])
    wc = (cols - c).clamp(max=block[1])
    return (hr[:, None] * wc[None, :]).to(torch.int64)


def _order(score: Tensor, prio: Tensor) -> Tensor:
    """Permutation sorting flat units by (priority desc, score desc, index asc)."""
    by_score = torch.sort(score, descending=True, stable=True).indices
    by_prio = torch.sort(prio[by_score], descending=True, stable=True).indices
    return by_score[by_prio]


def _take(score: Tensor, prio: Tensor, size: Tensor, keep: int, what: str) -> Tensor:
    """Bool ``[U]``: the shortest prefix of the ranking holding >= ``keep`` elements (forced first)."""
    forced = int(size[prio == 2].sum())
    if forced > keep:
        raise UserError(f"{what}: always_keep holds {forced} weights, more than the {keep} to keep")
    out = prio == 2
    if keep == forced:
        return out
    order = _order(score, prio)
    usable = order[prio[order] >= 1]
    cum = torch.cumsum(size[usable], 0)
    if cum.numel() == 0 or int(cum[-1]) < keep:
        have = int(cum[-1]) if cum.numel() else 0
        raise UserError(f"{what}: {keep} weights must be kept but only {have} are candidates")
    count = int((cum < keep).sum()) + 1
    out[usable[:count]] = True
    return out


def _nm(w: Tensor, prio: Tensor, n: int, m: int, name: str) -> Tensor:
    mat = w.detach().float().abs().reshape(w.shape[0], math.prod(w.shape[1:]))
    pm = prio.reshape(mat.shape)
    rows, cols = mat.shape
    out = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    for start in range(0, cols, m):
        s = mat[:, start : start + m]
        p = pm[:, start : start + m]
        length = s.shape[1]
        quota = -(-n * length // m)
        if bool(((p >= 1).sum(1) < quota).any()):
            raise UserError(f"{name}: an N:M group has fewer candidates than its {n}:{m} quota")
        if bool(((p == 2).sum(1) > quota).any()):
            raise UserError(f"{name}: an N:M group has more always_keep weights than its {n}:{m} quota")
        # Per row: order by (prio desc, score desc, column asc) and keep the first `quota`.
        by_score = torch.sort(s, dim=1, descending=True, stable=True).indices
        by_prio = torch.sort(p.gather(1, by_score), dim=1, descending=True, stable=True).indices
        perm = by_score.gather(1, by_prio)
        sel = torch.zeros_like(s, dtype=torch.bool)
        sel.scatter_(1, perm[:, :quota], True)
        out[:, start : start + m] = sel
    return out.reshape(w.shape)


def rerank_masks_torch(
    weights: dict[str, Tensor],
    sparsity: float,
    *,
    kind: str = "unstructured",
    n: int = 2,
    m: int = 4,
    block: tuple[int, int] = (4, 4),
    scope: str = "global",
    candidates: dict[str, Tensor] | None = None,
    always_keep: dict[str, Tensor] | None = None,
    apply: bool = False,
) -> dict[str, Tensor]:
    """Reference masks (``True`` = kept), name -> bool tensor of each weight's shape.

    ``weights``: name -> tensor (``[out, in, ...]`` for ``nm``/``block``). See the module
    docstring of ``select.py`` for the rules. ``apply=True`` zeroes pruned weights in place.
    """
    block = tuple(block)  # type: ignore[assignment]
    check_args(weights, sparsity, kind, n, m, block, scope,
               {"candidates": candidates, "always_keep": always_keep})
    for name, w in weights.items():
        if bool(torch.isnan(w).any()):
            raise UserError(f"cannot rank {name}: it contains NaN (did training diverge?)")
    prios = {
        name: _priority(w, (candidates or {}).get(name), (always_keep or {}).get(name), name)
        for name, w in weights.items()
    }
    out: dict[str, Tensor] = {}
    if kind == "nm":
        for name, w in weights.items():
            out[name] = _nm(w, prios[name], n, m, name)
    else:
        units: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        for name, w in weights.items():
            if kind == "block":
                bh, bw = block
                pm = prios[name].reshape(w.shape[0], math.prod(w.shape[1:]))
                bp = pm[::bh, ::bw]
                up = bp.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[: pm.shape[0], : pm.shape[1]]
                if not torch.equal(up, pm):
                    raise UserError(f"{name}: candidates/always_keep are not aligned to {bh}x{bw} blocks")
                sc = block_scores(w, block)
                units[name] = (sc.reshape(-1), bp.reshape(-1), _block_sizes(w.shape, block, w.device).reshape(-1))
            else:
                sc = w.detach().float().abs().reshape(-1)
                units[name] = (sc, prios[name].reshape(-1), torch.ones_like(sc, dtype=torch.int64))
        if scope == "per_tensor":
            flat = {
                name: _take(*units[name], w.numel() - pruned_count(sparsity, w.numel()), name)
                for name, w in weights.items()
            }
        else:
            total = sum(w.numel() for w in weights.values())
            keep = total - pruned_count(sparsity, total)
            dev = next(iter(weights.values())).device
            cat = [torch.cat([u[i].to(dev) for u in units.values()]) for i in range(3)]
            sel = _take(cat[0], cat[1], cat[2], keep, "global scope")
            flat, start = {}, 0
            for name, u in units.items():
                flat[name] = sel[start : start + u[0].numel()].to(weights[name].device)
                start += u[0].numel()
        for name, w in weights.items():
            f = flat[name]
            if kind == "block":
                bh, bw = block
                rows, cols = w.shape[0], math.prod(w.shape[1:])
                bm = f.reshape(-(-rows // bh), -(-cols // bw))
                f = bm.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:rows, :cols]
            out[name] = f.reshape(w.shape)
    if apply:
        with torch.no_grad():
            for name, w in weights.items():
                w.masked_fill_(~out[name], 0)
    return out
