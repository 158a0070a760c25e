"""The masked cast kernel ``(W ⊙ M).to(dtype)`` against its reference and hand-built values.

A cast rounds each value on its own (round to nearest even, in both torch and Triton), so the
kernel must match the reference bit for bit, not to a tolerance.
"""

import pytest
import torch

from sparse_rnnt.kernels.masked_linear import cast as cast_mod
from sparse_rnnt.kernels.masked_linear import fused, masked_cast, masked_cast_ref, pack_rows

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def _weights(n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Values with more mantissa than the narrow types hold, so the cast really rounds.
    w = (torch.randn(n, k, generator=g, dtype=torch.float64) * 3).to(dtype)
    keep = torch.rand(n, k, generator=g) < 0.3
    return w, keep


@pytest.mark.parametrize("src", FLOATS)
@pytest.mark.parametrize("dst", FLOATS)
@pytest.mark.parametrize("k", [53, 64, 300])  # 64: bits read as int32 words; 300: 3 column tiles
def test_kernel_fills_a_poisoned_output_with_the_reference_bits(src, dst, k):
    n = 70  # 3 row tiles, the last partial
    w, keep = _weights(n, k, src, seed=k)
    want = (w.double() * keep).to(dst)
    for bits, given in ((False, keep), (True, pack_rows(keep))):
        m, mode = fused._kernel_mask(given[None], k, bits)
        assert mode == (0 if not bits else 2 if k % 32 == 0 else 1)
        out = torch.full((n, k), float("nan"), dtype=dst)
        got = cast_mod._launch_masked_cast(w, m, mode, dst, out=out)
        assert got is out
        assert torch.equal(got, want), f"bits={bits}"
        assert torch.equal(masked_cast_ref(w, given, dst), want)


def test_hand_computed_values():
    w = torch.tensor([[1.0, -2.0, 1.0 + 2**-9, 3.0], [0.5, 7.0, -1.0 - 2**-8 - 2**-10, 9.0]])
    keep = torch.tensor([[True, False, True, True], [False, True, True, False]])
    got = masked_cast(w, pack_rows(keep), torch.bfloat16)
    # bf16 keeps 8 significant bits: 1 + 2^-9 rounds to 1 (tie to even), -1 - 2^-8 - 2^-10 to -1 - 2^-7.
    want = torch.tensor([[1.0, 0.0, 1.0, 3.0], [0.0, 7.0, -1.0 - 2**-7, 0.0]], dtype=torch.bfloat16)
    assert torch.equal(got, want)


def test_strided_source_and_empty_shapes():
    w, keep = _weights(40, 90, torch.float32, seed=3)
    wt = w.t().contiguous().t()  # same values, column-major strides
    assert not wt.is_contiguous()
    assert torch.equal(masked_cast(wt, keep, torch.bfloat16), (w * keep).to(torch.bfloat16))
    empty = masked_cast(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool), torch.bfloat16)
    assert empty.shape == (0, 5) and empty.dtype == torch.bfloat16


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("fmt", ["bytes", "bits"])
@pytest.mark.parametrize("dst", [torch.bfloat16, torch.float16])
def test_gradients_are_straight_through_or_masked(hard, fmt, dst):
    n, k = 37, 96
    w, keep = _weights(n, k, torch.float32, seed=11)
    mask = keep if fmt == "bytes" else pack_rows(keep)
    g = torch.randn(n, k, generator=torch.Generator().manual_seed(12)).to(dst)
    grads = []
    for backend in ("triton", "torch"):
        wl = w.clone().requires_grad_(True)
        out = masked_cast(wl, mask, dst, hard=hard, backend=backend)
        assert out.dtype == dst and torch.equal(out.detach(), (w * keep).to(dst))
        out.backward(g)
        grads.append(wl.grad)
    want = g.float() * keep if hard else g.float()
    assert torch.equal(grads[0], want) and torch.equal(grads[1], want)


def test_invalid_inputs_raise_value_errors():
    w = torch.randn(4, 9)
    with pytest.raises(ValueError, match="weight must be"):
        masked_cast(w[0], torch.ones(9, dtype=torch.bool), torch.bfloat16)
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        masked_cast(w, torch.ones(4, 9, dtype=torch.bool), torch.float64)
    with pytest.raises(ValueError, match="mask must have shape"):
        masked_cast(w, torch.ones(4, 8, dtype=torch.bool), torch.bfloat16)
    with pytest.raises(ValueError, match="backend"):
        masked_cast(w, torch.ones(4, 9, dtype=torch.bool), torch.bfloat16, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["bytes", "bits"])
@pytest.mark.parametrize("hard", [False, True])
def test_cuda_large_masked_cast(fmt, hard):
    # GPU counterpart of the CPU tests above, at a layer's size.
    n, k = 3072, 768 + 5
    w, keep = _weights(n, k, torch.float32, seed=21)
    w, keep = w.cuda().requires_grad_(True), keep.cuda()
    mask = keep if fmt == "bytes" else pack_rows(keep)
    out = masked_cast(w, mask, torch.bfloat16, hard=hard)
    assert torch.equal(out, (w.detach() * keep).to(torch.bfloat16))
    g = torch.randn(n, k, device="cuda").to(torch.bfloat16)
    out.backward(g)
    assert torch.equal(w.grad, g.float() * keep if hard else g.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hard", [False, True])
def test_cuda_masked_layer_autocast_paths(hard):
    # GPU counterpart of tests/model/test_masked.py's autocast test: a masked layer under CUDA bf16
    # autocast, "cast" (bf16 copy of W ⊙ M, then cuBLAS) and "fused" (copy, then the fused
    # kernel), against float64 values of the same bf16 math and PyTorch's own bf16 error.
    from torch import nn

    from sparse_rnnt.model.masked import MaskedLinear
    from tests.kernels.tolerance import assert_close_to

    torch.manual_seed(0)
    n, k, r = 1024, 768 + 3, 2048
    lin = nn.Linear(k, n).cuda()
    keep = torch.rand(n, k, device="cuda") < 0.3
    x = torch.randn(r, k, device="cuda")
    g = torch.randn(r, n, device="cuda")
    x16, w16, g16 = x.bfloat16(), (lin.weight.detach() * keep).bfloat16(), g.bfloat16()
    dw16 = g16.T @ x16
    torch_outs = (torch.nn.functional.linear(x16, w16, lin.bias.detach().bfloat16()), g16 @ w16,
                  dw16 * keep if hard else dw16)
    xd, wd, gd = x16.double(), w16.double(), g16.double()
    refs = (xd @ wd.T + lin.bias.detach().bfloat16().double(), gd @ wd,
            (gd.T @ xd) * keep if hard else gd.T @ xd)
    for path in ("cast", "fused"):
        layer = MaskedLinear.wrap(lin, "triton", path)
        layer.set_mask(pack_rows(keep), hard=hard)
        lin.weight.grad = None
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(xx)
        y.float().backward(g)
        for name, out, ref, tout in zip(("y", "dx", "dW"), (y, xx.grad.bfloat16(), lin.weight.grad.bfloat16()),
                                        refs, torch_outs, strict=True):
            assert_close_to(out, ref, tout, f"{path} {name}")


@pytest.mark.parametrize("fmt", ["bytes", "bits"])
def test_hard_gradient_refuses_a_mask_changed_in_place_after_forward(fmt):
    """The mask is kept on ctx rather than saved (a copy may be back-propagated twice), so its
    version is checked: the hard gradient needs the forward's mask, and a silent gradient through
    the new one would differ from the reference's (which uses the old)."""
    w, keep = _weights(6, 20, torch.float32, seed=5)
    mask = keep.clone() if fmt == "bytes" else pack_rows(keep)
    wl = w.clone().requires_grad_(True)
    out = masked_cast(wl, mask, torch.bfloat16, hard=True)
    mask.bitwise_not_()
    with pytest.raises(RuntimeError, match="modified in place after the forward pass"):
        out.backward(torch.ones_like(out))
    # Soft gradients do not read the mask: allowed, and straight through.
    wl = w.clone().requires_grad_(True)
    out = masked_cast(wl, mask, torch.bfloat16, hard=False)
    mask.bitwise_not_()
    out.backward(torch.ones_like(out))
    assert torch.equal(wl.grad, torch.ones_like(w))
