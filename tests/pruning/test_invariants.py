"""Property-based invariants of the pruners over random schedules, granularities and step
sequences (hypothesis), each checked against an independent computation."""

from __future__ import annotations

import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from sparse_rnnt.errors import UserError
from sparse_rnnt.pruning.masks import LanguageMasks, MaskSet
from sparse_rnnt.pruning.methods import Pruner, PruningConfig
from sparse_rnnt.pruning.ranking import Granularity, pruned_count
from tests.pruning.test_methods import WHOLE, batch, tiny_model

LANGS = ["en", "fr", "it"]
levels_st = st.lists(st.sampled_from([0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9]), min_size=1, max_size=3, unique=True).map(sorted)


def _step(model, opt, pruner, step, lang=None):
    x, y = batch(step)
    with pruner.masked_forward(lang):
        ((model(x) - y) ** 2).mean().backward()
    pruner.before_optimizer_step(step, lang)
    opt.step()
    opt.zero_grad()
    pruner.after_optimizer_step(step)
    return pruner.update_mask(step, lang)


@settings(max_examples=20, deadline=None)
@given(method=st.sampled_from(["imp", "lth", "lap"]), levels=levels_st, interval=st.integers(2, 4),
       seed=st.integers(0, 50), steps=st.integers(3, 12))
def test_hard_masks_zero_after_every_adam_step_and_lth_rewinds_exactly(method, levels, interval, seed, steps):
    model = tiny_model(seed)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = PruningConfig(method=method, levels=tuple(levels), target_sparsity=levels[-1], interval=interval,
                        adapt_every=1, scope=WHOLE)
    pruner = Pruner(cfg, model)
    pruner.prepare()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    total = sum(p.numel() for p in pruner.params.values())
    for step in range(1, steps + 1):
        n_events = len(pruner.history)
        _step(model, opt, pruner, step)
        mask = pruner.masks()
        for name, p in pruner.params.items():
            assert bool((p.detach()[~mask[name]] == 0).all()), (step, name)  # exactly zero
        level = pruner.schedule.sparsity_at(step)
        assert total - mask.kept() == pruned_count(level, total)  # achieved sparsity exact
        leveled = any(h["event"] == "level" for h in pruner.history[n_events:])
        if method == "lth" and leveled:  # rewound: kept weights equal the dense ones, bit for bit
            for name, p in pruner.params.items():
                assert torch.equal(p.detach()[mask[name]], dense[name][mask[name]]), (step, name)


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["unstructured", "nm", "block"]), seed=st.integers(0, 50),
       sparsity=st.sampled_from([0.3, 0.5, 0.7]), nm=st.sampled_from([(2, 4), (1, 4), (1, 2)]),
       block=st.sampled_from([(2, 2), (3, 2), (1, 4)]), ranking=st.sampled_from(["global", "per_tensor"]))
def test_achieved_sparsity_per_granularity(kind, seed, sparsity, nm, block, ranking):
    model = tiny_model(seed)
    if kind == "nm":
        sparsity = 1 - nm[0] / nm[1]
    g = Granularity(kind=kind, n=nm[0], m=nm[1], block=block)
    cfg = PruningConfig(method="imp", schedule="oneshot", levels=(sparsity,), target_sparsity=sparsity,
                        granularity=g, ranking=ranking, scope=WHOLE)
    pruner = Pruner(cfg, model)
    pruner.prepare()
    mask = pruner.masks()
    tensors = [(mask[n], p) for n, p in pruner.params.items()]
    if kind == "unstructured":
        if ranking == "global":
            total = sum(m.numel() for m, _ in tensors)
            assert total - mask.kept() == pruned_count(sparsity, total)
        else:
            for m, _ in tensors:
                assert int((~m).sum()) == pruned_count(sparsity, m.numel())
    elif kind == "nm":
        n, mm = nm
        for m, _ in tensors:  # exactly n of every m along the input dim; tail keeps ceil(n * L / m)
            _, cols = m.shape
            for start in range(0, cols, mm):
                width = min(mm, cols - start)
                want = -(-n * width // mm)
                assert bool((m[:, start:start + width].sum(dim=1) == want).all())
    else:  # whole blocks; pruned count within one block of the target
        bh, bw = block
        scope_total = sum(m.numel() for m, _ in tensors)
        groups = [[m] for m, _ in tensors] if ranking == "per_tensor" else [[m for m, _ in tensors]]
        for group in groups:
            total = sum(m.numel() for m in group)
            pruned = sum(int((~m).sum()) for m in group)
            assert pruned_count(sparsity, total) - bh * bw < pruned <= pruned_count(sparsity, total)
        assert scope_total == sum(p.numel() for p in pruner.params.values())
        for m, _ in tensors:
            for r in range(0, m.shape[0], bh):
                for c in range(0, m.shape[1], bw):
                    tile = m[r:r + bh, c:c + bw]
                    assert bool(tile.all()) or not bool(tile.any())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 50), level=st.sampled_from([0.3, 0.5, 0.7]))
def test_soft_pruned_weights_receive_the_straight_through_gradient(seed, level):
    model = tiny_model(seed)
    cfg = PruningConfig(method="adaptive", schedule="oneshot", levels=(level,), target_sparsity=level, scope=WHOLE)
    pruner = Pruner(cfg, model)
    pruner.prepare()
    mask = pruner.masks()
    x, y = batch(seed)
    with pruner.masked_forward(None):
        ((model(x) - y) ** 2).mean().backward()
    # Independent reference: the gradient w.r.t. the masked weights of the same functional network.
    w1 = (model[0].weight.detach() * mask["0.weight"]).requires_grad_(True)
    w2 = (model[2].weight.detach() * mask["2.weight"]).requires_grad_(True)
    out = torch.tanh(x @ w1.T + model[0].bias.detach()) @ w2.T + model[2].bias.detach()
    ((out - y) ** 2).mean().backward()
    for name, ref in (("0.weight", w1.grad), ("2.weight", w2.grad)):
        got = pruner.params[name].grad
        torch.testing.assert_close(got, ref)
        pruned = ~mask[name]
        assert bool(pruned.any())
        assert bool((got[pruned] != 0).any())  # pruned weights do get gradient


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 50), order=st.lists(st.sampled_from(LANGS), min_size=4, max_size=10),
       levels=st.lists(st.sampled_from([0.7, 0.8, 0.9]), min_size=1, max_size=3, unique=True).map(sorted),
       density=st.floats(0.05, 0.3))
def test_a_language_never_takes_or_changes_weights_owned_only_by_others(seed, order, levels, density):
    model = tiny_model(seed)
    cfg = PruningConfig(method="dynamic-pathways", levels=tuple(levels), target_sparsity=levels[-1], interval=3,
                        adapt_every=1, scope=WHOLE)
    pruner = Pruner(cfg, model, languages=list(LANGS))
    g = torch.Generator().manual_seed(seed)
    start = LanguageMasks({lang: MaskSet({n: torch.rand(p.shape, generator=g) < density
                                          for n, p in pruner.params.items()}) for lang in LANGS})
    pruner.prepare()
    try:
        pruner.init_masks(start)
    except UserError as e:  # the schedule asked for more weights than a zone holds: not this property
        if "candidates" not in str(e):
            raise
        assume(False)  # rejected, not passed: hypothesis fails the test if it must reject them all
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step, lang in enumerate(order, 1):
        before = pruner.language_masks().clone()
        weights = {n: p.detach().clone() for n, p in pruner.params.items()}
        # Weights owned only by other languages, computed by hand from the masks.
        others_only = {}
        for n in before.names:
            others = torch.zeros_like(before[lang][n])
            for o in LANGS:
                if o != lang:
                    others |= before[o][n]
            others_only[n] = others & ~before[lang][n]
        try:
            _step(model, opt, pruner, step, lang)
        except UserError as e:  # a level step that no longer fits: stop the sequence there
            if "candidates" not in str(e):
                raise
            event("stopped at a level step that no longer fits")
            return
        after = pruner.language_masks()
        kept = {n: torch.zeros_like(before[lang][n]) for n in before.names}
        for o in LANGS:
            for n in before.names:
                kept[n] |= after[o][n]
        for n in before.names:
            now, was = pruner.params[n].detach(), weights[n]
            # lang's step never moved a weight owned only by others; every step here re-ranks
            # (adapt_every=1), and a weight no language keeps any more is zeroed
            assert torch.equal(now[others_only[n] & kept[n]], was[others_only[n] & kept[n]]), (step, n)
            assert bool((now[~kept[n]] == 0).all()), (step, n)
            for o in LANGS:  # every language re-ranked, none taking what another alone kept before
                owned_by_others = torch.zeros_like(before[o][n])
                for o2 in LANGS:
                    if o2 != o:
                        owned_by_others |= before[o2][n]
                assert not bool((after[o][n] & owned_by_others & ~before[o][n]).any()), (step, o, n)
    event("full sequence")
