"""Compact sparse weight formats for exported models, and PyTorch references of their matmuls.

Two formats of a pruned ``Linear`` weight ``W [N, K]`` (out, in) with a keep mask ``M [N, K]``:

- :class:`BitmapWeight` (unstructured): one bit per weight plus the kept values;
- :class:`BsrWeight` (block sparse): kept ``(bh, bw)`` blocks, as in torch's BSR layout.

Both have ``from_dense`` / ``to_dense`` (exact), ``tensors()`` (a flat dict for safetensors),
``from_tensors`` (validates everything and raises ``ValueError`` on any inconsistency, so a
tampered artifact can never make a kernel read out of bounds) and ``nbytes`` (bytes stored).

The references ``bitmap_linear_ref`` / ``bsr_linear_ref`` compute ``y = x Wᵀ + b`` by densifying;
``bitmap_linear_gather`` computes it directly from the stored tensors (no dense weight), as an
independent check of the layout.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FLOAT_DTYPES",
    "BitmapWeight",
    "BsrWeight",
    "bitmap_linear_gather",
    "bitmap_linear_ref",
    "bsr_linear_ref",
    "check_linear_inputs",
    "pack_bits",
    "popcount32",
    "unpack_bits",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------- bit helpers


def pack_bits(mask: Tensor) -> Tensor:
    """Bool ``[N, K]`` -> int32 words ``[N, ceil(K/32)]``: bit ``j`` of word ``i`` is column ``32 i + j``.

    Bits past ``K`` in the last word are zero.
    """
    n, k = mask.shape
    n_words = (k + 31) // 32
    padded = torch.zeros(n, n_words * 32, dtype=torch.int64, device=mask.device)
    padded[:, :k] = mask.to(torch.int64)
    weights = torch.arange(32, device=mask.device, dtype=torch.int64)
    words = (padded.view(n, n_words, 32) << weights).sum(-1)  # in [0, 2^32)
    # Reinterpret as signed int32 (two's complement), the dtype kernels read.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_bits(words: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_bits`: int32 ``[N, W]`` -> bool ``[N, k]`` (``k <= 32 W``)."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int64)
    bits = (words.to(torch.int64)[:, :, None] >> shifts) & 1
    return bits.reshape(words.shape[0], words.shape[1] * 32)[:, :k].bool()  # no -1: N may be 0


def popcount32(words: Tensor) -> Tensor:
    """Number of set bits of each int32 word, as int64, same shape."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    count = torch.zeros_like(w)
    for _ in range(32):
        count += w & 1
        w = w >> 1
    return count


# ----------------------------------------------------------------------------- validation


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _get(tensors: dict[str, Tensor], name: str, fmt: str) -> Tensor:
    _require(name in tensors, f"{fmt}: missing tensor {name!r} (have {sorted(tensors)})")
    t = tensors[name]
    _require(isinstance(t, Tensor), f"{fmt}: {name!r} is not a tensor")
    return t


def _check_shape(shape: Any, fmt: str) -> tuple[int, int]:
    ok = isinstance(shape, (tuple, list)) and len(shape) == 2 and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    )
    _require(ok, f"{fmt}: shape must be two non-negative ints (N, K), got {shape!r}")
    return int(shape[0]), int(shape[1])


def _check_dense_inputs(weight: Tensor, mask: Tensor, fmt: str) -> None:
    _require(weight.dim() == 2, f"{fmt}: weight must be [N, K], got shape {tuple(weight.shape)}")
    _require(mask.shape == weight.shape, f"{fmt}: mask shape {tuple(mask.shape)} != weight {tuple(weight.shape)}")
    _require(mask.dtype == torch.bool, f"{fmt}: mask must be bool, got {mask.dtype}")
    _require(weight.dtype in FLOAT_DTYPES, f"{fmt}: weight dtype {weight.dtype} not in {FLOAT_DTYPES}")


# ----------------------------------------------------------------------------- bitmap


class _Stored(ABC):
    """What both formats derive from their stored tensors (:meth:`tensors`, keyed by field name)."""

    values: Tensor

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by field name."""

    @property
    def nbytes(self) -> int:
        """Bytes stored (every tensor of :meth:`tensors`)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the values."""
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.values.device

    def to(self, device: torch.device | str) -> Self:
        """The same weight on ``device``."""
        return dataclasses.replace(self, **{k: t.to(device) for k, t in self.tensors().items()})


@dataclass
class BitmapWeight(_Stored):
    """Unstructured sparse weight ``[N, K]``: a bitmap plus the kept values, tiled along K.

    Layout (all tensors contiguous, on one device):

    - ``bits`` int32 ``[N, ceil(K/32)]``: bit ``j`` (LSB = 0) of word ``i`` of row ``n`` is set iff
      ``W[n, 32 i + j]`` is kept; bits of columns ``>= K`` are zero.
    - ``values`` ``[nnz]`` (the weight's dtype): kept weights in row-major order (row 0 by
      increasing column, then row 1, ...).
    - ``offsets`` int32 ``[N, ceil(K/T)]``: ``offsets[n, t]`` is the index in ``values`` of the
      first kept weight of row ``n`` at a column ``>= t T`` (a kernel handling tile ``t`` starts
      there). The value of a kept ``W[n, c]`` is ``values[offsets[n, c // T] + p]`` where ``p`` is
      the number of set bits of row ``n`` in columns ``[T (c // T), c)`` (a popcount prefix).

    ``tile`` (``T``) is a multiple of 32 and a power of two (32..1024; default 128: 32 bits of
    offsets per 128 weights, 0.25 bit per weight). ``nnz < 2^31``. Storage: ``K/8`` bytes of
    bits plus ``4 ceil(K/T)`` bytes of offsets per row, plus the values.
    """

    bits: Tensor
    values: Tensor
    offsets: Tensor
    shape: tuple[int, int]
    tile: int = 128

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor, tile: int = 128) -> BitmapWeight:
        """Keep ``weight[mask]`` (``weight [N, K]``, ``mask`` bool ``[N, K]``); other values are dropped."""
        _check_dense_inputs(weight, mask, "BitmapWeight")
        _check_tile(tile)
        n, k = weight.shape
        bits = pack_bits(mask)
        values = weight[mask].contiguous()  # boolean indexing is row-major
        _require(values.numel() <= _INT32_MAX, "BitmapWeight: more than 2^31-1 kept weights")
        offsets = _tile_offsets(bits, k, tile)
        return cls(bits=bits, values=values, offsets=offsets, shape=(n, k), tile=tile)

    def to_dense(self) -> Tensor:
        """Dense ``[N, K]`` weight, zeros where pruned (exact)."""
        n, k = self.shape
        mask = unpack_bits(self.bits, k)
        out = torch.zeros(n, k, dtype=self.values.dtype, device=self.values.device)
        out[mask] = self.values
        return out

    def mask(self) -> Tensor:
        """Bool keep mask ``[N, K]``."""
        return unpack_bits(self.bits, self.shape[1])

    def tensors(self) -> dict[str, Tensor]:
        """``{"bits", "values", "offsets"}`` (shape and tile are passed to :meth:`from_tensors`)."""
        return {"bits": self.bits, "values": self.values, "offsets": self.offsets}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], shape: tuple[int, int], tile: int = 128) -> BitmapWeight:
        """Rebuild from :meth:`tensors`; raises ``ValueError`` on any inconsistency."""
        fmt = "BitmapWeight"
        n, k = _check_shape(shape, fmt)
        _check_tile(tile)
        bits = _get(tensors, "bits", fmt)
        values = _get(tensors, "values", fmt)
        offsets = _get(tensors, "offsets", fmt)
        n_words, n_tiles = (k + 31) // 32, (k + tile - 1) // tile
        _require(bits.dtype == torch.int32, f"{fmt}: bits dtype must be int32, got {bits.dtype}")
        _require(offsets.dtype == torch.int32, f"{fmt}: offsets dtype must be int32, got {offsets.dtype}")
        _require(values.dtype in FLOAT_DTYPES, f"{fmt}: values dtype {values.dtype} not in {FLOAT_DTYPES}")
        _require(tuple(bits.shape) == (n, n_words), f"{fmt}: bits shape {tuple(bits.shape)} != {(n, n_words)}")
        _require(tuple(offsets.shape) == (n, n_tiles),
                 f"{fmt}: offsets shape {tuple(offsets.shape)} != {(n, n_tiles)}")
        _require(values.dim() == 1, f"{fmt}: values must be 1-D, got shape {tuple(values.shape)}")
        _require(bits.device == values.device == offsets.device, f"{fmt}: tensors on different devices")
        if k % 32:
            tail = bits[:, -1].to(torch.int64) & 0xFFFFFFFF
            _require(bool((tail >> (k % 32) == 0).all()), f"{fmt}: bits set past column K={k}")
        nnz = int(popcount32(bits).sum()) if bits.numel() else 0
        _require(nnz == values.numel(),
                 f"{fmt}: bitmap has {nnz} kept weights but values has {values.numel()} entries")
        expected = _tile_offsets(bits, k, tile)
        bad = (expected != offsets).nonzero()
        if bad.numel():
            r, t = (int(v) for v in bad[0])
            raise ValueError(f"{fmt}: offsets[{r}, {t}] = {int(offsets[r, t])}, expected {int(expected[r, t])} "
                             "(the popcount prefix of the bitmap)")
        return cls(bits=bits.contiguous(), values=values.contiguous(), offsets=offsets.contiguous(),
                   shape=(n, k), tile=tile)

    @property
    def nnz(self) -> int:
        """Number of kept weights."""
        return self.values.numel()



def _check_tile(tile: int) -> None:
    ok = isinstance(tile, int) and 32 <= tile <= 1024 and tile & (tile - 1) == 0
    _require(ok, f"BitmapWeight: tile must be a power of two in [32, 1024], got {tile!r}")


def _tile_offsets(bits: Tensor, k: int, tile: int) -> Tensor:
    """int32 ``[N, ceil(k/tile)]``: global value index of each (row, tile)'s first kept weight."""
    n, n_words = bits.shape
    n_tiles = (k + tile - 1) // tile
    wpt = tile // 32
    counts = popcount32(bits)
    padded = torch.zeros(n, n_tiles * wpt, dtype=torch.int64, device=bits.device)
    padded[:, :n_words] = counts
    per_tile = padded.view(n, n_tiles, wpt).sum(-1).reshape(-1)  # row-major (row, tile)
    starts = torch.cumsum(per_tile, 0) - per_tile
    return starts.view(n, n_tiles).to(torch.int32)


# ----------------------------------------------------------------------------- BSR


@dataclass
class BsrWeight(_Stored):
    """Block-sparse weight ``[N, K]`` with blocks ``(bh, bw)``, laid out like torch's BSR.

    - ``crow_indices`` int32 ``[ceil(N/bh) + 1]``: blocks of block row ``i`` are
      ``crow_indices[i] .. crow_indices[i+1]`` (starts at 0, non-decreasing, ends at ``nblocks``);
    - ``col_indices`` int32 ``[nblocks]``: block column of each block, strictly increasing within
      a block row, in ``[0, ceil(K/bw))``;
    - ``values`` ``[nblocks, bh, bw]``: the blocks; pruned weights inside a kept block are zero.

    A block is kept when the mask keeps any weight in it. Edge blocks are padded: ``N`` and ``K``
    are rounded up to multiples of ``bh`` and ``bw`` and the padding entries are zero (validated).
    """

    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor
    shape: tuple[int, int]

    @property
    def blocksize(self) -> tuple[int, int]:
        """``(bh, bw)``."""
        return int(self.values.shape[1]), int(self.values.shape[2])

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor, blocksize: tuple[int, int] = (16, 16)) -> BsrWeight:
        """Blocks of ``weight * mask`` (``[N, K]``) holding any kept weight."""
        _check_dense_inputs(weight, mask, "BsrWeight")
        bh, bw = _check_blocksize(blocksize)
        n, k = weight.shape
        nb_r, nb_c = (n + bh - 1) // bh, (k + bw - 1) // bw
        padded = torch.zeros(nb_r * bh, nb_c * bw, dtype=weight.dtype, device=weight.device)
        padded[:n, :k] = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
        pmask = torch.zeros(nb_r * bh, nb_c * bw, dtype=torch.bool, device=weight.device)
        pmask[:n, :k] = mask
        blocks = padded.view(nb_r, bh, nb_c, bw).permute(0, 2, 1, 3)  # [nb_r, nb_c, bh, bw]
        keep = pmask.view(nb_r, bh, nb_c, bw).any(dim=3).any(dim=1)  # [nb_r, nb_c]
        crow = torch.zeros(nb_r + 1, dtype=torch.int64, device=weight.device)
        crow[1:] = torch.cumsum(keep.sum(1), 0)
        rows, cols = keep.nonzero(as_tuple=True)  # row-major, so columns ascend within a row
        return cls(crow_indices=crow.to(torch.int32), col_indices=cols.to(torch.int32),
                   values=blocks[rows, cols].contiguous(), shape=(n, k))

    def to_dense(self) -> Tensor:
        """Dense ``[N, K]`` (exact)."""
        n, k = self.shape
        bh, bw = self.blocksize
        nb_r, nb_c = (n + bh - 1) // bh, (k + bw - 1) // bw
        counts = (self.crow_indices[1:] - self.crow_indices[:-1]).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(nb_r, device=counts.device), counts)
        blocks = torch.zeros(nb_r, nb_c, bh, bw, dtype=self.values.dtype, device=self.values.device)
        blocks[rows, self.col_indices.to(torch.int64)] = self.values
        return blocks.permute(0, 2, 1, 3).reshape(nb_r * bh, nb_c * bw)[:n, :k].contiguous()

    def tensors(self) -> dict[str, Tensor]:
        """``{"crow_indices", "col_indices", "values"}`` (shape passed to :meth:`from_tensors`)."""
        return {"crow_indices": self.crow_indices, "col_indices": self.col_indices, "values": self.values}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], shape: tuple[int, int],
                     blocksize: tuple[int, int] | None = None) -> BsrWeight:
        """Rebuild from :meth:`tensors`; raises ``ValueError`` on any inconsistency.

        ``blocksize`` (optional) must match the values' block shape when given.
        """
        fmt = "BsrWeight"
        n, k = _check_shape(shape, fmt)
        crow = _get(tensors, "crow_indices", fmt)
        col = _get(tensors, "col_indices", fmt)
        values = _get(tensors, "values", fmt)
        _require(crow.dtype == torch.int32, f"{fmt}: crow_indices dtype must be int32, got {crow.dtype}")
        _require(col.dtype == torch.int32, f"{fmt}: col_indices dtype must be int32, got {col.dtype}")
        _require(values.dtype in FLOAT_DTYPES, f"{fmt}: values dtype {values.dtype} not in {FLOAT_DTYPES}")
        _require(values.dim() == 3, f"{fmt}: values must be [nblocks, bh, bw], got {tuple(values.shape)}")
        bh, bw = _check_blocksize((int(values.shape[1]), int(values.shape[2])))
        if blocksize is not None:
            _require(tuple(blocksize) == (bh, bw), f"{fmt}: blocksize {tuple(blocksize)} != values' {(bh, bw)}")
        _require(crow.device == col.device == values.device, f"{fmt}: tensors on different devices")
        nb_r, nb_c = (n + bh - 1) // bh, (k + bw - 1) // bw
        nblocks = values.shape[0]
        _require(tuple(crow.shape) == (nb_r + 1,), f"{fmt}: crow_indices shape {tuple(crow.shape)} != {(nb_r + 1,)}")
        _require(tuple(col.shape) == (nblocks,),
                 f"{fmt}: col_indices has {col.numel()} entries, values has {nblocks} blocks")
        c = crow.to(torch.int64)
        _require(int(c[0]) == 0, f"{fmt}: crow_indices[0] = {int(c[0])}, expected 0")
        _require(int(c[-1]) == nblocks, f"{fmt}: crow_indices[-1] = {int(c[-1])}, expected nblocks = {nblocks}")
        steps = c[1:] - c[:-1]
        if (steps < 0).any():
            i = int((steps < 0).nonzero()[0])
            raise ValueError(f"{fmt}: crow_indices decreases at block row {i} ({int(c[i])} -> {int(c[i + 1])})")
        ci = col.to(torch.int64)
        if nblocks:
            bad = (ci < 0) | (ci >= nb_c)
            if bad.any():
                j = int(bad.nonzero()[0])
                raise ValueError(f"{fmt}: col_indices[{j}] = {int(ci[j])} out of range [0, {nb_c})")
            # Strictly increasing within each block row (no duplicates, sorted as kernels assume).
            same_row = torch.ones(nblocks, dtype=torch.bool, device=ci.device)
            same_row[c[1:-1][(c[1:-1] > 0) & (c[1:-1] < nblocks)]] = False
            same_row[0] = False
            bad = same_row[1:] & (ci[1:] <= ci[:-1]) if nblocks > 1 else torch.zeros(0, dtype=torch.bool)
            if bad.any():
                j = int(bad.nonzero()[0]) + 1
                raise ValueError(f"{fmt}: col_indices not strictly increasing within a block row at {j}")
        out = cls(crow_indices=crow.contiguous(), col_indices=col.contiguous(), values=values.contiguous(),
                  shape=(n, k))
        if nblocks and (n % bh or k % bw):
            # Padding past the matrix edge must be zero: to_dense drops it, kernels must agree.
            counts = steps
            rows = torch.repeat_interleave(torch.arange(nb_r, device=ci.device), counts)
            r_idx = rows[:, None] * bh + torch.arange(bh, device=ci.device)  # [nblocks, bh]
            c_idx = ci[:, None] * bw + torch.arange(bw, device=ci.device)  # [nblocks, bw]
            outside = (r_idx[:, :, None] >= n) | (c_idx[:, None, :] >= k)
            _require(not bool((values[outside] != 0).any()), f"{fmt}: nonzero padding past the {n}x{k} edge")
        return out

    @property
    def nnz_blocks(self) -> int:
        """Number of stored blocks."""
        return int(self.values.shape[0])


    def to_torch_bsr(self) -> Tensor:
        """PyTorch sparse BSR tensor of the padded ``[ceil(N/bh) bh, ceil(K/bw) bw]`` matrix."""
        n, k = self.shape
        bh, bw = self.blocksize
        size = ((n + bh - 1) // bh * bh, (k + bw - 1) // bw * bw)
        with warnings.catch_warnings():  # "BSR support is in beta"; invariants were validated
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_bsr_tensor(self.crow_indices, self.col_indices, self.values, size=size,
                                           check_invariants=False)


def _check_blocksize(blocksize: tuple[int, int]) -> tuple[int, int]:
    ok = isinstance(blocksize, (tuple, list)) and len(blocksize) == 2 and all(
        isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 256 for b in blocksize
    )
    _require(ok, f"BsrWeight: blocksize must be two ints in [1, 256], got {blocksize!r}")
    return int(blocksize[0]), int(blocksize[1])


# ----------------------------------------------------------------------------- references


def check_linear_inputs(x: Tensor, shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
                        bias: Tensor | None, op: str) -> None:
    """Raise ``ValueError`` unless ``x [*, K]`` and ``bias [N]`` match a ``[N, K]`` weight."""
    n, k = shape
    _require(x.dim() >= 1 and x.shape[-1] == k, f"{op}: x last dim {tuple(x.shape)[-1:]} != K = {k}")
    _require(x.dtype == dtype, f"{op}: x dtype {x.dtype} != weight dtype {dtype}")
    _require(x.device == device, f"{op}: x on {x.device}, weight on {device}")
    if bias is not None:
        _require(tuple(bias.shape) == (n,), f"{op}: bias shape {tuple(bias.shape)} != ({n},)")
        _require(bias.dtype == dtype and bias.device == device, f"{op}: bias must be {dtype} on {device}")


def prepare_inference_inputs(x: Tensor, w: BitmapWeight | BsrWeight, bias: Tensor | None, op: str,
                             backends: str) -> tuple[Tensor, Tensor | None]:
    """Checks shared by the inference-only kernel backends; ``x [*, K]`` -> contiguous ``[R, K]``
    rows and a contiguous bias. Raises ``ValueError`` on bad inputs or when autograd is wanted."""
    check_linear_inputs(x, w.shape, w.dtype, w.device, bias, op)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError(f"{op}: the {backends} backends are inference-only (no autograd); "
                         "call under torch.no_grad() or use backend='torch'")
    rows = math.prod(x.shape[:-1])  # not -1, which K = 0 leaves undetermined
    return x.reshape(rows, w.shape[1]).contiguous(), (bias.contiguous() if bias is not None else None)


def bitmap_linear_ref(x: Tensor, w: BitmapWeight, bias: Tensor | None = None) -> Tensor:
    """``y [*, N] = x [*, K] Wᵀ + b`` with ``W = w.to_dense()`` (``F.linear``)."""
    check_linear_inputs(x, w.shape, w.dtype, w.device, bias, "bitmap_linear")
    return F.linear(x, w.to_dense(), bias)


def bitmap_linear_gather(x: Tensor, w: BitmapWeight, bias: Tensor | None = None) -> Tensor:
    """``y [*, N] = x [*, K] Wᵀ + b`` straight from the stored tensors, in fp32 then cast.

    Every kept value's column is recovered from the bitmap and its index from ``offsets`` plus a
    within-tile popcount prefix (the kernels' lookup), without densifying ``W``.
    """
    check_linear_inputs(x, w.shape, w.dtype, w.device, bias, "bitmap_linear")
    n, k = w.shape
    mask = unpack_bits(w.bits, k)  # [N, K]
    rows, cols = mask.nonzero(as_tuple=True)
    tile_idx = cols // w.tile
    # Popcount prefix inside each (row, tile): rank of the kept weight among its tile's kept ones.
    within = torch.cumsum(mask.to(torch.int64), 1) - mask.to(torch.int64)  # kept before column c
    before_tile = _count_before(mask, rows, tile_idx * w.tile)
    idx = w.offsets.to(torch.int64)[rows, tile_idx] + within[rows, cols] - before_tile
    vals = w.values.float()[idx]
    x2 = x.reshape(-1, k).float()
    y = torch.zeros(x2.shape[0], n, dtype=torch.float32, device=x.device)
    y.index_add_(1, rows, x2[:, cols] * vals)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _count_before(mask: Tensor, rows: Tensor, col: Tensor) -> Tensor:
    """Kept weights of row ``rows[i]`` in columns ``[0, col[i])``."""
    csum = torch.zeros(mask.shape[0], mask.shape[1] + 1, dtype=torch.int64, device=mask.device)
    csum[:, 1:] = torch.cumsum(mask.to(torch.int64), 1)
    return csum[rows, col]


def bsr_linear_ref(x: Tensor, w: BsrWeight, bias: Tensor | None = None) -> Tensor:
    """``y [*, N] = x [*, K] Wᵀ + b`` with ``W = w.to_dense()`` (``F.linear``)."""
    check_linear_inputs(x, w.shape, w.dtype, w.device, bias, "bsr_linear")
    return F.linear(x, w.to_dense(), bias)
