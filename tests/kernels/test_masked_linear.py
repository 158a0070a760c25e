"""Fused masked linear kernels against float64 references, on CPU under the Triton interpreter
and (larger shapes) on CUDA.

Tolerances: the kernel's error against a float64 reference may be at most twice PyTorch's own
error in the same dtype, plus one unit in the last place of the largest reference value.
"""

import pytest
import torch

from sparse_rnnt.kernels.masked_linear import (
    fused,
    mask_format,
    masked_linear,
    masked_linear_ref,
    pack_rows,
    pathway_masked_linear,
    pathway_masked_linear_ref,
    unpack_rows,
)
from sparse_rnnt.kernels.masked_linear.fused import _Plan, unmasked_linear
from tests.kernels.tolerance import assert_close_to

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inputs(r, k, n, dtype, device="cpu", seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, k, generator=g).to(device, dtype)
    w = torch.randn(n, k, generator=g).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    dy = torch.randn(r, n, generator=g).to(device, dtype)
    return x, w, b, dy


def _grads(fn, x, w, b, dy):
    """Output and (dx, dW, db) of ``fn(x, w, b)`` for upstream gradient ``dy``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w) + ((b,) if b is not None else ())]
    y = fn(*leaves) if b is not None else fn(*leaves, None)
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype).reshape(y.shape))
    return (y.detach(), *grads)


def _check_against_reference(fn, ref_fn, x, w, b, dy, what):
    """``fn`` (kernel) and ``ref_fn`` (torch in the same dtype) against ``ref_fn`` in float64."""
    got = _grads(fn, x, w, b, dy)
    in_dtype = _grads(ref_fn, x, w, b, dy)
    d = [t.double() if t is not None else None for t in (x, w, b, dy)]
    ref64 = _grads(ref_fn, *d)
    for name, a, t, r in zip(("y", "dx", "dW", "db"), got, in_dtype, ref64, strict=False):
        assert_close_to(a, r, t, f"{what} {name}")


# ----------------------------------------------------------------------------- mask packing


@pytest.mark.parametrize("k", [1, 2, 7, 8, 9, 15, 16, 17, 53])
def test_pack_rows_follows_the_bit_layout(k):
    g = torch.Generator().manual_seed(k)
    mask = torch.rand(5, k, generator=g) < 0.5
    packed = pack_rows(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 7) // 8)
    for n in range(5):
        for j in range((k + 7) // 8 * 8):
            bit = (int(packed[n, j // 8]) >> (j % 8)) & 1
            assert bit == (int(mask[n, j]) if j < k else 0), (n, j)
    assert torch.equal(unpack_rows(packed, k), mask)


def test_pack_rows_agrees_with_flat_pack_bits_when_rows_are_whole_bytes():
    from sparse_rnnt.pruning.masks import pack_bits

    mask = torch.rand(6, 24, generator=torch.Generator().manual_seed(1)) < 0.3
    assert torch.equal(pack_rows(mask).reshape(-1), pack_bits(mask))


def test_mask_format_detection():
    assert mask_format(torch.ones(3, 9, dtype=torch.bool), 9) == "bytes"
    assert mask_format(torch.ones(3, 9, dtype=torch.uint8), 9) == "bytes"
    assert mask_format(torch.ones(3, 2, dtype=torch.uint8), 9) == "bits"
    # K == 1: uint8 [N, 1] is bits; bool means bytes.
    assert mask_format(torch.ones(3, 1, dtype=torch.uint8), 1) == "bits"
    assert mask_format(torch.ones(3, 1, dtype=torch.bool), 1) == "bytes"
    with pytest.raises(ValueError, match="bool or uint8"):
        mask_format(torch.ones(3, 9), 9)
    with pytest.raises(ValueError, match="last dim"):
        mask_format(torch.ones(3, 5, dtype=torch.uint8), 9)


# ----------------------------------------------------------------------------- hand-computed


def _hand_example():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    w = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, -1.0]])
    m = torch.tensor([[True, False, True], [False, True, True]])
    b = torch.tensor([0.5, -1.0])
    return x, w, m, b


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bits", [False, True])
@pytest.mark.parametrize("hard", [False, True])
def test_hand_computed_2x3(backend, bits, hard):
    x, w, m, b = _hand_example()
    mask = pack_rows(m) if bits else m
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    y = masked_linear(x, w, mask, b, hard=hard, backend=backend)
    # W ⊙ M = [[1, 0, 1], [0, 0, -1]]
    assert torch.equal(y.detach(), torch.tensor([[4.5, -4.0], [10.5, -7.0]]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    soft = torch.tensor([[5.0, 7.0, 9.0], [5.0, 7.0, 9.0]])
    assert torch.equal(w.grad, torch.tensor([[5.0, 0.0, 9.0], [0.0, 7.0, 9.0]]) if hard else soft)
    assert torch.equal(b.grad, torch.tensor([2.0, 2.0]))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_hand_computed_pathway(backend):
    x, w, m, _ = _hand_example()
    masks = torch.stack([m, torch.ones_like(m)])  # language 1 keeps every weight
    lang = torch.tensor([1, 0])
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = pathway_masked_linear(x, w, masks, lang, hard=True, backend=backend)
    # row 0 (language 1): [1, 2, 3] W^T = [6, -1]; row 1 (language 0): [4, 5, 6] (W ⊙ M)^T = [10, -6]
    assert torch.equal(y.detach(), torch.tensor([[6.0, -1.0], [10.0, -6.0]]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([[3.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    # Hard: language 1 gives [1, 2, 3] to both rows unmasked; language 0 gives [4, 5, 6] ⊙ M.
    assert torch.equal(w.grad, torch.tensor([[5.0, 2.0, 9.0], [1.0, 7.0, 9.0]]))


# ----------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["bytes", "bits"])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("k", [53, 64])  # 64: bits read as int32 words
def test_masked_linear_matches_reference(dtype, fmt, hard, k):
    r, n = 37, 29
    x, w, b, dy = _inputs(r, k, n, dtype, seed=3)
    m = torch.rand(n, k, generator=torch.Generator().manual_seed(4)) < 0.6
    mask = pack_rows(m) if fmt == "bits" else m
    x3 = x[:36].reshape(3, 12, k)  # leading dims are flattened
    _check_against_reference(
        lambda a, c, d: masked_linear(a, c, mask, d, hard=hard),
        lambda a, c, d: masked_linear_ref(a, c, mask, d, hard=hard),
        x3, w, b, dy[:36], f"{dtype} {fmt} K={k} hard={hard}",
    )


@pytest.mark.parametrize("pathway", [False, True])
@pytest.mark.parametrize("needs", ["none", "no_grad", "x", "weight", "bias"])
def test_forward_without_autograd_only_when_no_gradient_can_be_asked_for(pathway, needs):
    # Without a gradient to ask for, the forward skips the autograd Function; with one, whichever
    # input asks for it gets the hand-computed gradient of the 2x3 example.
    x, w, m, b = _hand_example()
    if needs in ("x", "weight", "bias"):
        {"x": x, "weight": w, "bias": b}[needs].requires_grad_(True)
    else:
        x.requires_grad_(needs == "no_grad")
    with torch.set_grad_enabled(needs != "no_grad"):
        if pathway:
            y = pathway_masked_linear(x, w, torch.stack([m, m]), torch.tensor([1, 0]), b)
        else:
            y = masked_linear(x, w, pack_rows(m), b)
    assert torch.equal(y.detach(), torch.tensor([[4.5, -4.0], [10.5, -7.0]]))
    if needs in ("none", "no_grad"):
        assert y.grad_fn is None and not y.requires_grad
        return
    y.sum().backward()
    want = {"x": torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]),
            "weight": torch.tensor([[5.0, 7.0, 9.0], [5.0, 7.0, 9.0]]), "bias": torch.tensor([2.0, 2.0])}
    assert torch.equal({"x": x, "weight": w, "bias": b}[needs].grad, want[needs])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pathway", [False, True])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("k", [41, 96])
def test_kernels_write_every_output_element(dtype, pathway, hard, k):
    """Each launcher fills a NaN-poisoned output; values match the float64 reference."""
    r, n, nl = 45, 23, 3
    x, w, b, dy = _inputs(r, k, n, dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    masks = torch.rand(nl if pathway else 1, n, k, generator=g) < 0.5
    lang = torch.randint(0, nl, (r,), generator=g) if pathway else None
    plan = _Plan(r, lang, masks.shape[0])
    packed = torch.stack([pack_rows(mm) for mm in masks])
    nan = float("nan")
    for bits, given in ((False, masks), (True, packed)):
        m, mode = fused._kernel_mask(given, k, bits)
        assert mode == (0 if not bits else 2 if k % 32 == 0 else 1)
        y = fused._launch_fwd(x, w, m, mode, b, plan, False, out=torch.full((r, n), nan, dtype=dtype))
        # Both orientations of the forward and dX (the masked W as the right or the left
        # operand) at a second tile shape: on GPUs the autotuner may pick either. 16-wide tiles
        # and launch-order groups of 2 give 2-5 row tiles by 1-3 column tiles in whole and partial
        # groups, so a tile the grouped order skips stays NaN (bit words need 32-wide K tiles).
        y_variants = [
            fused._launch_fwd(x, w, m, mode, b, plan, False, out=torch.full((r, n), nan, dtype=dtype),
                              config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "W_AS_A": w_as_a, "GROUP": 2})
            for w_as_a in (False, True)
        ]
        dx = fused._launch_dx(dy, w, m, mode, plan, False, out=torch.full((r, k), nan, dtype=dtype))
        dx_variants = [
            fused._launch_dx(dy, w, m, mode, plan, False, out=torch.full((r, k), nan, dtype=dtype),
                             config={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "W_AS_A": w_as_a, "GROUP": 2})
            for w_as_a in (False, True)
        ]
        dw = fused._launch_dw(dy, x, m, mode, hard, plan, False, dtype, out=torch.full((n, k), nan, dtype=dtype))
        dw_grouped = fused._launch_dw(dy, x, m, mode, hard, plan, False, dtype,
                                      out=torch.full((n, k), nan, dtype=dtype),
                                      config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP": 1})
        # float64 reference (row by row mask) and the same in the test dtype
        for ref_dtype in (torch.float64, dtype):
            row_mask = masks[lang] if pathway else masks[0].expand(r, n, k)
            xd, wd, dyd = x.to(ref_dtype), w.to(ref_dtype), dy.to(ref_dtype)
            wm = wd * row_mask.to(ref_dtype)  # [R, N, K]
            y_ref = torch.einsum("rk,rnk->rn", xd, wm) + b.to(ref_dtype)
            dx_ref = torch.einsum("rn,rnk->rk", dyd, wm)
            per_row = dyd[:, :, None] * xd[:, None, :]
            dw_ref = (per_row * row_mask.to(ref_dtype)).sum(0) if hard else per_row.sum(0)
            if ref_dtype == torch.float64:
                refs64 = (y_ref, dx_ref, dw_ref)
            else:
                refs_dtype = (y_ref, dx_ref, dw_ref)
        for name, out, r64, rd in zip(("y", "dx", "dW"), (y, dx, dw), refs64, refs_dtype, strict=True):
            assert_close_to(out, r64, rd, f"{name} mode={mode}")
        for w_as_a, out in zip((False, True), y_variants, strict=True):
            assert_close_to(out, refs64[0], refs_dtype[0], f"y W_AS_A={w_as_a} mode={mode}")
        for w_as_a, out in zip((False, True), dx_variants, strict=True):
            assert_close_to(out, refs64[1], refs_dtype[1], f"dx W_AS_A={w_as_a} mode={mode}")
        assert_close_to(dw_grouped, refs64[2], refs_dtype[2], f"dW grouped mode={mode}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("k", [70, 96])
def test_bits_and_bytes_masks_give_identical_results(dtype, hard, k):
    x, w, b, dy = _inputs(33, k, 19, dtype, seed=7)
    m = torch.rand(19, k, generator=torch.Generator().manual_seed(8)) < 0.4
    packed = pack_rows(m)
    # The same bits at an odd address: read byte by byte instead of as int32 words.
    unaligned = torch.zeros(1 + packed.numel(), dtype=torch.uint8)[1:].view(packed.shape)
    unaligned.copy_(packed)
    assert fused._kernel_mask(unaligned[None], k, True)[1] == 1
    a = _grads(lambda p, q, s: masked_linear(p, q, m, s, hard=hard), x, w, b, dy)
    for mask in (packed, unaligned):
        c = _grads(lambda p, q, s, mask=mask: masked_linear(p, q, mask, s, hard=hard), x, w, b, dy)
        for u, v in zip(a, c, strict=True):
            assert torch.equal(u, v)


@pytest.mark.parametrize("k", range(1, 10))
def test_bits_masks_for_tiny_k(k):
    x, w, b, dy = _inputs(6, k, 5, torch.float32, seed=k)
    m = torch.rand(5, k, generator=torch.Generator().manual_seed(10 + k)) < 0.5
    for mask in (pack_rows(m), m):
        _check_against_reference(
            lambda a, c, d, mask=mask: masked_linear(a, c, mask, d, hard=True),
            lambda a, c, d, mask=mask: masked_linear_ref(a, c, mask, d, hard=True),
            x, w, b, dy, f"K={k} {mask.dtype}",
        )


def test_uint8_bytes_mask_treats_any_nonzero_as_keep_and_strided_inputs():
    k, n, r = 20, 11, 9
    x = torch.randn(k, r).t()  # non-contiguous rows
    w = torch.randn(n, k)
    m = torch.randint(0, 4, (n, k), dtype=torch.uint8)  # values 0..3
    y = masked_linear(x, w, m)
    torch.testing.assert_close(y, x @ (w * (m != 0)).t(), rtol=1e-5, atol=1e-5)


def test_empty_batch_and_weight_only_gradient():
    w = torch.randn(4, 10, requires_grad=True)
    m = torch.ones(4, 10, dtype=torch.bool)
    assert masked_linear(torch.randn(0, 10), w, m).shape == (0, 4)
    x = torch.randn(2, 5, 10)
    masked_linear(x, w, m, hard=True).sum().backward()
    torch.testing.assert_close(w.grad, x.reshape(-1, 10).sum(0).expand(4, 10), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_pathway_batch_stays_in_the_autograd_graph(backend):
    x, w = torch.randn(0, 10, requires_grad=True), torch.randn(4, 10, requires_grad=True)
    masks = torch.rand(2, 4, 10, generator=torch.Generator().manual_seed(0)) < 0.5
    y = pathway_masked_linear(x, w, masks, torch.zeros(0, dtype=torch.long), backend=backend)
    assert y.shape == (0, 4) and y.requires_grad
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(4, 10)) and x.grad.shape == (0, 10)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("bits", [False, True])
def test_non_finite_weights_at_pruned_positions_contribute_zero(backend, hard, bits):
    # A diverged weight the mask prunes must not reach the output: W ⊙ M is a selection (inf * 0
    # would be NaN). Hand reference: the weight with its pruned entries replaced by 0.
    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(5, 13, generator=g), torch.randn(4, 13, generator=g), torch.randn(4, generator=g)
    keep = torch.rand(4, 13, generator=g) < 0.6
    keep[0, 2], keep[1, 5], keep[3, 12] = False, False, False
    w[0, 2], w[1, 5], w[3, 12] = float("inf"), float("nan"), float("-inf")
    mask = pack_rows(keep) if bits else keep
    clean = w.masked_fill(~keep, 0)
    dy = torch.randn(5, 4, generator=g)
    wl = w.clone().requires_grad_(True)
    y = masked_linear(x, wl, mask, b, hard=hard, backend=backend)
    torch.testing.assert_close(y, x @ clean.T + b, rtol=1e-5, atol=1e-5)
    y.backward(dy)
    dw = dy.T @ x  # soft: every weight gets dYᵀX; hard: the pruned ones get 0
    torch.testing.assert_close(wl.grad, dw * keep if hard else dw, rtol=1e-5, atol=1e-5)
    two = torch.stack([mask, mask])
    yp = pathway_masked_linear(x, w, two, torch.tensor([0, 1, 1, 0, 1]), b, hard=hard, backend=backend)
    torch.testing.assert_close(yp, x @ clean.T + b, rtol=1e-5, atol=1e-5)
    from sparse_rnnt.kernels.masked_linear import masked_cast

    assert torch.equal(masked_cast(w, mask, torch.bfloat16, hard=hard, backend=backend), clean.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pathway", [False, True])
def test_strided_bias(dtype, pathway):
    # A bias view with stride 2: the kernel reads the bias with unit stride, so it must get a copy.
    x, w, _, dy = _inputs(7, 19, 6, dtype, seed=3)
    m = torch.rand(6, 19, generator=torch.Generator().manual_seed(5)) < 0.5
    masks, lang = torch.stack([m, ~m]), torch.tensor([0, 1, 1, 0, 1, 0, 0])
    ys, grads = [], []
    for fn in ((pathway_masked_linear, pathway_masked_linear_ref) if pathway else (masked_linear, masked_linear_ref)):
        base = torch.randn(12, generator=torch.Generator().manual_seed(4)).to(dtype).requires_grad_(True)
        b = base[::2]
        assert not b.is_contiguous()
        y = fn(x, w, masks, lang, b) if pathway else fn(x, w, m, b)
        y.backward(dy)
        ys.append(y.detach().float())
        grads.append(base.grad.float())
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(ys[0], ys[1], rtol=tol, atol=tol)
    torch.testing.assert_close(grads[0], grads[1], rtol=tol, atol=tol)
    assert bool((grads[0][1::2] == 0).all())  # the gradient reaches the viewed elements only


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("pathway", [False, True])
def test_zero_input_features_give_the_bias(pathway, backend):
    x, w, b = torch.randn(3, 0, requires_grad=True), torch.randn(4, 0), torch.randn(4, requires_grad=True)
    if pathway:
        y = pathway_masked_linear(x, w, torch.ones(2, 4, 0, dtype=torch.bool), torch.tensor([0, 1, 1]), b,
                                  backend=backend)
    else:
        y = masked_linear(x, w, torch.ones(4, 0, dtype=torch.bool), b, backend=backend)
    torch.testing.assert_close(y, b.detach().expand(3, 4))
    y.sum().backward()
    torch.testing.assert_close(b.grad, torch.full((4,), 3.0))
    assert x.grad.shape == (3, 0)


@pytest.mark.parametrize("pathway", [False, True])
def test_both_backends_compute_in_the_inputs_dtype_under_autocast(pathway):
    """Autocast cannot reach the Triton kernels; the references turn it off too, so under bf16
    autocast both backends give float32 outputs equal to the float32 computation outside it."""
    x, w, b, _ = _inputs(5, 12, 7, torch.float32)
    mask = torch.rand(7, 12, generator=torch.Generator().manual_seed(3)) > 0.5
    if pathway:
        masks, lang = torch.stack([mask, ~mask]), torch.tensor([0, 1, 1, 0, 1])

        def run(backend):
            return pathway_masked_linear(x, w, masks, lang, b, backend=backend)
    else:
        def run(backend):
            return masked_linear(x, w, mask, b, backend=backend)
    outside = {backend: run(backend) for backend in ("triton", "torch")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = {backend: run(backend) for backend in ("triton", "torch")}
    for backend in ("triton", "torch"):
        assert inside[backend].dtype == torch.float32
        torch.testing.assert_close(inside[backend], outside[backend], rtol=0, atol=0)
    torch.testing.assert_close(inside["triton"], inside["torch"], rtol=1e-5, atol=1e-5)


def test_double_backward_is_refused_by_name():
    x, w, b, _ = _inputs(3, 8, 4, torch.float32)
    x.requires_grad_(True)
    y = masked_linear(x, w, torch.ones(4, 8, dtype=torch.bool), b)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


# ----------------------------------------------------------------------------- pathway


def _per_language_loop(x, w, b, masks, lang, hard):
    """Independent reference: one masked_linear_ref per language, rows put back in place."""
    parts = []
    for index in range(masks.shape[0]):
        rows = (lang == index).nonzero().squeeze(1)
        parts.append((rows, masked_linear_ref(x[rows], w, masks[index], b, hard=hard)))
    y = x.new_zeros(x.shape[0], w.shape[0])
    for rows, part in parts:
        y = y.index_put((rows,), part)
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["bytes", "bits"])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("k", [45, 64])
def test_pathway_matches_per_language_loop(dtype, fmt, hard, k):
    r, n, nl = 83, 27, 4
    x, w, b, dy = _inputs(r, k, n, dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    m = torch.rand(nl, n, k, generator=g) < 0.5
    masks = torch.stack([pack_rows(mm) for mm in m]) if fmt == "bits" else m
    # Unequal segments, language 2 absent, several row tiles for language 0.
    lang = torch.tensor([0, 1, 3])[torch.randint(0, 3, (r,), generator=g)]
    lang[:40] = 0
    lang = lang[torch.randperm(r, generator=g)]
    what = f"pathway {dtype} {fmt} K={k} hard={hard}"
    _check_against_reference(
        lambda a, c, d: pathway_masked_linear(a, c, masks, lang, d, hard=hard),
        lambda a, c, d: _per_language_loop(a, c, d, masks, lang, hard),
        x, w, b, dy, what,
    )
    # The torch backend (naive reference) agrees with the loop too.
    _check_against_reference(
        lambda a, c, d: pathway_masked_linear(a, c, masks, lang, d, hard=hard, backend="torch"),
        lambda a, c, d: _per_language_loop(a, c, d, masks, lang, hard),
        x, w, b, dy, what + " torch backend",
    )


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_pathway_hard_weight_gradient_is_the_asr_pathways_sum(backend):
    """dW = Σ_l (dY_lᵀ X_l) ⊙ M_l (hard) or Σ_l dY_lᵀ X_l (soft), by explicit float64 matmuls."""
    r, k, n, nl = 50, 19, 13, 3
    x, w, _, dy = _inputs(r, k, n, torch.float64, seed=13, bias=False)
    g = torch.Generator().manual_seed(14)
    masks = torch.rand(nl, n, k, generator=g) < 0.5
    lang = torch.randint(0, nl, (2, 25), generator=g)
    x32, w32, dy32 = x.float(), w.float(), dy.float()
    for hard in (False, True):
        expected = torch.zeros(n, k, dtype=torch.float64)
        for index in range(nl):
            sel = lang.reshape(-1) == index
            contribution = dy[sel].t() @ x[sel]
            expected += contribution * masks[index] if hard else contribution
        xv = x32.reshape(2, 25, k).requires_grad_(True)
        wv = w32.clone().requires_grad_(True)
        y = pathway_masked_linear(xv, wv, pack_rows(masks.reshape(-1, k)).reshape(nl, n, -1), lang,
                                  hard=hard, backend=backend)
        assert y.shape == (2, 25, n)
        y.backward(dy32.reshape(2, 25, n))
        torch.testing.assert_close(wv.grad.double(), expected, rtol=1e-5, atol=1e-4)
        dx = torch.stack([dy[i] @ (w * masks[lang.reshape(-1)[i]]) for i in range(r)])
        torch.testing.assert_close(xv.grad.reshape(r, k).double(), dx, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- validation


def test_invalid_inputs_raise_value_errors():
    x = torch.randn(4, 10)
    w = torch.randn(3, 10)
    m = torch.ones(3, 10, dtype=torch.bool)
    masks = torch.ones(2, 3, 10, dtype=torch.bool)
    lang = torch.tensor([0, 1, 1, 0])
    cases = [
        (lambda: masked_linear(torch.randn(4, 9), w, m), "x must be"),
        (lambda: masked_linear(x, torch.randn(3, 10, 1), m), "weight must be"),
        (lambda: masked_linear(x.double(), w.double(), m), "weight dtype"),
        (lambda: masked_linear(x.half(), w, m), "x dtype"),
        (lambda: masked_linear(x, w, torch.ones(3, 11, dtype=torch.bool)), "bytes mask must have shape"),
        (lambda: masked_linear(x, w, torch.ones(4, 2, dtype=torch.uint8)), "bits mask must have shape"),
        (lambda: masked_linear(x, w, torch.ones(3, 10)), "bool or uint8"),
        (lambda: masked_linear(x, w, m, torch.randn(4)), "bias must be"),
        (lambda: masked_linear(x, w, m, torch.randn(3).half()), "bias dtype"),
        (lambda: masked_linear(x, w, m, backend="cuda"), "backend"),
        (lambda: pathway_masked_linear(x, w, masks, torch.tensor([0, 1, 2, 0])), "lang value 2 out of range"),
        (lambda: pathway_masked_linear(x, w, masks, torch.tensor([0, -1, 1, 0])), "lang value -1"),
        (lambda: pathway_masked_linear(x, w, masks, lang[:3]), "lang must have shape"),
        (lambda: pathway_masked_linear(x, w, masks, lang.float()), "integer"),
        (lambda: pathway_masked_linear(x, w, m, lang), "stacked"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


@pytest.mark.parametrize("dtype", DTYPES)
def test_unmasked_linear_is_the_dense_linear(dtype):
    # The benchmarks' no-mask diagnostic: the same kernels with the mask compiled out.
    r, k, n = 37, 45, 29
    x, w, b, dy = _inputs(r, k, n, dtype, seed=41)
    keep_all = torch.ones(n, k, dtype=torch.bool)
    _check_against_reference(
        lambda a, c, d: unmasked_linear(a, c, d),
        lambda a, c, d: masked_linear_ref(a, c, keep_all, d),
        x, w, b, dy, f"unmasked {dtype}",
    )
    with pytest.raises(ValueError, match="bias"):
        unmasked_linear(x, w, b[:3])
    with pytest.raises(ValueError):
        unmasked_linear(x, w[:, :-1], b)  # K differs from x's


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.parametrize("hard", [False, True])
def test_float32_weight_gradient_over_many_rows(hard):
    # The fp32 dW adds one fresh product per row tile: many row tiles, a ragged last tile, and
    # pathway segments that start inside a tile.
    r, k, n = 1100, 35, 37
    x, w, b, dy = _inputs(r, k, n, torch.float32, seed=31)
    g = torch.Generator().manual_seed(32)
    m = torch.rand(n, k, generator=g) < 0.4
    _check_against_reference(
        lambda a, c, d: masked_linear(a, c, m, d, hard=hard),
        lambda a, c, d: masked_linear_ref(a, c, m, d, hard=hard),
        x, w, b, dy, f"fp32 long dW hard={hard}",
    )
    masks = torch.rand(3, n, k, generator=g) < 0.5
    lang = torch.randint(0, 3, (r,), generator=g)
    _check_against_reference(
        lambda a, c, d: pathway_masked_linear(a, c, masks, lang, d, hard=hard),
        lambda a, c, d: pathway_masked_linear_ref(a, c, masks, lang, d, hard=hard),
        x, w, b, dy, f"fp32 long pathway dW hard={hard}",
    )


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["bytes", "bits"])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("k", [515, 512])
def test_cuda_large_masked_linear(dtype, fmt, hard, k):
    r, n = 4099, 1029
    x, w, b, dy = _inputs(r, k, n, dtype, device="cuda", seed=21)
    m = torch.rand(n, k, generator=torch.Generator().manual_seed(22)).cuda() < 0.3
    mask = pack_rows(m) if fmt == "bits" else m
    _check_against_reference(
        lambda a, c, d: masked_linear(a, c, mask, d, hard=hard),
        lambda a, c, d: masked_linear_ref(a, c, mask, d, hard=hard),
        x, w, b, dy, f"cuda {dtype} {fmt} hard={hard}",
    )


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["bytes", "bits"])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("k", [389, 384])
def test_cuda_large_pathway(dtype, fmt, hard, k):
    r, n, nl = 3001, 771, 5
    x, w, b, dy = _inputs(r, k, n, dtype, device="cuda", seed=23)
    g = torch.Generator().manual_seed(24)
    m = (torch.rand(nl, n, k, generator=g) < 0.5).cuda()
    masks = torch.stack([pack_rows(mm) for mm in m]) if fmt == "bits" else m
    lang = torch.randint(0, nl, (r,), generator=g).cuda()
    _check_against_reference(
        lambda a, c, d: pathway_masked_linear(a, c, masks, lang, d, hard=hard),
        lambda a, c, d: _per_language_loop(a, c, d, masks, lang, hard),
        x, w, b, dy, f"cuda pathway {dtype} {fmt} hard={hard}",
    )


@pytest.mark.gpu
@cuda
def test_cuda_tf32_within_tf32_error():
    x, w, b, _ = _inputs(1000, 768, 512, torch.float32, device="cuda", seed=25)
    m = torch.rand(512, 768, device="cuda") < 0.5
    y = masked_linear(x, w, pack_rows(m), b, allow_tf32=True)
    ref = masked_linear_ref(x.double(), w.double(), m, b.double())
    # TF32 keeps 10 mantissa bits: relative error ~2^-11 per product, ~sqrt(K) growth.
    assert (y.double() - ref).abs().max() <= 2.0**-11 * 768**0.5 * ref.abs().max()
