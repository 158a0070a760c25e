"""Sparse weight formats and small-row sparse matmuls, on CPU under the Triton interpreter and
(real Emformer shapes) on CUDA.

Formats are checked against brute-force loops and torch's own BSR conversion; matmuls against a
float64 dense reference, with the kernel's error allowed to be at most twice PyTorch's own
error in the same dtype plus one unit in the last place of the largest reference value.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

from sparse_rnnt.kernels.small_row import (
    BitmapWeight,
    BsrWeight,
    bitmap_linear,
    bitmap_linear_gather,
    bsr_linear,
    cuda_ext,
)
from sparse_rnnt.kernels.small_row import bitmap as bitmap_mod
from sparse_rnnt.kernels.small_row.naive import pack_bits, popcount32, unpack_bits
from tests.kernels.tolerance import assert_linear_close_to

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta:UserWarning"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(r, n, k, dtype, density=0.3, seed=0, device="cpu", block=None):
    """x [r, k], w [n, k], mask [n, k] (unstructured, or kept blocks of ``block``), bias [n]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, k, generator=g).to(device, dtype)
    w = torch.randn(n, k, generator=g).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype)
    if block is None:
        mask = torch.rand(n, k, generator=g) < density
    else:
        bh, bw = block
        keep = torch.rand((n + bh - 1) // bh, (k + bw - 1) // bw, generator=g) < density
        mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
        mask &= torch.rand(n, k, generator=g) < 0.8  # some pruned weights inside kept blocks
    return x, w, mask.to(device), b


# ----------------------------------------------------------------------------- bitmap format


@pytest.mark.parametrize("k", [1, 31, 32, 33, 53, 130])
def test_pack_bits_follows_the_documented_layout(k):
    g = torch.Generator().manual_seed(k)
    mask = torch.rand(4, k, generator=g) < 0.5
    words = pack_bits(mask)
    assert words.dtype == torch.int32 and words.shape == (4, (k + 31) // 32)
    for n in range(4):
        for i in range(words.shape[1]):
            word = int(words[n, i]) & 0xFFFFFFFF
            for j in range(32):
                c = 32 * i + j
                assert (word >> j) & 1 == (int(mask[n, c]) if c < k else 0), (n, c)
    assert torch.equal(unpack_bits(words, k), mask)
    assert torch.equal(popcount32(words).sum(1), mask.sum(1))


@pytest.mark.parametrize("k,tile", [(53, 32), (130, 128), (300, 64), (1, 128)])
def test_bitmap_round_trip_and_offsets(k, tile):
    n = 7
    _, w, mask, _ = _problem(1, n, k, torch.float32, seed=k)
    bw = BitmapWeight.from_dense(w, mask, tile=tile)
    assert torch.equal(bw.to_dense(), w * mask)
    assert bw.values.shape == (int(mask.sum()),)
    # Brute force: offsets[n, t] = kept weights before (row n, column t*tile) in row-major order.
    n_tiles = (k + tile - 1) // tile
    assert bw.offsets.shape == (n, n_tiles)
    for row in range(n):
        for t in range(n_tiles):
            expected = int(mask[:row].sum()) + int(mask[row, : t * tile].sum())
            assert int(bw.offsets[row, t]) == expected, (row, t)
    # Value of a kept weight at offsets + popcount prefix inside its tile.
    for row, c in mask.nonzero().tolist()[:50]:
        t = c // tile
        p = int(mask[row, t * tile: c].sum())
        assert bw.values[int(bw.offsets[row, t]) + p] == w[row, c]
    assert bw.nbytes == 4 * n * ((k + 31) // 32) + 4 * int(mask.sum()) + 4 * n * n_tiles


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmap_from_tensors_round_trip(dtype):
    _, w, mask, _ = _problem(1, 9, 77, dtype)
    bw = BitmapWeight.from_dense(w, mask, tile=64)
    back = BitmapWeight.from_tensors({k: v.clone() for k, v in bw.tensors().items()}, (9, 77), tile=64)
    assert torch.equal(back.to_dense(), w * mask) and back.values.dtype == dtype


def _bitmap_tensors():
    _, w, mask, _ = _problem(1, 6, 70, torch.float32, seed=3)
    return {k: v.clone() for k, v in BitmapWeight.from_dense(w, mask, tile=32).tensors().items()}


def _flip_first_kept_bit(t):
    t["bits"][0, 0] ^= 1  # one more or one fewer kept weight than values


def _set_bit_past_k(t):
    t["bits"][0, -1] |= 1 << 20  # K = 70 -> column 64 + 20 = 84 >= K


def _tamper_offsets(t):
    t["offsets"][2, 1] += 1


BITMAP_TAMPERS = {
    "popcount": (_flip_first_kept_bit, "kept weights"),
    "bit past K": (_set_bit_past_k, "past column"),
    "truncated values": (lambda t: t.update(values=t["values"][:-1]), "kept weights"),
    "offsets": (_tamper_offsets, "offsets"),
    "offsets out of range": (lambda t: t["offsets"].fill_(2**30), "offsets"),
    "bits dtype": (lambda t: t.update(bits=t["bits"].long()), "int32"),
    "values dtype": (lambda t: t.update(values=t["values"].double()), "dtype"),
    "bits shape": (lambda t: t.update(bits=t["bits"][:, :2]), "shape"),
    "values 2-D": (lambda t: t.update(values=t["values"][None]), "1-D"),
    "missing": (lambda t: t.pop("offsets"), "missing"),
}


@pytest.mark.parametrize("name", sorted(BITMAP_TAMPERS))
def test_bitmap_from_tensors_rejects_tampering(name):
    tamper, msg = BITMAP_TAMPERS[name]
    t = _bitmap_tensors()
    BitmapWeight.from_tensors({k: v.clone() for k, v in t.items()}, (6, 70), tile=32)  # intact: fine
    tamper(t)
    with pytest.raises(ValueError, match=msg):
        BitmapWeight.from_tensors(t, (6, 70), tile=32)


def test_bitmap_from_tensors_rejects_bad_shape_and_tile():
    t = _bitmap_tensors()
    with pytest.raises(ValueError, match="shape"):
        BitmapWeight.from_tensors(t, (6, 100), tile=32)
    with pytest.raises(ValueError, match="tile"):
        BitmapWeight.from_tensors(t, (6, 70), tile=48)
    with pytest.raises(ValueError, match="shape"):
        BitmapWeight.from_tensors(t, (6, -1), tile=32)


# ----------------------------------------------------------------------------- BSR format


@pytest.mark.parametrize("n,k,block", [(37, 53, (16, 16)), (32, 48, (16, 16)), (37, 130, (8, 32)), (5, 7, (2, 3))])
def test_bsr_round_trip_matches_torch_bsr(n, k, block):
    _, w, mask, _ = _problem(1, n, k, torch.float32, density=0.4, block=block, seed=n)
    bs = BsrWeight.from_dense(w, mask, block)
    assert torch.equal(bs.to_dense(), w * mask)
    bh, bw = block
    padded = torch.zeros((n + bh - 1) // bh * bh, (k + bw - 1) // bw * bw)
    padded[:n, :k] = w * mask  # randn weights are never exactly 0: kept blocks == nonzero blocks
    ref = padded.to_sparse_bsr(block)
    assert torch.equal(bs.crow_indices.long(), ref.crow_indices().long())
    assert torch.equal(bs.col_indices.long(), ref.col_indices().long())
    assert torch.equal(bs.values, ref.values())
    assert bs.nbytes == 4 * (bs.crow_indices.numel() + bs.col_indices.numel()) + 4 * ref.values().numel()
    back = BsrWeight.from_tensors({a: v.clone() for a, v in bs.tensors().items()}, (n, k), blocksize=block)
    assert torch.equal(back.to_dense(), w * mask)


def _bsr_tensors():
    _, w, mask, _ = _problem(1, 37, 53, torch.float32, density=0.5, block=(16, 16), seed=1)
    bs = BsrWeight.from_dense(w, mask, (16, 16))
    assert bs.nnz_blocks >= 4 and int((bs.crow_indices[1:] - bs.crow_indices[:-1]).max()) >= 2
    return {k: v.clone() for k, v in bs.tensors().items()}


def _first_row_with_two_blocks(t):
    c = t["crow_indices"].long()
    return int(((c[1:] - c[:-1]) >= 2).nonzero()[0])


def _swap_cols(t):
    i = int(t["crow_indices"][_first_row_with_two_blocks(t)])
    a, b = int(t["col_indices"][i]), int(t["col_indices"][i + 1])
    t["col_indices"][i], t["col_indices"][i + 1] = b, a


def _non_monotone_crow(t):
    t["crow_indices"][1] = int(t["crow_indices"][2]) + 1  # row 0 ends after row 1 does


def _nonzero_padding(t):
    t["values"][-1, -1, -1] = 1.0  # last block row covers rows 32..47 of N = 37


BSR_TAMPERS = {
    "col out of range": (lambda t: t["col_indices"].__setitem__(0, 4), "out of range"),
    "negative col": (lambda t: t["col_indices"].__setitem__(0, -1), "out of range"),
    "unsorted cols": (_swap_cols, "increasing"),
    "non-monotone crow": (_non_monotone_crow, "decreases"),
    "crow end": (lambda t: t["crow_indices"].__setitem__(-1, int(t["crow_indices"][-1]) - 1), r"crow_indices\[-1\]"),
    "crow dtype": (lambda t: t.update(crow_indices=t["crow_indices"].long()), "int32"),
    "values dtype": (lambda t: t.update(values=t["values"].to(torch.int32)), "dtype"),
    "truncated values": (lambda t: t.update(values=t["values"][:-1]), "blocks"),
    "values 2-D": (lambda t: t.update(values=t["values"][0]), r"\[nblocks"),
    "nonzero padding": (_nonzero_padding, "padding"),
    "missing": (lambda t: t.pop("col_indices"), "missing"),
}


@pytest.mark.parametrize("name", sorted(BSR_TAMPERS))
def test_bsr_from_tensors_rejects_tampering(name):
    tamper, msg = BSR_TAMPERS[name]
    t = _bsr_tensors()
    BsrWeight.from_tensors({k: v.clone() for k, v in t.items()}, (37, 53))  # intact: fine
    tamper(t)
    with pytest.raises(ValueError, match=msg):
        BsrWeight.from_tensors(t, (37, 53))


def test_bsr_from_tensors_rejects_wrong_blocksize():
    with pytest.raises(ValueError, match="blocksize"):
        BsrWeight.from_tensors(_bsr_tensors(), (37, 53), blocksize=(16, 8))


# ----------------------------------------------------------------------------- matmuls (CPU)


@pytest.fixture
def nan_partials(monkeypatch):
    """K-split partial buffers come back NaN-filled, so unwritten partials would show."""
    def poisoned(split, r, n, device):
        return torch.full((split, r, n), float("nan"), dtype=torch.float32, device=device)

    monkeypatch.setattr(bitmap_mod, "partials", poisoned)


@pytest.mark.parametrize("k", [53, 130])
@pytest.mark.parametrize("r", [1, 3, 17, 64, 70])
def test_bitmap_gather_reference(r, k):
    x, w, mask, b = _problem(r, 37, k, torch.float32, seed=r)
    bw = BitmapWeight.from_dense(w, mask, tile=32)
    assert_linear_close_to(bitmap_linear_gather(x, bw, b), x, w * mask, b, "gather")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,tile", [(53, 32), (130, 64)])
@pytest.mark.parametrize("r", [1, 3, 17, 64, 70])
def test_bitmap_triton_matches_reference(r, k, tile, dtype, bias, nan_partials):
    x, w, mask, b = _problem(r, 37, k, dtype, seed=r + k)
    b = b if bias else None
    bw = BitmapWeight.from_dense(w, mask, tile=tile)
    for split in (None, 2):
        out = torch.full((r, 37), float("nan"), dtype=dtype)
        with torch.no_grad():
            y = bitmap_linear(x, bw, b, split_k=split, out=out)
        assert y.data_ptr() == out.data_ptr()
        assert_linear_close_to(y, x, w * mask, b, f"bitmap split={split}")
    assert torch.equal(bitmap_linear(x, bw, b, backend="torch"), F.linear(x, w * mask, b))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,block", [(53, (16, 16)), (130, (8, 32))])
@pytest.mark.parametrize("r", [1, 3, 17, 64, 70])
def test_bsr_triton_matches_reference(r, k, block, dtype, bias, nan_partials):
    x, w, mask, b = _problem(r, 37, k, dtype, density=0.5, block=block, seed=r + k)
    b = b if bias else None
    bs = BsrWeight.from_dense(w, mask, block)
    for split in (None, 3):
        out = torch.full((r, 37), float("nan"), dtype=dtype)
        with torch.no_grad():
            y = bsr_linear(x, bs, b, split_k=split, out=out)
        assert_linear_close_to(y, x, w * mask, b, f"bsr split={split}")
    assert torch.equal(bsr_linear(x, bs, b, backend="torch"), F.linear(x, w * mask, b))


def test_torch_bsr_backend_matches_reference():
    x, w, mask, b = _problem(5, 37, 53, torch.float32, density=0.5, block=(16, 16))
    bs = BsrWeight.from_dense(w, mask, (16, 16))
    assert_linear_close_to(bsr_linear(x, bs, b, backend="torch-bsr"), x, w * mask, b, "torch-bsr")


def test_leading_dims_and_errors():
    x, w, mask, b = _problem(6, 37, 53, torch.float32)
    bw = BitmapWeight.from_dense(w, mask)
    bs = BsrWeight.from_dense(w, mask)
    x3 = x.reshape(2, 3, 53)
    with torch.no_grad():
        y = bitmap_linear(x3, bw, b)
        z = bsr_linear(x3, bs, b)
    assert y.shape == z.shape == (2, 3, 37)
    assert_linear_close_to(y.reshape(6, 37), x, w * mask, b, "bitmap [2, 3, K]")
    assert_linear_close_to(z.reshape(6, 37), x, w * mask, b, "bsr [2, 3, K]")
    with pytest.raises(ValueError, match="backend"):
        bitmap_linear(x, bw, backend="cublas")
    with pytest.raises(ValueError, match="backend"):
        bsr_linear(x, bs, backend="cuda")
    with pytest.raises(ValueError, match="dtype"):
        bitmap_linear(x.half(), bw)
    with pytest.raises(ValueError, match="K = 53"):
        bsr_linear(x[:, :50], bs)
    with pytest.raises(ValueError, match="inference-only"):
        bitmap_linear(x.requires_grad_(True), bw)
    with pytest.raises(ValueError, match="out must be"):
        bsr_linear(x.detach(), bs, out=torch.empty(6, 36))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_weight_dimensions(backend):
    # N = 0: an empty output (unpacking a mask of no rows must not need a -1 size); K = 0: the bias.
    b = torch.tensor([1.0, 2.0, 3.0])
    with torch.no_grad():
        for fmt, cls, fn in (("bitmap", BitmapWeight, bitmap_linear), ("bsr", BsrWeight, bsr_linear)):
            w0 = cls.from_dense(torch.zeros(0, 8), torch.zeros(0, 8, dtype=torch.bool))
            assert fn(torch.randn(2, 8), w0, backend=backend).shape == (2, 0), fmt
            assert w0.to_dense().shape == (0, 8), fmt
            wk = cls.from_dense(torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool))
            torch.testing.assert_close(fn(torch.randn(2, 0), wk, b, backend=backend), b.expand(2, 3))
    assert unpack_bits(pack_bits(torch.zeros(0, 40, dtype=torch.bool)), 40).shape == (0, 40)


def test_failed_extension_build_is_built_once_logged_once_and_export_falls_back_to_triton(caplog, monkeypatch):
    # CUDA "present" but the build fails (no GPU needed): one build attempt, one warning, and the
    # exported bitmap layers choose the Triton kernels every time.
    import torch.utils.cpp_extension as cpp_extension

    from sparse_rnnt.export.formats import _small_row_backend

    attempts = []

    def failing_build(*args, **kwargs):
        attempts.append(kwargs.get("name"))
        raise RuntimeError("Error building extension: nvcc fatal")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "load", failing_build)
    cuda_ext.get_extension.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cuda_ext.__name__):
            backends = [_small_row_backend("bitmap", torch.device("cuda")) for _ in range(4)]
        assert backends == ["triton"] * 4
        assert attempts == ["sparse_rnnt_small_row_bitmap"]
        warnings = [r.getMessage() for r in caplog.records if r.name == cuda_ext.__name__]
        assert len(warnings) == 1 and "nvcc fatal" in warnings[0]
    finally:
        cuda_ext.get_extension.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_cuda_backend_unavailable_without_cuda(caplog):
    cuda_ext.get_extension.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cuda_ext.__name__):
            assert cuda_ext.get_extension() is None
            assert cuda_ext.get_extension() is None  # cached: one warning only
        assert len([r for r in caplog.records if r.name == cuda_ext.__name__]) == 1
        x, w, mask, _ = _problem(2, 8, 40, torch.float32)
        with pytest.raises(RuntimeError, match="CUDA extension"):
            bitmap_linear(x, BitmapWeight.from_dense(w, mask), backend="cuda")
    finally:
        cuda_ext.get_extension.cache_clear()


def test_benchmark_rows_on_cpu():
    from benchmarks.bench_small_row import run
    from sparse_rnnt.kernels.small_row.cpu import get_cpu_extension

    rows = run("cpu", quick=True)
    ours = {"ours-cpu"} if get_cpu_extension() is not None else set()
    assert {r["provider"] for r in rows} == {"dense", "torch-csr", "torch-bsr", "bitmap-torch"} | ours
    for row in rows:
        n, k = row["N"], row["K"]
        assert row["dense_bytes"] == 4 * n * k and row["ms"] > 0
        assert row["ideal_ratio"] == pytest.approx(row["dense_bytes"] / row["format_bytes"])
        dense = next(d for d in rows if d["shape"] == row["shape"] and d["provider"] == "dense")
        assert row["achieved_fraction"] == pytest.approx(dense["ms"] / row["ms"] / row["ideal_ratio"])
        if row["provider"] == "bitmap-torch":  # 30% of fp32 values + 1 bit + 1/4 bit per weight, roughly
            assert 0.25 * 4 * n * k < row["format_bytes"] < 0.35 * 4 * n * k + n * k / 8 + n * k / 32 + 8 * n
        # cold: the same calls rotated over copies of the weight, against dense timed so
        assert row["cold_ms"] > 0 and row["graph_ms"] is None
        dense_cold = next(d["cold_ms"] for d in rows if d["shape"] == row["shape"] and d["provider"] == "dense")
        assert row["cold_speedup"] == pytest.approx(dense_cold / row["cold_ms"])
        if row["provider"] == "ours-cpu":  # the bitmap weight and a uint16 column per kept value
            bitmap = next(d for d in rows if d["shape"] == row["shape"] and d["provider"] == "bitmap-torch")
            assert 0.25 * 2 * n * k < row["format_bytes"] - bitmap["format_bytes"] < 0.35 * 2 * n * k
        if row["provider"] == "torch-csr":  # fp32 values + int64 column indices
            assert 0.25 * 12 * n * k < row["format_bytes"] < 0.35 * 12 * n * k + 8 * (n + 1)


# ----------------------------------------------------------------------------- CUDA, real shapes

EMFORMER = [(512, 2048), (2048, 512), (768, 3072), (3072, 768)]  # (N, K): base / paper-187m FFN


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", EMFORMER)
@pytest.mark.parametrize("r", [1, 8, 33, 64, 130])
def test_cuda_real_shapes(r, n, k, dtype):
    x, w, mask, b = _problem(r, n, k, dtype, density=0.3, device=DEV)
    bw = BitmapWeight.from_dense(w, mask)
    with torch.no_grad():
        assert_linear_close_to(bitmap_linear(x, bw, b), x, w * mask, b, "bitmap triton")
        if cuda_ext.get_extension() is not None:
            assert_linear_close_to(bitmap_linear(x, bw, b, backend="cuda"), x, w * mask, b, "bitmap cuda")
        x, w, mask, b = _problem(r, n, k, dtype, density=0.3, device=DEV, block=(16, 16))
        bs = BsrWeight.from_dense(w, mask, (16, 16))
        assert_linear_close_to(bsr_linear(x, bs, b), x, w * mask, b, "bsr triton")
        assert_linear_close_to(bsr_linear(x, bs, b, backend="torch-bsr"), x, w * mask, b, "torch-bsr")


def test_formats_move_between_devices_and_count_their_bytes():
    _, w, mask, _ = _problem(3, 37, 70, torch.float32, seed=40, block=(4, 8))
    for packed in (BitmapWeight.from_dense(w, mask, tile=64), BsrWeight.from_dense(w, mask, blocksize=(4, 8))):
        moved = packed.to("meta")
        assert moved.device.type == "meta" and moved.dtype == packed.dtype and moved.shape == packed.shape
        assert type(moved) is type(packed) and moved.tensors().keys() == packed.tensors().keys()
        assert getattr(moved, "tile", None) == getattr(packed, "tile", None)
        back = packed.to("cpu")
        assert all(torch.equal(a, b) for a, b in zip(back.tensors().values(), packed.tensors().values(), strict=True))
        assert packed.nbytes == sum(t.numel() * t.element_size() for t in packed.tensors().values())
        assert torch.equal(back.to_dense(), packed.to_dense())
