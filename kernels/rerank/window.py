"""Exact magnitude selection through a sampled window (``algorithm="window"``), in Triton.

The histogram selects of :mod:`.select` read every weight two or three times and spend most of a
pass on atomics. This one reads every weight once, and its writes are sparse:

1. **Sample.** Each tile gives ``SAMPLES_PER_TILE`` keys at a fixed stride from a hashed offset
   (non-candidates count as ``-1``, below every key). One torch sort per call, no host sync.
2. **Bracket.** Per group, the sample ranks around the expected rank of the ``K``-th largest,
   ``r = K * samples / units``, give a key interval ``[lo, hi]``: the ranks ``r +- m`` with
   ``m = 5 sigma + 16`` (``sigma`` the binomial spread of a sample rank). ``lo >= 1``, so the
   pruned zeros of a pruning run stay out of the window.
3. **One pass** over every weight. Candidates with ``key > hi`` are kept (mask 1), the rest get
   mask 0 for now. Candidates with ``lo <= key <= hi`` (the *window*) go, with their place, into a
   compact buffer. Per group it counts ``above`` (``key > hi``), the window and NaNs. With
   ``apply``, nonzero weights that are surely pruned (``key < lo`` or not a candidate) are zeroed,
   and their old bits go into an undo log first.
4. **Settle, still on the device.** A one-program kernel checks the brackets: no NaN,
   ``above < K <= above + window`` per group, and the window fits its buffer. The buffer is
   sorted (key descending, flat index ascending: the reference's tie order; empty slots last),
   and a kernel keeps the first ``K - above`` entries of each group: it writes their mask bytes
   and zeroes the others where the weights are applied. It does nothing when the check failed.
5. **One host sync**, at the end, reads the check and the counts.

Exactness never depends on the sample: a missed bracket (or a NaN, or a full window buffer)
restores the logged weights and leaves the call to the histogram select, which also gives its
errors. That is logged at DEBUG. So are undo-log overflows (the first re-rank of a dense model
prunes most weights): the masked zeroing then runs as one more pass over the launch.

Tiny groups (fewer than ``_MIN_SAMPLES`` sample slots in range) put all their candidates in the
window, which makes the sort exact for them too, zeros included.

Costs per call: one read of every weight, one mask byte per weight written, about ``1/256`` of the
weights read for the sample, a sort of the sample and of the window buffer, one host sync, and
few launches (sample, its sort, bracket, counters, pass, check, buffer sort and gather, settle):
the small steps are kernels, not chains of torch ops, and the host tables go over in pinned,
non-blocking copies, so the host queues everything before it waits once.
"""

from __future__ import annotations

import logging
import math

import torch
import triton
import triton.language as tl

from ..host import cdiv, next_power_of_2
from ..launch import DirectLauncher
from ._segments import (
    INT32_MAX,
    Segment,
    _candidates,
    _keys,
    _Launch,
    _segment_tile,
    _src,
    to_device,
)

log = logging.getLogger(__name__)

SAMPLES_PER_TILE = 16
_HASH = 40503  # odd multiplier: the sample offset differs between neighbouring tiles
_MIN_SAMPLES = 64  # fewer sample slots in range: the whole group is the window
_SIGMAS = 5.0
_SLACK = 16


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _sample_kernel(tab_src, tab_cand, tab_group, tile_seg, first_tile, seg_n, sample,
                   WIDE: tl.constexpr, HAS_CAND: tl.constexpr, SPT: tl.constexpr, STRIDE: tl.constexpr):
    """Sample slot ``i`` of tile ``pid``: the key ``k`` of element ``h + i * STRIDE`` (``-1``: out
    of range or not a candidate), ``h`` a hash of ``pid`` below ``STRIDE``, stored as the int64
    ``group << 32 | (2**31 - 1 - k)``, so one ascending sort orders by group, then key descending."""
    pid = tl.program_id(0).to(tl.int64)
    seg = tl.load(tile_seg + pid).to(tl.int64)
    local = pid - tl.load(first_tile + seg)
    h = (pid * 40503) % STRIDE  # _HASH
    offs = local * (SPT * STRIDE) + h + tl.arange(0, SPT).to(tl.int64) * STRIDE
    valid = offs < tl.load(seg_n + seg)
    _, key = _keys(_src(tab_src, seg, WIDE), offs, valid, WIDE)
    c = _candidates(tab_cand, seg, offs, valid, HAS_CAND)
    k = tl.where(c, key, -1).to(tl.int64)
    g = tl.load(tab_group + seg)
    tl.store(sample + pid * SPT + tl.arange(0, SPT), (g << 32) | (2147483647 - k))


@triton.jit
def _bracket_kernel(ordered, plan, lo, hi, G, BLOCK: tl.constexpr):
    """Per group ``g``: ``plan[g, :3] = (lo index, hi index or -1, mode)`` into the sorted sample
    ``ordered``; writes the key interval ``[lo[g], hi[g]]``. Mode 0: sample keys (``lo >= 1``,
    ``hi >= lo``, ``hi`` = every key when its index is -1); 1: every key; 2: none (keeps nothing)."""
    gs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = gs < G
    lo_i = tl.load(plan + gs * 5, mask=ok, other=0)
    hi_i = tl.load(plan + gs * 5 + 1, mask=ok, other=0)
    mode = tl.load(plan + gs * 5 + 2, mask=ok, other=0)
    k_lo = 2147483647 - (tl.load(ordered + lo_i, mask=ok, other=0) & 0xFFFFFFFF)
    k_hi = 2147483647 - (tl.load(ordered + tl.maximum(hi_i, 0), mask=ok, other=0) & 0xFFFFFFFF)
    k_lo = tl.maximum(k_lo, 1)
    k_hi = tl.maximum(tl.where(hi_i < 0, 2147483647, k_hi), k_lo)
    k_lo = tl.where(mode == 1, 0, tl.where(mode == 2, 2147483647, k_lo))
    k_hi = tl.where(mode == 0, k_hi, 2147483647)
    tl.store(lo + gs, k_lo.to(tl.int32), mask=ok)
    tl.store(hi + gs, k_hi.to(tl.int32), mask=ok)


@triton.jit
def _window_kernel(
    tab_src, tab_cand, tab_out, tab_group, tab_nan, tab_apply, tab_base, tile_seg, first_tile, seg_n,
    lo, hi, stats, reserved, win_key, win_loc, win_cap, undo_loc, undo_bits, undo_cap,
    WIDE: tl.constexpr, HAS_CAND: tl.constexpr, APPLY: tl.constexpr, BLOCK: tl.constexpr,
):
    """The one pass over the weights: masks of the sure keeps, the window into its buffer,
    per-group counts ``stats[g] = (nan, above, window)``, and (``APPLY``) the sure prunes zeroed
    through the undo log. ``reserved = (window slots, undo slots)`` taken so far."""
    pid = tl.program_id(0).to(tl.int64)
    seg, offs, valid = _segment_tile(pid, tile_seg, first_tile, seg_n, BLOCK)
    g = tl.load(tab_group + seg).to(tl.int64)
    src = _src(tab_src, seg, WIDE)
    bits, key = _keys(src, offs, valid, WIDE)
    c = _candidates(tab_cand, seg, offs, valid, HAS_CAND)
    t_lo = tl.load(lo + g)
    t_hi = tl.load(hi + g)
    above = c & (key > t_hi)
    win = c & (key >= t_lo) & (key <= t_hi)
    isnan = valid & (key > tl.load(tab_nan + seg))
    nwin = tl.sum(win.to(tl.int32), axis=0)
    tl.atomic_add(stats + g * 3, tl.sum(isnan.to(tl.int32), axis=0), sem="relaxed")
    tl.atomic_add(stats + g * 3 + 1, tl.sum(above.to(tl.int32), axis=0), sem="relaxed")
    tl.atomic_add(stats + g * 3 + 2, nwin, sem="relaxed")
    loc = (seg << 32) | offs
    # Slots in the window buffer: one atomic per program, then an in-tile scan.
    first = tl.atomic_add(reserved, nwin, sem="relaxed").to(tl.int64)
    pos = first + tl.cumsum(win.to(tl.int64), axis=0) - 1
    ok = win & (pos < win_cap)
    flat = tl.load(tab_base + seg) + offs
    # key descending, then flat index ascending, as one descending int64 (flat < 2**31 - 1).
    tl.store(win_key + pos, (key.to(tl.int64) << 31) | (2147483647 - flat), mask=ok)
    tl.store(win_loc + pos, loc, mask=ok)
    out = tl.load(tab_out + seg).to(tl.pointer_type(tl.uint8))
    tl.store(out + offs, above.to(tl.uint8), mask=valid)
    if APPLY:
        applies = tl.load(tab_apply + seg) != 0
        drop = valid & applies & (bits != 0) & ((~c) | (key < t_lo))
        first_u = tl.atomic_add(reserved + 1, tl.sum(drop.to(tl.int32), axis=0), sem="relaxed").to(tl.int64)
        upos = first_u + tl.cumsum(drop.to(tl.int64), axis=0) - 1
        logged = drop & (upos < undo_cap)
        tl.store(undo_loc + upos, loc, mask=logged)
        tl.store(undo_bits + upos, bits.to(tl.int32), mask=logged)
        tl.store(src + offs, tl.zeros_like(bits), mask=logged)


@triton.jit
def _check_kernel(counters, plan, caps, group_tab, flag, G, L, BLOCK: tl.constexpr):
    """One program, after the pass: ``flag = 1`` iff no NaN, every window fits its buffer and every
    live group's ``K`` lies in ``(above, above + window]``; ``group_tab[g] = (run start, need)``,
    the run start being the window entries of the same launch's earlier groups."""
    gs = tl.arange(0, BLOCK)
    ok = gs < G
    nan = tl.load(counters + gs * 3, mask=ok, other=0)
    above = tl.load(counters + gs * 3 + 1, mask=ok, other=0).to(tl.int64)
    win = tl.load(counters + gs * 3 + 2, mask=ok, other=0).to(tl.int64)
    keep = tl.load(plan + gs * 5 + 3, mask=ok, other=0)
    launch = tl.load(plan + gs * 5 + 4, mask=ok, other=0)
    bad = (nan != 0) | ((keep > 0) & ((above >= keep) | (keep > above + win)))
    ls = tl.arange(0, 2)  # at most two launches: 32- and 16-bit keys
    taken = tl.load(counters + G * 3 + ls * 2, mask=ls < L, other=0).to(tl.int64)
    over = taken > tl.load(caps + ls, mask=ls < L, other=0)
    good = (tl.sum(bad.to(tl.int32), axis=0) == 0) & (tl.sum(over.to(tl.int32), axis=0) == 0)
    run = tl.zeros((BLOCK,), tl.int64)
    for li in tl.static_range(2):
        w = tl.where(launch == li, win, 0)
        run += tl.where(launch == li, tl.cumsum(w, axis=0) - w, 0)
    tl.store(group_tab + gs * 2, run, mask=ok)
    tl.store(group_tab + gs * 2 + 1, tl.where(keep > 0, keep - above, 0), mask=ok)
    tl.store(flag, good.to(tl.int32))


@triton.jit
def _settle_kernel(loc, taken, cap, flag, group_tab, tab_src, tab_out, tab_group, tab_apply,
                   WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """Window entry ``i`` at ``loc[i] = segment << 32 | offset`` (entries in group runs, each run
    in rank order; ``taken`` entries, none when ``flag`` is 0): kept iff
    ``i - start[g] < need[g]`` (``group_tab[g] = (start, need)``). Writes its mask byte, and
    zeroes its weight when not kept and its segment applies."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = (i < tl.load(taken)) & (i < cap) & (tl.load(flag) != 0)
    lc = tl.load(loc + i, mask=ok, other=0)
    seg = lc >> 32
    off = lc & 0xFFFFFFFF
    g = tl.load(tab_group + seg, mask=ok, other=0)
    keep = (i - tl.load(group_tab + g * 2, mask=ok, other=0)) < tl.load(group_tab + g * 2 + 1, mask=ok, other=0)
    out = tl.load(tab_out + seg, mask=ok, other=0).to(tl.pointer_type(tl.uint8))
    tl.store(out + off, keep.to(tl.uint8), mask=ok)
    src = tl.load(tab_src + seg, mask=ok, other=0).to(tl.pointer_type(tl.int32 if WIDE else tl.int16))
    applies = tl.load(tab_apply + seg, mask=ok, other=0) != 0
    tl.store(src + off, tl.zeros((BLOCK,), tl.int32 if WIDE else tl.int16), mask=ok & applies & ~keep)


@triton.jit
def _restore_kernel(loc, bits, count, tab_src, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """Undo: write the logged ``bits[i]`` back at ``loc[i]``."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = i < count
    lc = tl.load(loc + i, mask=ok, other=0)
    b = tl.load(bits + i, mask=ok, other=0)
    src = tl.load(tab_src + (lc >> 32), mask=ok, other=0).to(tl.pointer_type(tl.int32 if WIDE else tl.int16))
    tl.store(src + (lc & 0xFFFFFFFF), b.to(tl.int32 if WIDE else tl.int16), mask=ok)


@triton.jit
def _zero_pruned_kernel(tab_src, tab_out, tab_apply, tile_seg, first_tile, seg_n,
                        WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """Zero the weights whose mask byte is 0, in the segments that apply (undo-log overflow)."""
    pid = tl.program_id(0).to(tl.int64)
    seg, offs, valid = _segment_tile(pid, tile_seg, first_tile, seg_n, BLOCK)
    valid = valid & (tl.load(tab_apply + seg) != 0)
    out = tl.load(tab_out + seg).to(tl.pointer_type(tl.uint8))
    k = tl.load(out + offs, mask=valid, other=1)
    src = _src(tab_src, seg, WIDE)
    tl.store(src + offs, tl.zeros((BLOCK,), tl.int32 if WIDE else tl.int16), mask=valid & (k == 0))


# Repeated launches skip Triton's per-call argument binding (``kernels/launch.py``).
_bracket_launch = DirectLauncher(_bracket_kernel)
_check_launch = DirectLauncher(_check_kernel)
_restore_launch = DirectLauncher(_restore_kernel)
_sample_launch = DirectLauncher(_sample_kernel)
_settle_launch = DirectLauncher(_settle_kernel)
_window_launch = DirectLauncher(_window_kernel)
_zero_pruned_launch = DirectLauncher(_zero_pruned_kernel)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _in_range_slots(n: int, first_tile: int, block: int, spt: int) -> int:
    """Sample slots of a segment of ``n`` units that fall inside it (mirrors ``_sample_kernel``)."""
    stride = block // spt
    full, rem = divmod(n, block)
    slots = full * spt
    if rem:
        h = ((first_tile + full) * _HASH) % stride
        slots += max(0, -(-(rem - h) // stride))
    return slots


def interval_ranks(keep: int, samples: int, units: int, margin: int | None = None) -> tuple[int, int, int] | None:
    """The interval rule: sample ranks ``(lo, hi, m)`` around the expected rank of the ``keep``-th
    largest of ``units`` weights, given ``samples`` in-range sample keys sorted largest first.
    ``lo = ceil(r + m)``, ``hi = floor(r - m)`` (``< 0``: no upper bound), ``r = keep * samples /
    units``, ``m`` = ``margin`` or ``5 sigma + 16``. None: too few samples, the whole group is the
    window. (``benchmarks/window_size.py`` simulates with this same rule.)"""
    if samples < _MIN_SAMPLES:
        return None
    r = keep * samples / units
    p = min(max(r / samples, 0.0), 1.0)
    m = margin if margin is not None else math.ceil(_SIGMAS * math.sqrt(samples * p * (1 - p)) + _SLACK)
    return math.ceil(r + m), math.floor(r - m), m


def window_select(
    launches: list[_Launch], segments: list[Segment], grids: list[int], keep: list[int], block: int, warps: int,
    *, margin: int | None = None, thresholds: bool = True,
) -> list[tuple[int, int]] | None:
    """Masks (and ``apply`` zeros) of every segment, or None when the bracket missed.

    Single weights only (no unit sizes); ``grids``: each segment's tiles. ``margin``: sample ranks on each side of the expected
    rank (None: ``5 sigma + 16``), exposed so tests can force a miss. ``thresholds``: also return
    per group ``(threshold key, ties kept)`` like :func:`.select.select_units` (one more host sync).
    On None, every weight is as it was and the masks are partly written.
    """
    groups = len(keep)
    if not launches:  # nothing but empty tensors: nothing to keep
        return [(INT32_MAX, 0)] * groups
    dev = segments[0].src.device
    spt = min(SAMPLES_PER_TILE, block)
    stride = block // spt

    # Per group (host): units, sample slots in range, slots in all, its launch.
    units = [0] * groups
    in_range = [0] * groups
    slots = [0] * groups
    launch_of = [-1] * groups
    for li, ln in enumerate(launches):
        first = 0
        for i in ln.index:
            s = segments[i]
            units[s.group] += s.src.numel()
            in_range[s.group] += _in_range_slots(s.src.numel(), first, block, spt)
            slots[s.group] += grids[i] * spt
            launch_of[s.group] = li
            first += grids[i]

    # 1. Sample, sorted by (group, key descending) in one sort.
    samples = []
    for ln in launches:
        sample = torch.empty(ln.tiles * spt, dtype=torch.int64, device=dev)
        _sample_launch[(ln.tiles,)](
            ln.src, ln.cand, ln.group, ln.tile_seg, ln.first, ln.n, sample,
            WIDE=ln.wide, HAS_CAND=ln.has_cand, SPT=spt, STRIDE=stride, num_warps=1,
        )
        samples.append(sample)
    ordered = (samples[0] if len(samples) == 1 else torch.cat(samples)).sort().values

    # 2. Brackets: sample ranks around the expected rank of the K-th largest.
    start = [0] * groups
    for g in range(1, groups):
        start[g] = start[g - 1] + slots[g - 1]
    # per group: lo index, hi index, mode (0 ranks, 1 all, 2 none), K, launch
    plan = [[0, -1, 2, keep[g], max(launch_of[g], 0)] for g in range(groups)]
    cap = [0] * len(launches)
    for g in range(groups):
        if keep[g] == 0:
            continue
        ranks = interval_ranks(keep[g], in_range[g], units[g], margin)
        if ranks is None:
            plan[g][2] = 1
            cap[launch_of[g]] += units[g]
            continue
        lo_rank, hi_rank, m = ranks
        plan[g][:3] = [start[g] + min(lo_rank, slots[g] - 1), start[g] + hi_rank if hi_rank >= 0 else -1, 0]
        cap[launch_of[g]] += min(units[g], math.ceil((2 * m + 4) * units[g] / in_range[g] * 1.25))
    caps = [min(c + 1024, ln.units) for c, ln in zip(cap, launches, strict=True)]
    tables = to_device(torch.tensor([x for row in plan for x in row] + caps, dtype=torch.int64), dev)
    plan_t, caps_t = tables[:5 * groups], tables[5 * groups:]
    bounds = torch.empty(2, groups, dtype=torch.int32, device=dev)
    _bracket_launch[(cdiv(groups, 128),)](ordered, plan_t, bounds[0], bounds[1], groups, BLOCK=128)

    # 3. The pass. Counters (per group: NaN, above, window; per launch: slots taken) in one buffer.
    # Twice the warps of the other passes: its int64 places and sort keys take registers, and
    # compiled for sm_90 a 4096-unit tile needs 186-205 per thread with 8 warps (one 8-warp block
    # per SM) but 128 with 16 (16 warps per SM, more loads in flight).
    pass_warps = min(32, 2 * warps)
    counters = torch.zeros(3 * groups + 2 * len(launches), dtype=torch.int32, device=dev)
    bufs = []
    for li, ln in enumerate(launches):
        apply = any(segments[i].apply for i in ln.index)
        wcap = caps[li]
        ucap = min(ln.units, wcap + ln.units // 32) if apply else 0
        win_key = torch.full((wcap,), -1, dtype=torch.int64, device=dev)  # -1: no entry, sorts last
        win_loc = torch.empty(wcap, dtype=torch.int64, device=dev)
        undo_loc = torch.empty(max(ucap, 1), dtype=torch.int64, device=dev)
        undo_bits = torch.empty(max(ucap, 1), dtype=torch.int32, device=dev)
        _window_launch[(ln.tiles,)](
            ln.src, ln.cand, ln.out, ln.group, ln.nan_above, ln.apply, ln.base, ln.tile_seg, ln.first, ln.n,
            bounds[0], bounds[1], counters, counters[3 * groups + 2 * li:], win_key, win_loc, wcap,
            undo_loc, undo_bits, ucap,
            WIDE=ln.wide, HAS_CAND=ln.has_cand, APPLY=apply, BLOCK=block, num_warps=pass_warps,
        )
        bufs.append((win_key, win_loc, wcap, undo_loc, undo_bits, ucap))

    # 4. On the device, no host sync: check the brackets, and settle every window (a no-op when
    # the check failed): sort its buffer (group runs, key descending, flat index ascending; empty
    # slots last) and keep the first K - above of each group.
    group_tab = torch.empty(groups, 2, dtype=torch.int64, device=dev)
    flag = torch.empty(1, dtype=torch.int32, device=dev)
    _check_launch[(1,)](counters, plan_t, caps_t, group_tab, flag, groups, len(launches),
                        BLOCK=next_power_of_2(groups))
    keys = []
    for li, ln in enumerate(launches):
        win_key, win_loc, wcap, _, _, _ = bufs[li]
        sk, order = win_key.sort(descending=True)
        loc = win_loc[order]
        if len({segments[i].group for i in ln.index}) > 1:
            seg = (loc >> 32).clamp(0, len(ln.index) - 1)  # empty slots hold no place
            grp = torch.where(sk < 0, groups, ln.group[seg])
            o2 = grp.sort(stable=True).indices
            sk, loc = sk[o2], loc[o2]
        _settle_launch[(cdiv(wcap, block),)](
            loc, counters[3 * groups + 2 * li:], wcap, flag, group_tab, ln.src, ln.out, ln.group, ln.apply,
            WIDE=ln.wide, BLOCK=block, num_warps=warps,
        )
        keys.append(sk)

    # 5. One host sync, at the end: the check, the counts, and what is left to do.
    host = torch.cat([counters, flag]).tolist()
    nan, above, win = host[0:3 * groups:3], host[1:3 * groups:3], host[2:3 * groups:3]
    taken = [(host[3 * groups + 2 * li], host[3 * groups + 2 * li + 1]) for li in range(len(launches))]
    if not host[-1]:
        if any(nan):
            reason = "NaN weights"
        elif any(t[0] > c for t, c in zip(taken, caps, strict=True)):
            reason = "the window overflowed its buffer"
        else:
            g = next(g for g in range(groups) if keep[g] and not above[g] < keep[g] <= above[g] + win[g])
            reason = f"group {g}: {keep[g]} kept is outside ({above[g]}, {above[g] + win[g]}]"
        for li, ln in enumerate(launches):
            _, _, _, undo_loc, undo_bits, ucap = bufs[li]
            n_undo = min(taken[li][1], ucap)
            if n_undo:
                _restore_launch[(cdiv(n_undo, block),)](
                    undo_loc, undo_bits, n_undo, ln.src, WIDE=ln.wide, BLOCK=block, num_warps=warps)
        log.debug("window select missed (%s); the histogram select takes over", reason)
        return None
    for li, ln in enumerate(launches):
        log.debug("window select: %d of %d units in the window", taken[li][0], ln.units)
        ucap = bufs[li][5]
        if taken[li][1] > ucap:  # undo log full: some sure prunes were left for this pass
            log.debug("window select: %d weights to zero, undo log holds %d; zeroing in one more pass",
                      taken[li][1], ucap)
            _zero_pruned_launch[(ln.tiles,)](
                ln.src, ln.out, ln.apply, ln.tile_seg, ln.first, ln.n,
                WIDE=ln.wide, BLOCK=block, num_warps=warps,
            )
    result: list[tuple[int, int]] = [(INT32_MAX, 0)] * groups
    if thresholds:  # per live group: its last kept entry's key, and how many kept entries have it
        table = group_tab.tolist()  # (run start, need), as the settle kernel used them
        sorted_keys = [(sk >> 31).cpu() for sk in keys]  # the windows are small
        for g, (run, need) in enumerate(table):
            if need:
                kept = sorted_keys[launch_of[g]][run:run + need]
                result[g] = (int(kept[-1]), int((kept == kept[-1]).sum()))
    return result
