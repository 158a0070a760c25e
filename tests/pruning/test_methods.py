"""Pruning methods driven step by step with Adam, checked against brute-force references."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from sparse_rnnt.errors import UserError
from sparse_rnnt.pruning.masks import LanguageMasks, MaskSet
from sparse_rnnt.pruning.methods import Pruner, PruningConfig
from sparse_rnnt.pruning.ranking import Granularity, pruned_count
from sparse_rnnt.pruning.scope import ScopeConfig

WHOLE = ScopeConfig(roots=())


def tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)


def ref_top(weights: dict[str, Tensor], keep: int, cand: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Brute force: keep the ``keep`` largest |w| (global, lower index first) among candidates."""
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights.values()]).double()
    allowed = (
        torch.ones_like(flat, dtype=torch.bool) if cand is None
        else torch.cat([cand[n].reshape(-1) for n in weights])
    )
    key = [(-float(v), i) for i, v in enumerate(flat.tolist())]
    order = sorted(k for k in key if allowed[k[1]])
    kept = torch.zeros_like(flat, dtype=torch.bool)
    for _, i in order[:keep]:
        kept[i] = True
    out, start = {}, 0
    for n, w in weights.items():
        out[n] = kept[start : start + w.numel()].reshape(w.shape)
        start += w.numel()
    return out


def weights_of(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}


def train_step(model: nn.Module, opt: torch.optim.Optimizer, pruner: Pruner, step: int, lang: str | None = None) -> None:
    x, y = batch(step)
    with pruner.masked_forward(lang):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
    pruner.before_optimizer_step(step, lang)
    opt.step()
    opt.zero_grad()
    pruner.after_optimizer_step(step)


# ---------------------------------------------------------------- hard methods


@pytest.mark.parametrize("method", ["imp", "lth", "lap"])
def test_hard_methods_exact(method: str) -> None:
    model = tiny_model()
    cfg = PruningConfig(method=method, levels=(0.2, 0.5, 0.7), interval=3, adapt_every=1, scope=WHOLE)
    pruner = Pruner(cfg, model)
    theta0 = weights_of(model)
    pruner.prepare()
    total = sum(w.numel() for w in theta0.values())
    # step 0 level 0.2 from the dense weights
    expected = ref_top(theta0, total - pruned_count(0.2, total))
    assert all(torch.equal(pruner.masks()[n], expected[n]) for n in theta0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    moved_without_reapply = False
    for step in range(1, 10):
        x, y = batch(step)
        with pruner.masked_forward():
            ((model(x) - y) ** 2).mean().backward()
        pruner.before_optimizer_step(step)
        for n, p in pruner.params.items():
            assert not bool(p.grad[~pruner.masks()[n]].any())
        opt.step()
        opt.zero_grad()
        moved_without_reapply |= any(bool(p.detach()[~pruner.masks()[n]].any()) for n, p in pruner.params.items())
        pruner.after_optimizer_step(step)
        for n, p in pruner.params.items():
            assert not bool(p.detach()[~pruner.masks()[n]].any())
        old = pruner.masks().clone()
        before = weights_of(model)
        changed = pruner.update_mask(step)
        new = pruner.masks()
        if step % 3 == 0 and step < 9:
            level = (0.2, 0.5, 0.7)[step // 3]
            assert changed
            assert total - new.kept() == pruned_count(level, total)
            exp = ref_top(before, total - pruned_count(level, total), old.as_dict())
            for n in new:
                assert torch.equal(new[n], exp[n])
                assert not bool((new[n] & ~old[n]).any())  # nested
            after = weights_of(model)
            for n in new:
                if method == "lth":
                    assert torch.equal(after[n][new[n]], theta0[n][new[n]])
                else:
                    assert torch.equal(after[n][new[n]], before[n][new[n]])
                    assert not torch.equal(after[n][new[n]], theta0[n][new[n]])
                assert not bool(after[n][~new[n]].any())
            assert pruner.history[-1]["churn"] == old.flips(new) / total
        else:
            assert not changed and new.equal(old)
    assert moved_without_reapply  # Adam moments would have moved pruned weights
    assert pruner.level == 0.7


# ---------------------------------------------------------------- adaptive (soft)


def test_adaptive_soft_forward_gradients_and_comeback() -> None:
    model = tiny_model(1)
    cfg = PruningConfig(method="adaptive", levels=(0.5, 0.7), target_sparsity=0.7, interval=6,
                        adapt_every=2, scope=WHOLE)
    pruner = Pruner(cfg, model)
    pruner.prepare()
    mask = pruner.masks()
    w0, w2 = model[0].weight, model[2].weight
    # forward uses theta ⊙ m
    x, y = batch(0)
    m0, m2 = mask["0.weight"], mask["2.weight"]
    manual = torch.tanh(x @ (w0.detach() * m0).T + model[0].bias.detach()) @ (w2.detach() * m2).T + model[2].bias.detach()
    with pruner.masked_forward():
        out = model(x)
        ((out - y) ** 2).mean().backward()
    torch.testing.assert_close(out.detach(), manual, rtol=0, atol=1e-6)
    # pruned weights were set to zero at the level step, and they get a gradient (stay trainable)
    assert bool(w0.detach()[~m0].eq(0).all()) and bool(w0.detach()[m0].ne(0).all())
    assert bool(w0.grad[~m0].ne(0).any()) and bool(w2.grad[~m2].ne(0).any())
    before = w0.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    pruner.before_optimizer_step(1)
    opt.step()
    opt.zero_grad()
    pruner.after_optimizer_step(1)
    assert bool((w0.detach()[~m0] != before[~m0]).any())
    # comeback: make one pruned weight the largest, re-rank at an adapt step
    idx = torch.nonzero(~m0)[0]
    with torch.no_grad():
        w0[idx[0], idx[1]] = 100.0
    old = pruner.masks().clone()
    assert not pruner.update_mask(1)  # not an adapt step
    assert pruner.update_mask(2)
    new = pruner.masks()
    assert bool(new["0.weight"][idx[0], idx[1]])
    for n, p in pruner.params.items():  # the re-rank set the newly pruned weights to zero
        assert bool((p.detach()[~new[n]] == 0).all())
    total = new.numel()
    assert total - new.kept() == pruned_count(0.5, total)
    exp = ref_top(weights_of(model), total - pruned_count(0.5, total))
    assert all(torch.equal(new[n], exp[n]) for n in new)
    h = pruner.history[-1]
    assert h["event"] == "rerank" and h["step"] == 2 and h["churn"] == old.flips(new) / total > 0


def test_adaptive_lth_level_step_ranks_then_rewinds() -> None:
    model = tiny_model(2)
    cfg = PruningConfig(method="adaptive", variant="lth", levels=(0.5, 0.7), target_sparsity=0.7,
                        interval=4, adapt_every=2, scope=WHOLE)
    pruner = Pruner(cfg, model)
    theta0 = weights_of(model)
    pruner.prepare()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(1, 5):
        train_step(model, opt, pruner, step)
        trained = weights_of(model)
        pruner.update_mask(step)
    total = sum(w.numel() for w in theta0.values())
    exp = ref_top(trained, total - pruned_count(0.7, total))  # ranked on pre-rewind weights
    assert all(torch.equal(pruner.masks()[n], exp[n]) for n in exp)
    after = weights_of(model)
    # rewound to theta0, pruned weights set to zero
    assert all(torch.equal(after[n], theta0[n] * pruner.masks()[n]) for n in theta0)
    assert pruner.history[-1]["event"] == "level" and pruner.level == 0.7


# ---------------------------------------------------------------- dynamic pathways

LANGS = ["en", "fr", "it"]


def dp_pruner(model: nn.Module, level: float = 0.5) -> Pruner:
    cfg = PruningConfig(method="dynamic-pathways", levels=(level,), target_sparsity=level,
                        interval=10, adapt_every=2, scope=WHOLE)
    pruner = Pruner(cfg, model, languages=LANGS)
    pruner.prepare()
    return pruner


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("method", ["dynamic-pathways", "imp"])
def test_initial_masks_from_the_cpu_follow_the_weights(method: str, backend: str, device: str) -> None:
    # Masks read from a file are on the CPU. On CUDA they once reached the re-rank kernels as
    # CPU candidates ("must be ... on cuda:0") and stopped dynamic pathways at step 0 (H100).
    # Here a step-0 level event re-ranks inside them: against the reference, and on the weights'
    # device; the caller's masks are copied, not aliased.
    model = tiny_model(3).to(device)
    multi = method == "dynamic-pathways"
    cfg = PruningConfig(method=method, levels=(0.5,), target_sparsity=0.5, schedule="oneshot", interval=10,
                        adapt_every=2, scope=WHOLE, backend=backend)
    pruner = Pruner(cfg, model, languages=LANGS if multi else None)
    g = torch.Generator().manual_seed(4)
    init = {lg: {n: torch.rand(p.shape, generator=g) < 0.8 for n, p in pruner.params.items()} for lg in LANGS}
    before = weights_of(model)
    given = LanguageMasks({lg: MaskSet(init[lg]) for lg in LANGS}) if multi else MaskSet(init["en"])
    pruner.prepare(initial_masks=given)
    total = sum(p.numel() for p in pruner.params.values())
    keep = total - pruned_count(0.5, total)
    for lg in LANGS if multi else [None]:
        got = pruner.masks(lg)
        zone = ref_zone(init, lg) if multi else init["en"]
        # ranked on the weights as init_masks left them: dynamic pathways zeroes what no language keeps
        used = {n: torch.stack([init[x][n] for x in LANGS]).any(0) if multi else init["en"][n] for n in before}
        exp = ref_top({n: w.cpu() * used[n] for n, w in before.items()}, keep, zone)
        for n, p in pruner.params.items():
            assert got[n].device == p.device
            assert torch.equal(got[n].cpu(), exp[n])
    first = next(iter(pruner.params))
    assert (given["en"] if multi else given)[first].data_ptr() != pruner.masks(LANGS[0] if multi else None)[first].data_ptr()


def ref_zone(masks: dict[str, dict[str, Tensor]], lang: str) -> dict[str, Tensor]:
    """By hand: where ``lang`` may keep weights (no other language's, or its own)."""
    out = {}
    for n in masks[lang]:
        others = torch.zeros_like(masks[lang][n])
        for other in masks:
            if other != lang:
                others |= masks[other][n]
        out[n] = ~others | masks[lang][n]
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), density=st.floats(0.05, 0.6), level=st.sampled_from([0.3, 0.5, 0.8]),
       lang=st.sampled_from(LANGS))
def test_dynamic_pathways_rerank_is_language_specific_inside_the_zone(seed: int, density: float, level: float,
                                                                       lang: str) -> None:
    # init_masks runs the step-0 sparsity step on the given masks: every language at `level`
    # inside the zone they define. A re-rank step then re-ranks the batch's language inside its
    # zone (from the masks as they are); each other language keeps its mask until its own batch.
    model = tiny_model(seed % 7)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    pruner = dp_pruner(model, level)
    init = {lg: {n: torch.rand(p.shape, generator=g) < density for n, p in pruner.params.items()} for lg in LANGS}
    total = sum(p.numel() for p in pruner.params.values())
    keep = total - pruned_count(level, total)
    w0 = {n: t.clone() for n, t in pruner.theta0.items()}  # prepare() ran its step-0 event on all-ones masks
    if any(sum(int(z.sum()) for z in ref_zone(init, lg).values()) < keep for lg in LANGS):
        with pytest.raises(UserError, match="candidates"):
            pruner.init_masks(LanguageMasks({lg: MaskSet(init[lg]) for lg in LANGS}))
        return
    pruner.init_masks(LanguageMasks({lg: MaskSet(init[lg]) for lg in LANGS}))
    # the step-0 event, every zone from the given masks, on weights that no given mask keeps zeroed
    w0 = {n: t * (init["en"][n] | init["fr"][n] | init["it"][n]) for n, t in w0.items()}
    for lg in LANGS:
        exp = ref_top(w0, keep, ref_zone(init, lg))
        assert all(torch.equal(pruner.masks(lg)[n], exp[n]) for n in exp), lg
    with torch.no_grad():  # training since
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    before = {lg: pruner.masks(lg).as_dict() for lg in LANGS}
    w = {n: t for n, t in weights_of(model).items() if n in pruner.params}
    pruner.update_mask(2, lang)
    exp = ref_top(w, keep, ref_zone(before, lang))
    for n in exp:
        assert torch.equal(pruner.masks(lang)[n], exp[n])
    for lg in LANGS:
        if lg != lang:
            assert all(torch.equal(pruner.masks(lg)[n], before[lg][n]) for n in exp), lg
    assert [h["language"] for h in pruner.history if h["event"] == "rerank"] == [lang]
    for other in [lg for lg in LANGS if lg != lang]:  # step 3, the same window: their own batches
        now = {lg: pruner.masks(lg).as_dict() for lg in LANGS}
        w = {n: t for n, t in weights_of(model).items() if n in pruner.params}
        pruner.update_mask(3, other)
        exp = ref_top(w, keep, ref_zone(now, other))
        assert all(torch.equal(pruner.masks(other)[n], exp[n]) for n in exp), other
        events = len(pruner.history)
        assert not pruner.update_mask(3, other) and len(pruner.history) == events  # once per window
    assert sorted(h["language"] for h in pruner.history if h["event"] == "rerank") == sorted(LANGS)


def _one_linear(weights: list[float]) -> nn.Module:
    m = nn.Linear(len(weights), 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([weights]))
    return m


def test_dynamic_pathways_event_zones_by_hand() -> None:
    # Languages re-ranked in one event (update_mask(step, None): every language due) take their
    # zones from the masks before it. |w| = 0.9 0.8 0 0 at the step-0 event, level 0.5 (keep 2):
    # from a = {0}, b = {1} the zones are {0, 2, 3} and {1, 2, 3}, so a = {0, 2}, b = {1, 2} (the
    # tie to the lower index). Then |w| = 0.9 0.8 0.1 0.2: zones {0, 2, 3} and {1, 2, 3} give
    # a = {0, 3} and b = {1, 3} (weight 3 becomes shared); one language after the other would
    # give b {1, 2}, from the zone a's new mask leaves it.
    for langs in (["a", "b"], ["b", "a"]):
        model = _one_linear([0.9, -0.8, 0.0, 0.0])
        cfg = PruningConfig(method="dynamic-pathways", levels=(0.5,), target_sparsity=0.5, interval=10,
                            adapt_every=2, scope=WHOLE)
        pruner = Pruner(cfg, model, languages=langs)
        pruner.prepare()
        init = {"a": torch.tensor([[True, False, False, False]]), "b": torch.tensor([[False, True, False, False]])}
        pruner.init_masks(LanguageMasks({lg: MaskSet({"weight": init[lg]}) for lg in langs}))
        assert pruner.masks("a")["weight"].tolist() == [[True, False, True, False]]
        assert pruner.masks("b")["weight"].tolist() == [[False, True, True, False]]
        with torch.no_grad():  # training since
            model.weight.copy_(torch.tensor([[0.9, -0.8, 0.1, -0.2]]))
        assert pruner.update_mask(2, None)
        assert pruner.masks("a")["weight"].tolist() == [[True, False, False, True]]
        assert pruner.masks("b")["weight"].tolist() == [[False, True, False, True]]
        # weight 2, kept by nobody, is zeroed (soft pruning); the others keep their values
        assert model.weight[0].tolist() == pytest.approx([0.9, -0.8, 0.0, -0.2])


def test_dynamic_pathways_alternating_batches_rerank_each_language_after_its_own_batch() -> None:
    # Two languages alternating with an even period: every re-rank step falls on the same
    # language's batch; the other is re-ranked after its next batch, once per window.
    model = tiny_model(4)
    langs = ["en", "fr"]
    cfg = PruningConfig(method="dynamic-pathways", levels=(0.5,), target_sparsity=0.5, interval=100,
                        adapt_every=2, scope=WHOLE)
    pruner = Pruner(cfg, model, languages=langs)
    g = torch.Generator().manual_seed(3)
    pruner.prepare(initial_masks=LanguageMasks({lg: MaskSet({n: torch.rand(p.shape, generator=g) < 0.4
                                                             for n, p in pruner.params.items()}) for lg in langs}))
    keep = pruner.masks("en").kept()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(1, 9):
        lang = langs[step % 2]
        train_step(model, opt, pruner, step, lang)
        before = {lg: pruner.masks(lg).as_dict() for lg in langs}
        w = {n: t for n, t in weights_of(model).items() if n in pruner.params}
        pruner.update_mask(step, lang)
        if step >= 2:  # from step 2 on, the step's language is due at every step
            exp = ref_top(w, keep, ref_zone(before, lang))
            assert all(torch.equal(pruner.masks(lang)[n], exp[n]) for n in w), step
    events = [(h["step"], h["language"]) for h in pruner.history if h["event"] == "rerank"]
    assert events == [(2, "en"), (3, "fr"), (4, "en"), (5, "fr"), (6, "en"), (7, "fr"), (8, "en")]


def test_dynamic_pathways_from_one_shared_mask_grow_apart() -> None:
    # A LAP start gives every language the same mask. Re-ranked all together on the same weights
    # (the rule before), they stayed identical for good (an audit measured IoU 1.0 after 60 steps
    # in which 44 re-ranks changed the masks). Re-ranked after their own batches, they part.
    model = tiny_model(2)
    langs = ["en", "fr"]
    cfg = PruningConfig(method="dynamic-pathways", levels=(0.5, 0.7), target_sparsity=0.7, interval=10,
                        adapt_every=2, scope=WHOLE)
    pruner = Pruner(cfg, model, languages=langs)
    g = torch.Generator().manual_seed(4)
    lap = MaskSet({n: torch.rand(p.shape, generator=g) < 0.6 for n, p in pruner.params.items()})
    pruner.prepare(initial_masks=lap)
    assert all(torch.equal(pruner.masks("en")[n], pruner.masks("fr")[n]) for n in lap.names)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(1, 21):
        lang = langs[step % 2]
        train_step(model, opt, pruner, step, lang)
        pruner.update_mask(step, lang)
    en, fr = pruner.masks("en"), pruner.masks("fr")
    both = sum(int((en[n] & fr[n]).sum()) for n in lap.names)
    either = sum(int((en[n] | fr[n]).sum()) for n in lap.names)
    assert both < either  # IoU below 1: the pathways differ
    assert en.kept() == fr.kept()


def test_dynamic_pathways_prepared_with_initial_masks_reranks_inside_their_zones() -> None:
    # The trainer's path: prepare(initial_masks=...) with a schedule level at step 0. Every
    # language is ranked at that level inside the zone the initial masks define.
    model = tiny_model(9)
    cfg = PruningConfig(method="dynamic-pathways", levels=(0.6, 0.8), target_sparsity=0.8, interval=10,
                        adapt_every=2, scope=WHOLE)
    pruner = Pruner(cfg, model, languages=LANGS)
    g = torch.Generator().manual_seed(12)
    init = {lg: {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in pruner.params.items()} for lg in LANGS}
    w = weights_of(model)
    pruner.prepare(initial_masks=LanguageMasks({lg: MaskSet(init[lg]) for lg in LANGS}))
    total = sum(t.numel() for t in w.values())
    keep = total - pruned_count(0.6, total)
    assert pruner.level == 0.6
    # init_masks first zeroes what no initial mask keeps (soft pruning), then the step-0 event ranks
    union = {n: init["en"][n] | init["fr"][n] | init["it"][n] for n in w}
    w = {n: t * union[n] for n, t in w.items()}
    kept = {n: torch.zeros_like(t, dtype=torch.bool) for n, t in w.items()}
    for lg in LANGS:
        exp = ref_top(w, keep, ref_zone(init, lg))
        assert all(torch.equal(pruner.masks(lg)[n], exp[n]) for n in w), lg
        for n in w:
            kept[n] |= exp[n]
    now = weights_of(model)  # soft: only the weights no language keeps are zeroed
    assert all(torch.equal(now[n], w[n] * kept[n]) for n in w)


def test_dynamic_pathways_forward_uses_each_languages_own_pathway() -> None:
    # Inside masked_forward(z) the model computes with theta ⊙ m_z: a weight another language
    # keeps but z does not is zero for z, and the dense theta is back afterwards.
    model = tiny_model(6)
    pruner = dp_pruner(model, 0.5)
    g = torch.Generator().manual_seed(8)
    init = {lg: {n: torch.rand(p.shape, generator=g) < 0.6 for n, p in pruner.params.items()} for lg in LANGS}
    pruner.init_masks(LanguageMasks({lg: MaskSet(init[lg]) for lg in LANGS}))
    init = {lg: pruner.masks(lg).as_dict() for lg in LANGS}  # after the step-0 sparsity step
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # soft pruning: weights no language keeps regrow, so theta has no zeros
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, _ = batch(0)
    for lang in LANGS:
        ref = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.copy_(theta[n] * init[lang][n] if n in init[lang] else theta[n])
        with torch.no_grad(), pruner.masked_forward(lang):
            got = model(x)
        assert torch.equal(got, ref(x).detach())
        assert all(torch.equal(p, theta[n]) for n, p in model.named_parameters())


def test_dynamic_pathways_level_step_together_and_training() -> None:
    model = tiny_model(3)
    # 0.8 then 0.9: each language keeps a fifth, so a free zone is left for the steps to train
    cfg = PruningConfig(method="dynamic-pathways", levels=(0.8, 0.9), target_sparsity=0.9,
                        interval=4, adapt_every=2, scope=WHOLE)
    pruner = Pruner(cfg, model, languages=LANGS)
    pruner.prepare()
    g = torch.Generator().manual_seed(5)
    init = {lg: {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in pruner.params.items()} for lg in LANGS}
    pruner.init_masks(LanguageMasks({lg: MaskSet(init[lg]) for lg in LANGS}))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(1, 4):
        lang = LANGS[step % 3]
        zone = ref_zone({lg: pruner.masks(lg).as_dict() for lg in LANGS}, lang)
        before = weights_of(model)
        train_step(model, opt, pruner, step, lang)
        after = weights_of(model)
        for n in zone:
            assert torch.equal(after[n][~zone[n]], before[n][~zone[n]])  # others' weights untouched
            own = pruner.masks(lang)[n]
            assert bool((after[n][zone[n] & ~own] != before[n][zone[n] & ~own]).any())  # soft: free ones train
        pruner.update_mask(step, lang)
    # level step at 4: every language re-pruned on the shared weights, zones from the masks before it
    current = {lg: pruner.masks(lg).as_dict() for lg in LANGS}
    w = weights_of(model)
    total = sum(t.numel() for t in w.values())
    keep = total - pruned_count(0.9, total)
    expected = {lg: ref_top(w, keep, ref_zone(current, lg)) for lg in LANGS}
    assert pruner.update_mask(4)
    for lg in LANGS:
        assert all(torch.equal(pruner.masks(lg)[n], expected[lg][n]) for n in w)
        assert pruner.masks(lg).kept() == keep
    assert [h["language"] for h in pruner.history[-3:]] == LANGS


# ---------------------------------------------------------------- checkpoints


def roundtrip(state: dict) -> dict:
    """Through safetensors bytes + JSON, as a checkpoint would."""
    return {"meta": json.loads(json.dumps(state["meta"])), "tensors": st_load(st_save(state["tensors"]))}


@pytest.mark.parametrize("method", ["imp", "lth", "adaptive", "dynamic-pathways"])
def test_state_dict_resume_matches_uninterrupted(method: str) -> None:
    langs = LANGS if method == "dynamic-pathways" else None
    cfg = PruningConfig(method=method, levels=(0.3, 0.6), target_sparsity=0.6, interval=4, adapt_every=2,
                        variant="lth", scope=WHOLE)

    def make() -> tuple[nn.Module, torch.optim.Optimizer, Pruner]:
        model = tiny_model(4)
        return model, torch.optim.Adam(model.parameters(), lr=0.05), Pruner(cfg, model, languages=langs)

    def lang_at(step: int) -> str | None:
        return None if langs is None else LANGS[step % 3]

    def run(model: nn.Module, opt: torch.optim.Optimizer, pruner: Pruner, steps: range) -> list:
        trace = []
        for step in steps:
            train_step(model, opt, pruner, step, lang_at(step))
            pruner.update_mask(step, lang_at(step))
            masks = [pruner.masks(lg) for lg in (langs or [None])]
            trace.append(([m.clone() for m in masks], weights_of(model)))
        return trace

    model_a, opt_a, pr_a = make()
    pr_a.prepare()
    full = run(model_a, opt_a, pr_a, range(1, 11))

    model_b, opt_b, pr_b = make()
    pr_b.prepare()
    run(model_b, opt_b, pr_b, range(1, 6))
    saved = (roundtrip(pr_b.state_dict()), model_b.state_dict(), opt_b.state_dict())
    model_c, opt_c, pr_c = make()
    with torch.no_grad():
        for p in model_c.parameters():
            p.add_(1.0)  # make sure state really comes from the checkpoint
    pr_c.load_state_dict(saved[0])
    model_c.load_state_dict(saved[1])
    opt_c.load_state_dict(saved[2])
    assert pr_c.history == pr_b.history and pr_c.level == pr_b.level
    resumed = run(model_c, opt_c, pr_c, range(6, 11))
    for (ma, wa), (mc, wc) in zip(full[5:], resumed, strict=True):
        assert all(a.equal(c) for a, c in zip(ma, mc, strict=True))
        assert all(torch.equal(wa[n], wc[n]) for n in wa)


def test_load_state_dict_rejects_other_method() -> None:
    model = tiny_model()
    imp = Pruner(PruningConfig(method="imp", scope=WHOLE), model)
    imp.prepare()
    lth = Pruner(PruningConfig(method="lth", scope=WHOLE), model)
    with pytest.raises(UserError, match="method"):
        lth.load_state_dict(imp.state_dict())


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "magic"}, "pruning.method"),
        ({"method": "adaptive", "adapt_every": 1000}, "adapt_every"),
        ({"method": "dynamic-pathways", "interval": 50}, "adapt_every"),
        ({"method": "imp", "adapt_every": 0}, "adapt_every"),
        ({"method": "imp", "schedule": "oneshot", "levels": (float("nan"),)}, "pruning.levels"),
        ({"method": "imp", "schedule": "oneshot", "levels": (1.5,)}, "pruning.levels"),
        ({"method": "imp", "interval": 0}, "interval"),
        ({"method": "imp", "levels": (0.5, 0.2, 0.7)}, "increasing"),
        ({"method": "imp", "levels": (0.2, 0.5)}, "target_sparsity"),
        ({"method": "imp", "target_sparsity": 1.0, "levels": (0.5, 1.0)}, "target_sparsity"),
        ({"method": "adaptive", "variant": "random"}, "variant"),
        ({"method": "imp", "ranking": "layer"}, "ranking"),
        ({"method": "imp", "schedule": "linear"}, "schedule"),
        ({"method": "imp", "schedule": "cubic", "levels": (0.2, 0.5)}, "target_sparsity"),
        ({"method": "imp", "granularity": Granularity(kind="diag")}, "granularity"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        PruningConfig(**kwargs).validate()


@pytest.mark.parametrize("method", ["imp", "lth", "lap", "pathways"])
def test_hard_methods_ignore_adapt_every(method: str) -> None:
    # Only the soft methods re-rank every adapt_every steps: a hard method with a short interval
    # (prune --method imp --interval 50, adapt_every left at its default 100) is a valid config.
    cfg = PruningConfig(method=method, interval=50)
    assert cfg.adapt_every >= cfg.interval and not cfg.soft
    cfg.validate()
    PruningConfig(method=method, interval=10, adapt_every=10).validate()


@pytest.mark.parametrize("method", ["adaptive", "dynamic-pathways"])
def test_soft_methods_need_adapt_every_below_interval(method: str) -> None:
    with pytest.raises(UserError, match=r"pruning.adapt_every \(100\).*pruning.interval \(50\)"):
        PruningConfig(method=method, interval=50).validate()
    with pytest.raises(UserError, match="adapt_every"):
        PruningConfig(method=method, interval=10, adapt_every=10).validate()
    PruningConfig(method=method, interval=50, adapt_every=49).validate()


def test_prune_config_accepts_imp_with_a_short_interval() -> None:
    from sparse_rnnt.config import load_config

    cfg = load_config(None, ["pruning.method=imp", "pruning.interval=50"])
    assert cfg.pruning is not None and cfg.pruning.interval == 50 and cfg.pruning.adapt_every == 100
    with pytest.raises(UserError, match="adapt_every"):
        load_config(None, ["pruning.method=adaptive", "pruning.interval=50"])


def test_prune_command_line_imp_with_a_short_interval() -> None:
    # The command's own config path (no dense checkpoint needed to build the config).
    from sparse_rnnt.cli import build_parser, prune_config

    def cfg(method: str):
        args = build_parser().parse_args(["prune", "--init", "dense", "--out", "run", "--method", method,
                                          "--interval", "50"])
        return prune_config(args, {})

    assert cfg("imp").pruning.interval == 50
    with pytest.raises(UserError, match="adapt_every"):
        cfg("adaptive")


def test_adaptive_event_timing_when_n_does_not_divide_t_and_after_the_last_level() -> None:
    # T = 5, n = 3, levels 0.2 -> 0.5: sparsity steps at 0 and 5; re-ranks at every other multiple
    # of 3, also after the last level (at 0.5, over all weights).
    cfg = PruningConfig(method="adaptive", levels=(0.2, 0.5), target_sparsity=0.5, interval=5, adapt_every=3,
                        scope=WHOLE)
    model = tiny_model(1)
    pruner = Pruner(cfg, model)
    pruner.prepare()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    total = sum(p.numel() for p in pruner.params.values())
    for step in range(1, 14):
        train_step(model, opt, pruner, step)
        trained = {n: p.detach().clone() for n, p in pruner.params.items()}  # ranked before zeroing
        pruner.update_mask(step)
        if step % 3 == 0 and step != 5:
            exp = ref_top(trained, total - pruned_count(pruner.level, total))
            assert all(torch.equal(pruner.masks()[n], exp[n]) for n in exp), step
    assert [(h["step"], h["event"], h["level"]) for h in pruner.history] == [
        (0, "level", 0.2), (3, "rerank", 0.2), (5, "level", 0.5), (6, "rerank", 0.5), (9, "rerank", 0.5),
        (12, "rerank", 0.5)]


def test_cubic_config_drives_the_pruner_at_hand_computed_levels() -> None:
    # s_i = 0.2, s_f = 0.7, N = 2 events after the start, T = 3: s = 0.2, 0.7 - 0.5 (1/2)^3, 0.7
    cfg = PruningConfig(method="imp", schedule="cubic", levels=(0.2, 0.5, 0.7), interval=3, adapt_every=1,
                        scope=WHOLE)
    cfg.validate()
    model = tiny_model(2)
    pruner = Pruner(cfg, model)
    pruner.prepare()
    total = sum(p.numel() for p in pruner.params.values())
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    seen = {0: pruner.masks().kept()}
    for step in range(1, 8):
        train_step(model, opt, pruner, step)
        pruner.update_mask(step)
        seen[step] = pruner.masks().kept()
    expected = {0: 0.2, 3: 0.6375, 6: 0.7}
    for step, kept in seen.items():
        level = max(v for k, v in expected.items() if k <= step)
        assert kept == total - pruned_count(level, total), step
    assert [h["step"] for h in pruner.history if h["event"] == "level"] == [0, 3, 6]


def test_dynamic_pathways_needs_languages() -> None:
    with pytest.raises(UserError, match="languages"):
        Pruner(PruningConfig(method="dynamic-pathways", scope=WHOLE), tiny_model())


# ---------------------------------------------------------------- the real model


def test_imp_on_tiny_emformer_rnnt() -> None:
    from sparse_rnnt.model.configs import model_config
    from sparse_rnnt.model.rnnt import EmformerRNNT

    torch.manual_seed(0)
    model = EmformerRNNT(model_config("tiny", transformer_num_layers=2), num_symbols=12)
    cfg = PruningConfig(method="imp", levels=(0.5, 0.7), target_sparsity=0.7, interval=2, adapt_every=1)
    pruner = Pruner(cfg, model)
    assert len(pruner.params) == 16  # 1 + 5*2 encoder layers + output + x2g, p2g, predictor, joiner
    pruner.prepare()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    feats = torch.randn(2, 48, 80)
    flen = torch.tensor([48, 40])
    tgt = torch.randint(0, 11, (2, 5))
    tlen = torch.tensor([5, 3])
    total = sum(p.numel() for p in pruner.params.values())
    for step in range(1, 4):
        with pruner.masked_forward():
            model(feats, flen, tgt, tlen).loss.backward()
        pruner.before_optimizer_step(step)
        opt.step()
        opt.zero_grad()
        pruner.after_optimizer_step(step)
        pruner.update_mask(step)
        level = 0.5 if step < 2 else 0.7
        assert total - pruner.masks().kept() == pruned_count(level, total)
        for n, p in pruner.params.items():
            assert not bool(p.detach()[~pruner.masks()[n]].any())


# ---------------------------------------------------------------- N:M levels, starting masks


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({}, "0.2,0.5,0.7"),  # the default staircase
        ({"levels": (0.5, 0.7), "target_sparsity": 0.7}, "0.5,0.7"),
        ({"levels": (0.2, 0.5), "target_sparsity": 0.5}, "0.2,0.5"),  # ends right, starts below
        ({"levels": (0.2, 0.5), "target_sparsity": 0.5, "schedule": "cubic"}, "0.2,0.5"),
        ({"levels": (0.7,), "target_sparsity": 0.7, "schedule": "oneshot"}, "target_sparsity 0.7"),
    ],
)
def test_nm_granularity_refuses_levels_it_cannot_reach(kwargs: dict, bad: str) -> None:
    # 2:4 keeps exactly 2 of every 4 weights: any other level failed at its sparsity step, mid-run.
    cfg = PruningConfig(method="imp", granularity=Granularity("nm", n=2, m=4), **kwargs)
    with pytest.raises(UserError, match=r"2:4 prunes exactly 0\.5") as e:
        cfg.validate()
    assert bad in str(e.value)
    assert "--levels 0.5" in str(e.value) and "--schedule oneshot" in str(e.value)


def test_nm_granularity_accepts_its_own_sparsity() -> None:
    nm = Granularity("nm", n=2, m=4)
    PruningConfig(method="imp", granularity=nm, levels=(0.5,), target_sparsity=0.5).validate()
    PruningConfig(method="imp", granularity=nm, levels=(0.5,), target_sparsity=0.5, schedule="cubic").validate()
    # oneshot reads only the target (the CLI fills levels below it, unused)
    PruningConfig(method="imp", granularity=nm, levels=(0.2, 0.5), target_sparsity=0.5, schedule="oneshot").validate()
    PruningConfig(method="imp", granularity=Granularity("nm", n=1, m=4), levels=(0.75,), target_sparsity=0.75).validate()


def _half_mask(model: nn.Module) -> MaskSet:
    """Every second weight of each in-scope tensor kept: sparsity 0.5, per tensor too."""
    return MaskSet({n: (torch.arange(p.numel()) % 2 == 0).reshape(p.shape)
                    for n, p in model.named_parameters() if p.dim() == 2})


@pytest.mark.parametrize("method", ["imp", "lth", "lap"])
@pytest.mark.parametrize("ranking", ["global", "per_tensor"])
def test_check_initial_sparsity_refuses_masks_sparser_than_the_first_level(method: str, ranking: str) -> None:
    from sparse_rnnt.pruning.methods import check_initial_sparsity

    model = tiny_model()
    masks = _half_mask(model)
    cfg = PruningConfig(method=method, ranking=ranking, levels=(0.2, 0.5, 0.7), interval=3, scope=WHOLE)
    with pytest.raises(UserError, match=r"the init masks are at sparsity 0\.500.*above the first level 0\.2: "
                                        r"pass --levels starting at 0\.5 or above"):
        check_initial_sparsity(cfg, masks)
    # Without the check the run got this far and failed at step 0, after the data work.
    pruner = Pruner(cfg, model)
    with pytest.raises(UserError, match="must be kept but only"):
        pruner.prepare(initial_masks=masks)
    # Levels from the masks' sparsity on are fine, and so is a level 0 start (no event at step 0).
    ok = PruningConfig(method=method, ranking=ranking, levels=(0.5, 0.7), target_sparsity=0.7, interval=3,
                       scope=WHOLE)
    check_initial_sparsity(ok, masks)
    Pruner(ok, tiny_model()).prepare(initial_masks=masks)
    check_initial_sparsity(PruningConfig(method=method, levels=(0.0, 0.7), interval=3, scope=WHOLE), masks)


def test_check_initial_sparsity_leaves_soft_and_per_language_methods_alone() -> None:
    from sparse_rnnt.pruning.methods import check_initial_sparsity

    masks = _half_mask(tiny_model())
    # adaptive re-ranks over every weight, dynamic pathways inside its zones: both can densify
    check_initial_sparsity(PruningConfig(method="adaptive", interval=3, adapt_every=1, scope=WHOLE), masks)
    check_initial_sparsity(PruningConfig(method="dynamic-pathways", interval=3, adapt_every=1, scope=WHOLE),
                           LanguageMasks({"en": masks}))


@pytest.mark.parametrize("method", ["imp", "dynamic-pathways"])
def test_init_masks_after_prepare_equals_prepare_with_initial_masks(method: str) -> None:
    # prepare() runs the step-0 sparsity step on all-ones masks; init_masks then used to keep the
    # given masks below the level and the weights that step had zeroed (59 kept weights at 0).
    langs = LANGS if method == "dynamic-pathways" else None
    cfg = PruningConfig(method=method, levels=(0.5, 0.7), target_sparsity=0.7, interval=10, adapt_every=2, scope=WHOLE)
    g = torch.Generator().manual_seed(7)
    models = [tiny_model(5), tiny_model(5)]
    one, two = (Pruner(cfg, m, languages=langs) for m in models)
    given_set = MaskSet({n: torch.rand(p.shape, generator=g) < 0.6 for n, p in one.params.items()})
    given = LanguageMasks({lg: given_set.clone() for lg in LANGS}) if langs else given_set
    one.prepare(initial_masks=given)
    two.prepare()
    two.init_masks(given)
    for lg in langs or [None]:
        assert all(torch.equal(one.masks(lg)[n], two.masks(lg)[n]) for n in given_set.names)
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True))
    assert one.history == two.history and one.level == two.level == 0.5
    x, y = batch(1)
    with two.masked_forward(langs[0] if langs else None):
        ((models[1](x) - y) ** 2).mean().backward()
    two.before_optimizer_step(1, langs[0] if langs else None)
    two.after_optimizer_step(1)
    assert not two.update_mask(1, langs[0] if langs else None)
    if method == "dynamic-pathways":
        two.update_mask(2, langs[0])  # a re-rank: masks have moved on, so new starting masks are refused
        with pytest.raises(UserError, match="call it right after prepare"):
            two.init_masks(given)
