"""MaskedLinear and the reversible layer swap: the fused kernel reaches every linear layer."""

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
