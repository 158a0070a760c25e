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


def _run(method: str, backend: str, aggregation: str = "alternate", algorithm: str = "atomic"):
    model = tiny_model(3)
    cfg = PruningConfig(method=method, backend=backend, levels=(0.3, 0.6), target_sparsity=0.6, interval=3,
                        adapt_every=1, aggregation=aggregation, rerank_algorithm=algorithm)
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
    for step in range(1, STEPS + 1):
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
    ("adaptive", "alternate"), ("dynamic-pathways", "alternate"), ("pathways", "alternate"),
    ("pathways", "sum"), ("imp", "alternate"),
])
def test_triton_backend_matches_torch(method, aggregation):
    ref_model, ref_losses, ref_masks = _run(method, "torch", aggregation)
    model, losses, masks = _run(method, "triton", aggregation)
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
    _, _, ref_masks = _run("adaptive", "torch")
    _, _, masks = _run("adaptive", "triton", algorithm=algorithm)
    assert seen and set(seen) == {algorithm}
    for step, (a, b) in enumerate(zip(ref_masks, masks, strict=True), 1):
        assert _equal(a, b), f"masks differ after step {step}"
    with pytest.raises(UserError, match=r"pruning\.rerank_algorithm"):
        PruningConfig(method="adaptive", rerank_algorithm="bucket").validate()


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
