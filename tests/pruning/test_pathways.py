"""ASR Pathways stage 2 (``method="pathways"``): fixed per-language masks, alternate and sum modes,
checked against hand-built masked forwards and separate backward passes."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from sparse_rnnt.errors import UserError
from sparse_rnnt.pruning.masks import LanguageMasks, MaskSet
from sparse_rnnt.pruning.methods import Pruner, PruningConfig
from sparse_rnnt.pruning.scope import ScopeConfig

WHOLE = ScopeConfig(roots=())  # every weight matrix of the model is in scope
LANGS = ["en", "fr"]


def tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def batch(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(500 + seed)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def random_masks(model: nn.Module, seed: int = 1, keep: float = 0.5) -> LanguageMasks:
    """Independent random pathways per language (they overlap partly, and leave some weights unused)."""
    g = torch.Generator().manual_seed(seed)
    weights = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    return LanguageMasks({
        lang: MaskSet({n: torch.rand(w.shape, generator=g) < keep for n, w in weights.items()})
        for lang in LANGS
    })


def loss_of(model: nn.Module, seed: int) -> Tensor:
    x, y = batch(seed)
    return ((model(x) - y) ** 2).mean()


def make(aggregation: str = "alternate", opt: str = "adam") -> tuple[nn.Sequential, Pruner, LanguageMasks, torch.optim.Optimizer]:
    model = tiny_model()
    cfg = PruningConfig(method="pathways", aggregation=aggregation, scope=WHOLE)
    pruner = Pruner(cfg, model, languages=list(LANGS))
    masks = random_masks(model)
    pruner.prepare()
    pruner.init_masks(masks)
    optimizer: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), lr=0.05) if opt == "adam"
        else torch.optim.SGD(model.parameters(), lr=1.0)
    )
    return model, pruner, masks, optimizer


def weights(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}


def test_init_masks_zeroes_outside_union() -> None:
    model, _, masks, _ = make()
    for n, w in weights(model).items():
        union = masks["en"][n] | masks["fr"][n]
        assert not bool(union.all())  # the test masks do leave unused weights
        assert bool((w[~union] == 0).all())
        assert bool((w[union] != 0).all())  # kept weights untouched (random init is nonzero)


def test_alternate_freezes_weights_outside_language_mask() -> None:
    model, pruner, masks, opt = make("alternate")
    # Several alternating steps so Adam's moments are nonzero everywhere in the union.
    for step, lang in enumerate(["en", "fr", "en", "fr", "fr"], start=1):
        before = weights(model)
        with pruner.masked_forward(lang):
            loss_of(model, step).backward()
        pruner.before_optimizer_step(step, lang)
        grads = {n: p.grad.clone() for n, p in pruner.params.items()}
        for n in grads:
            assert not bool(grads[n][~masks[lang][n]].any())
        opt.step()
        opt.zero_grad()
        pruner.after_optimizer_step(step)
        assert pruner.update_mask(step, lang) is False
        after = weights(model)
        for n in before:
            m = masks[lang][n]
            assert torch.equal(after[n][~m], before[n][~m])  # bit-identical outside m_lang
            # Adam moves every trained weight with a gradient (a weight can get an exact zero
            # gradient when its hidden unit's outgoing weights are all pruned).
            live = m & (grads[n] != 0)
            assert int(live.sum()) > m.sum() // 2
            assert bool((after[n][live] != before[n][live]).all())
    # Masks never changed.
    for lang in LANGS:
        assert pruner.masks(lang).equal(masks[lang])


def test_alternate_without_freezing_adam_would_move_others() -> None:
    """Guard for the test above: plain masked-grad Adam does move weights outside m_z."""
    model, pruner, masks, opt = make("alternate")
    for step, lang in enumerate(["en", "fr"], start=1):
        with pruner.masked_forward(lang):
            loss_of(model, step).backward()
        pruner.before_optimizer_step(step, lang)
        opt.step()
        opt.zero_grad()
        pruner.after_optimizer_step(step)
    before = weights(model)
    with pruner.masked_forward("en"):
        loss_of(model, 3).backward()
    masks["en"].mask_grads_(pruner.params)
    opt.step()  # no snapshot/restore
    after = weights(model)
    only_fr = {n: masks["fr"][n] & ~masks["en"][n] for n in before}
    assert any(bool((after[n][only_fr[n]] != before[n][only_fr[n]]).any()) for n in before)


def test_sum_applies_sum_of_masked_gradients() -> None:
    model, pruner, masks, opt = make("sum", opt="sgd")
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Reference: separate backward passes on a copy, forward with theta ⊙ m_l, grads masked by hand.
    ref = tiny_model()
    ref.load_state_dict(model.state_dict())
    ref_params = dict(ref.named_parameters())
    expected = {n: torch.zeros_like(t) for n, t in theta.items()}
    for i, lang in enumerate(LANGS):
        ref.zero_grad()
        with torch.no_grad():
            for n in masks[lang].names:
                ref_params[n].copy_(theta[n] * masks[lang][n])
        loss_of(ref, i).backward()
        for n, p in ref_params.items():
            g = p.grad.clone()
            if n in masks[lang]:
                g = g * masks[lang][n]
            expected[n] += g
    # Pruner: one batch per language, accumulated into one SGD(lr=1) step.
    for i, lang in enumerate(LANGS):
        with pruner.masked_forward(lang):
            loss_of(model, i).backward()
        pruner.accumulate_grads(lang)
        for p in pruner.params.values():
            assert not bool(p.grad.any())  # zeroed after accumulation
    pruner.before_optimizer_step(1, None)
    opt.step()
    opt.zero_grad()
    pruner.after_optimizer_step(1)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), theta[n] - expected[n], rtol=1e-6, atol=1e-7)
    name = "0.weight"
    union = masks["en"][name] | masks["fr"][name]
    assert bool((model[0].weight.detach()[~union] == 0).all())  # outside the union stays zero


def test_sum_with_adam_keeps_weights_outside_the_union_exactly_zero() -> None:
    # Adam moves every weight with a nonzero moment by about lr per step, whatever its gradient:
    # over several summed steps, the weights no pathway keeps must still be exactly zero, and the
    # kept ones train.
    model, pruner, masks, opt = make("sum", opt="adam")
    start = weights(model)
    for step in range(1, 6):
        for i, lang in enumerate(LANGS):
            with pruner.masked_forward(lang):
                loss_of(model, 10 * step + i).backward()
            pruner.accumulate_grads(lang)
        pruner.before_optimizer_step(step, None)
        opt.step()
        opt.zero_grad()
        pruner.after_optimizer_step(step)
    now = weights(model)
    for n in masks.names:
        union = masks["en"][n] | masks["fr"][n]
        assert bool((now[n][~union] == 0).all()), n
        # (a kept weight whose unit feeds only pruned weights gets no gradient: most, not all)
        assert float((now[n][union] != start[n][union]).float().mean()) > 0.5, n


def test_sum_shared_weight_gets_both_contributions() -> None:
    """Single shared weight, hand-checked: the update is g_en + g_fr there, g_en where only en keeps."""
    model, pruner, masks, opt = make("sum", opt="sgd")
    name = "0.weight"
    shared = masks["en"][name] & masks["fr"][name]
    en_only = masks["en"][name] & ~masks["fr"][name]
    grads: dict[str, Tensor] = {}
    for i, lang in enumerate(LANGS):
        with pruner.masked_forward(lang):
            loss_of(model, i).backward()
        grads[lang] = model[0].weight.grad.clone()
        pruner.accumulate_grads(lang)
    before = model[0].weight.detach().clone()
    pruner.before_optimizer_step(1, None)
    opt.step()
    pruner.after_optimizer_step(1)
    delta = before - model[0].weight.detach()
    torch.testing.assert_close(delta[shared], grads["en"][shared] + grads["fr"][shared])
    torch.testing.assert_close(delta[en_only], grads["en"][en_only])
    assert bool(grads["fr"][en_only].abs().sum() > 0)  # fr's straight-through grad was dropped


def test_forward_uses_language_pathway() -> None:
    model, pruner, masks, _ = make()
    x, _ = batch(7)
    for lang in LANGS:
        w0, b0 = model[0].weight.detach() * masks[lang]["0.weight"], model[0].bias.detach()
        w2, b2 = model[2].weight.detach() * masks[lang]["2.weight"], model[2].bias.detach()
        manual = torch.tanh(x @ w0.T + b0) @ w2.T + b2
        with pruner.masked_forward(lang):
            out = model(x)
        torch.testing.assert_close(out, manual, rtol=0, atol=1e-6)
    # A weight kept by fr but not by en is nonzero in theta yet absent from en's forward.
    fr_only = masks["fr"]["0.weight"] & ~masks["en"]["0.weight"]
    assert bool((model[0].weight.detach()[fr_only] != 0).all())
    with pruner.masked_forward("en"):
        assert bool((model[0].weight.detach()[fr_only] == 0).all())
    assert bool((model[0].weight.detach()[fr_only] != 0).all())  # restored on exit


def test_state_round_trip() -> None:
    _, pruner, masks, _ = make("sum")
    state = pruner.state_dict()
    assert state["meta"]["method"] == "pathways"
    model2 = tiny_model(seed=3)
    other = Pruner(PruningConfig(method="pathways", aggregation="sum", scope=WHOLE), model2, list(LANGS))
    with pytest.raises(UserError, match="init_masks"):
        other.masked_forward("en").__enter__()
    other.load_state_dict(state)
    for lang in LANGS:
        assert other.masks(lang).equal(masks[lang])
    # Usable right away after loading (no init_masks needed).
    with other.masked_forward("en"):
        loss_of(model2, 0).backward()
    other.accumulate_grads("en")
    other.before_optimizer_step(1, None)
    for n, p in other.params.items():
        assert not bool(p.grad[~masks["en"][n]].any())


def test_errors() -> None:
    with pytest.raises(UserError, match="aggregation"):
        PruningConfig(method="pathways", aggregation="mean").validate()
    with pytest.raises(UserError, match="languages"):
        Pruner(PruningConfig(method="pathways", scope=WHOLE), tiny_model())
    model = tiny_model()
    pruner = Pruner(PruningConfig(method="pathways", scope=WHOLE), model, list(LANGS))
    pruner.prepare()
    # prepared but no stage-1 masks yet: every hook refuses
    with pytest.raises(UserError, match="init_masks"):
        pruner.masked_forward("en").__enter__()
    with pytest.raises(UserError, match="init_masks"):
        pruner.before_optimizer_step(1, "en")
    with pytest.raises(UserError, match="init_masks"):
        pruner.state_dict()
    with pytest.raises(UserError, match="LanguageMasks"):
        pruner.init_masks(random_masks(model)["en"])
    with pytest.raises(UserError, match="languages"):
        pruner.init_masks(LanguageMasks({"en": random_masks(model)["en"]}))
    pruner.init_masks(random_masks(model))
    with pytest.raises(ValueError, match="language"):
        pruner.before_optimizer_step(1, "de")
    with pytest.raises(ValueError, match="aggregation"):
        pruner.accumulate_grads("en")  # alternate mode
    _, summing, _, _ = make("sum")
    with pytest.raises(ValueError, match="language=None"):
        summing.before_optimizer_step(1, "en")
    with pytest.raises(RuntimeError, match="accumulate_grads"):
        summing.before_optimizer_step(1, None)
    with pytest.raises(ValueError, match="pathways"):
        Pruner(PruningConfig(method="imp", scope=WHOLE), tiny_model()).accumulate_grads("en")
