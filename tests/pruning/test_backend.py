"""Backend triton (fused masked linear + radix-select re-rank, Triton interpreter on CPU) drives
every method to the same masks as backend torch, with outputs and weights equal to float rounding."""

import copy

import pytest
import torch

from sparse_rnnt.errors import UserError
from sparse_rnnt.model.masked import MaskedLinear
from sparse_rnnt.pruning.masks import LanguageMasks, MaskSet
from sparse_rnnt.pruning.methods import Pruner, PruningConfig, resolve_backend
from tests.model.test_masked import tiny_model
from tests.model.test_rnnt import _inputs

LANGS = ["en", "fr"]
STEPS = 5


def _batch(step: int):
    return _inputs(seed=step, frames=(40, 28, 20))


def _run(method: str, backend: str, aggregation: str = "alternate", algorithm: str = "atomic",
         autocast_path: str | None = None, steps: int = STEPS):
    """``autocast_path``: run the forward under CPU bf16 autocast with that path (None: fp32).
    ``steps``: training steps (the level event is at step 3, adaptive re-ranks at every step)."""
    model = tiny_model(3)
    cfg = PruningConfig(method=method, backend=backend, levels=(0.3, 0.6), target_sparsity=0.6, interval=3,
                        adapt_every=1, aggregation=aggregation, rerank_algorithm=algorithm,
                        autocast_path=autocast_path or "cast")
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_path is not None)
    multi = method in ("dynamic-pathways", "pathways")
    pruner = Pruner(cfg, model, languages=LANGS if multi else None)
    assert pruner.backend == backend
    initial = None
    if method == "pathways":
        g = torch.Generator().manual_seed(5)
        initial = LanguageMasks({lang: MaskSet({n: torch.rand(p.shape, generator=g) < 0.5
                                                for n, p in pruner.params.items()}) for lang in LANGS})
    pruner.prepare(initial_masks=initial)
    # SGD: Adam would turn float noise in exactly-zero gradients (e.g. the attention key bias,
    # which softmax ignores) into full-size steps of either sign.
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses, masks = [], []
    model.train()
    torch.manual_seed(0)  # dropout draws: the same in both runs
    for step in range(1, steps + 1):
        opt.zero_grad()
        if aggregation == "sum":
            for i, lang in enumerate(LANGS):
                with pruner.masked_forward(lang):
                    loss = model(*_batch(10 * step + i)).loss
                    loss.backward()
                pruner.accumulate_grads(lang)
            lang = None
        else:
            lang = LANGS[step % 2] if multi else None
            with pruner.masked_forward(lang):
                with amp:
                    loss = model(*_batch(step)).loss
                loss.backward()
        losses.append(float(loss.detach()))
        pruner.before_optimizer_step(step, lang)
        opt.step()
        pruner.after_optimizer_step(step)
        pruner.update_mask(step, lang)
        snap = pruner.language_masks() if multi else pruner.masks()
        masks.append(snap.clone())
    assert (backend == "triton") == any(isinstance(m, MaskedLinear) for m in model.modules()) or method in ("imp",)
    pruner.close()
    assert not any(isinstance(m, MaskedLinear) for m in model.modules())
    return model, losses, masks


def _equal(a, b) -> bool:
    if isinstance(a, LanguageMasks):
        return all(a[lang].equal(b[lang]) for lang in a.languages)
    return a.equal(b)


@pytest.mark.parametrize("method,aggregation", [
    # 29 s in the interpreter; dynamic-pathways re-ranks with the same adaptive pruner, per
    # language, and test_one_mask_methods_zero_weights_inside_the_rerank_kernels[adaptive] runs
    # adaptive's single mask through the kernels.
    pytest.param("adaptive", "alternate", marks=pytest.mark.slow),
    ("dynamic-pathways", "alternate"),
    # 23 s in the interpreter; dynamic-pathways alternates pathway masks too.
    pytest.param("pathways", "alternate", marks=pytest.mark.slow),
    ("pathways", "sum"), ("imp", "alternate"),
])
def test_triton_backend_matches_torch(method, aggregation):
    # pathways "sum" runs two forwards per step and has no schedule (fixed masks): 3 steps
    steps = 3 if aggregation == "sum" else STEPS
    ref_model, ref_losses, ref_masks = _run(method, "torch", aggregation, steps=steps)
    model, losses, masks = _run(method, "triton", aggregation, steps=steps)
    for step, (a, b) in enumerate(zip(ref_masks, masks, strict=True), 1):
        assert _equal(a, b), f"masks differ after step {step}"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("algorithm", ["radix", "window"])
def test_rerank_algorithm_reaches_the_kernels(algorithm, monkeypatch):
    # Every re-rank of the run goes through the chosen algorithm, and the masks are the torch ones.
    from sparse_rnnt.kernels import rerank

    seen = []
    real = rerank.rerank_masks

    def spy(*args, **kw):
        seen.append(kw.get("algorithm"))
        return real(*args, **kw)

    monkeypatch.setattr(rerank, "rerank_masks", spy)
    # two steps: two adaptive re-ranks, each through the algorithm (the plumbing; the algorithms'
    # results have their own tests in tests/kernels/test_rerank.py)
    _, _, ref_masks = _run("adaptive", "torch", steps=2)
    _, _, masks = _run("adaptive", "triton", algorithm=algorithm, steps=2)
    assert seen and set(seen) == {algorithm}
    for step, (a, b) in enumerate(zip(ref_masks, masks, strict=True), 1):
        assert _equal(a, b), f"masks differ after step {step}"
    with pytest.raises(UserError, match=r"pruning\.rerank_algorithm"):
        PruningConfig(method="adaptive", rerank_algorithm="bucket").validate()


@pytest.mark.parametrize("method", ["adaptive", "imp"])
def test_one_mask_methods_zero_weights_inside_the_rerank_kernels(method, monkeypatch):
    # One mask, no LTH rewind: the pruned weights are zeroed by the re-rank launches themselves
    # (apply=True), not by a separate torch pass; the run still matches the torch backend.
    from sparse_rnnt.kernels import rerank

    applied = []
    real = rerank.rerank_masks

    def spy(*args, **kw):
        applied.append(kw.get("apply", False))
        return real(*args, **kw)

    def no_torch_zeroing(self, params):
        raise AssertionError("separate zeroing pass")

    monkeypatch.setattr(rerank, "rerank_masks", spy)
    # three steps: up to the step-3 level event (and adaptive's re-rank at every step)
    ref_model, _, ref_masks = _run(method, "torch", steps=3)
    if method == "adaptive":  # (IMP also re-zeroes after every optimizer step, by design)
        monkeypatch.setattr(MaskSet, "apply_", no_torch_zeroing)
    model, _, masks = _run(method, "triton", steps=3)
    assert any(applied)  # some re-rank zeroed the weights itself
    for a, b in zip(ref_masks, masks, strict=True):
        assert _equal(a, b)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-3, atol=1e-5, msg=n)


def _masked_loss(backend: str, path: str, keep: float | None) -> float:
    """Loss of one forward of ``tiny_model(3)`` under CPU bf16 autocast through the pruner's
    masked forward, from random starting masks keeping ``keep`` of the weights (None: dense)."""
    model = tiny_model(3)
    pruner = Pruner(PruningConfig(method="adaptive", backend=backend, autocast_path=path), model)
    g = torch.Generator().manual_seed(7)
    masks = None if keep is None else MaskSet({n: torch.rand(p.shape, generator=g) < keep
                                               for n, p in pruner.params.items()})
    pruner.prepare(initial_masks=masks)
    with torch.no_grad():  # soft pruning's state: pruned weights are not zero, the forward masks them
        for p in pruner.params.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    with torch.no_grad(), pruner.masked_forward(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = float(model(*_batch(1)).loss)
    pruner.close()
    return loss


def test_autocast_paths_give_the_torch_backends_masked_forward():
    # "cast" casts theta * m to bf16 exactly as the torch backend's substituted parameter is cast
    # by autocast, so the loss is the same bits; "fused" agrees to bf16 rounding. Dense differs.
    ref = _masked_loss("torch", "cast", 0.5)
    assert _masked_loss("triton", "cast", 0.5) == ref
    assert abs(_masked_loss("triton", "fused", 0.5) - ref) <= 1e-3 * abs(ref)
    assert abs(_masked_loss("torch", "cast", None) - ref) > 1e-2 * abs(ref)


# "fused" (not the autocast default) takes 23 s in the interpreter: make test-slow runs it.
@pytest.mark.parametrize("path", ["cast", pytest.param("fused", marks=pytest.mark.slow)])
def test_autocast_paths_train_like_the_torch_backend(path):
    # A pruning run under bf16 autocast. "cast" copies W ⊙ M to bf16 once per forward, as
    # autocast copies the torch backend's substituted parameter, and gradients meet in the copy
    # the same way (the predictor LSTM calls its layer at every step): the same losses and masks,
    # bit for bit. "fused" computes in its own kernels: it agrees to bf16 rounding, so a few
    # weights near the threshold flip (measured: at most 142 of 27,360; fp32 against bf16
    # training of the torch backend flips 186) and the losses drift by up to 4% (fp32 against
    # bf16: 1.5%).
    _, ref_losses, ref_masks = _run("adaptive", "torch", autocast_path="cast")
    _, losses, masks = _run("adaptive", "triton", autocast_path=path)
    if path == "cast":
        assert losses == ref_losses
        for step, (a, b) in enumerate(zip(ref_masks, masks, strict=True), 1):
            assert _equal(a, b), f"masks differ after step {step}"
    flips = [a.flips(b) / a.numel() for a, b in zip(ref_masks, masks, strict=True)]
    assert max(flips) < 0.01, flips
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0.06, atol=0)
    with pytest.raises(UserError, match=r"pruning\.autocast_path"):
        PruningConfig(method="adaptive", autocast_path="bf16").validate()


def test_autocast_path_reaches_the_swapped_layers():
    for path in ("cast", "fused"):
        cfg = PruningConfig(method="adaptive", backend="triton", autocast_path=path)
        model = tiny_model(0)
        pruner = Pruner(cfg, model)
        layers = [m for m in model.modules() if isinstance(m, MaskedLinear)]
        assert layers and {m.autocast_path for m in layers} == {path}
        pruner.close()


def test_backend_resolution_and_errors(monkeypatch):
    params = dict(tiny_model(0).named_parameters())
    assert resolve_backend("auto", params) == "torch"  # CPU model
    assert resolve_backend("torch", params) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="CUDA"):
        resolve_backend("triton", params)
    with pytest.raises(UserError, match=r"pruning\.backend"):
        PruningConfig(method="imp", backend="cuda").validate()


def test_close_restores_an_identical_model():
    model = tiny_model(4)
    before = copy.deepcopy(model.state_dict())
    pruner = Pruner(PruningConfig(method="adaptive", backend="triton"), model)
    assert any(isinstance(m, MaskedLinear) for m in model.modules())
    pruner.close()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
