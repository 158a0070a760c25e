"""The CPU small-row sparse kernel (``csrc/cpu_spmm.cpp`` through ``kernels/small_row/cpu.py``)
against a float64 reference, within twice PyTorch's own error in the same dtype; its weight
container; its errors; and its fallback when it cannot be built."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from sparse_rnnt.kernels.small_row import BsrWeight
from sparse_rnnt.kernels.small_row import cpu as cpu_mod
from sparse_rnnt.kernels.small_row.cpu import (
    CpuSparseWeight,
    cpu_sparse_linear,
    cpu_sparse_linear_ref,
)
from tests.kernels.tolerance import assert_linear_close_to

HAS_CXX = shutil.which("c++") is not None or shutil.which("g++") is not None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Row counts around each loop's bounds: gather (<= 2), one or two 16-lane tiles (<= 32), then
# tiles of 64 lanes walked per column tile (a partial last tile: 65, 130).
ROWS = (1, 2, 3, 5, 16, 17, 31, 33, 64, 65, 130)


def _problem(n: int, k: int, dtype: torch.dtype, density: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    mask = torch.rand(n, k, generator=g) < density
    bias = torch.randn(n, generator=g).to(dtype)
    return w, mask, bias


@pytest.fixture(scope="module")
def ext():
    if not HAS_CXX:  # the fallback tests below run without one
        pytest.skip("no C++ compiler to build the CPU kernel")
    ops = cpu_mod.get_cpu_extension()
    assert ops is not None, "the CPU kernel did not build (see the warning in the log)"
    return ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k", "tile"), [(37, 45, 32), (129, 300, 128), (70, 1000, 1024), (5, 1, 128)])
def test_kernel_matches_float64_reference(ext, dtype, n, k, tile):
    w, mask, bias = _problem(n, k, dtype)
    cw = CpuSparseWeight.from_dense(w, mask, tile)
    dense = w * mask
    for r in ROWS:
        x = torch.randn(r, k, generator=torch.Generator().manual_seed(r)).to(dtype)
        for b in (bias, None):
            out = cpu_sparse_linear(x, cw, b)
            assert out.dtype == dtype and out.shape == (r, n)
            assert_linear_close_to(out, x, dense, b, f"{dtype} {n}x{k} tile {tile} rows {r} bias {b is not None}")


def test_columns_past_32767_read_as_unsigned(ext):
    # Column indices are uint16 held in int16: columns >= 2^15 are negative in the tensor.
    n, k = 6, 40000
    w, mask, bias = _problem(n, k, torch.float32, density=0.05)
    mask[:, -1] = True  # the last column, 39999, in every row
    cw = CpuSparseWeight.from_dense(w, mask)
    assert int(cw.cols.min()) < 0
    for r in (1, 3, 40):
        x = torch.randn(r, k)
        assert_linear_close_to(cpu_sparse_linear(x, cw, bias), x, w * mask, bias, f"rows {r}")


def test_long_rows_keep_their_accuracy(ext):
    # 36000 kept weights per row: a plain running sum drifted to 2-9x F.linear's error here; the
    # blocked partial sums with Kahan compensation stay within the rule on every loop.
    n, k = 4, 40000
    w, mask, bias = _problem(n, k, torch.float32, density=0.9)
    cw = CpuSparseWeight.from_dense(w, mask)
    for r in (1, 3, 17, 40):
        x = torch.randn(r, k, generator=torch.Generator().manual_seed(r))
        assert_linear_close_to(cpu_sparse_linear(x, cw, bias), x, w * mask, bias, f"rows {r}")


def test_leading_dimensions_empty_rows_and_empty_weights(ext):
    w, mask, bias = _problem(24, 50, torch.float32)
    mask[3] = False  # a row with no kept weight: y = bias there
    mask[:, 7] = False
    cw = CpuSparseWeight.from_dense(w, mask)
    x = torch.randn(2, 3, 50)
    out = cpu_sparse_linear(x, cw, bias)
    assert out.shape == (2, 3, 24)
    assert_linear_close_to(out.reshape(6, 24), x.reshape(6, 50), w * mask, bias, "leading dims")
    torch.testing.assert_close(out[..., 3], bias[3].expand(2, 3), rtol=0, atol=0)
    assert cpu_sparse_linear(torch.randn(0, 50), cw, bias).shape == (0, 24)
    nothing = CpuSparseWeight.from_dense(w, torch.zeros_like(mask))
    torch.testing.assert_close(cpu_sparse_linear(torch.randn(4, 50), nothing, bias), bias.expand(4, 24))
    no_k = CpuSparseWeight.from_dense(torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool))
    b3 = torch.randn(3)
    torch.testing.assert_close(cpu_sparse_linear(torch.randn(2, 0), no_k, b3), b3.expand(2, 3))
    no_n = CpuSparseWeight.from_dense(torch.zeros(0, 9), torch.zeros(0, 9, dtype=torch.bool))
    assert cpu_sparse_linear(torch.randn(2, 9), no_n).shape == (2, 0)


def test_weight_container_round_trips_and_counts_its_bytes():
    w, mask, _ = _problem(33, 70, torch.bfloat16)
    cw = CpuSparseWeight.from_dense(w, mask, tile=32)
    torch.testing.assert_close(cw.to_dense(), w * mask, rtol=0, atol=0)
    rows, cols = mask.nonzero(as_tuple=True)
    assert torch.equal(cw.cols.long(), cols) and cw.cols.dtype == torch.int16
    assert torch.equal(cw.bitmap.values, w[rows, cols])
    assert cw.nbytes == cw.bitmap.nbytes + 2 * int(mask.sum())
    assert set(cw.tensors()) == {"bits", "values", "offsets", "cols"}
    # from a BSR weight: its nonzeros (zeros stored inside kept blocks are pruned weights)
    bsr = BsrWeight.from_dense(w, mask, (4, 8))
    torch.testing.assert_close(CpuSparseWeight.from_bsr(bsr).to_dense(), w * mask, rtol=0, atol=0)
    with pytest.raises(ValueError, match="65536"):
        CpuSparseWeight.from_dense(torch.zeros(1, 65537), torch.zeros(1, 65537, dtype=torch.bool))


def test_reference_backend_and_errors(ext):
    w, mask, bias = _problem(8, 40, torch.float32)
    cw = CpuSparseWeight.from_dense(w, mask)
    x = torch.randn(3, 40)
    torch.testing.assert_close(cpu_sparse_linear(x, cw, bias, backend="torch"), F.linear(x, w * mask, bias))
    torch.testing.assert_close(cpu_sparse_linear_ref(x, cw, bias), F.linear(x, w * mask, bias))
    with pytest.raises(ValueError, match="backend"):
        cpu_sparse_linear(x, cw, backend="triton")
    with pytest.raises(ValueError, match="dtype"):
        cpu_sparse_linear(x.double(), cw)
    with pytest.raises(ValueError, match="K = 40"):
        cpu_sparse_linear(torch.randn(3, 41), cw)
    with pytest.raises(ValueError, match="inference-only"):
        cpu_sparse_linear(x.requires_grad_(), cw)
    with torch.no_grad():
        assert cpu_sparse_linear(x, cw).shape == (3, 8)
    # the op itself checks what the Python wrapper does not re-check
    with pytest.raises(RuntimeError, match="offsets has"):
        ext.sparse_linear(x.detach(), cw.bitmap.offsets, cw.cols, cw.bitmap.values, 40, 32, None)
    with pytest.raises(RuntimeError, match="x has 39 columns, the weight 40"):
        ext.sparse_linear(torch.randn(3, 39), cw.bitmap.offsets, cw.cols, cw.bitmap.values, 40, 128, None)
    with pytest.raises(RuntimeError, match="weight is"):
        ext.sparse_linear(x.detach().half(), cw.bitmap.offsets, cw.cols, cw.bitmap.values, 40, 128, None)


def test_failed_build_is_logged_once_and_loading_falls_back_to_dense(caplog, monkeypatch, tmp_path):
    # A real failed build (a source that does not compile), then what load_artifact does with it:
    # "auto" runs the layers dense, "kernel" refuses by name.
    from sparse_rnnt.errors import UserError
    from sparse_rnnt.export.formats import resolve_cpu_sparse

    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_mod, "SOURCE", bad)
    monkeypatch.setattr(cpu_mod, "_registered", lambda: False)  # as in a process that never loaded it
    monkeypatch.setattr(cpu_mod, "_NAME", "sparse_rnnt_cpu_spmm_broken")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    cpu_mod.get_cpu_extension.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_mod.__name__):
            assert cpu_mod.get_cpu_extension() is None
            assert cpu_mod.get_cpu_extension() is None  # cached: one attempt, one warning
            assert resolve_cpu_sparse("auto") == "dense"
            with pytest.raises(UserError, match="could not be built"):
                resolve_cpu_sparse("kernel")
        warnings = [r for r in caplog.records if r.name == cpu_mod.__name__ and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()
        if HAS_CXX:  # the compiler's diagnostic, not torch's command line, says why
            assert "error:" in warnings[0].getMessage() and "broken.cpp" in warnings[0].getMessage()
        # what loading does with it (convert_linears decodes layers as load_artifact does)
        from sparse_rnnt.export.artifact import convert_linears

        _, mask, _ = _problem(6, 8, torch.float32)
        for fmt in ("bitmap", "bsr"):
            model = torch.nn.Sequential(torch.nn.Linear(8, 6))
            assert convert_linears(model, {"0.weight": mask}, fmt, cpu_sparse="auto") == {"0.weight": "torch"}
            with pytest.raises(UserError, match="could not be built"):
                convert_linears(torch.nn.Sequential(torch.nn.Linear(8, 6)), {"0.weight": mask}, fmt,
                                cpu_sparse="kernel")
        # formats that never use the kernel neither need nor build it
        assert convert_linears(torch.nn.Sequential(torch.nn.Linear(8, 6)), {"0.weight": mask}, "dense",
                               cpu_sparse="kernel") == {"0.weight": "torch"}
        assert resolve_cpu_sparse("dense") == "dense"
        with pytest.raises(ValueError, match="cpu_sparse"):
            resolve_cpu_sparse("fast")
    finally:
        cpu_mod.get_cpu_extension.cache_clear()


def test_build_folder_is_per_cpu_feature_set(monkeypatch, tmp_path):
    # -march=native code must not be reused on another CPU: the folder is named by a hash of the
    # CPU's model and feature flags, read from /proc/cpuinfo (fakes here).
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    folders = []
    for flags in ("fpu sse2 avx2 avx512f", "fpu sse2 avx2", "fpu sse2 avx2"):
        info = tmp_path / f"cpuinfo{len(folders)}"
        info.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n"
                        f"processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
        monkeypatch.setattr(cpu_mod, "_CPUINFO", str(info))
        folders.append(cpu_mod._build_directory())
    assert folders[0] != folders[1] and folders[1] == folders[2]
    assert all(f.parent == tmp_path / "ext" and torch.__version__.replace("+", "_") in f.name for f in folders)


def test_bitmap_and_bsr_layers_of_an_exported_model_run_the_kernel(ext):
    # convert_linears decodes every layer as load_artifact does: on the CPU the sparse formats run
    # the kernel ("cpu") or, with cpu_sparse="dense", their decompressed weight ("torch"); either
    # way the joiner logits are the masked dense model's.
    import copy

    from sparse_rnnt.export.artifact import convert_linears, probe_logits, relative_error
    from sparse_rnnt.model import MODEL_SIZES, build_model
    from sparse_rnnt.pruning.ranking import magnitude_masks

    torch.manual_seed(0)
    base = build_model(MODEL_SIZES["tiny"], 40, verbose=False).eval()
    mods = {f"{n}.weight": m for n, m in base.named_modules() if type(m) is torch.nn.Linear}
    masks = magnitude_masks({n: m.weight.detach() for n, m in mods.items()}, 0.7)
    ref_model = copy.deepcopy(base)
    with torch.no_grad():
        for name, mask in masks.items():
            ref_model.get_parameter(name).mul_(mask)
    ref = probe_logits(ref_model, torch.device("cpu"))
    for fmt in ("bitmap", "bsr"):
        for choice in ("kernel", "dense"):
            model = copy.deepcopy(base)
            runtimes = convert_linears(model, masks, fmt, cpu_sparse=choice)
            assert set(runtimes.values()) == {"cpu" if choice == "kernel" else "torch"}
            err = relative_error(probe_logits(model, torch.device("cpu")), ref)
            assert err < 1e-5, (fmt, choice, err)


def test_auto_layer_runtime_chooses_between_the_cpu_kernel_and_dense(ext):
    # The per-layer choice sees the CPU kernel's layers as sparse layers and swaps those whose
    # dense product times faster (a timer table here) for their dense weight, outputs unchanged.
    from sparse_rnnt.export.autoselect import choose_layer_runtimes, sparse_layers
    from sparse_rnnt.export.formats import DenseExported, SmallRowExported

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.ReLU(), torch.nn.Linear(20, 10))
    x = torch.randn(4, 30)
    with torch.no_grad():
        for i in (0, 2):
            lin = model[i]
            mask = torch.rand_like(lin.weight) < 0.4
            cw = CpuSparseWeight.from_dense(lin.weight.detach() * mask, mask)
            model[i] = SmallRowExported("bitmap", cw, lin.bias.detach(), "cpu", torch.float32)
        before = model(x)
    assert set(sparse_layers(model)) == {"0", "2"}
    calls = iter([1.0, 2.0, 2.0, 1.0])  # layer 0: sparse 1 ms, dense 2; layer 2: sparse 2, dense 1

    choices = choose_layer_runtimes(model, {"0": [4], "2": [4]}, timer=lambda fn: next(calls))
    assert [c.kept for c in choices] == ["sparse", "dense"]
    assert isinstance(model[0], SmallRowExported) and isinstance(model[2], DenseExported)
    assert model[2].runtime == "torch-auto"
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_cpu_layer_calls_the_op_directly_and_checks_what_it_skips(ext):
    # SmallRowExported on the "cpu" runtime skips cpu_sparse_linear's per-call checks (the weight
    # is checked once); what it still checks: the input's width and autograd.
    from sparse_rnnt.export.formats import SmallRowExported

    w, mask, bias = _problem(12, 40, torch.bfloat16)
    layer = SmallRowExported("bitmap", CpuSparseWeight.from_dense(w, mask), bias, "cpu", torch.bfloat16)
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        out = layer(x)  # float32 in, computed in bfloat16, float32 out
    assert out.dtype == torch.float32 and out.shape == (2, 3, 12)
    assert_linear_close_to(out.reshape(6, 12).to(torch.bfloat16), x.reshape(6, 40).to(torch.bfloat16),
                           w * mask, bias, "layer")
    with torch.no_grad(), pytest.raises(ValueError, match="80 features, the layer takes 40"):
        layer(torch.randn(3, 80))  # 240 values would reshape to [6, 40] without the check
    with pytest.raises(ValueError, match="inference-only"):
        layer(torch.randn(3, 40, requires_grad=True))
    with pytest.raises(ValueError, match="bfloat16"):
        SmallRowExported("bitmap", CpuSparseWeight.from_dense(w, mask), bias.float(), "cpu", torch.bfloat16)


def test_layers_wider_than_the_kernel_run_dense_and_say_so(ext, caplog):
    # Columns are uint16: a layer with more than 65536 inputs keeps its dense weight, logged.
    from sparse_rnnt.export.artifact import convert_linears

    model = torch.nn.Sequential(torch.nn.Linear(65537, 2), torch.nn.Linear(2, 3))
    masks = {"0.weight": torch.rand(2, 65537) < 0.3, "1.weight": torch.rand(3, 2) < 0.6}
    with caplog.at_level(logging.WARNING):
        runtimes = convert_linears(model, masks, "bitmap", cpu_sparse="kernel")
    assert runtimes == {"0.weight": "torch", "1.weight": "cpu"}
    assert any("65537" in r.getMessage() and "runs dense" in r.getMessage() for r in caplog.records)
