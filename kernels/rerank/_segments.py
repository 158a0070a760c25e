"""What the re-rank kernels share: the segments of a selection, their launch tables, and the
Triton helpers that read a tile of a segment (keys, candidates, unit sizes).

Private to ``sparse_rnnt.kernels.rerank``: :mod:`.select` (histogram / radix select) and
:mod:`.window` (sampled window select) both launch over the same tables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_rnnt.errors import UserError

INT32_MAX = 2**31 - 1
_NAN_ABOVE = {torch.float32: 0x7F800000, torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
_INTERP = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _keys(src, offs, valid, WIDE: tl.constexpr):
    """Load raw bits and return (bits, key): key = bit pattern of |x| as int32."""
    bits = tl.load(src + offs, mask=valid, other=0)
    key = bits.to(tl.int32) & (0x7FFFFFFF if WIDE else 0x7FFF)
    return bits, key


@triton.jit
def _segment_tile(pid, tile_seg, first_tile, seg_n, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False):
    """(segment, element offsets, validity) of tile ``pid`` of a launch over several segments.
    ``ALIGNED``: every segment's length is a multiple of 16 (see :func:`_ptr`)."""
    seg = tl.load(tile_seg + pid).to(tl.int64)
    local = pid - tl.load(first_tile + seg)
    offs = local * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    n = tl.load(seg_n + seg)
    if ALIGNED:
        n = tl.multiple_of(n, 16)
    return seg, offs, offs < n


@triton.jit
def _sample_tile(pid, tile_seg, first_tile, seg_n, BLOCK: tl.constexpr, SAMPLE: tl.constexpr,
                 ALIGNED: tl.constexpr = False):
    """(segment, offsets, validity) of tile ``pid``'s sample: one of its ``SAMPLE`` chunks of
    ``BLOCK // SAMPLE`` units, chunk ``pid * 40503 % SAMPLE`` (odd multiplier: consecutive tiles
    take different chunks, so a row-per-tile tensor is not sampled in the same columns only).
    Every tensor gets ``1 / SAMPLE`` of its units in contiguous runs: a sample at a fraction of a
    pass's bytes. :func:`sample_counts` gives what it covers."""
    seg = tl.load(tile_seg + pid).to(tl.int64)
    local = pid - tl.load(first_tile + seg)
    chunk = (pid * 40503) % SAMPLE
    offs = local * BLOCK + chunk * (BLOCK // SAMPLE) + tl.arange(0, BLOCK // SAMPLE).to(tl.int64)
    n = tl.load(seg_n + seg)
    if ALIGNED:
        n = tl.multiple_of(n, 16)
    return seg, offs, offs < n


def sample_counts(n: int, tiles: int, first: int, block: int, sample: int) -> tuple[int, int]:
    """(units, chunks holding at least one unit) that :func:`_sample_tile` reads of a segment of
    ``n`` units in ``tiles`` tiles from launch tile ``first``: every tile but the last is full."""
    if tiles == 0:
        return 0, 0
    ch = block // sample
    pid = first + tiles - 1
    start = (tiles - 1) * block + (pid * 40503 % sample) * ch
    last = min(max(n - start, 0), ch)
    return (tiles - 1) * ch + last, tiles - 1 + int(last > 0)


@triton.jit
def _ptr(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr = False):
    """A segment's address from a table as a pointer to ``DTYPE``. ``ALIGNED`` (the launch's
    addresses are 16-byte aligned and its lengths multiples of 16, :attr:`_Launch.aligned`) tells
    the compiler so, on the pointer: an address read from memory proves nothing, and without the
    hint every load and store of a tile was one element wide (``ld.global.b32``, ``st.global.b8``
    in the sm_90 PTX; a hint on the integer address does not reach the pointer)."""
    p = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _candidates(tab_cand, seg, offs, valid, HAS_CAND: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Valid units that may be kept: a segment's candidate bytes when it has any (address != 0)."""
    c = valid
    if HAS_CAND:
        addr = tl.load(tab_cand + seg)
        cand = _ptr(addr, tl.uint8, ALIGNED)
        c = c & (tl.load(cand + offs, mask=valid & (addr != 0), other=1) != 0)
    return c


@triton.jit
def _unit_weights(tab_size, seg, offs, valid, HAS_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Element count of each unit: loaded for blocks, 1 for single weights."""
    if HAS_SIZE:
        size = tl.load(tab_size + seg).to(tl.pointer_type(tl.int32))
        return tl.load(size + offs, mask=valid, other=0)
    return tl.full((BLOCK,), 1, tl.int32)


@triton.jit
def _src(tab_src, seg, WIDE: tl.constexpr, ALIGNED: tl.constexpr = False):
    return _ptr(tl.load(tab_src + seg), tl.int32 if WIDE else tl.int16, ALIGNED)


def _tile(tile: int | None) -> tuple[int, int]:
    """(elements per program, num_warps). Big tiles under the interpreter: fewer Python programs."""
    if tile is not None:
        if tile < 16 or tile & (tile - 1):
            raise ValueError(f"tile must be a power of two >= 16, got {tile}")
        return tile, 4
    return (8192, 4) if _INTERP else (4096, 8)


def _bits(t: Tensor) -> Tensor:
    """Integer view of a contiguous float tensor (same bits), flat."""
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16).reshape(-1)


@dataclass
class Segment:
    """One tensor of units taking part in a selection.

    ``src``: flat int32/int16 bit view of the scores' source (weights, or float32 block scores);
    ``cand``: flat uint8 (1 = may be kept) or None; ``size``: flat int32 unit weights or None
    (= 1); ``out``: flat uint8 output mask; ``group``: which selection it belongs to;
    ``nan_above``: keys above this are NaN; ``apply``: zero ``src`` where pruned; ``name``: the
    tensor's name, for error messages.
    """

    src: Tensor
    cand: Tensor | None
    size: Tensor | None
    out: Tensor
    group: int
    nan_above: int
    apply: bool = False
    name: str = ""

    @property
    def wide(self) -> bool:
        return self.src.dtype == torch.int32

    def has_nan(self) -> bool:
        """Whether the source holds a NaN (one pass; for error messages only)."""
        magnitude = self.src & (0x7FFFFFFF if self.wide else 0x7FFF)
        return bool((magnitude > self.nan_above).any())


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on ``device`` without waiting for the work queued there: a blocking
    copy from pageable memory synchronizes the stream, one from pinned memory need not (PyTorch's
    caching host allocator keeps the pinned block until the copy is done)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _Launch:
    """One grid over every segment of a key width (16 or 32 bits): per-segment tables (addresses,
    sizes, groups, flags) and, per tile, its segment. Triton takes no list of pointers, so the
    kernels read each tile's tensors through these address tables (one launch per pass instead of
    one per tensor)."""

    def __init__(self, segments: list[Segment], index: list[int], grids: list[int], block: int,
                 device: torch.device) -> None:
        segs = [segments[i] for i in index]
        self.index = index
        self.wide = segs[0].wide
        self.has_cand = any(s.cand is not None for s in segs)
        self.has_size = segs[0].size is not None
        if any((s.size is not None) != self.has_size for s in segs):
            raise ValueError("segments of one selection must all have unit sizes, or none")
        tiles = [grids[i] for i in index]
        first = [0]
        for t in tiles[:-1]:
            first.append(first[-1] + t)
        self.tiles = sum(tiles)
        # Host copies of what the tables hold per segment: (group, units, tiles, first tile).
        self.host = [(s.group, s.src.numel(), t, f) for s, t, f in zip(segs, tiles, first, strict=True)]
        self.units = sum(s.src.numel() for s in segs)
        base = [0]  # each segment's first unit in the launch's flat order
        for s in segs[:-1]:
            base.append(base[-1] + s.src.numel())

        def addr(t: Tensor | None) -> int:
            return 0 if t is None else t.data_ptr()

        table = torch.tensor([
            [addr(s.src) for s in segs], [addr(s.cand) for s in segs], [addr(s.size) for s in segs],
            [addr(s.out) for s in segs], [s.src.numel() for s in segs], first,
            [s.group for s in segs], [s.nan_above for s in segs], [int(s.apply) for s in segs], base,
        ], dtype=torch.int64)
        tile_seg = torch.repeat_interleave(torch.arange(len(segs), dtype=torch.int64), torch.tensor(tiles))
        # One host-to-device copy of both, which does not wait for the device.
        both = to_device(torch.cat([table.reshape(-1), tile_seg]), device)
        (self.src, self.cand, self.size, self.out, self.n, self.first,
         self.group, self.nan_above, self.apply, self.base) = both[:table.numel()].view(table.shape).unbind(0)
        self.tile_seg = both[table.numel():]
        # Whether the kernels may assume 16-byte vectors (see _ptr): weights and masks from torch
        # allocations are, unless a view starts inside one or a length is not a multiple of 16.
        self.aligned = all(
            s.src.numel() % 16 == 0 and all(addr(t) % 16 == 0 for t in (s.src, s.cand, s.out)) for s in segs
        )

    def args(self) -> tuple[Tensor, ...]:
        return self.src, self.cand, self.size


def _check_counts(nan_count: list[int], avail: list[int], keep: list[int], what: list[str],
                  segments: list[Segment] | None = None) -> None:
    """Raise the errors the device's counts show; ``segments`` (named) let a NaN name its tensors."""
    if any(nan_count):
        g = next(i for i, c in enumerate(nan_count) if c)
        names = [s.name for s in segments or [] if s.group == g and s.name and s.has_nan()]
        where = ""
        if names and names != [what[g]]:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            where = f" (NaN in {', '.join(names[:3])}{more})"
        raise UserError(f"cannot rank {what[g]}{where}: it contains NaN (did training diverge?)")
    for g, (k, a) in enumerate(zip(keep, avail, strict=True)):
        if k > a:
            raise UserError(f"{what[g]}: {k} weights must be kept but only {a} are candidates")
