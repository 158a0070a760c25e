"""Exact magnitude masks against torch.nn.utils.prune and a brute-force Python reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from sparse_rnnt.errors import UserError
from sparse_rnnt.pruning.ranking import (
    Granularity,
    block_sq_norms,
    magnitude_masks,
    scores,
    topk_mask,
)

SETTINGS = settings(max_examples=150, deadline=None)


# ---------------------------------------------------------------- brute-force reference
def ref_select(keys: list, prio: list[int], keep: int, sizes: list[int] | None = None) -> set[int] | None:
    """Kept unit indices: forced (prio 2) first, then candidates (prio 1) by (-key, index) until
    ``keep`` elements are covered. None when infeasible."""
    size = (lambda i: 1) if sizes is None else (lambda i: sizes[i])
    kept = {i for i, p in enumerate(prio) if p == 2}
    have = sum(size(i) for i in kept)
    if have > keep:
        return None
    for i in sorted((i for i, p in enumerate(prio) if p == 1), key=lambda i: (-keys[i], i)):
        if have >= keep:
            break
        kept.add(i)
        have += size(i)
    return kept if have >= keep else None


def n_pruned(s: float, total: int) -> int:
    return math.floor(s * total + 0.5)


def prio_list(cand: torch.Tensor | None, forced: torch.Tensor | None, numel: int) -> list[int]:
    c = [1] * numel if cand is None else [int(x) for x in cand.reshape(-1).tolist()]
    if forced is not None:
        c = [2 if f else p for p, f in zip(c, forced.reshape(-1).tolist(), strict=True)]
    return c


def blocks_of(w: torch.Tensor, bh: int, bw: int) -> list[tuple[int, int, int, int]]:
    """Row-major (r0, r1, c0, c1) block bounds, partial edge blocks included."""
    rows, cols = w.shape
    return [
        (r, min(r + bh, rows), c, min(c + bw, cols))
        for r in range(0, rows, bh)
        for c in range(0, cols, bw)
    ]


# ---------------------------------------------------------------- strategies
@st.composite
def weight_sets(draw: st.DrawFn, max_tensors: int = 3, int_valued: bool | None = None) -> dict[str, torch.Tensor]:
    """1-3 small matrices, either integer-valued in [-3, 3] (many ties) or standard normal."""
    k = draw(st.integers(1, max_tensors))
    shapes = [(draw(st.integers(1, 9)), draw(st.integers(1, 11))) for _ in range(k)]
    ints = draw(st.booleans()) if int_valued is None else int_valued
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return {
        f"t{i}": (torch.randint(-3, 4, s, generator=g).float() if ints else torch.randn(s, generator=g))
        for i, s in enumerate(shapes)
    }


def random_masks(weights: dict[str, torch.Tensor], p: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(w.shape, generator=g) < p for n, w in weights.items()}


# ---------------------------------------------------------------- peer checks
def _linears(seed: int) -> list[nn.Linear]:
    torch.manual_seed(seed)
    return [nn.Linear(17, 9), nn.Linear(9, 31), nn.Linear(31, 5)]


@pytest.mark.parametrize("k", [0, 1, 100, 300, 586, 587])
def test_global_unstructured_matches_torch_prune(k: int) -> None:
    layers = _linears(1)
    weights = {f"l{i}": m.weight.detach().clone() for i, m in enumerate(layers)}
    total = sum(w.numel() for w in weights.values())
    assert total == 587
    ours = magnitude_masks(weights, k / total, scope="global")
    prune.global_unstructured([(m, "weight") for m in layers], pruning_method=prune.L1Unstructured, amount=k)
    for i, m in enumerate(layers):
        assert torch.equal(ours[f"l{i}"], m.weight_mask.bool())
    assert sum(int((~v).sum()) for v in ours.values()) == k


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 0.9, 1.0])
def test_per_tensor_unstructured_matches_torch_prune(sparsity: float) -> None:
    layers = _linears(2)
    weights = {f"l{i}": m.weight.detach().clone() for i, m in enumerate(layers)}
    ours = magnitude_masks(weights, sparsity, scope="per_tensor")
    for i, m in enumerate(layers):
        count = n_pruned(sparsity, m.weight.numel())
        prune.l1_unstructured(m, "weight", amount=count)
        assert torch.equal(ours[f"l{i}"], m.weight_mask.bool())
        assert int((~ours[f"l{i}"]).sum()) == count


# ---------------------------------------------------------------- exact reference checks
@SETTINGS
@given(
    weights=weight_sets(),
    sparsity=st.floats(0.0, 1.0),
    scope=st.sampled_from(["global", "per_tensor"]),
    cand_p=st.sampled_from([None, 0.5, 0.9]),
    keep_p=st.sampled_from([None, 0.1, 0.4]),
    seed=st.integers(0, 1000),
)
def test_unstructured_equals_reference(
    weights: dict[str, torch.Tensor], sparsity: float, scope: str, cand_p: float | None,
    keep_p: float | None, seed: int,
) -> None:
    cands = None if cand_p is None else random_masks(weights, cand_p, seed)
    forced = None
    if keep_p is not None:
        forced = random_masks(weights, keep_p, seed + 1)
        if cands is not None:
            forced = {n: f & cands[n] for n, f in forced.items()}
    groups = [list(weights)] if scope == "global" else [[n] for n in weights]
    expected: dict[str, torch.Tensor] = {}
    feasible = True
    for names in groups:
        keys, prio = [], []
        for n in names:
            keys += weights[n].abs().reshape(-1).tolist()
            prio += prio_list(None if cands is None else cands[n], None if forced is None else forced[n], weights[n].numel())
        total = len(keys)
        kept = ref_select(keys, prio, total - n_pruned(sparsity, total))
        if kept is None:
            feasible = False
            break
        flat = torch.tensor([i in kept for i in range(total)])
        start = 0
        for n in names:
            expected[n] = flat[start : start + weights[n].numel()].reshape(weights[n].shape)
            start += weights[n].numel()
    event("infeasible" if not feasible else "feasible")
    if not feasible:
        with pytest.raises(UserError):
            magnitude_masks(weights, sparsity, scope=scope, candidates=cands, always_keep=forced)
        return
    got = magnitude_masks(weights, sparsity, scope=scope, candidates=cands, always_keep=forced)
    assert list(got) == list(weights)
    for n in weights:
        assert got[n].dtype == torch.bool and torch.equal(got[n], expected[n]), n
        if cands is not None:
            assert not bool((got[n] & ~cands[n]).any())
        if forced is not None:
            assert bool(got[n][forced[n]].all())
    # Exact achieved sparsity (the documented rounding).
    for names in groups:
        total = sum(weights[n].numel() for n in names)
        assert sum(int((~got[n]).sum()) for n in names) == n_pruned(sparsity, total)


@SETTINGS
@given(
    weights=weight_sets(int_valued=True),
    sparsity=st.floats(0.0, 1.0),
    scope=st.sampled_from(["global", "per_tensor"]),
    bh=st.integers(1, 4),
    bw=st.integers(1, 5),
    cand_p=st.sampled_from([None, 0.6]),
    seed=st.integers(0, 1000),
)
def test_block_equals_reference(
    weights: dict[str, torch.Tensor], sparsity: float, scope: str, bh: int, bw: int,
    cand_p: float | None, seed: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    # Block-aligned candidates: one coin per block, painted over the block's elements.
    cands: dict[str, torch.Tensor] | None = None
    if cand_p is not None:
        cands = {}
        for n, w in weights.items():
            c = torch.zeros(w.shape, dtype=torch.bool)
            for r0, r1, c0, c1 in blocks_of(w, bh, bw):
                c[r0:r1, c0:c1] = bool(torch.rand((), generator=g) < cand_p)
            cands[n] = c
    groups = [list(weights)] if scope == "global" else [[n] for n in weights]
    expected: dict[str, torch.Tensor] = {}
    feasible = True
    for names in groups:
        keys, prio, sizes, where = [], [], [], []
        for n in names:
            for r0, r1, c0, c1 in blocks_of(weights[n], bh, bw):
                # Integer sum of squares ranks exactly like the L2 norm.
                keys.append(int((weights[n][r0:r1, c0:c1] ** 2).sum().item()))
                prio.append(1 if cands is None else int(cands[n][r0, c0]))
                sizes.append((r1 - r0) * (c1 - c0))
                where.append((n, r0, r1, c0, c1))
        total = sum(weights[n].numel() for n in names)
        keep = total - n_pruned(sparsity, total)
        kept = ref_select(keys, prio, keep, sizes)
        if kept is None:
            feasible = False
            break
        kept_elems = sum(sizes[i] for i in kept)
        assert keep <= kept_elems < keep + bh * bw  # the reference itself obeys "exact to one block"
        for n in names:
            expected[n] = torch.zeros(weights[n].shape, dtype=torch.bool)
        for i in kept:
            n, r0, r1, c0, c1 = where[i]
            expected[n][r0:r1, c0:c1] = True
    gran = Granularity("block", block=(bh, bw))
    event("infeasible" if not feasible else "feasible")
    if not feasible:
        with pytest.raises(UserError):
            magnitude_masks(weights, sparsity, gran, scope=scope, candidates=cands)
        return
    got = magnitude_masks(weights, sparsity, gran, scope=scope, candidates=cands)
    for n in weights:
        assert torch.equal(got[n], expected[n]), n
    for names in groups:
        total = sum(weights[n].numel() for n in names)
        pruned = sum(int((~got[n]).sum()) for n in names)
        assert n_pruned(sparsity, total) - bh * bw < pruned <= n_pruned(sparsity, total)


@SETTINGS
@given(
    weights=weight_sets(),
    nm=st.sampled_from([(2, 4), (1, 4), (1, 2), (3, 8), (4, 4)]),
    cand_p=st.sampled_from([None, 0.85]),
    keep_p=st.sampled_from([None, 0.15]),
    seed=st.integers(0, 1000),
)
def test_nm_equals_reference(
    weights: dict[str, torch.Tensor], nm: tuple[int, int], cand_p: float | None, keep_p: float | None, seed: int,
) -> None:
    n, m = nm
    cands = None if cand_p is None else random_masks(weights, cand_p, seed)
    forced = None
    if keep_p is not None:
        forced = random_masks(weights, keep_p, seed + 1)
        if cands is not None:
            forced = {k: f & cands[k] for k, f in forced.items()}
    expected: dict[str, torch.Tensor] = {}
    feasible = True
    for name, w in weights.items():
        rows, cols = w.shape
        exp = torch.zeros(w.shape, dtype=torch.bool)
        prio = prio_list(None if cands is None else cands[name], None if forced is None else forced[name], w.numel())
        for r in range(rows):
            for c0 in range(0, cols, m):
                idx = list(range(c0, min(c0 + m, cols)))
                quota = math.ceil(n * len(idx) / m)
                kept = ref_select(
                    [abs(w[r, c].item()) for c in idx], [prio[r * cols + c] for c in idx], quota
                )
                if kept is None:
                    feasible = False
                    continue
                assert len(kept) == quota
                for j in kept:
                    exp[r, idx[j]] = True
        expected[name] = exp
    gran = Granularity("nm", n=n, m=m)
    event("infeasible" if not feasible else "feasible")
    if not feasible:
        with pytest.raises(UserError):
            magnitude_masks(weights, 1 - n / m, gran, candidates=cands, always_keep=forced)
        return
    for scope in ("global", "per_tensor"):
        got = magnitude_masks(weights, 1 - n / m, gran, scope=scope, candidates=cands, always_keep=forced)
        for name in weights:
            assert torch.equal(got[name], expected[name]), name


def test_nm_counts_hand_example() -> None:
    # 2:4 on 10 input columns: groups of 4, 4, and a tail of 2 keeping ceil(2 * 2 / 4) = 1.
    w = torch.tensor([[1.0, -5.0, 3.0, 2.0, 0.5, 0.1, -0.2, 9.0, -4.0, 3.0]])
    got = magnitude_masks({"w": w}, 0.5, Granularity("nm", n=2, m=4))["w"]
    assert got.tolist() == [[False, True, True, False, True, False, False, True, True, False]]
    # 3:8 on 5 columns: a single partial group keeps ceil(3 * 5 / 8) = 2.
    w = torch.tensor([[0.3, 0.1, 0.9, 0.2, 0.8]])
    got = magnitude_masks({"w": w}, 1 - 3 / 8, Granularity("nm", n=3, m=8))["w"]
    assert got.tolist() == [[False, False, True, False, True]]


# ---------------------------------------------------------------- defining property of a magnitude mask
@SETTINGS
@given(
    weights=weight_sets(int_valued=False),
    sparsity=st.floats(0.0, 1.0),
    kind=st.sampled_from(["unstructured", "block", "nm"]),
    scope=st.sampled_from(["global", "per_tensor"]),
    cand_p=st.sampled_from([None, 0.7]),
    seed=st.integers(0, 1000),
)
def test_kept_never_smaller_than_pruned_candidate(
    weights: dict[str, torch.Tensor], sparsity: float, kind: str, scope: str, cand_p: float | None, seed: int,
) -> None:
    gran = Granularity(kind, n=2, m=4, block=(2, 3))
    if kind == "nm":
        sparsity = 0.5
    # Block candidates would have to be block-aligned; the property is checked without them there.
    cands = None if cand_p is None or kind == "block" else random_masks(weights, cand_p, seed)
    try:
        got = magnitude_masks(weights, sparsity, gran, scope=scope, candidates=cands)
    except UserError:
        assert cands is not None  # only too few candidates may fail
        return
    # (kept scores, pruned-candidate scores) per ranking pool.
    pools: list[tuple[list[float], list[float]]] = []
    for name, w in weights.items():
        cand = torch.ones(w.shape, dtype=torch.bool) if cands is None else cands[name]
        if kind == "unstructured":
            pools.append((w.abs()[got[name]].tolist(), w.abs()[~got[name] & cand].tolist()))
        elif kind == "block":
            sc = scores(w, gran)
            # Independent block norms agree with scores().
            for r0, r1, c0, c1 in blocks_of(w, 2, 3):
                ref = torch.linalg.vector_norm(w[r0:r1, c0:c1].double()).item()
                assert math.isclose(sc[r0 // 2, c0 // 3].item(), ref, rel_tol=1e-5, abs_tol=1e-6)
                assert bool(got[name][r0:r1, c0:c1].all()) or not bool(got[name][r0:r1, c0:c1].any())
            block_kept = got[name][::2, ::3]
            pools.append((sc[block_kept].tolist(), sc[~block_kept].tolist()))
        else:
            rows, cols = w.shape
            for r in range(rows):
                for c0 in range(0, cols, 4):
                    seg = slice(c0, min(c0 + 4, cols))
                    a, k, c = w[r, seg].abs(), got[name][r, seg], cand[r, seg]
                    pools.append((a[k].tolist(), a[~k & c].tolist()))
    if kind != "nm" and scope == "global":
        pools = [([x for p in pools for x in p[0]], [x for p in pools for x in p[1]])]
    for kept, pruned in pools:
        if kept and pruned:
            assert min(kept) >= max(pruned)


# ---------------------------------------------------------------- ties
def test_ties_keep_lower_flat_index_first() -> None:
    w = torch.full((4, 5), 0.5)
    got = magnitude_masks({"w": w}, 13 / 20)["w"]
    assert got.reshape(-1).tolist() == [True] * 7 + [False] * 13
    # Global: the first tensor (dict order) comes first.
    both = magnitude_masks({"a": torch.ones(2, 3), "b": torch.ones(3, 2)}, 0.5)
    assert both["a"].all() and not both["b"].any()
    # Candidates skip over non-candidates but keep the index order.
    cand = torch.tensor([[False, True, False, True, True]])
    got = magnitude_masks({"w": torch.ones(1, 5)}, 0.6, candidates={"w": cand})["w"]
    assert got.tolist() == [[False, True, False, True, False]]
    # N:M: the first n of each group; blocks: the first blocks in row-major order.
    nm = magnitude_masks({"w": torch.ones(2, 8)}, 0.5, Granularity("nm", n=2, m=4))["w"]
    assert nm.tolist() == [[True, True, False, False] * 2] * 2
    blk = magnitude_masks({"w": torch.ones(4, 4)}, 0.5, Granularity("block", block=(2, 2)))["w"]
    assert blk.tolist() == [[True] * 4, [True] * 4, [False] * 4, [False] * 4]
    # Zero and negative zero tie too.
    z = magnitude_masks({"w": torch.tensor([[0.0, -0.0, 0.0, 1.0]])}, 0.5)["w"]
    assert z.tolist() == [[True, False, False, True]]


def test_topk_mask() -> None:
    s = torch.tensor([[3.0, 1.0, 3.0], [2.0, 3.0, 0.0]])
    assert topk_mask(s, 2).tolist() == [[True, False, True], [False, False, False]]
    assert topk_mask(s, 0).sum() == 0
    assert topk_mask(s, 6).all()
    cand = torch.tensor([[False, True, True], [True, False, False]])
    assert topk_mask(s, 2, cand).tolist() == [[False, False, True], [True, False, False]]
    with pytest.raises(UserError):
        topk_mask(s, 4, cand)
    with pytest.raises(ValueError):
        topk_mask(s, -1)


def test_half_precision_ranks_like_float32() -> None:
    torch.manual_seed(3)
    w = torch.randn(16, 24).to(torch.bfloat16)
    for gran in (Granularity(), Granularity("block", block=(4, 4)), Granularity("nm")):
        s = 0.5 if gran.kind == "nm" else 0.6
        a = magnitude_masks({"w": w}, s, gran)["w"]
        b = magnitude_masks({"w": w.float()}, s, gran)["w"]
        assert torch.equal(a, b)


def test_scores_block_partial_edges() -> None:
    w = torch.arange(1.0, 16.0).reshape(3, 5)  # 2x2 blocks: 2 block rows, 3 block columns
    sc = scores(w, Granularity("block", block=(2, 2)))
    assert sc.shape == (2, 3)
    # Bottom-right block holds only w[2, 4] = 15.
    assert sc[1, 2].item() == pytest.approx(15.0)
    assert sc[0, 0].item() == pytest.approx(math.sqrt(1 + 4 + 36 + 49))
    assert sc[1, 0].item() == pytest.approx(math.sqrt(11**2 + 12**2))


def test_errors() -> None:
    w = {"w": torch.randn(4, 8)}
    with pytest.raises(UserError, match="fixes the sparsity"):
        magnitude_masks(w, 0.7, Granularity("nm", n=2, m=4))
    with pytest.raises(UserError, match="sparsity"):
        magnitude_masks(w, 1.5)
    with pytest.raises(UserError, match="scope"):
        magnitude_masks(w, 0.5, scope="layerwise")
    with pytest.raises(UserError, match="granularity"):
        Granularity("rows").validate()
    with pytest.raises(UserError, match="N:M"):
        Granularity("nm", n=5, m=4).validate()
    with pytest.raises(UserError, match="block"):
        Granularity("block", block=(0, 4)).validate()
    with pytest.raises(UserError, match="NaN"):
        magnitude_masks({"w": torch.tensor([[1.0, float("nan")]])}, 0.5)
    cand = torch.zeros(4, 8, dtype=torch.bool)
    cand[0, :3] = True
    with pytest.raises(UserError, match="candidates"):
        magnitude_masks(w, 0.5, candidates={"w": cand})  # keep 16, only 3 candidates
    forced = torch.zeros(4, 8, dtype=torch.bool)
    forced[1, 1] = True
    with pytest.raises(UserError, match="not candidates"):
        magnitude_masks(w, 0.5, candidates={"w": torch.ones(4, 8, dtype=torch.bool) & ~forced}, always_keep={"w": forced})
    with pytest.raises(UserError, match="always_keep"):
        magnitude_masks(w, 0.9, always_keep={"w": torch.ones(4, 8, dtype=torch.bool)})
    with pytest.raises(UserError, match="aligned"):
        magnitude_masks(w, 0.5, Granularity("block", block=(2, 2)), candidates={"w": cand})
    with pytest.raises(ValueError, match="not being pruned"):
        magnitude_masks(w, 0.5, candidates={"v": cand})


def test_block_keys_bitwise_fixed_order() -> None:
    # The documented ranking key: squares summed one by one, row-major within the block, float32.
    w = torch.randn(7, 10, generator=torch.Generator().manual_seed(5)) * 3
    keys = block_sq_norms(w, (3, 4))
    norms = scores(w, Granularity("block", block=(3, 4)))
    assert keys.shape == norms.shape == (3, 3)
    for r0, r1, c0, c1 in blocks_of(w, 3, 4):
        acc = np.float32(0.0)
        for x in w[r0:r1, c0:c1].reshape(-1).numpy():
            acc = np.float32(acc + np.float32(x) * np.float32(x))
        assert keys[r0 // 3, c0 // 4].item() == float(acc)
        assert norms[r0 // 3, c0 // 4].item() == pytest.approx(math.sqrt(float(acc)), rel=1e-6)
