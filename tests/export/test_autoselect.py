"""The per-layer choice between a sparse kernel and the dense weight (``export.autoselect``)."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from sparse_rnnt.export.autoselect import (
    LayerChoice,
    choose_layer_runtimes,
    compressed_bytes,
    dense_weight,
    device_timer,
    probe_rows,
    sparse_layers,
)
from sparse_rnnt.export.formats import DenseExported, SmallRowExported
from sparse_rnnt.kernels.small_row import BitmapWeight, BsrWeight
from sparse_rnnt.model import MODEL_SIZES, build_model
from tests.kernels.tolerance import assert_linear_close_to


def _sparse_tiny(seed: int = 0, backend: str = "torch"):
    """The ``tiny`` model with every encoder FFN layer and the joiner's output as small-row
    layers (bitmap / BSR alternating) at 70% sparsity; their masked dense weights by name."""
    torch.manual_seed(seed)
    model = build_model(MODEL_SIZES["tiny"], 40, verbose=False).eval()
    g = torch.Generator().manual_seed(seed)
    names = [n for n, m in model.named_modules()
             if type(m) is torch.nn.Linear and ("pos_ff" in n or n.endswith("joiner.linear"))]
    assert len(names) >= 3
    ref = {}
    for i, name in enumerate(names):
        mod = model.get_submodule(name)
        w = mod.weight.detach()
        fmt = "bitmap" if i % 2 == 0 else "bsr"
        if fmt == "bsr":  # 30% of 4x4 blocks (shapes here are multiples of 4)
            blocks = torch.rand(w.shape[0] // 4, w.shape[1] // 4, generator=g) < 0.3
            mask = blocks.repeat_interleave(4, 0).repeat_interleave(4, 1)
        else:
            mask = torch.rand(w.shape, generator=g) < 0.3
        packed = BitmapWeight.from_dense(w, mask) if fmt == "bitmap" else BsrWeight.from_dense(w, mask, blocksize=(4, 4))
        bias = None if mod.bias is None else mod.bias.detach().clone()
        layer = SmallRowExported(fmt, packed, bias, backend, torch.float32)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
        ref[name] = (packed.to_dense(), bias)
    return model, ref


def test_sparse_layers_and_dense_weights_are_the_masked_weights():
    model, ref = _sparse_tiny()
    layers = sparse_layers(model)
    assert sorted(layers) == sorted(ref)
    for name, layer in layers.items():
        torch.testing.assert_close(dense_weight(layer), ref[name][0], rtol=0, atol=0)
        assert compressed_bytes(layer) == layer.packed.nbytes < ref[name][0].numel() * 4


def test_probe_rows_records_the_shapes_of_s_streams():
    # Eager steps batch exactly the ready streams: an encoder layer sees S x (segment + right
    # context) reduced frames per chunk step, one call per chunk; the joiner S rows per greedy
    # symbol step, at least one per frame.
    from sparse_rnnt.streaming.encoder import geometry

    model, _ = _sparse_tiny()
    geo = geometry(model.rnnt)
    frames = geo.segment_reduced + geo.right_context // geo.stride
    for s in (1, 3):
        got = probe_rows(model, (s,), chunks=3)
        assert set(got) == set(sparse_layers(model))
        for name, rows in got.items():
            if "pos_ff" in name:
                assert rows == Counter({s * frames: 3}), name
            else:
                assert set(rows) == {s} and rows[s] >= 3 * geo.segment_reduced, name
    both = probe_rows(model, (1, 3), chunks=3)
    one, three = probe_rows(model, (1,), chunks=3), probe_rows(model, (3,), chunks=3)
    for n in both:  # the joiner's counts depend on what the noise makes it emit
        if "pos_ff" in n:
            assert both[n] == one[n] + three[n]
    with pytest.raises(ValueError):
        probe_rows(model, (0,))


class _TableTimer:
    """A stand-in device: ms per call from a table, by (which product, rows). The sparse product is
    told apart by a call of the small-row layer's ``_linear`` inside the timed function, so the
    choice logic is tested without timing noise."""

    def __init__(self, sparse: dict[int, float], dense: dict[int, float]) -> None:
        self.sparse, self.dense, self.calls = sparse, dense, []

    def __call__(self, fn) -> float:
        seen = []
        real = SmallRowExported._linear

        def spy(layer, x):
            seen.append(x.shape[0])
            return real(layer, x)

        SmallRowExported._linear = spy
        try:
            out = fn()
        finally:
            SmallRowExported._linear = real
        kind = "sparse" if seen else "dense"
        self.calls.append((kind, out.shape[0]))
        return (self.sparse if seen else self.dense)[out.shape[0]]


def test_choice_weighs_each_row_count_by_its_calls_and_replaces_only_slower_layers():
    model, ref = _sparse_tiny()
    names = sorted(ref)
    # Dense is faster at 1 row, slower at 40 rows. Layer A: 10 calls of 1 row, 1 of 40 -> dense
    # costs 10*1 + 9 = 19 against sparse 10*2 + 5 = 25: dense. Layer B: 1 call of 1 row, 10 of 40
    # -> dense 1 + 90 = 91 against sparse 2 + 50 = 52: sparse.
    timer = _TableTimer(sparse={1: 2.0, 40: 5.0}, dense={1: 1.0, 40: 9.0})
    a, b = names[0], names[1]
    x = torch.randn(7, model.get_submodule(a).in_features)
    before = model.get_submodule(a)(x)
    bytes_a, fmt_a = compressed_bytes(model.get_submodule(a)), model.get_submodule(a).fmt
    choices = choose_layer_runtimes(model, {a: {1: 10, 40: 1}, b: {1: 1, 40: 10}}, timer=timer)
    got = {c.name: c for c in choices}
    assert set(got) == {a, b}  # layers not named keep their kernel and are not listed
    assert got[a].kept == "dense" and got[a].runtime == "torch-auto" and got[a].sparse_runtime == "torch"
    assert got[b].kept == "sparse" and got[b].runtime == "torch" and got[b].extra_bytes == 0
    assert got[a].rows == (1, 40) and got[a].calls == (10, 1)
    assert got[a].sparse_ms == (2.0, 5.0) and got[a].dense_ms == (1.0, 9.0)
    assert got[a].extra_bytes == ref[a][0].numel() * 4 - bytes_a > 0
    la = model.get_submodule(a)
    assert isinstance(la, DenseExported) and la.fmt == got[a].fmt == fmt_a
    assert isinstance(model.get_submodule(b), SmallRowExported)
    for n in names[2:]:
        assert isinstance(model.get_submodule(n), SmallRowExported)
    # the dense copy computes the same product from the same weight
    torch.testing.assert_close(la(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(la.weight, ref[a][0], rtol=0, atol=0)
    assert {("sparse", 1), ("sparse", 40), ("dense", 1), ("dense", 40)} <= set(timer.calls)
    assert LayerChoice(**got[a].to_json()) == got[a]
    # A tie keeps the sparse kernel: dense must be strictly faster to cost the memory.
    model2, _ = _sparse_tiny()
    tie = choose_layer_runtimes(model2, {a: [1]}, timer=_TableTimer(sparse={1: 1.0}, dense={1: 1.0}))
    assert tie[0].kept == "sparse" and isinstance(model2.get_submodule(a), SmallRowExported)


def test_choice_refuses_bad_rows():
    model, ref = _sparse_tiny()
    with pytest.raises(ValueError, match="not sparse layers"):
        choose_layer_runtimes(model, {"nope": [1]}, timer=lambda fn: 1.0)
    with pytest.raises(ValueError, match=">= 1"):
        choose_layer_runtimes(model, {sorted(ref)[0]: [0]}, timer=lambda fn: 1.0)
    # Call counts weigh the times: zero or negative ones would invert the choice.
    for calls in (0, -10, 2.5, True):
        with pytest.raises(ValueError, match="call counts must be integers >= 1"):
            choose_layer_runtimes(model, {sorted(ref)[0]: {1: calls}}, timer=lambda fn: 1.0)


def test_probe_rows_of_a_beam_see_the_beam_width():
    # The joiner (a small-row layer here) scores every hypothesis of the beam at once: rows up to
    # the beam width per stream, which a greedy probe (one row) would not time.
    model, _ = _sparse_tiny()
    joiner = next(n for n in sparse_layers(model) if n.endswith("joiner.linear"))
    greedy = probe_rows(model, (1,), chunks=3)
    beam = probe_rows(model, (1,), chunks=3, decoding="beam", beam_width=4)
    assert set(greedy[joiner]) == {1}
    assert max(beam[joiner]) == 4
    for name in greedy:  # the encoder's layers do not depend on the search
        if "pos_ff" in name:
            assert beam[name] == greedy[name]


def test_real_timer_on_cpu_keeps_outputs():
    # The default timer on this machine: whatever it picks, every layer's output stays the masked
    # dense product, and the choices cover every layer probed.
    model, ref = _sparse_tiny(backend="torch")
    rows = probe_rows(model, (2,))
    x = {n: torch.randn(5, model.get_submodule(n).in_features) for n in ref}
    choices = choose_layer_runtimes(model, rows)
    assert sorted(c.name for c in choices) == sorted(ref)
    for n, (w, b) in ref.items():
        torch.testing.assert_close(model.get_submodule(n)(x[n]), F.linear(x[n], w, b), rtol=1e-5, atol=1e-5)
    assert device_timer(torch.device("cpu"))(lambda: time.sleep(0.002)) >= 2.0  # ms per call
    assert device_timer(torch.device("cpu"), graphs=False)(lambda: time.sleep(0.002)) >= 2.0
    assert all(isinstance(c.sparse_ms[0], float) and c.rows == tuple(sorted(Counter(rows[c.name]))) for c in choices)


def _auto_keeps_outputs(device: str, dtype: torch.dtype, backend_for, streams: tuple[int, ...] | None,
                        timer=None, rows=None) -> list[LayerChoice]:
    # The small-row layers rebuilt on ``device`` in ``dtype`` on ``backend_for(fmt)``, probed at
    # ``streams`` (or ``rows`` given), chosen with ``timer`` (None: the device's own); every
    # chosen layer's output must stay the masked product, within twice torch's own error in the
    # layer's dtype.
    model, ref = _sparse_tiny()
    model = model.to(device)
    for name in ref:
        layer = model.get_submodule(name)
        packed = type(layer.packed).from_tensors(
            {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in layer.packed.tensors().items()},
            tuple(layer.packed.shape), **({"tile": layer.packed.tile} if layer.fmt == "bitmap" else
                                          {"blocksize": tuple(layer.packed.blocksize)}))
        bias = None if layer.bias is None else layer.bias.detach().to(device, dtype)
        new = SmallRowExported(layer.fmt, packed, bias, backend_for(layer.fmt), dtype)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    rows = probe_rows(model, streams) if rows is None else rows
    choices = choose_layer_runtimes(model, rows, timer=timer)
    assert sorted(c.name for c in choices) == sorted(rows)
    assert all(t > 0 for c in choices for t in c.sparse_ms + c.dense_ms)
    for n, (w, b) in ((n, ref[n]) for n in rows):
        x = torch.randn(8, w.shape[1], device=device).to(dtype)
        wd, bd = w.to(device, dtype), None if b is None else b.to(device, dtype)
        assert_linear_close_to(model.get_submodule(n)(x), x, wd, bd, n)
    return choices


# Measured here on 2026-11-27: float32 13 s, bfloat16 20 s. bf16, what the GPU artifacts use, runs
# by default; float32 is in `make test-slow`.
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.slow), torch.bfloat16])
def test_auto_runtimes_on_the_triton_kernels_keep_outputs(dtype):
    # The CPU counterpart of the CUDA test below: the Triton small-row kernels (interpreter),
    # layers in float32 and bfloat16. The interpreter takes about a second per call of these
    # layers, so the probe (tested above) is replaced by its rows at 1 and 2 streams for three
    # layers (a bitmap and a BSR encoder layer, the joiner), and each product runs once, timed by
    # a table: the encoder layers go dense, the joiner stays sparse.
    model, _ = _sparse_tiny()
    enc = sorted(n for n in sparse_layers(model) if "pos_ff" in n)[:2]
    rows = {enc[0]: {5: 1, 10: 1}, enc[1]: {5: 1, 10: 1}, "rnnt.joiner.linear": {1: 16, 2: 16}}
    timer = _TableTimer(sparse={1: 1.0, 2: 1.0, 5: 9.0, 10: 9.0}, dense={1: 2.0, 2: 2.0, 5: 1.0, 10: 1.0})
    choices = _auto_keeps_outputs("cpu", dtype, lambda fmt: "triton", None, timer=timer, rows=rows)
    assert {kind for kind, _ in timer.calls} == {"sparse", "dense"}
    assert {c.name: c.kept for c in choices} == {enc[0]: "dense", enc[1]: "dense", "rnnt.joiner.linear": "sparse"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU timer test above is its counterpart)")
def test_cuda_eager_timer_charges_the_host_side_of_a_call():
    # A call that spends 1 ms on the host before a tiny kernel: eager steps pay the millisecond,
    # a graph replay does not (the capture recorded the kernel only).
    x = torch.ones(8, device="cuda")

    def call():
        time.sleep(0.001)
        x.add_(1)

    assert device_timer(torch.device("cuda"), graphs=False)(call) >= 1.0
    assert device_timer(torch.device("cuda"), graphs=True)(call) < 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU tests above check the same logic)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_auto_runtimes_time_real_kernels_and_keep_outputs(dtype):
    # On the GPU: the small-row layers on their real kernels (the CUDA extension where it builds,
    # else Triton), timed in CUDA graphs at the rows of 1 and 8 streams.
    from sparse_rnnt.export.formats import _small_row_backend

    _auto_keeps_outputs("cuda", dtype, lambda fmt: _small_row_backend(fmt, torch.device("cuda")), (1, 8))
