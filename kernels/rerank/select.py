"""Exact magnitude re-ranking (mask selection) by radix select, in Triton.

Bit-identical to ``sparse_rnnt.pruning.ranking.magnitude_masks`` (that module's docstring is the
contract: ``P = floor(s * total + 0.5)`` pruned, ``K = total - P`` kept; ties kept by lower flat
index over the tensors concatenated in dict order; ``0.0`` and ``-0.0`` tie; candidates restrict
what may be kept while ``K`` comes from the full size; blocks ranked by their squared L2 norm
summed sequentially row-major, kept in rank order until the kept element count is ``>= K``; N:M
per input-dim group with tail quota ``ceil(n * L / m)``; NaN raises).

How (unstructured and block; ``U`` units = weights or blocks, one *group* = one selection):

- **Keys.** A score ``|w| >= 0`` is ranked by its IEEE bit pattern with the sign cleared, which
  orders exactly like the value (NaN patterns sort above ``inf``, so they are detected, not
  ranked). float32 weights and block scores give 31-bit keys, bf16/fp16 weights 15-bit keys
  (the reference ranks half precision in float32; the conversion is exact and monotonic, so the
  order and the ties are the same). The kernels read the weights through an integer view, so
  they are dtype-agnostic and ``apply`` stores the bit pattern 0 (``+0.0``).
- **Pass 1** (every dtype): a global histogram of 32768 bins + 1 NaN bin by atomics, spread
  over private copies (program id mod copies); bin 0 (zeros: the pruned weights) is summed per
  program and added once (float32: the high 15 key bits; 16-bit: the whole key, so one pass is
  exact). Candidates only (NaN counted for every weight, as the reference checks all). A fold
  kernel sums the copies, totals each chunk of bins (256-1024 bins, so that the fold has about
  256 programs: :func:`fold_layout`) and zeroes the copies for the next pass; a search kernel
  (one program per group: the chunk totals from the top, then one chunk's bins)
  finds the bin holding the K-th largest and the count strictly above it, and flags NaN or too
  few candidates in a device counter.
- **Pass 2** (31-bit keys only): histogram of the low 16 bits of the keys inside the selected high
  bin; same search. Now the threshold key ``t`` and ``need = K - count(key > t)`` are exact.
- **Sampled bracket** (a GPU default for 16-bit keys, :class:`_AtomicSelect`): pass 1 first histograms 1/16 of
  every tile, and then takes atomics only for the candidates in the range of bins the sample
  brackets around the K-th largest, counting the others per program into bin 0 and the free top
  bin (exact totals). For 31-bit keys it also counts the whole keys of 32 bins around the
  sample's estimate, whose slice replaces pass 2 when it holds the selected bin. A missed
  bracket or slice gates the exact pass on a device counter: the result never depends on it.
- **Ties.** If the histogram says every candidate with ``key == t`` fits (``ties == need``, the
  usual float32 case; a device flag per group) the tie-count kernel returns at once for that
  group. Otherwise it counts ties per tile, a one-program scan kernel (which does nothing when
  every group's ties fit) gives the exclusive prefix over the tiles in flat order over the
  group's tensors (several groups: the tiles sorted by group, each count written at its tile's
  slot), and the final kernel ranks its ties with an in-tile cumsum from there.
- **Final pass**: ``keep = cand & (key > t | (key == t & tie_rank < need))``, written as a uint8
  mask, and (``apply=True``) a masked store of 0 into the pruned weights that are not zero
  already, so kept weights stay bit-identical. Two launches: one compiled for groups whose ties
  all fit (no scan), one for the others; each program skips the tiles of the other case. Neither
  writes anything when the error counter is set: the host raises then, with every weight and
  mask as it was.
- **Blocks**: a kernel computes the float32 squared norms (squares added one by one in row-major
  order within the block, FMA contraction disabled so ``acc + x*x`` rounds twice like the torch
  reference); block units then go through the same passes with every histogram count, tie count
  and tie rank *weighted by the block's element count*: a block is kept iff the weight of the
  blocks ranked before it is ``< K``, which is the reference's "smallest prefix >= K" rule. A
  last kernel expands the block mask to elements (and applies it).
- **N:M**: one kernel per tensor; a program ranks each of its groups by pairwise comparison
  (``m x m`` per group), keeps rank < quota among candidates, and flags NaN and groups with too
  few candidates into an error counter read once per tensor.

Several tensors: every pass is ONE launch over all tensors of a key width. The kernels read each
tile's tensors through device tables of addresses (cast to pointers in the kernel, hinted
16-byte aligned when every tensor of the launch is, see ``_segments._ptr``), sizes, groups
and flags, plus a per-tile segment index, so a model with a hundred layers costs the same few
launches as one tensor (each Triton launch costs host time; the H200 run took 6.6 ms at
10M weights in 8 tensors before the atomics fix, 1.1 ms after, mostly fixed cost). Groups: global
scope = one group, per-tensor scope = one group per tensor, a ``[G, bins]`` histogram whose
searches run batched. Host syncs: none until the end of the call, where one read of the counts
raises the errors (``_AtomicSelect``), so a selection can be replayed from a CUDA graph
(:class:`RerankPlan`, which can also start from the previous threshold: ``warm_start``).

**Mask codes** (31-bit keys, single weights): the pass that last bounds the threshold (pass 2, or
a warm start's window pass) also writes each unit's mask case in 2 bits to scratch (kept above
the bound, decided inside it, pruned and to be zeroed, pruned with nothing to write), and the
mask pass reads those and only the weights inside the bound (:func:`_coded_mask_kernel`): a cold
select moves about 9.5 bytes per weight (pass 1 and 2 read 4 each, codes 1/4 out and in, the mask
1 out) where it moved 13, a warm hit 5.5 where it moved 9. Not the masks
themselves: an error must leave them as they were. Groups whose ties need ranks, and a sampled
bracket's fine path (which skips pass 2), take the plain mask pass.
``algorithm="radix"`` still syncs once per digit.

No ``triton.autotune``: the histogram kernels accumulate with atomics and the final kernel
writes the weights in place, so autotune's benchmark reruns would double count or re-zero; and
the tie and final passes must use the same tile size. Tile sizes come from :func:`_tile`.

``always_keep`` (forced weights) is not in the kernels: ``rerank_masks`` falls back to the torch
reference (``naive.py``) when it is given.
"""

from __future__ import annotations

import logging
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_rnnt.errors import UserError

from ..host import cdiv, next_power_of_2
from ..launch import DirectLauncher
from ._segments import (
    _INTERP,
    _NAN_ABOVE,
    INT32_MAX,
    Segment,
    _bits,
    _candidates,
    _check_counts,
    _keys,
    _Launch,
    _ptr,
    _sample_tile,
    _segment_tile,
    _src,
    _tile,
    _unit_weights,
    sample_counts,
    to_device,
)
from .naive import check_args, pruned_count, rerank_masks_torch
from .window import window_select

log = logging.getLogger(__name__)
ALGORITHMS = ("atomic", "radix", "window")


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")

NAN_BIN = 32768  # bins 0..32767 hold keys (or their high 15 bits); 32768 counts NaNs
_WARM_WINDOW = {True: 65536, False: 32}  # a warm start's keys around the last threshold: 31-bit, 16-bit
# Copies of a warm start's per-group counts, one per program modulo this (a power of two);
# several under the interpreter too, so that the CPU tests sum them.
_STAT_COPIES = 4 if _INTERP else 32
# Bins per fold program and search step on the interpreter (fewer, big steps); on a GPU the
# fold's chunk (fold_chunk).
_INTERP_CHUNK = 32768
# The cold pass 1's bracket (_AtomicSelect): a sample of 1/_SAMPLE of every tile, its ranks
# +- _BRACKET_SIGMAS standard deviations counted as if each sampled chunk were one draw (the worst
# case: units alike within a chunk, as a row's scale makes them), + _BRACKET_SLACK.
_SAMPLE = 16
_BRACKET_SIGMAS = 4.0
_BRACKET_SLACK = 16
_BRACKET_MIN_CHUNKS = 16  # a group sampled in fewer chunks gets no bracket (every bin)
_BRACKET_MIN_TILES = 64  # bracket=None: on for launches of at least this many tiles
_NO_RANK = 2**62  # a rank no count reaches: the bracket spans every bin
# Pass 2 folded into a bracketed pass 1 (31-bit keys): the low 16 bits of the keys in _FINE_SPAN
# pass-1 bins around the sample's estimate of the K-th largest's bin, one bin per key, in
# _FINE_COPIES private copies; only while all groups' copies fit in _FINE_BYTES.
_FINE_SPAN = 32
_FINE_COPIES = 2
_FINE_BYTES = 64 << 20


def bracket_by_default(single: bool, block: int, tiles: int, wide_keys: bool) -> bool:
    """Whether ``bracket=None`` turns the sampled bracket on (on a GPU): single weights, tiles of
    at least ``16 * _SAMPLE`` units, at least ``_BRACKET_MIN_TILES`` tiles, and 16-bit keys only.
    With 31-bit keys (float32) it made the cold select slower on the H100 (2026-11-27, device
    time: 0.372 against 0.275 ms at 10M weights, 1.062 against 0.853 ms at 63M); with 16-bit keys
    it gained at 63M (0.532 against 0.624 ms) and lost 0.02 ms at 10M."""
    return single and block >= 16 * _SAMPLE and tiles >= _BRACKET_MIN_TILES and not wide_keys


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _hist_kernel(
    tab_src, tab_cand, tab_size, tab_group, tab_nan, tile_seg, first_tile, seg_n, n_tiles,
    hist, sel_hi, live, gate, blo, bhi, group_stride, copy_stride, fine, flo, fine_group_stride,
    tab_apply, codes,
    PASS2: tl.constexpr, WIDE: tl.constexpr, HAS_CAND: tl.constexpr, HAS_SIZE: tl.constexpr,
    COPIES: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False,
    BRACKET: tl.constexpr = False, SAMPLE: tl.constexpr = 1, FINE: tl.constexpr = False,
    SPAN: tl.constexpr = 1, FCOPIES: tl.constexpr = 1, LOOP: tl.constexpr = False, CODES: tl.constexpr = False,
):
    """Histogram (weighted by unit size when given) of candidate keys, every segment of the
    launch in one grid, into copy ``program % COPIES`` of its group's ``COPIES`` histograms.
    Nothing when ``gate[0] == 0`` (a warm start found every threshold, or a bracket held it).
    ``SAMPLE > 1``: only each tile's sample chunk (:func:`_sample_tile`). ``BRACKET`` (pass 1):
    only the bins in ``[blo[g], bhi[g]]`` take atomics; the candidates below go to bin 0 and those
    above to bin 32767 (free: the top finite key's bin is 0x7F80), summed per program, so the
    total and every count from the top down to ``blo`` stay exact. ``FINE`` (with ``BRACKET``,
    31-bit keys): the candidates inside the bracket whose pass-1 bin ``b`` is in ``[flo[g],
    flo[g] + SPAN)`` are also counted by their whole key, in ``fine`` bin ``(b - flo[g]) * 65536
    + (key & 0xFFFF)`` of copy ``program % FCOPIES``: the pass-2 histogram of every bin there.
    One tile per program, or with ``LOOP`` (the short grid of a pass that is usually gated off,
    :data:`_IDLE_PROGRAMS`) tiles ``p, p + P, ...`` of the ``n_tiles`` for program ``p`` of ``P``.
    The loop is compiled only there: it took the plain pass from 64 to 116 registers for sm_90.
    ``CODES`` (pass 2 of single weights): also each unit's mask case, as :func:`_near_hist_kernel`
    writes them, with the group's selected pass-1 bin for the window (a group that keeps nothing:
    every unit pruned), for :func:`_coded_mask_kernel`."""
    if tl.load(gate) != 0:
        prog = tl.program_id(0).to(tl.int64)
        if LOOP:
            for tile in range(prog, n_tiles, tl.num_programs(0)):
                _hist_tile(tab_src, tab_cand, tab_size, tab_group, tab_nan, tile_seg, first_tile, seg_n,
                           hist, sel_hi, live, blo, bhi, group_stride, copy_stride, fine, flo, fine_group_stride,
                           tab_apply, codes, tile, prog, PASS2, WIDE, HAS_CAND, HAS_SIZE, COPIES, BLOCK, ALIGNED,
                           BRACKET, SAMPLE, FINE, SPAN, FCOPIES, CODES)
        else:
            _hist_tile(tab_src, tab_cand, tab_size, tab_group, tab_nan, tile_seg, first_tile, seg_n,
                       hist, sel_hi, live, blo, bhi, group_stride, copy_stride, fine, flo, fine_group_stride,
                       tab_apply, codes, prog, prog, PASS2, WIDE, HAS_CAND, HAS_SIZE, COPIES, BLOCK, ALIGNED,
                       BRACKET, SAMPLE, FINE, SPAN, FCOPIES, CODES)


@triton.jit
def _hist_tile(tab_src, tab_cand, tab_size, tab_group, tab_nan, tile_seg, first_tile, seg_n,
               hist, sel_hi, live, blo, bhi, group_stride, copy_stride, fine, flo, fine_group_stride,
               tab_apply, codes, pid, prog,
               PASS2: tl.constexpr, WIDE: tl.constexpr, HAS_CAND: tl.constexpr, HAS_SIZE: tl.constexpr,
               COPIES: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, BRACKET: tl.constexpr,
               SAMPLE: tl.constexpr, FINE: tl.constexpr, SPAN: tl.constexpr, FCOPIES: tl.constexpr,
               CODES: tl.constexpr):
    """Tile ``pid`` of :func:`_hist_kernel`, counted into program ``prog``'s private copies."""
    if CODES:
        seg, offs, valid = _quad_tile(pid, tile_seg, first_tile, seg_n, BLOCK, ALIGNED)
    elif SAMPLE > 1:
        seg, offs, valid = _sample_tile(pid, tile_seg, first_tile, seg_n, BLOCK, SAMPLE, ALIGNED)
    else:
        seg, offs, valid = _segment_tile(pid, tile_seg, first_tile, seg_n, BLOCK, ALIGNED)
    g = tl.load(tab_group + seg).to(tl.int64)
    bits, key = _keys(_src(tab_src, seg, WIDE, ALIGNED), offs, valid, WIDE)
    c = _candidates(tab_cand, seg, offs, valid, HAS_CAND, ALIGNED)
    if CODES:
        w = tl.full((BLOCK // 4, 4), 1, tl.int32)
    else:
        w = _unit_weights(tab_size, seg, offs, valid, HAS_SIZE, BLOCK // SAMPLE)
    h = hist + g * group_stride + (prog % COPIES) * copy_stride
    if PASS2:
        hi = key >> 16
        sel = tl.load(sel_hi + g)
        live_g = tl.load(live + g) != 0
        if CODES:
            cl = c & live_g
            drop = valid & ~(cl & (hi >= sel)) & (tl.load(tab_apply + seg) != 0) & (bits != 0)
            code = (cl & (hi > sel)).to(tl.int32) + 2 * (cl & (hi == sel)).to(tl.int32) + 3 * drop.to(tl.int32)
            _store_codes(codes, pid, code, BLOCK)
        c = c & live_g & (hi == sel)
        b = key & 0xFFFF
        # Bin 0 holds the pruned weights (exact zeros), most of a sparse model: counted with
        # one reduction and a single atomic per program instead of one atomic per zero.
        lump = c & (b == 0)
    else:
        isnan = valid & (key > tl.load(tab_nan + seg))
        b = tl.where(isnan, 32768, (key >> 16) if WIDE else key)
        c = c | isnan  # NaN is an error wherever it is, candidate or not
        lump = c & (b == 0)
        if BRACKET:
            over = c & ~isnan & (b > tl.load(bhi + g))
            lump = lump | (c & ~isnan & (b < tl.load(blo + g)))
            c = c & ~over
            tl.atomic_add(h + 32767, tl.sum(tl.where(over, w, 0)), sem="relaxed")
            if FINE:
                rel = b - tl.load(flo + g)
                inb = c & ~isnan & (b >= tl.load(blo + g)) & (rel >= 0) & (rel < SPAN)
                hf = fine + g * fine_group_stride + (prog % FCOPIES) * (SPAN * 65536)
                # Exact zeros (key 0: in range only when flo is bin 0) by one reduction.
                tl.atomic_add(hf + rel.to(tl.int64) * 65536 + (key & 0xFFFF), w, mask=inb & (key != 0),
                              sem="relaxed")
                tl.atomic_add(hf, tl.sum(tl.where(inb & (key == 0), w, 0)), sem="relaxed")
    tl.atomic_add(h + b, w, mask=c & ~lump, sem="relaxed")
    tl.atomic_add(h, tl.sum(tl.where(lump, w, 0)), sem="relaxed")


@triton.jit
def _quad_tile(pid, tile_seg, first_tile, seg_n, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """:func:`_segment_tile` with the offsets as ``[BLOCK / 4, 4]`` (row ``i`` holds units ``4 i`` to
    ``4 i + 3``): the 2-bit mask codes of a row are one byte, packed or unpacked in registers (a
    reshape of the flat tile went through 32 KB of shared memory and 178 registers for sm_90)."""
    seg = tl.load(tile_seg + pid).to(tl.int64)
    local = pid - tl.load(first_tile + seg)
    offs = local * BLOCK + (tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]).to(tl.int64)
    n = tl.load(seg_n + seg)
    if ALIGNED:
        n = tl.multiple_of(n, 16)
    return seg, offs, offs < n


@triton.jit
def _store_codes(codes, pid, code, BLOCK: tl.constexpr):
    """Tile ``pid``'s 2-bit codes ``[BLOCK / 4, 4]`` (int32 in 0..3) as one byte per row."""
    packed = tl.sum(code << (tl.arange(0, 4) * 2)[None, :], axis=1)
    tl.store(codes + pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4), packed.to(tl.uint8))


@triton.jit
def _near_hist_kernel(
    tab_src, tab_cand, tab_group, tab_nan, tab_apply, tile_seg, first_tile, seg_n,
    lo, hist, stats, group_stride, copy_stride, codes,
    NW: tl.constexpr, WIDE: tl.constexpr, HAS_CAND: tl.constexpr, COPIES: tl.constexpr,
    BLOCK: tl.constexpr, SCOPIES: tl.constexpr, ALIGNED: tl.constexpr = False, CODES: tl.constexpr = False,
):
    """The warm start's one pass: per group, an exact histogram of the candidate keys in
    ``[lo[g], lo[g] + NW)`` (one bin per key), and ``stats[g, program % SCOPIES] = (above the
    window, NaN, candidates)`` counted with one atomic each per program, spread over ``SCOPIES``
    copies (summed by :func:`_near_search_kernel`): one address took 3 atomics from each of the
    15000 programs at 63M weights. Only the keys in the window (near the previous threshold)
    take an atomic each.

    ``CODES`` (31-bit keys): also what the mask pass needs to know of each unit if the window holds
    the threshold, 2 bits per unit at ``codes[tile * BLOCK / 4 ...]`` (unit ``4 i + j`` in bits
    ``2 j`` of byte ``i``): 1 kept (a candidate above the window), 2 in the window (decided by the
    threshold), 3 pruned and to be zeroed (below the window or not a candidate, applied, not zero
    yet), 0 pruned and nothing to write. So :func:`_coded_mask_kernel` reads a quarter byte per unit
    and the weights only in the window, instead of every weight again."""
    pid = tl.program_id(0).to(tl.int64)
    if CODES:  # the tile as [BLOCK / 4, 4]: a byte of codes is one row, packed in registers
        seg, offs, valid = _quad_tile(pid, tile_seg, first_tile, seg_n, BLOCK, ALIGNED)
    else:
        seg, offs, valid = _segment_tile(pid, tile_seg, first_tile, seg_n, BLOCK, ALIGNED)
    g = tl.load(tab_group + seg).to(tl.int64)
    bits, key = _keys(_src(tab_src, seg, WIDE, ALIGNED), offs, valid, WIDE)
    c = _candidates(tab_cand, seg, offs, valid, HAS_CAND, ALIGNED)
    isnan = valid & (key > tl.load(tab_nan + seg))
    cn = c & ~isnan
    rel = key - tl.load(lo + g)
    inwin = cn & (rel >= 0) & (rel < NW)
    if CODES:  # first, so that the bits need not live through the atomics
        drop = valid & ~isnan & (~c | (rel < 0)) & (tl.load(tab_apply + seg) != 0) & (bits != 0)
        # The three cases exclude each other.
        code = (cn & (rel >= NW)).to(tl.int32) + 2 * inwin.to(tl.int32) + 3 * drop.to(tl.int32)
        _store_codes(codes, pid, code, BLOCK)
    st = stats + (g * SCOPIES + pid % SCOPIES) * 3
    tl.atomic_add(st, tl.sum((cn & (rel >= NW)).to(tl.int32), axis=None), sem="relaxed")
    tl.atomic_add(st + 1, tl.sum(isnan.to(tl.int32), axis=None), sem="relaxed")
    tl.atomic_add(st + 2, tl.sum(cn.to(tl.int32), axis=None), sem="relaxed")
    h = hist + g * group_stride + (pid % COPIES) * copy_stride
    if NW <= 256:
        # A narrow (16-bit key) window holds a large share of the weights in a few bins: one atomic
        # per key queued on 32 addresses (0.71 ms at 63M bf16 on an H100, against 0.38 ms for
        # the cold pass); counted in the program first, one atomic per bin.
        local = tl.histogram(tl.where(inwin, rel, 0), NW, mask=inwin)
        tl.atomic_add(h + tl.arange(0, NW), local, mask=local != 0, sem="relaxed")
    else:
        # Bin 0 of a window that starts at key 0 holds the pruned weights: one atomic per program.
        tl.atomic_add(h + rel, 1, mask=inwin & (rel != 0), sem="relaxed")
        tl.atomic_add(h, tl.sum((inwin & (rel == 0)).to(tl.int32), axis=None), sem="relaxed")


@triton.jit
def _digit_hist_kernel(
    tab_src, tab_cand, tab_group, tab_nan, tile_seg, first_tile, seg_n,
    hist, prefix, live, nan_count, group_stride,
    SHIFT: tl.constexpr, BITS: tl.constexpr, FIRST: tl.constexpr, WIDE: tl.constexpr,
    HAS_CAND: tl.constexpr, BLOCK: tl.constexpr,
):
    """One digit (``BITS`` key bits from bit ``SHIFT`` up) of a radix select: a per-program
    histogram (``tl.histogram``, no per-element atomics) of the candidates whose higher digits
    equal their group's ``prefix``, added to the group's global histogram with ``2**BITS``
    atomics. ``FIRST`` (the top digit) also counts NaNs, which are never ranked."""
    pid = tl.program_id(0).to(tl.int64)
    seg, offs, valid = _segment_tile(pid, tile_seg, first_tile, seg_n, BLOCK)
    g = tl.load(tab_group + seg).to(tl.int64)
    _, key = _keys(_src(tab_src, seg, WIDE), offs, valid, WIDE)
    c = _candidates(tab_cand, seg, offs, valid, HAS_CAND)
    if FIRST:
        isnan = valid & (key > tl.load(tab_nan + seg))
        tl.atomic_add(nan_count + g, tl.sum(isnan.to(tl.int32)), sem="relaxed")
        c = c & ~isnan
    else:
        c = c & (tl.load(live + g) != 0) & ((key >> (SHIFT + BITS)) == tl.load(prefix + g))
    local = tl.histogram((key >> SHIFT) & ((1 << BITS) - 1), 1 << BITS, mask=c)
    tl.atomic_add(hist + g * group_stride + tl.arange(0, 1 << BITS), local, sem="relaxed")


@triton.jit
def _tie_count_kernel(
    tab_src, tab_cand, tab_size, tab_group, tile_seg, first_tile, seg_n, n_tiles, thr, fits, counts, slot,
    WIDE: tl.constexpr, HAS_CAND: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK: tl.constexpr,
    ORDERED: tl.constexpr, ALIGNED: tl.constexpr = False, LOOP: tl.constexpr = False,
):
    """``counts[tile]`` = (weighted) number of candidates equal to their group's threshold key;
    0 without reading the tile when every tie of its group is kept (``fits[g]``: no ranks needed).
    ``ORDERED`` (several groups): written at ``counts[slot[tile]]``, the tile's place with the
    tiles sorted by group, so that one scan ranks every group's ties. ``LOOP``: tiles ``p, p +
    P, ...`` of the ``n_tiles`` per program, as in :func:`_hist_kernel`."""
    prog = tl.program_id(0).to(tl.int64)
    if LOOP:
        for tile in range(prog, n_tiles, tl.num_programs(0)):
            _tie_count_tile(tab_src, tab_cand, tab_size, tab_group, tile_seg, first_tile, seg_n, thr, fits, counts,
                            slot, tile, WIDE, HAS_CAND, HAS_SIZE, BLOCK, ORDERED, ALIGNED)
    else:
        _tie_count_tile(tab_src, tab_cand, tab_size, tab_group, tile_seg, first_tile, seg_n, thr, fits, counts,
                        slot, prog, WIDE, HAS_CAND, HAS_SIZE, BLOCK, ORDERED, ALIGNED)


@triton.jit
def _tie_count_tile(tab_src, tab_cand, tab_size, tab_group, tile_seg, first_tile, seg_n, thr, fits, counts, slot,
                    pid, WIDE: tl.constexpr, HAS_CAND: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK: tl.constexpr,
                    ORDERED: tl.constexpr, ALIGNED: tl.constexpr):
    """Tile ``pid`` of :func:`_tie_count_kernel`."""
    seg, offs, valid = _segment_tile(pid, tile_seg, first_tile, seg_n, BLOCK, ALIGNED)
    g = tl.load(tab_group + seg)
    at = counts + (tl.load(slot + pid).to(tl.int64) if ORDERED else pid)
    if tl.load(fits + g) != 0:
        tl.store(at, 0)
    else:
        t = tl.load(thr + g)
        _, key = _keys(_src(tab_src, seg, WIDE, ALIGNED), offs, valid, WIDE)
        tie = _candidates(tab_cand, seg, offs, valid, HAS_CAND, ALIGNED) & (key == t)
        w = _unit_weights(tab_size, seg, offs, valid, HAS_SIZE, BLOCK)
        tl.store(at, tl.sum(tl.where(tie, w, 0), axis=0))


@triton.jit
def _tie_scan_kernel(counts, excl, fits, n, G, BLOCK: tl.constexpr, GBLOCK: tl.constexpr):
    """One program: ``excl[i] = sum(counts[:i])`` (int64) over the ``n`` tie counts, in the order
    :func:`_tie_count_kernel` wrote them. Nothing when every group's ties fit (``fits[g]`` for
    all ``G``): no tie rank is read then. One launch in place of torch's cast, scan and copies."""
    ranked = tl.full([], 0, tl.int32)
    for g0 in range(0, G, GBLOCK):
        gi = g0 + tl.arange(0, GBLOCK)
        ranked += tl.sum((tl.load(fits + gi, mask=gi < G, other=1) == 0).to(tl.int32), axis=0)
    if ranked > 0:
        carry = tl.full([], 0, tl.int64)
        for i0 in range(0, n, BLOCK):
            i = i0 + tl.arange(0, BLOCK).to(tl.int64)
            c = tl.load(counts + i, mask=i < n, other=0).to(tl.int64)
            tl.store(excl + i, carry + tl.cumsum(c, axis=0) - c, mask=i < n)
            carry += tl.sum(c, axis=0)


@triton.jit
def _report_kernel(result, flags, miss, report, n, BLOCK: tl.constexpr, HAS_MISS: tl.constexpr):
    """One program: ``report = [result (n int64), missed, need2, miss]`` (``flags[1:3]`` and
    ``miss[0]``, 0 without ``HAS_MISS``), what the host reads with one copy at the end of a
    select: one launch in the queue (or the CUDA graph) in place of four eager ones after it."""
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        tl.store(report + i, tl.load(result + i, mask=i < n), mask=i < n)
    tl.store(report + n, tl.load(flags + 1).to(tl.int64))
    tl.store(report + n + 1, tl.load(flags + 2).to(tl.int64))
    if HAS_MISS:
        tl.store(report + n + 2, tl.load(miss).to(tl.int64))
    else:
        tl.store(report + n + 2, tl.full([], 0, tl.int64))


@triton.jit
def _next_window_kernel(result, lo, G, half, GBLOCK: tl.constexpr):
    """A warm plan's next windows: ``lo[g] = clamp(threshold[g] - half, 0, 2**31 - 1)``, the
    threshold keys in ``result[0, :G]``."""
    for g0 in range(0, G, GBLOCK):
        gi = g0 + tl.arange(0, GBLOCK)
        t = tl.load(result + gi, mask=gi < G, other=0)
        tl.store(lo + gi, tl.minimum(tl.maximum(t - half, 0), 2147483647).to(tl.int32), mask=gi < G)


@triton.jit
def _mask_kernel(
    tab_src, tab_cand, tab_size, tab_out, tab_group, tab_apply, tile_seg, first_tile, seg_n, n_tiles,
    thr, need, fits, bad, excl, slot, gfirst,
    ALL_TIES: tl.constexpr, WIDE: tl.constexpr, HAS_CAND: tl.constexpr, HAS_SIZE: tl.constexpr,
    BLOCK: tl.constexpr, ORDERED: tl.constexpr, ALIGNED: tl.constexpr = False, LOOP: tl.constexpr = False,
):
    """Write each segment's ``out = keep`` (uint8) and zero its ``src`` where not kept when the
    segment applies (only bits not already zero: a pruned weight stays pruned without a write).
    Nothing at all when ``bad[0] != 0`` (NaN, too few candidates: the host raises afterwards).
    Two launches share the tiles: ``ALL_TIES`` handles the groups whose ties are all kept
    (``fits[g]``, no tie ranks needed, no scan compiled in), the other one the rest, whose
    ties before a tile are ``excl`` at the tile's slot (``ORDERED``: ``slot[tile]``, less ``excl``
    at its group's first slot ``gfirst[g]``) (:func:`_tie_scan_kernel`). ``LOOP``: several tiles
    per program, as in :func:`_hist_kernel`."""
    if tl.load(bad) == 0:
        prog = tl.program_id(0).to(tl.int64)
        if LOOP:
            for tile in range(prog, n_tiles, tl.num_programs(0)):
                _mask_tile(tab_src, tab_cand, tab_size, tab_out, tab_group, tab_apply, tile_seg, first_tile,
                           seg_n, thr, need, fits, excl, slot, gfirst, tile, ALL_TIES, WIDE, HAS_CAND, HAS_SIZE,
                           BLOCK, ORDERED, ALIGNED)
        else:
            _mask_tile(tab_src, tab_cand, tab_size, tab_out, tab_group, tab_apply, tile_seg, first_tile, seg_n,
                       thr, need, fits, excl, slot, gfirst, prog, ALL_TIES, WIDE, HAS_CAND, HAS_SIZE, BLOCK,
                       ORDERED, ALIGNED)


@triton.jit
def _mask_tile(tab_src, tab_cand, tab_size, tab_out, tab_group, tab_apply, tile_seg, first_tile, seg_n,
               thr, need, fits, excl, slot, gfirst, pid, ALL_TIES: tl.constexpr, WIDE: tl.constexpr,
               HAS_CAND: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK: tl.constexpr, ORDERED: tl.constexpr,
               ALIGNED: tl.constexpr):
    """Tile ``pid`` of :func:`_mask_kernel`."""
    seg = tl.load(tile_seg + pid).to(tl.int64)
    g = tl.load(tab_group + seg)
    if (tl.load(fits + g) != 0) == ALL_TIES:
        seg, offs, valid = _segment_tile(pid, tile_seg, first_tile, seg_n, BLOCK, ALIGNED)
        t = tl.load(thr + g)
        src = _src(tab_src, seg, WIDE, ALIGNED)
        bits, key = _keys(src, offs, valid, WIDE)
        c = _candidates(tab_cand, seg, offs, valid, HAS_CAND, ALIGNED)
        tie = c & (key == t)
        if ALL_TIES:
            keep = (c & (key > t)) | tie
        else:
            w = _unit_weights(tab_size, seg, offs, valid, HAS_SIZE, BLOCK)
            tw = tl.where(tie, w, 0)
            # Weight of the group's ties before each unit in flat order: tile start + in-tile scan.
            if ORDERED:
                start = tl.load(excl + tl.load(slot + pid)) - tl.load(excl + tl.load(gfirst + g))
            else:
                start = tl.load(excl + pid)
            rank = start + tl.cumsum(tw, axis=0) - tw
            keep = (c & (key > t)) | (tie & (rank < tl.load(need + g)))
        out = _ptr(tl.load(tab_out + seg), tl.uint8, ALIGNED)
        tl.store(out + offs, keep.to(tl.uint8), mask=valid)
        applies = tl.load(tab_apply + seg) != 0
        tl.store(src + offs, tl.zeros_like(bits), mask=valid & (~keep) & applies & (bits != 0))


@triton.jit
def _coded_mask_kernel(
    tab_src, tab_cand, tab_out, tab_group, tab_apply, tile_seg, first_tile, seg_n,
    thr, keep, fits, bad, stale, codes,
    WIDE: tl.constexpr, HAS_CAND: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr = False,
):
    """The ``ALL_TIES`` mask pass of a 31-bit launch of single weights, from the codes its last
    pass wrote (pass 2 or a warm start's window pass, ``CODES``): a tile of a group whose ties all
    fit keeps its code-1 units and its code-2 units with ``key >= thr``, reading only those
    weights, and zeroes its code-3 units and the code-2 units it prunes; a group that keeps
    nothing keeps none. When ``stale[0] != 0`` (a warm start missed and no pass 2 rewrote the
    codes), the plain :func:`_mask_kernel` tile from every weight. Nothing when ``bad[0] != 0``."""
    if tl.load(bad) == 0:
        pid = tl.program_id(0).to(tl.int64)
        if tl.load(stale) != 0:
            _mask_tile(tab_src, tab_cand, None, tab_out, tab_group, tab_apply, tile_seg, first_tile, seg_n,
                       thr, None, fits, None, None, None, pid, True, WIDE, HAS_CAND, False, BLOCK, False, ALIGNED)
        else:
            seg = tl.load(tile_seg + pid).to(tl.int64)
            g = tl.load(tab_group + seg)
            if tl.load(fits + g) != 0:
                seg, offs, valid = _quad_tile(pid, tile_seg, first_tile, seg_n, BLOCK, ALIGNED)
                packed = tl.load(codes + pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)).to(tl.int32)
                code = (packed[:, None] >> (tl.arange(0, 4) * 2)[None, :]) & 3
                near = valid & (code == 2)
                src = _src(tab_src, seg, WIDE, ALIGNED)
                bits, key = _keys(src, offs, near, WIDE)
                kept = ((code == 1) & (tl.load(keep + g) > 0)) | (near & (key >= tl.load(thr + g)))
                out = _ptr(tl.load(tab_out + seg), tl.uint8, ALIGNED)
                tl.store(out + offs, kept.to(tl.uint8), mask=valid)
                applies = tl.load(tab_apply + seg) != 0
                drop = (valid & (code == 3)) | (near & ~kept & applies & (bits != 0))
                tl.store(src + offs, tl.zeros_like(bits), mask=drop)


@triton.jit
def _search_kernel(
    hist, row_stride, tot, tot_stride, nbins, keep, b1, live2, thr, fits, result, bad, gate, blo, bhi, missed,
    flo, need2, G, PASS2: tl.constexpr, CHUNK: tl.constexpr, NCH: tl.constexpr, BRACKET: tl.constexpr = False,
    FINE: tl.constexpr = False, SPAN: tl.constexpr = 1,
):
    """Program ``g``: in row ``g`` of ``hist`` (``nbins`` bins, NaN count in bin ``nbins`` for
    pass 1), the bin holding the ``k``-th largest weight counted from the top, ``k = max(keep[g]
    - above, 1)``, the weight above that bin and in it; ``above`` = 0 in pass 1, the pass-1 count
    above (``result[5]``) in pass 2. Then the selection's state: ``result[g, :]`` = (threshold
    key, need, ties, NaN, candidates, weight above the pass-1 bin), ``thr``/``fits`` (int32 for
    the mask pass). Pass 1 writes every group as if its keys were 16 bits wide, and ``b1`` (the
    pass-1 bin) and adds the group to ``bad`` on NaN or too few candidates; pass 2 rewrites the
    groups flagged in ``live2`` (31-bit keys that keep something: the threshold is
    ``b1 << 16 | bin``). ``tot``: the row's chunk totals (:func:`_fold_kernel`).
    A group that keeps nothing gets an unreachable threshold and needs nothing. Nothing at all
    when ``gate[0] == 0`` (a warm start found every threshold). ``BRACKET`` (pass 1 after a
    bracketed histogram): a group whose bin falls outside ``[blo[g], bhi[g]]`` (into a lumped
    count) adds 1 to ``missed``, and the exact pass 1 (gated on it) runs again. ``FINE`` (pass 2
    on the fine histogram of a bracketed pass 1, ``hist [G, SPAN * 65536]``): row ``g`` is the
    slice of its pass-1 bin ``b1[g]``; a group whose bin has no exact slice there (outside the
    span or the bracket) writes nothing and adds 1 to ``need2``, which gates the real pass 2."""
    if tl.load(gate) != 0:
        _search_body(hist, row_stride, tot, tot_stride, nbins, keep, b1, live2, thr, fits, result, bad, blo, bhi,
                     missed, flo, need2, G, PASS2, CHUNK, NCH, BRACKET, FINE, SPAN)


@triton.jit
def _fold_kernel(h, out, tot, gate, nbins, nsearch, copies, group_stride, copy_stride, out_stride, tot_stride,
                 CHUNK: tl.constexpr, COPY_BLOCK: tl.constexpr):
    """Program ``(g, c)``: bins ``[c * CHUNK, (c + 1) * CHUNK)`` of group ``g``'s ``copies``
    private histograms summed into ``out[g]``, and their total over the bins below ``nsearch``
    into ``tot[g, c]``: the chunk totals a search scans before it reads one chunk's bins. The
    copies are left zeroed for the next pass (no memset launch). Nothing when ``gate[0] == 0``:
    its histogram pass wrote nothing either, so the copies are still zero. ``COPY_BLOCK`` copies
    are loaded at once: one copy per iteration left each program waiting on one 4 KB load at a
    time (the fold took 0.12-0.18 ms of a 0.28-0.37 ms select at 10M weights on the H100)."""
    if tl.load(gate) != 0:
        g = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1).to(tl.int64)
        idx = c * CHUNK + tl.arange(0, CHUNK)
        m = idx < nbins
        acc = tl.zeros([CHUNK], dtype=tl.int32)
        src = h + g * group_stride
        rows = tl.arange(0, COPY_BLOCK).to(tl.int64)
        for j in range(0, copies, COPY_BLOCK):
            at = src + (j + rows)[:, None] * copy_stride + idx[None, :]
            m2 = ((j + rows) < copies)[:, None] & m[None, :]
            acc += tl.sum(tl.load(at, mask=m2, other=0), axis=0)
            tl.store(at, tl.zeros([COPY_BLOCK, CHUNK], dtype=tl.int32), mask=m2)
        tl.store(out + g * out_stride + idx, acc, mask=m)
        tl.store(tot + g * tot_stride + c, tl.sum(tl.where(idx < nsearch, acc, 0).to(tl.int64), axis=0))


@triton.jit
def _scan_top(row, tot, nbins, k, CHUNK: tl.constexpr, NCH: tl.constexpr):
    """The bin of ``row[:nbins]`` where the count from the top reaches ``k``: (found, bin,
    count above it, count in it, total), from the chunk totals ``tot`` (``CHUNK`` bins each, as
    :func:`_fold_kernel` writes them, ``NCH >= cdiv(nbins, CHUNK)``) and then one chunk's bins:
    two steps, not one per chunk (a serial scan of 65536 bins took 0.1 ms on an H100). Not
    found: bin 0 and the total less bin 0 above it, as the torch search gives."""
    nch = (nbins + CHUNK - 1) // CHUNK
    cl = tl.arange(0, NCH)
    ci = nch - 1 - cl  # top chunks first
    cv = tl.load(tot + ci, mask=ci >= 0, other=0).to(tl.int64)
    ccum = tl.cumsum(cv, axis=0)
    total = tl.sum(cv, axis=0)
    cpos = tl.min(tl.where(ccum >= k, cl, NCH), axis=0)
    found = cpos < NCH
    chunk = tl.where(found, nch - 1 - cpos, 0).to(tl.int64)
    above_c = tl.sum(tl.where(cl == cpos, ccum - cv, 0), axis=0)
    lanes = tl.arange(0, CHUNK)
    idx = chunk * CHUNK + CHUNK - 1 - lanes  # the chunk's top bins first
    vals = tl.load(row + idx, mask=(idx < nbins) & found, other=0).to(tl.int64)
    cum = above_c + tl.cumsum(vals, axis=0)
    pos = tl.min(tl.where(cum >= k, lanes, CHUNK), axis=0)
    at = lanes == pos
    h0 = tl.load(row).to(tl.int64)
    bin_at = tl.where(found, chunk * CHUNK + CHUNK - 1 - pos, 0)
    ties = tl.where(found, tl.sum(tl.where(at, vals, 0), axis=0), h0)
    above = tl.where(found, tl.sum(tl.where(at, cum - vals, 0), axis=0), total - h0)
    return found, bin_at, above, ties, total


@triton.jit
def _search_body(hist, row_stride, tot, tot_stride, nbins, keep, b1, live2, thr, fits, result, bad, blo, bhi,
                 missed, flo, need2, G, PASS2: tl.constexpr, CHUNK: tl.constexpr, NCH: tl.constexpr,
                 BRACKET: tl.constexpr, FINE: tl.constexpr, SPAN: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    kg = tl.load(keep + g)
    above0 = tl.load(result + 5 * G + g) if PASS2 else tl.full([], 0, tl.int64)
    k = tl.maximum(kg - above0, 1)
    row = hist + g * row_stride
    tg = tot + g * tot_stride
    if FINE:
        # The fine counts are exact for the keys of bins inside both the span and the bracket.
        b1g = tl.load(b1 + g)
        off = b1g - tl.load(flo + g)
        exact = (off >= 0) & (off < SPAN) & (b1g >= tl.load(blo + g)) & (b1g <= tl.load(bhi + g))
        off = tl.where(exact, off, 0).to(tl.int64)
        row += off * 65536
        tg += off * (65536 // CHUNK)
    _, bin_at, above, ties, running = _scan_top(row, tg, nbins, k, CHUNK, NCH)
    live = kg > 0
    if PASS2:
        applies = tl.load(live2 + g) != 0
        if FINE:
            tl.atomic_add(need2, (applies & ~exact).to(tl.int32))
            applies = applies & exact
        hi = tl.load(b1 + g).to(tl.int64)
        t = (hi << 16) | bin_at
        need = kg - above0 - above
        tl.store(result + g, t, mask=applies)
        tl.store(result + G + g, need, mask=applies)
        tl.store(result + 2 * G + g, ties, mask=applies)
        tl.store(thr + g, t.to(tl.int32), mask=applies)
        tl.store(fits + g, (ties == need).to(tl.int32), mask=applies)
    else:
        nan = tl.load(row + nbins).to(tl.int64)
        t = tl.where(live, bin_at, 2147483647)
        need = tl.where(live, kg - above, 0)
        ties = tl.where(live, ties, 0)
        tl.store(result + g, t)
        tl.store(result + G + g, need)
        tl.store(result + 2 * G + g, ties)
        tl.store(result + 3 * G + g, nan)
        tl.store(result + 4 * G + g, running)
        tl.store(result + 5 * G + g, above)
        tl.store(thr + g, t.to(tl.int32))
        tl.store(fits + g, (ties == need).to(tl.int32))
        tl.store(b1 + g, bin_at.to(tl.int32))
        err = (nan > 0) | (kg > running)
        tl.atomic_add(bad, err.to(tl.int32))
        if BRACKET:  # an error is exact already (the totals are); a bin outside is not
            inside = (bin_at >= tl.load(blo + g)) & (bin_at <= tl.load(bhi + g))
            tl.atomic_add(missed, (live & ~err & ~inside).to(tl.int32))


@triton.jit
def _sample_bracket_kernel(hist, row_stride, tot, tot_stride, rank_hi, rank_lo, rank_mid, blo, bhi, flo, gate,
                           nbins, CHUNK: tl.constexpr, NCH: tl.constexpr, SPAN: tl.constexpr):
    """Program ``g``, on the folded histogram of a sample: ``bhi[g]`` = the bin where the count
    from the top reaches ``rank_hi[g]`` (the top bin if it never does), ``blo[g]`` = the bin
    where it reaches ``rank_lo[g]`` (bin 0 if it never does): the bracket of the bracketed
    pass 1. ``flo[g]``: the first of the ``SPAN`` bins of its fine histogram, centred on the bin
    at ``rank_mid[g]`` (the estimate of the K-th largest) and kept inside the bracket where it
    fits; a rank past the sample's nonzero keys takes the smallest nonzero bin (a pruning run's
    K-th largest is its smallest kept weight, next to the zeros of bin 0, and the sample's
    estimate falls on either side of that edge). Nothing when ``gate[0] == 0``."""
    if tl.load(gate) != 0:
        g = tl.program_id(0).to(tl.int64)
        row = hist + g * row_stride
        tg = tot + g * tot_stride
        f_hi, b_hi, _, _, total = _scan_top(row, tg, nbins, tl.load(rank_hi + g), CHUNK, NCH)
        f_lo, b_lo, _, _, _ = _scan_top(row, tg, nbins, tl.load(rank_lo + g), CHUNK, NCH)
        nonzero = total - tl.load(row).to(tl.int64)
        mid = tl.load(rank_mid + g)
        _, b_mid, _, _, _ = _scan_top(row, tg, nbins, tl.where(nonzero > 0, tl.minimum(mid, nonzero), mid), CHUNK, NCH)
        top = tl.where(f_hi, b_hi, nbins - 1)
        bottom = tl.where(f_lo, b_lo, 0)
        tl.store(bhi + g, top.to(tl.int32))
        tl.store(blo + g, bottom.to(tl.int32))
        first = tl.maximum(tl.minimum(b_mid - SPAN // 2 + 1, top - SPAN + 1), bottom)
        tl.store(flo + g, first.to(tl.int32))


@triton.jit
def _near_search_kernel(hist, row_stride, tot, tot_stride, keep, lo, stats, thr, fits, result, miss, G,
                        NW: tl.constexpr, CHUNK: tl.constexpr, NCH: tl.constexpr, SCOPIES: tl.constexpr):
    """Program ``g``, after :func:`_near_hist_kernel`: when the window holds the group's
    ``keep``-th largest (``above < keep <= above + window``, no NaN), the group's threshold, need
    and ties as :func:`_search_kernel` gives them; otherwise it adds 1 to ``miss``, and the
    two-pass select (gated on ``miss``) runs for every group."""
    g = tl.program_id(0).to(tl.int64)
    kg = tl.load(keep + g)
    st = stats + (g * SCOPIES + tl.arange(0, SCOPIES)) * 3  # the copies of the group's counts
    above = tl.sum(tl.load(st).to(tl.int64), axis=0)
    nan = tl.sum(tl.load(st + 1).to(tl.int64), axis=0)
    avail = tl.sum(tl.load(st + 2).to(tl.int64), axis=0)
    found, bin_at, ab, ties, _ = _scan_top(hist + g * row_stride, tot + g * tot_stride, NW,
                                           tl.maximum(kg - above, 1), CHUNK, NCH)
    live = kg > 0
    hit = (nan == 0) & ((~live) | ((above < kg) & found))
    t = tl.where(live, tl.load(lo + g).to(tl.int64) + bin_at, 2147483647)
    need = tl.where(live, kg - above - ab, 0)
    ties = tl.where(live, ties, 0)
    tl.store(result + g, t, mask=hit)
    tl.store(result + G + g, need, mask=hit)
    tl.store(result + 2 * G + g, ties, mask=hit)
    tl.store(result + 3 * G + g, nan, mask=hit)
    tl.store(result + 4 * G + g, avail, mask=hit)
    tl.store(thr + g, t.to(tl.int32), mask=hit)
    tl.store(fits + g, (ties == need).to(tl.int32), mask=hit)
    tl.atomic_add(miss, (~hit).to(tl.int32))


@triton.jit
def _block_sq_kernel(w, out, n_blocks, nbc, rows, cols, bh, bw, BLOCK: tl.constexpr):
    """``out[b]`` = sum of squares of block ``b`` (float32), added one by one in row-major order."""
    pid = tl.program_id(0).to(tl.int64)
    bid = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = bid < n_blocks
    r0 = (bid // nbc) * bh
    c0 = (bid % nbc) * bw
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, bh):
        for j in range(0, bw):
            r = r0 + i
            c = c0 + j
            ok = valid & (r < rows) & (c < cols)
            x = tl.load(w + r * cols + c, mask=ok, other=0.0).to(tl.float32)
            acc = acc + x * x  # a missing element adds an exact 0
    tl.store(out + bid, acc, mask=valid)


@triton.jit
def _expand_kernel(w, bmask, out, n, cols, nbc, bh, bw, APPLY: tl.constexpr, BLOCK: tl.constexpr):
    """Element mask from the block mask ``bmask [nbr, nbc]``; with APPLY zero pruned ``w`` bits."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < n
    r = offs // cols
    c = offs % cols
    k = tl.load(bmask + (r // bh) * nbc + c // bw, mask=valid, other=0)
    tl.store(out + offs, k, mask=valid)
    if APPLY:
        tl.store(w + offs, tl.zeros((BLOCK,), w.dtype.element_ty), mask=valid & (k == 0))


@triton.jit
def _nm_kernel(
    src, cand, out, err, n_groups, gpr, cols, n, m, nan_above,
    WIDE: tl.constexpr, HAS_CAND: tl.constexpr, BG: tl.constexpr, MP: tl.constexpr,
):
    """N:M masks of BG groups (``m`` consecutive weights of a row, padded to MP lanes).

    ``err[0]`` += NaN count, ``err[1]`` += groups with fewer candidates than their quota.
    """
    pid = tl.program_id(0).to(tl.int64)
    gid = pid * BG + tl.arange(0, BG).to(tl.int64)  # [BG]
    j = tl.arange(0, MP)  # [MP]
    gvalid = gid < n_groups
    row = gid // gpr
    start = (gid % gpr) * m
    col = start[:, None] + j[None, :]  # [BG, MP]
    valid = gvalid[:, None] & (j[None, :] < m) & (col < cols)
    offs = row[:, None] * cols + col
    _, key = _keys(src, offs, valid, WIDE)
    isnan = valid & (key > nan_above)
    c = valid
    if HAS_CAND:
        c = c & (tl.load(cand + offs, mask=valid, other=0) != 0)
    k = tl.where(c, key, -1)
    # rank of lane q = candidates p ordered before it: larger key, or equal key and lower index.
    kp = k[:, :, None]
    kq = k[:, None, :]
    jp = j[None, :, None]
    jq = j[None, None, :]
    before = ((kp > kq) | ((kp == kq) & (jp < jq))) & c[:, :, None]
    rank = tl.sum(before.to(tl.int32), axis=1)  # [BG, MP]
    length = tl.minimum(cols - start, m)
    quota = (n * length + m - 1) // m  # = n for full groups, ceil(n*L/m) for the tail
    keep = c & (rank < quota[:, None])
    short = gvalid & (tl.sum(c.to(tl.int32), axis=1) < quota)
    tl.atomic_add(err, tl.sum(isnan.to(tl.int32)))
    tl.atomic_add(err + 1, tl.sum(short.to(tl.int32)))
    tl.store(out + offs, keep.to(tl.uint8), mask=valid)


@triton.jit
def _apply_kernel(w, mask, n, BLOCK: tl.constexpr):
    """Zero the bits of ``w`` where ``mask == 0``."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < n
    k = tl.load(mask + offs, mask=valid, other=1)
    tl.store(w + offs, tl.zeros((BLOCK,), w.dtype.element_ty), mask=valid & (k == 0))


# Repeated launches skip Triton's per-call argument binding (``kernels/launch.py``).
_apply_launch = DirectLauncher(_apply_kernel)
_block_sq_launch = DirectLauncher(_block_sq_kernel)
_digit_hist_launch = DirectLauncher(_digit_hist_kernel)
_expand_launch = DirectLauncher(_expand_kernel)
_fold_launch = DirectLauncher(_fold_kernel)
_hist_launch = DirectLauncher(_hist_kernel)
_mask_launch = DirectLauncher(_mask_kernel)
_near_hist_launch = DirectLauncher(_near_hist_kernel)
_near_search_launch = DirectLauncher(_near_search_kernel)
_nm_launch = DirectLauncher(_nm_kernel)
_sample_bracket_launch = DirectLauncher(_sample_bracket_kernel)
_search_launch = DirectLauncher(_search_kernel)
_next_window_launch = DirectLauncher(_next_window_kernel)
_report_launch = DirectLauncher(_report_kernel)
_tie_count_launch = DirectLauncher(_tie_count_kernel)
_tie_scan_launch = DirectLauncher(_tie_scan_kernel)
_coded_mask_launch = DirectLauncher(_coded_mask_kernel)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _hist_copies(groups: int, programs: int) -> int:
    """Private histogram copies per group: up to 64 (one selection) while the copies of all
    groups stay within 64 histograms (8.4 MB of pass-1 bins); 1 under the interpreter."""
    if _INTERP:
        return 1
    return max(1, min(64 // max(groups, 1), next_power_of_2(max(programs, 1))))


def _search(hist: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``hist [G, B]``: bin holding the k-th largest (weighted) and the weight above it.

    Meaningful where ``1 <= k <= hist.sum(1)`` (other rows give an in-range bin). Returns int64 ``bin [G]`` and ``above [G]``.
    """
    cum = hist.flip(1).to(torch.int64).cumsum(1)  # weight of the top j+1 bins
    idx = (cum < k[:, None]).sum(1).clamp(max=hist.shape[1] - 1)  # first j with cum >= k
    bins = hist.shape[1] - 1 - idx
    above = cum.gather(1, idx[:, None]).squeeze(1) - hist.gather(1, bins[:, None]).squeeze(1)
    return bins, above


def _bracket_ranks(launches: list[_Launch], keep: list[int], block: int) -> list[list[int]]:
    """Per group, the sample ranks from the top ``[r - m, r + m, r]`` whose bins bound the
    bracket (and centre its fine histogram):
    ``r = K * S / U`` (``S`` of ``U`` units sampled), ``m`` = :data:`_BRACKET_SIGMAS` standard
    deviations of the sample count above the K-th largest with every sampled chunk one draw, +
    :data:`_BRACKET_SLACK`. Groups that keep nothing or were sampled in too few chunks get
    :data:`_NO_RANK` (every bin)."""
    groups = len(keep)
    units, sampled, chunks = [0] * groups, [0] * groups, [0] * groups
    for ln in launches:
        for g, n, tiles, first in ln.host:
            su, sc = sample_counts(n, tiles, first, block, _SAMPLE)
            units[g] += n
            sampled[g] += su
            chunks[g] += sc
    ranks = []
    for k, u, su, sc in zip(keep, units, sampled, chunks, strict=True):
        if k <= 0 or sc < _BRACKET_MIN_CHUNKS:
            ranks.append([_NO_RANK, _NO_RANK, _NO_RANK])
            continue
        p = k / u
        r = k * su / u
        m = _BRACKET_SIGMAS * su * math.sqrt(p * (1 - p) / sc) + _BRACKET_SLACK
        ranks.append([max(1, math.floor(r - m)), math.ceil(r + m), max(1, round(r))])
    return ranks


# Programs of a launch that usually has nothing to do (gated off on the device, or no tile of
# its case): each exits at once, and on the H100 a 15000-program launch that did nothing still
# took 10-15 us (63M weights: four gated histogram passes 0.062 ms of a 0.466 ms warm select).
# The kernels loop over their tiles, so a short grid does the whole pass when it does run. Three
# under the interpreter, so that the CPU tests run every such launch's loop over several tiles.
_IDLE_PROGRAMS = 3 if _INTERP else 1024


def _grid(tiles: int, *, idle: bool) -> int:
    """Programs for a launch over ``tiles`` tiles: one per tile, or at most
    :data:`_IDLE_PROGRAMS` for a launch that is usually ``idle``."""
    return min(tiles, _IDLE_PROGRAMS) if idle else tiles


# The fold's programs: one per (group, chunk of bins). With 1024-bin chunks one group's 32769
# pass-1 bins made 33 programs, on an H100 of 132 SMs; chunks are halved (down to
# _FOLD_MIN_CHUNK) until the launch has _FOLD_PROGRAMS programs. The search kernels read the
# chunk totals at the same chunk size.
_FOLD_PROGRAMS = 256
_FOLD_MAX_CHUNK = 1024
_FOLD_MIN_CHUNK = 256
_FOLD_MAX_COPY_BLOCK = 16  # private histogram copies the fold loads at once


def fold_chunk(groups: int, bins: int) -> int:
    """Bins per fold program on a GPU: :data:`_FOLD_MAX_CHUNK`, halved down to
    :data:`_FOLD_MIN_CHUNK` while the fold of ``groups`` histograms of ``bins`` bins would have
    fewer than :data:`_FOLD_PROGRAMS` programs."""
    chunk = _FOLD_MAX_CHUNK
    while chunk > _FOLD_MIN_CHUNK and groups * cdiv(bins, chunk) < _FOLD_PROGRAMS:
        chunk //= 2
    return chunk


def fold_layout(groups: int, bins: int, nsearch: int, copies: int,
                chunk: int | None = None) -> tuple[int, int, int]:
    """``(chunk, copy_block, warps)`` of the fold of ``[groups, copies, bins]`` histograms whose
    first ``nsearch`` bins are searched: ``chunk`` bins per program (given, else
    :func:`fold_chunk`, or on the interpreter :data:`_INTERP_CHUNK`), ``copy_block`` copies
    loaded at once, about 32 int32 values per thread (a ``[8, 1024]`` tile at 8 warps compiled
    to 150 registers and no spills for sm_90; at 4 warps to 255 and spills), and the warps."""
    if chunk is None:
        chunk = _INTERP_CHUNK if _INTERP else fold_chunk(groups, bins)
    chunk = min(chunk, next_power_of_2(nsearch))
    warps = 8 if chunk >= 1024 else 4
    copy_block = max(1, min(_FOLD_MAX_COPY_BLOCK, next_power_of_2(copies), 32 * 32 * warps // chunk))
    return chunk, copy_block, warps


class _Folded:
    """The sum of a group's private histogram copies (``h [G, C, B]``, zero before each pass and
    zeroed again by the fold), one launch of :func:`_fold_kernel`, into ``row [G, B]`` and chunk
    totals over the first ``nsearch`` bins, which a search kernel (``chunk``/``nch`` its
    CHUNK/NCH) reads. Layout: :func:`fold_layout`."""

    def __init__(self, h: Tensor, nsearch: int, chunk: int | None = None) -> None:
        groups, copies, bins = h.shape
        self.h, self.nsearch = h, nsearch
        self.chunk, self.copy_block, self.warps = fold_layout(groups, bins, nsearch, copies, chunk)
        self.grid = (groups, cdiv(bins, self.chunk))
        self.nch = next_power_of_2(cdiv(nsearch, self.chunk))
        self.row = torch.empty(groups, bins, dtype=torch.int32, device=h.device)
        self.tot = torch.empty(groups, self.grid[1], dtype=torch.int64, device=h.device)

    def enqueue(self, gate: Tensor) -> None:
        h = self.h
        _fold_launch[self.grid](
            h, self.row, self.tot, gate, h.shape[2], self.nsearch, h.shape[1], h.stride(0), h.stride(1),
            self.row.stride(0), self.tot.stride(0), CHUNK=self.chunk, COPY_BLOCK=self.copy_block,
            num_warps=self.warps,
        )


class _AtomicSelect:
    """The atomic (histogram) select of fixed segments, queued on the device with no host sync:
    the tables, constants and buffers are made once (:meth:`__init__`), :meth:`enqueue` queues
    the passes and the final mask pass (which writes nothing when the counts show an error), and
    :meth:`finish` reads the counts once, raises their errors and returns the thresholds. So a
    selection can be captured in a CUDA graph and replayed (:class:`RerankPlan`)."""

    def __init__(self, launches: list[_Launch], segments: list[Segment], keep: list[int], what: list[str],
                 wide: list[bool], block: int, warps: int, dev: torch.device, copies: int,
                 warm: bool = False, bracket: bool | None = None) -> None:
        # Magnitudes crowd into a few hundred bins: with one histogram, millions of atomics queue
        # on the same addresses. Programs spread them over private copies, summed after the pass.
        if copies < 1:
            raise ValueError(f"hist_copies must be >= 1, got {copies}")
        groups = len(keep)
        self.launches, self.keep, self.what, self.block, self.warps = launches, keep, what, block, warps
        self.segments = segments
        self.copies = copies
        live_wide = [int(kg > 0 and w) for kg, w in zip(keep, wide, strict=True)]
        single = not any(ln.has_size for ln in launches)
        if bracket is None:
            # Off under the interpreter, which runs every program in Python: the extra passes
            # doubled the time of the pruning tests there (tests turn it on where they test it).
            bracket = not _INTERP and bracket_by_default(single, block, sum(ln.tiles for ln in launches), any(wide))
        elif bracket and (not single or block < 16 * _SAMPLE):
            raise ValueError(f"bracket=True ranks single weights (not blocks) in tiles of at least "
                             f"{16 * _SAMPLE} units")
        # Pass 1 spends its time on one atomic per candidate. With a bracket, a sample first (1/16
        # of every tile) gives each group a range of pass-1 bins that holds its K-th largest with
        # high probability; pass 1 then takes atomics only inside it and counts the rest per
        # program. A group whose bin falls outside runs the exact pass 1 after it (gated).
        self.bracket = bracket
        self.last_bracket_missed = False
        ranks = [list(r) for r in zip(*_bracket_ranks(launches, keep, block), strict=True)] if bracket else []
        # Pass 2 folded into the bracketed pass 1 for 31-bit keys, while the fine histograms fit.
        fine_copies = min(copies, _FINE_COPIES)
        self.fine = bracket and any(live_wide) and groups * fine_copies * _FINE_SPAN * 65536 * 4 <= _FINE_BYTES
        self.last_fine_missed = False
        consts = to_device(torch.tensor([keep, live_wide, *ranks], dtype=torch.int64), dev)
        self.k, self.live_wide = consts[0], consts[1].to(torch.int32)
        # Histogram copies are zero between passes: zeroed here, then by each fold that reads them.
        self.h1 = torch.zeros(groups, copies, NAN_BIN + 1, dtype=torch.int32, device=dev)
        # Pass 2 counts only the units inside one pass-1 bin: a few copies are enough.
        copies2 = min(copies, 4)
        self.h2 = (torch.zeros(groups, copies2, 65536, dtype=torch.int32, device=dev)
                   if any(live_wide) else None)
        self.f1 = _Folded(self.h1, NAN_BIN)
        self.f2 = _Folded(self.h2, 65536) if self.h2 is not None else None
        self.zeros_g = torch.zeros(groups, dtype=torch.int32, device=dev)
        # Per group after enqueue: threshold key, need, ties, NaN count, candidates, weight above
        # the pass-1 bin; the pass-1 bin, the threshold, whether every tie is kept and the
        # bracket's bins and its fine histogram's first bin (int32, for the kernels); the count of
        # groups in error, of groups whose bracket missed and of groups that need the real pass 2,
        # zeroed together by one memset per run.
        self.result = torch.empty(6, groups, dtype=torch.int64, device=dev)
        self.report = torch.empty(6 * groups + 3, dtype=torch.int64, device=dev)  # what finish() reads
        small = torch.empty(6 * groups, dtype=torch.int32, device=dev)
        self.b1, self.thr, self.fits, self.blo, self.bhi, self.flo = small.view(6, groups).unbind(0)
        # Zeroed together by one memset per run: the three counts, and a warm start's window
        # statistics [G, _STAT_COPIES, 3] and miss count.
        self.zeroed = torch.empty(3 + (3 * groups * _STAT_COPIES + 1 if warm else 0), dtype=torch.int32, device=dev)
        self.flags = self.zeroed[:3]
        self.bad, self.missed, self.need2 = self.flags[0:1], self.flags[1:2], self.flags[2:3]
        if bracket:
            # The sample ranks from the top [3, G]: the bracket's top bin (row 0), its bottom bin
            # (row 1) and the estimate of the K-th largest's (row 2).
            self.ranks = consts[2:5]
            self.hs = torch.zeros(groups, min(copies, 16), NAN_BIN + 1, dtype=torch.int32, device=dev)
            self.fs = _Folded(self.hs, NAN_BIN)
        if self.fine:
            self.hf = torch.zeros(groups, fine_copies, _FINE_SPAN * 65536, dtype=torch.int32, device=dev)
            self.ff = _Folded(self.hf, _FINE_SPAN * 65536)
        self.finals = [_FinalPass(ln, segments, block, warps, dev) for ln in launches]
        # 31-bit launches of single weights: the mask codes of the pass that last bounds the
        # threshold (see the module docstring), 2 bits per unit, so that the mask pass reads a
        # quarter byte per unit and the weights only inside the bound, not every weight again.
        # Pass 2 writes them unless the fine path may skip it (or no group needs it); then only a
        # warm start's window pass does, and a miss takes the plain mask pass.
        self.pass2_codes = self.f2 is not None and not self.fine
        self.codes = [torch.empty(ln.tiles * block // 4, dtype=torch.uint8, device=dev)
                      if ln.wide and not ln.has_size and (warm or self.pass2_codes) else None for ln in launches]
        self.one = torch.ones(1, dtype=torch.int32, device=dev)
        self.dirty = False
        self.warm = warm
        if warm:
            if any(ln.has_size for ln in launches):
                raise ValueError("a warm start ranks single weights, not blocks")
            # A window of keys around the previous threshold, one bin per key: +-0.4% of the value
            # for float32 keys, +-1/8 of an octave for 16-bit ones.
            self.nw = _WARM_WINDOW[any(wide)]
            self.copies_w = min(copies, 8)
            self.hw = torch.zeros(groups, self.copies_w, self.nw, dtype=torch.int32, device=dev)
            self.fw = _Folded(self.hw, self.nw)
            self.stats = self.zeroed[3:3 + 3 * groups * _STAT_COPIES].view(groups, _STAT_COPIES, 3)
            self.miss = self.zeroed[-1:]
            self.lo = torch.zeros(groups, dtype=torch.int32, device=dev)

    def compile_warm(self) -> None:
        """Compile every kernel a warm select launches before a graph capture, which cannot
        compile (the driver refuses to load a module while a stream captures): the gated passes'
        short-grid variants and the mask pass from the codes are not those a cold run launched.
        Runs the warm select once with the error flag raised, so that no mask pass writes:
        weights, masks, candidates and the next window stay as they are."""
        lo = self.lo.clone()
        self.enqueue(warm=True, dry=True)
        self.lo.copy_(lo)

    def _near_pass(self) -> None:
        """The warm start's window pass; ``stats`` and ``miss`` zeroed before it."""
        groups = len(self.keep)
        for ln, codes in zip(self.launches, self.codes, strict=True):
            _near_hist_launch[(ln.tiles,)](
                ln.src, ln.cand, ln.group, ln.nan_above, ln.apply, ln.tile_seg, ln.first, ln.n,
                self.lo, self.hw, self.stats, self.copies_w * self.nw, self.nw, codes,
                NW=self.nw, WIDE=ln.wide, HAS_CAND=ln.has_cand, COPIES=self.copies_w,
                BLOCK=self.block, SCOPIES=_STAT_COPIES, ALIGNED=ln.aligned, CODES=codes is not None,
                num_warps=self.warps,
            )
        fw = self.fw
        fw.enqueue(self.one)
        _near_search_launch[(groups,)](
            fw.row, fw.row.stride(0), fw.tot, fw.tot.stride(0), self.k, self.lo, self.stats, self.thr, self.fits,
            self.result, self.miss, groups, NW=self.nw, CHUNK=fw.chunk, NCH=fw.nch, SCOPIES=_STAT_COPIES,
            num_warps=4,
        )

    def enqueue(self, warm: bool = False, dry: bool = False) -> None:
        """Queue the select; ``warm`` (a plan's later runs) first tries the window around the
        previous threshold, and the cold passes run only when some group's window missed.
        ``dry``: every launch, but the mask passes write nothing (:meth:`compile_warm`)."""
        # About a dozen launches (a score with the bracket): histogram, copies summed, search (one
        # program per group), and again for 31-bit keys; then the tie ranks and the mask pass.
        # Gated launches still launch (a graph holds them all) and exit at once, on short grids
        # (_IDLE_PROGRAMS) whose programs loop over the tiles when the gate is open.
        groups = len(self.keep)

        def hist_pass(f: _Folded, pass2: bool, sel_hi: Tensor, live: Tensor, gate: Tensor,
                      bracket: bool = False, sample: int = 1) -> None:
            h = f.h
            copies, bins = h.shape[1], h.shape[2]
            for ln, codes in zip(self.launches, self.codes, strict=True):
                if pass2 and not ln.wide:
                    continue  # 16-bit keys are exact after pass 1
                codes = codes if pass2 and self.pass2_codes else None
                fine = bracket and self.fine and ln.wide
                hf = self.hf if fine else h
                # A pass behind a device gate (a warm start's miss, a missed bracket) usually does
                # nothing: a short grid, whose programs loop over the tiles when it runs.
                grid = _grid(ln.tiles, idle=gate is not self.one)
                _hist_launch[(grid,)](
                    *ln.args(), ln.group, ln.nan_above, ln.tile_seg, ln.first, ln.n, ln.tiles,
                    h, sel_hi, live, gate, self.blo, self.bhi, copies * bins, bins, hf, self.flo, hf.stride(0),
                    ln.apply, codes, PASS2=pass2, WIDE=ln.wide, HAS_CAND=ln.has_cand, HAS_SIZE=ln.has_size,
                    COPIES=copies, BLOCK=self.block, ALIGNED=ln.aligned, BRACKET=bracket, SAMPLE=sample,
                    FINE=fine, SPAN=_FINE_SPAN if fine else 1, FCOPIES=hf.shape[1] if fine else 1,
                    LOOP=grid < ln.tiles, CODES=codes is not None,
                    # A sample chunk is 256 units: one warp gives each thread 16 bytes or more.
                    num_warps=self.warps if sample == 1 else 1,
                )
            f.enqueue(gate)

        def search(f: _Folded, pass2: bool, gate: Tensor, bracket: bool = False, fine: bool = False) -> None:
            _search_launch[(groups,)](
                f.row, f.row.stride(0), f.tot, f.tot.stride(0), 65536 if pass2 else NAN_BIN, self.k, self.b1,
                self.live_wide, self.thr, self.fits, self.result, self.bad, gate, self.blo, self.bhi, self.missed,
                self.flo, self.need2, groups, PASS2=pass2, CHUNK=f.chunk,
                NCH=65536 // f.chunk if fine else f.nch, BRACKET=bracket, FINE=fine, SPAN=_FINE_SPAN if fine else 1,
                num_warps=4,
            )

        if self.dirty:  # a queue cut short (an interrupt) may have left counts in the copies
            for h in (self.h1, self.h2, getattr(self, "hw", None), getattr(self, "hs", None), getattr(self, "hf", None)):
                if h is not None:
                    h.zero_()
        self.dirty = True
        self.zeroed.zero_()
        if dry:
            self.bad.fill_(1)
        gate = self.one
        if warm:
            self._near_pass()
            gate = self.miss  # the passes below do nothing unless a window missed
        f1 = self.f1
        gate1 = gate
        if self.bracket:
            fs = self.fs
            hist_pass(fs, False, self.zeros_g, self.zeros_g, gate, sample=_SAMPLE)
            _sample_bracket_launch[(groups,)](
                fs.row, fs.row.stride(0), fs.tot, fs.tot.stride(0), *self.ranks.unbind(0), self.blo, self.bhi, self.flo,
                gate, NAN_BIN, CHUNK=fs.chunk, NCH=fs.nch, SPAN=_FINE_SPAN, num_warps=4,
            )
            hist_pass(f1, False, self.zeros_g, self.zeros_g, gate, bracket=True)
            search(f1, False, gate, bracket=True)
            gate1 = self.missed  # the exact pass 1 below does nothing unless a bracket missed
        hist_pass(f1, False, self.zeros_g, self.zeros_g, gate1)
        search(f1, False, gate1)
        gate2 = gate
        if self.fine:
            # Pass 2 from the fine histogram; the real one runs only for groups it cannot serve.
            self.ff.enqueue(gate)
            search(self.ff, True, gate, fine=True)
            gate2 = self.need2
        if (f2 := self.f2) is not None:
            hist_pass(f2, True, self.b1, self.live_wide, gate2)
            search(f2, True, gate2)
        # The codes are the last bound's: pass 2's, or a warm hit's window pass's (a miss with no
        # pass 2 to rewrite them leaves them stale).
        stale = self.zeros_g if self.pass2_codes else self.miss if warm else None
        for fp, codes in zip(self.finals, self.codes, strict=True):
            coded = (self.k, stale, codes) if codes is not None and stale is not None else None
            fp.enqueue(self.thr, self.result[1], self.fits, self.bad, groups, coded=coded)
        self.dirty = False
        if self.warm:  # the next window: centred on this threshold
            _next_window_launch[(1,)](self.result, self.lo, groups, self.nw // 2, GBLOCK=128, num_warps=1)
        _report_launch[(1,)](self.result, self.flags, self.miss if self.warm else self.flags, self.report,
                             6 * groups, BLOCK=1024, HAS_MISS=self.warm, num_warps=4)

    def finish(self, warm: bool = False) -> tuple[list[tuple[int, int]], bool]:
        """One host sync: raise the errors the counts show, else per group ``(threshold, need)``,
        and whether a warm start found every threshold."""
        values = self.report.tolist()
        g = len(self.keep)
        self.last_bracket_missed = values[6 * g] != 0
        self.last_fine_missed = values[6 * g + 1] != 0
        thr, need, nan, avail = values[:g], values[g:2 * g], values[3 * g:4 * g], values[4 * g:5 * g]
        _check_counts(nan, avail, self.keep, self.what, self.segments)
        return list(zip(thr, need, strict=True)), warm and values[-1] == 0


class _FinalPass:
    """Tie ranks (only for groups whose ties do not all fit) and the mask pass of one launch:
    four launches (tie counts, their scan, the mask pass in its two cases)."""

    def __init__(self, ln: _Launch, segments: list[Segment], block: int, warps: int, dev: torch.device) -> None:
        self.ln, self.block, self.warps = ln, block, warps
        self.counts = torch.empty(ln.tiles, dtype=torch.int32, device=dev)
        self.excl = torch.empty(ln.tiles, dtype=torch.int64, device=dev)
        # Tie ranks: per-tile tie counts, exclusive prefix over each group's tiles in flat
        # (segment list) order. Several groups: each tile's slot with the tiles sorted by group
        # (stable: flat order within a group) and each group's first slot, made once, here.
        self.ordered = len({segments[i].group for i in ln.index}) > 1
        self.slot = self.gfirst = None
        if self.ordered:
            tile_group = ln.group[ln.tile_seg]
            order = torch.argsort(tile_group, stable=True)
            self.slot = torch.empty_like(order, dtype=torch.int32)
            self.slot[order] = torch.arange(ln.tiles, dtype=torch.int32, device=dev)
            groups = max(segments[i].group for i in ln.index) + 1
            self.gfirst = torch.searchsorted(tile_group[order], torch.arange(groups, device=dev)).to(torch.int32)

    def enqueue(self, thr: Tensor, need: Tensor, fits: Tensor, bad: Tensor, groups: int,
                coded: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
        """``coded = (keep, stale, codes)``: the launch's groups with every tie kept get
        :func:`_coded_mask_kernel` in place of the plain ``ALL_TIES`` pass."""
        ln, block, warps = self.ln, self.block, self.warps
        # Usually idle with 31-bit keys (short grids): the tie counts and the tie-ranking mask
        # pass, as every tie of a float32 threshold key fits, as a rule. With 16-bit keys either
        # case is common: a pruning run's repeated re-ranks find the smallest kept weight next to
        # the zeros, where every tie fits (the H100 profile's bf16 tie counts at 10M weights took
        # 0.003 ms, as long as float32's, which had nothing to count),
        # and a fresh ranking splits a key shared by thousands of units. So full grids there.
        grid = _grid(ln.tiles, idle=ln.wide)
        _tie_count_launch[(grid,)](
            *ln.args(), ln.group, ln.tile_seg, ln.first, ln.n, ln.tiles, thr, fits, self.counts, self.slot,
            WIDE=ln.wide, HAS_CAND=ln.has_cand, HAS_SIZE=ln.has_size, BLOCK=block, ORDERED=self.ordered,
            ALIGNED=ln.aligned, LOOP=grid < ln.tiles, num_warps=warps,
        )
        _tie_scan_launch[(1,)](self.counts, self.excl, fits, ln.tiles, groups, BLOCK=1024, GBLOCK=128, num_warps=4)
        for all_ties in (True, False):  # each tile is written by the one whose case its group is
            if all_ties and coded is not None:
                keep, stale, codes = coded
                _coded_mask_launch[(ln.tiles,)](
                    ln.src, ln.cand, ln.out, ln.group, ln.apply, ln.tile_seg, ln.first, ln.n,
                    thr, keep, fits, bad, stale, codes,
                    WIDE=ln.wide, HAS_CAND=ln.has_cand, BLOCK=block, ALIGNED=ln.aligned, num_warps=warps,
                )
                continue
            grid = _grid(ln.tiles, idle=ln.wide and not all_ties)
            _mask_launch[(grid,)](
                *ln.args(), ln.out, ln.group, ln.apply, ln.tile_seg, ln.first, ln.n, ln.tiles,
                thr, need, fits, bad, self.excl, self.slot, self.gfirst,
                ALL_TIES=all_ties, WIDE=ln.wide, HAS_CAND=ln.has_cand, HAS_SIZE=ln.has_size,
                BLOCK=block, ORDERED=self.ordered, ALIGNED=ln.aligned, LOOP=grid < ln.tiles, num_warps=warps,
            )


# Radix digits (shift, bits), top digit first: 31-bit keys (float32) and 15-bit keys (16-bit floats).
_DIGITS = {True: ((20, 11), (10, 10), (0, 10)), False: ((7, 8), (0, 7))}
_DIGIT_BINS = 2048


def _threshold_radix(launches: list[_Launch], segments: list[Segment], keep: list[int], what: list[str],
                     wide: list[bool], groups: int, block: int, warps: int,
                     dev: torch.device) -> tuple[list[int], list[int], list[int]]:
    """:func:`_threshold_atomic`'s result, digit by digit with per-program histograms."""
    live = [kg > 0 for kg in keep]
    prefix = [0] * groups
    remaining = list(keep)
    ties = [0] * groups
    nan_count = torch.zeros(groups, dtype=torch.int32, device=dev)
    for p in range(max((len(_DIGITS[ln.wide]) for ln in launches), default=0)):
        hist = torch.zeros(groups, _DIGIT_BINS, dtype=torch.int32, device=dev)
        prefix_t = torch.tensor(prefix, dtype=torch.int32, device=dev)
        live_t = torch.tensor([lv and p < len(_DIGITS[w]) for lv, w in zip(live, wide, strict=True)],
                              dtype=torch.int32, device=dev)
        for ln in launches:
            if p >= len(_DIGITS[ln.wide]):
                continue
            shift, bits = _DIGITS[ln.wide][p]
            _digit_hist_launch[(ln.tiles,)](
                ln.src, ln.cand, ln.group, ln.nan_above, ln.tile_seg, ln.first, ln.n,
                hist, prefix_t, live_t, nan_count, _DIGIT_BINS,
                SHIFT=shift, BITS=bits, FIRST=p == 0, WIDE=ln.wide, HAS_CAND=ln.has_cand,
                BLOCK=block, num_warps=warps,
            )
        k = torch.tensor(remaining, dtype=torch.int64, device=dev)
        bins, above = _search(hist, k.clamp(min=1))
        count = hist.gather(1, bins[:, None]).squeeze(1).to(torch.int64)
        rows = [hist.sum(1, dtype=torch.int64), bins, above, count]
        if p == 0:
            rows.append(nan_count.to(torch.int64))
        host = torch.stack(rows).tolist()
        if p == 0:
            _check_counts(host[4], host[0], keep, what, segments)
        for g in range(groups):
            if live[g] and p < len(_DIGITS[wide[g]]):
                prefix[g] = (prefix[g] << _DIGITS[wide[g]][p][1]) | host[1][g]
                remaining[g] -= host[2][g]
                ties[g] = host[3][g]
    return _unless_live(prefix, remaining, ties, live)


def _unless_live(thr: list[int], need: list[int], ties: list[int],
                 live: list[bool]) -> tuple[list[int], list[int], list[int]]:
    """Groups that keep nothing: a threshold above every key, nothing needed, no ties."""
    for g, lv in enumerate(live):
        if not lv:
            thr[g], need[g], ties[g] = INT32_MAX, 0, 0
    return thr, need, ties


def select_units(
    segments: list[Segment], keep: list[int], what: list[str], *, tile: int | None = None,
    hist_copies: int | None = None, algorithm: str = "atomic", window_margin: int | None = None,
    bracket: bool | None = None,
) -> list[tuple[int, int]]:
    """Exact radix select over ``segments`` grouped into ``len(keep)`` independent selections.

    Group ``g`` keeps the (size-weighted) top ``keep[g]`` candidate units in the order
    (key desc, flat index asc over its segments in list order), smallest prefix reaching
    ``keep[g]``. Writes every ``segment.out``; zeroes pruned ``src`` bits where ``apply``.
    Raises :class:`UserError` on NaN anywhere or too few candidates (``what[g]`` names the group).
    Returns per group ``(threshold key, need)`` (``(INT32_MAX, 0)`` when nothing is kept).
    The segments of a group must share a key width (the callers rank mixed dtypes in float32).

    ``algorithm`` finds each group's threshold key: ``"atomic"`` (16-bit digits, one global
    atomic per unit: one pass for 16-bit keys, two for 32-bit) or ``"radix"`` (8- to 11-bit
    digits counted per program with ``tl.histogram``: two passes for 16-bit keys, three for
    32-bit; single weights only) or ``"window"`` (one pass over the weights around a sampled
    bracket, sparse writes; single weights only; a missed bracket falls back to ``"atomic"``,
    see :mod:`.window`). All are exact; which is fastest is measured on GPUs.
    ``window_margin``: the window's half-width in sample ranks (None: from the sample's spread),
    exposed so tests can force a missed bracket. ``bracket`` (``"atomic"``): pass 1 takes atomics
    only inside a range of bins bracketed by a sample (see :class:`_AtomicSelect`); None: on a
    GPU for single 16-bit weights over at least 64 tiles (:func:`bracket_by_default`); exact
    either way.
    """
    return _select_units(segments, keep, what, tile=tile, hist_copies=hist_copies, algorithm=algorithm,
                         window_margin=window_margin, thresholds=True, bracket=bracket)


def _launches(segments: list[Segment], groups: int, block: int) -> tuple[list[_Launch], list[int], list[bool]]:
    """One launch per key width over ``segments`` (``block`` units per tile): the launches, each
    segment's tile count, and per group whether its keys are 31 bits wide."""
    total = sum(s.src.numel() for s in segments)
    if total >= INT32_MAX:
        raise ValueError(f"at most 2**31 - 2 units per call, got {total}")
    grids = [cdiv(s.src.numel(), block) for s in segments]
    by_width: dict[bool, list[int]] = {}
    for i, s in enumerate(segments):
        if grids[i]:
            by_width.setdefault(s.wide, []).append(i)
    dev = segments[0].src.device
    launches = [_Launch(segments, index, grids, block, dev) for index in by_width.values()]
    wide = [False] * groups
    for s in segments:
        wide[s.group] = s.wide
    return launches, grids, wide


def _select_units(
    segments: list[Segment], keep: list[int], what: list[str], *, tile: int | None,
    hist_copies: int | None, algorithm: str, window_margin: int | None, thresholds: bool,
    bracket: bool | None = None,
) -> list[tuple[int, int]]:
    """:func:`select_units`; ``thresholds=False`` lets the window select skip a host sync (the
    result is then only meaningful for the other algorithms)."""
    block, warps = _tile(tile)
    groups = len(keep)
    dev = segments[0].src.device
    launches, grids, wide = _launches(segments, groups, block)

    if algorithm in ("radix", "window") and any(ln.has_size for ln in launches):
        raise ValueError(f"algorithm={algorithm!r} ranks single weights; blocks use 'atomic'")
    if algorithm == "window":
        done = window_select(launches, segments, grids, keep, block, warps, margin=window_margin,
                             thresholds=thresholds)
        if done is not None:
            return done
        algorithm = "atomic"
    if algorithm == "atomic":
        sel = _AtomicSelect(launches, segments, keep, what, wide, block, warps, dev,
                            hist_copies if hist_copies is not None else _hist_copies(groups, sum(grids)),
                            bracket=bracket)
        sel.enqueue()
        return sel.finish()[0]
    if algorithm != "radix":
        raise ValueError(f"algorithm must be 'atomic', 'radix' or 'window', got {algorithm!r}")
    thr, need, ties = _threshold_radix(launches, segments, keep, what, wide, groups, block, warps, dev)
    table = to_device(torch.tensor([thr, need, [int(t == n) for t, n in zip(ties, need, strict=True)], [0] * groups],
                                   dtype=torch.int64), dev)
    bad = table[3, :1].to(torch.int32)  # the radix select raised its errors already
    for ln in launches:
        _FinalPass(ln, segments, block, warps, dev).enqueue(table[0].to(torch.int32), table[1],
                                                             table[2].to(torch.int32), bad, groups)
    return [(thr[g], need[g]) for g in range(groups)]


def block_sq_norms(weight: Tensor, block: tuple[int, int], *, tile: int = 256) -> Tensor:
    """float32 ``[ceil(out/bh), ceil(in/bw)]`` squared L2 norms of the blocks of ``weight [out, ...]``.

    Squares of the float32 values are added one at a time in row-major order within each block
    (FMA contraction off), bit-identical to the torch references. ``tile``: blocks per program, a
    power of two >= 16. Raises ``ValueError`` on a bad block, tile, dtype or a weight under 2 dims.
    """
    _tile(tile)
    if not (isinstance(block, (tuple, list)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise ValueError(f"block must be two integers >= 1, got {block!r}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16) or weight.dim() < 2:
        raise ValueError(f"block_sq_norms needs a float32/float16/bfloat16 weight of >= 2 dims, got "
                         f"{weight.dtype} {list(weight.shape)}")
    w = weight.detach().contiguous()
    rows, cols = w.shape[0], math.prod(w.shape[1:])
    bh, bw = block
    nbr, nbc = -(-rows // bh), -(-cols // bw)
    out = torch.empty(nbr, nbc, dtype=torch.float32, device=w.device)
    nb = nbr * nbc
    if nb:
        _block_sq_launch[(cdiv(nb, tile),)](
            w, out, nb, nbc, rows, cols, bh, bw, BLOCK=tile, enable_fp_fusion=False,
        )
    return out


def _run_nm(w: Tensor, cand: Tensor | None, out: Tensor, n: int, m: int, name: str) -> None:
    """N:M mask of one contiguous weight into ``out`` (uint8, flat)."""
    rows, cols = w.shape[0], math.prod(w.shape[1:])
    gpr = -(-cols // m)
    n_groups = rows * gpr
    if n_groups == 0:
        return
    mp = next_power_of_2(m)
    bg = max(1, min(1024 if _INTERP else 256, 4096 // (mp * mp)))
    err = torch.zeros(2, dtype=torch.int32, device=w.device)
    _nm_launch[(cdiv(n_groups, bg),)](
        _bits(w), cand, out, err, n_groups, gpr, cols, n, m, _NAN_ABOVE[w.dtype],
        WIDE=w.dtype == torch.float32, HAS_CAND=cand is not None, BG=bg, MP=mp,
    )
    nan, short = err.tolist()
    if nan:
        raise UserError(f"cannot rank {name}: it contains NaN (did training diverge?)")
    if short:
        raise UserError(f"{name}: an N:M group has fewer candidates than its {n}:{m} quota")


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------


def _groups(weights: dict[str, Tensor], sparsity: float,
            scope: str) -> tuple[list[int], list[str], dict[str, int]]:
    """The selections of a call: per group the units kept and the name its errors give, and
    each tensor's group (global scope: one group; per tensor: one each)."""
    names = list(weights)
    if scope == "global":
        total = sum(w.numel() for w in weights.values())
        return [total - pruned_count(sparsity, total)], ["global scope"], dict.fromkeys(names, 0)
    keep = [w.numel() - pruned_count(sparsity, w.numel()) for w in weights.values()]
    return keep, names, {name: i for i, name in enumerate(names)}


def _u8(mask: Tensor) -> Tensor:
    return mask.contiguous().view(torch.uint8).reshape(-1)


def rerank_masks_into(
    weights: dict[str, Tensor],
    sparsity: float,
    out: dict[str, Tensor],
    *,
    kind: str = "unstructured",
    n: int = 2,
    m: int = 4,
    block: tuple[int, int] = (4, 4),
    scope: str = "global",
    candidates: dict[str, Tensor] | None = None,
    apply: bool = False,
    tile: int | None = None,
    hist_copies: int | None = None,
    algorithm: str = "atomic",
    window_margin: int | None = None,
    bracket: bool | None = None,
) -> None:
    """Triton masks written into preallocated ``out[name]`` (contiguous uint8, weight's shape).

    Same rules as :func:`rerank_masks` (1 = kept). ``weights`` must be contiguous when
    ``apply=True`` (the zeros are written through them). ``tile``: elements per program
    (power of two; None = default), exposed so tests can force many tiles; ``hist_copies``:
    private histogram copies per selection (None = picked from the grid; 1 under the interpreter),
    exposed so tests can run the multi-copy path on CPU; ``algorithm``: how the unstructured
    threshold is found (``"atomic"``, ``"radix"`` or ``"window"``, see :func:`select_units`;
    blocks and N:M ignore it); ``window_margin``, ``bracket``: see :func:`select_units`.
    """
    block = tuple(block)  # type: ignore[assignment]
    check_args(weights, sparsity, kind, n, m, block, scope, {"candidates": candidates})
    _check_algorithm(algorithm)
    if set(out) != set(weights):
        raise ValueError(f"out must have exactly the weights' names, got {sorted(out)} for {sorted(weights)}")
    for name, w in weights.items():
        o = out[name]
        if o.dtype != torch.uint8 or o.shape != w.shape or not o.is_contiguous() or o.device != w.device:
            raise ValueError(f"out[{name!r}] must be contiguous uint8 of shape {list(w.shape)} on {w.device}")
        if apply and not w.is_contiguous():
            raise ValueError(f"{name}: apply=True needs a contiguous weight")
    cands = {name: _u8(c) for name, c in (candidates or {}).items()}
    ws = {name: w.detach().contiguous() for name, w in weights.items()}

    if kind == "nm":
        # Every tensor's groups first: an error (NaN, too few candidates) leaves all weights as they were.
        for name, w in ws.items():
            _run_nm(w, cands.get(name), out[name].reshape(-1), n, m, name)
        if apply:
            bsz = _tile(tile)[0]
            for name, w in ws.items():
                if w.numel():
                    _apply_launch[(cdiv(w.numel(), bsz),)](_bits(w), out[name].reshape(-1), w.numel(), BLOCK=bsz)
            _bump_versions(weights)
        return

    keep, what, group = _groups(ws, sparsity, scope)
    segments: list[Segment] = []
    if kind == "unstructured":
        # Keys of different dtypes do not compare: a group mixing dtypes ranks in float32 (exact
        # for half precision, like the reference) and applies afterwards.
        dts: dict[int, set[torch.dtype]] = {}
        for name, w in ws.items():
            dts.setdefault(group[name], set()).add(w.dtype)
        late: list[str] = []
        for name, w in ws.items():
            mixed = len(dts[group[name]]) > 1
            src = w.float() if mixed else w
            if mixed and apply:
                late.append(name)
            segments.append(Segment(
                _bits(src), cands.get(name), None, out[name].reshape(-1), group[name],
                _NAN_ABOVE[src.dtype], apply and not mixed, name,
            ))
        _select_units(segments, keep, what, tile=tile, hist_copies=hist_copies, algorithm=algorithm,
                      window_margin=window_margin, thresholds=False, bracket=bracket)
        bsz = _tile(tile)[0]
        for name in late:
            w = ws[name]
            _apply_launch[(cdiv(w.numel(), bsz),)](_bits(w), out[name].reshape(-1), w.numel(), BLOCK=bsz)
        if apply:
            _bump_versions(weights)
        return

    # Blocks: select over block units, then expand to elements. The int32 histograms count the
    # elements the blocks stand for, so the element total is what must fit.
    elements = sum(w.numel() for w in ws.values())
    if elements >= INT32_MAX:
        raise ValueError(f"block selection: at most 2**31 - 2 weights per call, got {elements}")
    bh, bw = block
    bmasks: dict[str, Tensor] = {}
    for name, w in ws.items():
        rows, cols = w.shape[0], math.prod(w.shape[1:])
        nbr, nbc = -(-rows // bh), -(-cols // bw)
        bc = None
        if name in cands:
            cm = candidates[name].reshape(rows, cols)  # type: ignore[index]
            bp = cm[::bh, ::bw]
            up = bp.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:rows, :cols]
            if not torch.equal(up, cm):
                raise UserError(f"{name}: candidates are not aligned to {bh}x{bw} blocks")
            bc = _u8(bp)
        r = (rows - torch.arange(0, rows, bh, device=w.device)).clamp(max=bh)
        c = (cols - torch.arange(0, cols, bw, device=w.device)).clamp(max=bw)
        sizes = (r[:, None] * c[None, :]).to(torch.int32).reshape(-1)
        scores = block_sq_norms(w, block)
        bmasks[name] = torch.empty(nbr * nbc, dtype=torch.uint8, device=w.device)
        segments.append(Segment(_bits(scores), bc, sizes, bmasks[name], group[name], _NAN_ABOVE[torch.float32],
                                name=name))
    select_units(segments, keep, what, tile=tile, hist_copies=hist_copies)
    bsz, warps = _tile(tile)
    for name, w in ws.items():
        cols = math.prod(w.shape[1:])
        if w.numel():
            _expand_launch[(cdiv(w.numel(), bsz),)](
                _bits(w), bmasks[name], out[name].reshape(-1), w.numel(), cols, -(-cols // bw), bh, bw,
                APPLY=apply, BLOCK=bsz, num_warps=warps,
            )
    if apply:
        _bump_versions(weights)


class RerankPlan:
    """:func:`rerank_masks_into` for tensors that stay where they are (a pruner's weights, masks
    and candidates), prepared once and run many times.

    Unstructured masks by the ``"atomic"`` select, one dtype per selection (``scope``). Building
    the plan makes the launch tables and buffers; :meth:`run` queues every pass without a host
    sync and reads the counts once at the end, raising :class:`UserError` on NaN or too few
    candidates with every weight and mask left as it was. ``graph=True`` (CUDA) captures the
    passes in a CUDA graph after the first run and replays it from the second on, so a call
    costs its device time plus one replay and one sync instead of a dozen launches.

    ``warm_start`` (default): from the second run on, one pass first counts, per selection, the
    weights above a window of keys centred on the previous run's threshold and histograms those
    inside it (one bin per key: +-0.4% of the value in float32, +-1/8 octave in 16-bit floats),
    so that only the weights near the threshold take an atomic each. When the window holds the
    new threshold, that pass is the whole select; when it does not (or on NaN, or too few
    candidates), the two-pass select runs after it. Exact either way; ``last_warm_hit`` says
    which happened. float32 weights are read once on a hit: the window pass writes each weight's
    mask case (2 bits, into scratch), and the mask pass reads those and only the weights in the
    window.

    ``bracket`` (default: on a GPU for single 16-bit weights over at least 64 tiles, see
    :func:`bracket_by_default`; off under the interpreter): a cold select's pass 1 first histograms a sample (1/16 of every tile) and then
    takes atomics only inside the range of bins the sample brackets around the threshold; a
    bracket that misses runs the exact pass 1 after it. For float32 the same pass also counts by
    whole key the bins around the sample's estimate, which stand in for pass 2 when they hold
    the threshold's bin. ``last_path`` says which select found the thresholds: ``"warm"``,
    ``"bracket"`` or ``"full"``.

    The tensors' values may change between runs; their storage must not: the plan holds their
    addresses (so ``weights`` and ``candidates`` must be contiguous, and ``out`` contiguous
    uint8 of each weight's shape, as for :func:`rerank_masks_into`).
    """

    def __init__(
        self, weights: dict[str, Tensor], sparsity: float, out: dict[str, Tensor], *,
        scope: str = "global", candidates: dict[str, Tensor] | None = None, apply: bool = False,
        tile: int | None = None, hist_copies: int | None = None, graph: bool = False,
        warm_start: bool = True, bracket: bool | None = None,
    ) -> None:
        check_args(weights, sparsity, "unstructured", 2, 4, (4, 4), scope, {"candidates": candidates})
        if not weights:
            raise ValueError("a re-rank plan needs at least one weight")
        devs = {w.device for w in weights.values()}
        if len(devs) > 1:
            raise ValueError(f"a re-rank plan's weights must share one device, got {sorted(map(str, devs))}")
        dev = next(iter(devs))
        if graph and dev.type != "cuda":
            raise ValueError("graph=True needs CUDA tensors (CUDA graphs)")
        for name, w in weights.items():
            o = out[name]
            if o.dtype != torch.uint8 or o.shape != w.shape or not o.is_contiguous() or o.device != dev:
                raise ValueError(f"out[{name!r}] must be contiguous uint8 of shape {list(w.shape)} on {dev}")
            if not w.is_contiguous():
                raise ValueError(f"{name}: a re-rank plan reads the weight in place; it must be contiguous")
            if candidates and name in candidates and not candidates[name].is_contiguous():
                raise ValueError(f"candidates[{name!r}]: a re-rank plan reads it in place; it must be contiguous")
        if scope == "global" and len({w.dtype for w in weights.values()}) > 1:
            raise ValueError("a global re-rank plan needs weights of one dtype (rerank_masks_into ranks "
                             "mixed dtypes in float32)")
        keep, what, group = _groups(weights, sparsity, scope)
        cands = candidates or {}
        self._segments = [
            Segment(_bits(w.detach()), _u8(cands[name]) if name in cands else None, None, out[name].reshape(-1),
                    group[name], _NAN_ABOVE[w.dtype], apply, name)
            for name, w in weights.items()
        ]
        block, warps = _tile(tile)
        launches, grids, wide = _launches(self._segments, len(keep), block)
        copies = hist_copies if hist_copies is not None else _hist_copies(len(keep), sum(grids))
        self._select = _AtomicSelect(launches, self._segments, keep, what, wide, block, warps, dev, copies,
                                     warm=warm_start, bracket=bracket)
        self._weights = weights if apply else {}
        self._warm = warm_start
        self._graph_wanted = graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self.runs = 0
        self.last_warm_hit = False
        self.last_path = ""

    @property
    def hist_copies(self) -> int:
        """Private histogram copies per selection of the cold pass 1 (given or chosen)."""
        return self._select.copies

    @property
    def bracket(self) -> bool:
        """Whether a cold select brackets its pass 1 by a sample (given or chosen)."""
        return self._select.bracket

    @property
    def captured(self) -> bool:
        """Whether :meth:`run` replays a CUDA graph."""
        return self._graph is not None

    def run(self) -> list[tuple[int, int]]:
        """Re-rank now: write the masks (and zero the pruned weights). Returns per selection group
        ``(threshold key, ties kept)`` like :func:`select_units`."""
        warm = self._warm and self.runs > 0  # the first run has no threshold to start from
        if self._graph is not None:
            self._graph.replay()
        else:
            self._select.enqueue(warm=warm)
        result, self.last_warm_hit = self._select.finish(warm=warm)
        sel = self._select
        self.last_path = ("warm" if self.last_warm_hit else
                          "bracket" if sel.bracket and not sel.last_bracket_missed else "full")
        if self._weights:
            _bump_versions(self._weights)
        self.runs += 1
        if self._graph_wanted and self._graph is None:
            # Captured after a run that compiled the cold path's kernels; the warm ones compile
            # here, by running the warm pass once for real (a capture cannot compile).
            if self._warm:
                self._select.compile_warm()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._select.enqueue(warm=self._warm)
            self._graph = graph
        return result


def _bump_versions(weights: dict[str, Tensor]) -> None:
    """The kernels write the zeros through raw pointers, which autograd does not see: bump each
    weight's version counter as an in-place torch op would, so a graph that saved the old values
    raises instead of silently using the new ones (and version-keyed caches see the change)."""
    torch.autograd.graph.increment_version([w for w in weights.values() if not w.is_inference()])


def rerank_masks(
    weights: dict[str, Tensor],
    sparsity: float,
    *,
    kind: str = "unstructured",
    n: int = 2,
    m: int = 4,
    block: tuple[int, int] = (4, 4),
    scope: str = "global",
    candidates: dict[str, Tensor] | None = None,
    always_keep: dict[str, Tensor] | None = None,
    apply: bool = False,
    backend: str = "triton",
    algorithm: str = "atomic",
) -> dict[str, Tensor]:
    """Exact magnitude masks (``True`` = kept), bit-identical to ``ranking.magnitude_masks``.

    ``weights``: name -> float32/bf16/fp16 tensor (``[out, in, ...]`` for ``nm``/``block``, any
    shape for ``unstructured``); ``candidates``/``always_keep``: name -> bool mask of the same
    shape. Returns name -> bool mask of each weight's shape, in dict order. ``apply=True``
    zeroes the pruned weights in place (kept ones untouched). ``backend``: ``"triton"`` or
    ``"torch"`` (``naive.py``); ``always_keep`` is only implemented by the torch backend, which
    the triton backend falls back to when it is given. ``algorithm``: ``"atomic"``, ``"radix"``
    or ``"window"`` (the triton backend's unstructured selection, see :func:`select_units`). Raises
    ``ValueError`` on bad arguments and :class:`UserError` on NaN weights or too few candidates.
    """
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    _check_algorithm(algorithm)
    if backend == "triton" and always_keep:
        log.info("rerank_masks: always_keep is implemented by the torch backend only; running backend 'torch'")
    if backend == "torch" or always_keep:
        return rerank_masks_torch(
            weights, sparsity, kind=kind, n=n, m=m, block=block, scope=scope,
            candidates=candidates, always_keep=always_keep, apply=apply,
        )
    out = {name: torch.empty(w.shape, dtype=torch.uint8, device=w.device) for name, w in weights.items()}
    if apply:
        # Non-contiguous weights: select on a copy, write the zeros back through the original.
        conts = {name: w if w.is_contiguous() else w.detach().contiguous() for name, w in weights.items()}
        rerank_masks_into(conts, sparsity, out, kind=kind, n=n, m=m, block=block, scope=scope,
                          candidates=candidates, apply=True, algorithm=algorithm)
        with torch.no_grad():
            for name, w in weights.items():
                if conts[name] is not w:
                    w.copy_(conts[name])
    else:
        rerank_masks_into(weights, sparsity, out, kind=kind, n=n, m=m, block=block, scope=scope,
                          candidates=candidates, algorithm=algorithm)
    return {name: o.view(torch.bool) for name, o in out.items()}


def magnitude_threshold(
    weights: dict[str, Tensor], sparsity: float, *, candidates: dict[str, Tensor] | None = None
) -> tuple[float, int]:
    """Global unstructured selection summary: (K-th largest ``|w|`` among candidates, ties kept).

    The kept set is every candidate with ``|w| >`` the threshold plus the first ``ties kept``
    candidates equal to it (flat order). ``(inf, 0)`` when nothing is kept.
    """
    masks = {name: torch.empty(w.shape, dtype=torch.uint8, device=w.device) for name, w in weights.items()}
    check_args(weights, sparsity, "unstructured", 2, 4, (4, 4), "global", {"candidates": candidates})
    if len({w.dtype for w in weights.values()}) > 1:
        raise ValueError("magnitude_threshold needs tensors of one dtype")
    ws = {name: w.detach().contiguous() for name, w in weights.items()}
    total = sum(w.numel() for w in ws.values())
    cands = {name: _u8(c) for name, c in (candidates or {}).items()}
    segs = [
        Segment(_bits(w), cands.get(name), None, masks[name].reshape(-1), 0, _NAN_ABOVE[w.dtype], name=name)
        for name, w in ws.items()
    ]
    (t, need), = select_units(segs, [total - pruned_count(sparsity, total)], ["global scope"])
    if need == 0:
        return math.inf, 0
    dt = next(iter(ws.values())).dtype
    if dt == torch.float32:
        val = torch.tensor([t], dtype=torch.int32).view(torch.float32)
    else:
        val = torch.tensor([t], dtype=torch.int16).view(dt)
    return float(val.item()), need
