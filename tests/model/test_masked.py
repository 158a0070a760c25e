"""MaskedLinear and the reversible layer swap: the fused kernel reaches every linear layer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_rnnt.kernels.masked_linear import pack_rows
from sparse_rnnt.model import build_model, model_config
from sparse_rnnt.model.masked import MaskedLinear, swap_linears
from sparse_rnnt.pruning.masks import MaskSet
from tests.model.test_rnnt import _inputs


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = model_config("tiny", transformer_num_layers=1, time_reduction_input_dim=12, transformer_ffn_dim=96,
                       encoding_dim=40, symbol_embedding_dim=24, ctc_weight=0.3)
    return build_model(cfg, 12, verbose=False)


def test_masked_linear_matches_dense_with_zeroed_weights():
    torch.manual_seed(0)
    lin = nn.Linear(13, 7)
    mask = torch.rand(7, 13) < 0.4
    layer = MaskedLinear.wrap(lin)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    x = torch.randn(3, 5, 13)
    assert torch.equal(layer(x), lin(x))  # no mask: an ordinary linear layer
    for hard in (False, True):
        layer.set_mask(pack_rows(mask), hard=hard)
        lin.weight.grad = None
        y = layer(x)
        ref = F.linear(x, lin.weight.detach() * mask, lin.bias.detach())
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        y.backward(g)
        dw = g.reshape(-1, 7).T @ x.reshape(-1, 13)
        torch.testing.assert_close(lin.weight.grad, dw * mask if hard else dw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flag", [False, True])
def test_float32_masked_layers_follow_torchs_tf32_flag(flag, monkeypatch):
    # The masked kernels use TF32 exactly when torch's flag gives it to the dense cuBLAS layers.
    from sparse_rnnt.kernels import masked_linear as ops

    seen = []
    real = ops.masked_linear

    def spy(*args, **kw):
        seen.append(kw.get("allow_tf32"))
        return real(*args, **kw)

    monkeypatch.setattr(ops, "masked_linear", spy)
    before = torch.backends.cuda.matmul.allow_tf32  # a property of torch's, not monkeypatch-able
    torch.backends.cuda.matmul.allow_tf32 = flag
    try:
        layer = MaskedLinear.wrap(nn.Linear(6, 4))
        layer.set_mask(pack_rows(torch.rand(4, 6) < 0.5))
        layer(torch.randn(2, 6))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert seen == [flag]


def _scope(model: nn.Module) -> dict[str, nn.Parameter]:
    from sparse_rnnt.pruning.scope import ScopeConfig, select_parameters

    return select_parameters(model, ScopeConfig())


def test_swap_is_reversible_and_keeps_names_and_parameters():
    model = tiny_model(0)
    before = dict(model.named_parameters())
    names = list(_scope(model))
    swap = swap_linears(model, names)
    assert swap.layers and set(swap.layers) <= set(names)
    after = dict(model.named_parameters())
    assert list(after) == list(before) and all(after[n] is before[n] for n in before)
    assert all(isinstance(model.get_submodule(n.rsplit(".", 1)[0]), MaskedLinear) for n in swap.layers)
    swap.restore()
    assert not any(isinstance(m, MaskedLinear) for m in model.modules())
    assert all(dict(model.named_parameters())[n] is p for n, p in before.items())


def test_swapped_emformer_forward_equals_substituted_weights():
    # Every in-scope weight of the Emformer RNN-T lives in an nn.Linear whose forward is called
    # as a module: masking through the swap gives the model with theta * m substituted.
    torch.manual_seed(1)
    model = tiny_model(1)
    model.eval()
    params = _scope(model)
    masks = MaskSet({n: torch.rand(p.shape) < 0.5 for n, p in params.items()})
    x, lengths, targets, tlen = _inputs(frames=(44, 30, 20))
    with masks.substituted(params):
        ref = model(x, lengths, targets, tlen).loss.detach()
    swap = swap_linears(model, list(params))
    assert set(swap.layers) == set(params), set(params) - set(swap.layers)
    for name, layer in swap.layers.items():
        layer.set_mask(pack_rows(masks[name]))
    out = model(x, lengths, targets, tlen).loss.detach()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    swap.clear_masks()
    dense = model(x, lengths, targets, tlen).loss.detach()
    assert not torch.allclose(dense, ref)  # the masks matter
    swap.restore()


@pytest.mark.parametrize("hard", [False, True])
def test_autocast_paths_give_the_same_values_and_gradients(hard):
    # CPU bf16 autocast, the counterpart of CUDA training's. "cast" zeroes the dropped weights in
    # the bf16 copy of W and runs F.linear on it: with the triton kernel or the torch reference
    # the copy is the same bits, so everything after it is too. "fused" copies W and runs the
    # fused kernel: equal to float rounding, within twice PyTorch's own bf16 error.
    from tests.kernels.tolerance import assert_close_to

    torch.manual_seed(0)
    lin = nn.Linear(45, 29)
    keep = torch.rand(29, 45) < 0.4
    x = torch.randn(3, 7, 45)
    g = torch.randn(3, 7, 29)
    got = {}
    for backend, path in (("torch", "cast"), ("triton", "cast"), ("triton", "fused")):
        layer = MaskedLinear.wrap(lin, backend, path)
        layer.set_mask(pack_rows(keep), hard=hard)
        lin.weight.grad = lin.bias.grad = None
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xx)
        assert y.dtype == torch.bfloat16
        y.float().backward(g)
        # Every result is a bf16 value (gradients are cast back up): compared in bf16, whose
        # rounding the tolerance allows (the interpreter truncates the fused kernels' stores).
        got[backend, path] = (y.detach(), xx.grad.bfloat16(), lin.weight.grad.bfloat16(), lin.bias.grad.clone())
    for a, b in zip(got["torch", "cast"], got["triton", "cast"], strict=True):
        assert torch.equal(a, b)
    # float64 values of the bf16 math: y = x W_mᵀ + b, dX = dY W_m, dW = dYᵀX (⊙ M when hard)
    xb, wm = x.bfloat16().double(), (lin.weight.detach() * keep).bfloat16().double()
    gb = g.bfloat16().double()
    dw = gb.reshape(-1, 29).T @ xb.reshape(-1, 45)
    refs = (xb @ wm.T + lin.bias.detach().bfloat16().double(), gb @ wm, dw * keep if hard else dw)
    # PyTorch's own bf16 error, computed apart from MaskedLinear
    x16, w16, g16 = x.bfloat16(), (lin.weight.detach() * keep).bfloat16(), g.bfloat16()
    dw16 = g16.reshape(-1, 29).T @ x16.reshape(-1, 45)
    torch_outs = (F.linear(x16, w16, lin.bias.detach().bfloat16()), g16 @ w16, dw16 * keep if hard else dw16)
    for path in ("cast", "fused"):
        for name, i in (("y", 0), ("dx", 1), ("dW", 2)):
            assert_close_to(got["triton", path][i], refs[i], torch_outs[i], f"{path} {name}")
        assert torch.equal(got["triton", path][3], got["torch", "cast"][3])
    # the hard gradient's zeros are exact
    assert (got["triton", "cast"][2][~keep] == 0).all() == hard


def test_autocast_path_is_validated():
    with pytest.raises(ValueError, match="autocast_path"):
        MaskedLinear.wrap(nn.Linear(3, 2), "triton", "materialize")
    with pytest.raises(ValueError, match="autocast_path"):
        swap_linears(tiny_model(0), [], autocast_path="")


def test_autocast_copy_is_made_once_per_weight_version(monkeypatch):
    # Like autocast's own copy of a weight: one cast per forward for a layer called at every step
    # of a recurrence, its gradients summed in the bf16 copy. So three calls give exactly what a
    # dense layer holding W ⊙ M gives under autocast, outputs and gradients bit for bit.
    from sparse_rnnt.kernels.masked_linear import cast as cast_mod

    launches = []
    real = cast_mod._launch_masked_cast
    monkeypatch.setattr(cast_mod, "_launch_masked_cast", lambda *a, **k: launches.append(a[3]) or real(*a, **k))
    torch.manual_seed(0)
    lin = nn.Linear(45, 29)
    keep = torch.rand(29, 45) < 0.4
    ref = nn.Linear(45, 29)
    with torch.no_grad():
        ref.weight.copy_(lin.weight * keep)
        ref.bias.copy_(lin.bias)
    layer = MaskedLinear.wrap(lin, "triton", "cast")
    layer.set_mask(pack_rows(keep))
    xs = torch.randn(3, 7, 45)
    g = torch.randn(7, 29)

    def run(module: nn.Module) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = sum(module(x) for x in xs)
        y.float().backward(g)
        return y.detach()

    y, y_ref = run(layer), run(ref)
    assert launches == [torch.bfloat16]  # one forward cast; soft gradients are cast back by torch
    assert torch.equal(y, y_ref) and torch.equal(lin.weight.grad, ref.weight.grad)
    first = lin.weight.grad.clone()
    # Unchanged weight: the copy is reused, and back-propagated through a second time.
    assert torch.equal(run(layer), y) and launches == [torch.bfloat16]
    assert torch.equal(lin.weight.grad, 2 * first)
    # An optimizer-style in-place update, a new mask, a no-grad forward: each makes a new copy.
    with torch.no_grad():
        lin.weight.add_(0.25)
        ref.weight.add_(0.25 * keep)
    assert torch.equal(run(layer), run(ref)) and len(launches) == 2
    layer.set_mask(pack_rows(keep))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(xs[0])
    assert len(launches) == 3
    run(layer)
    assert len(launches) == 4
    # A mask rewritten in place (as rerank_masks_into and RerankPlan write theirs) makes a new copy
    # too: the output is W ⊙ M_new, not the cached W ⊙ M_old.
    packed = pack_rows(keep)
    layer.set_mask(packed)
    run(layer)
    assert len(launches) == 5
    packed.copy_(pack_rows(~keep))
    with torch.no_grad():
        ref.weight.copy_(lin.weight * ~keep)
    assert torch.equal(run(layer), run(ref)) and len(launches) == 6
