"""Compile every Triton kernel of the package for a Hopper GPU (sm_90) on a machine without one.

    python -m tests.kernels.sm90_compile [--full]

Triton compiles to a cubin (its bundled ptxas) without a driver, so the code paths that only run
on a GPU get their type checks, lowering and register allocation here: the autotuner's GPU
configs (the interpreter runs one small config), the register-operand orientations (``W_AS_A``),
tensor-core precisions, and every constexpr branch of the re-rank and small-row kernels. It
must run without ``TRITON_INTERPRET`` (which swaps the kernels for interpreted ones); the test
in ``test_sm90_compile.py`` runs it in a subprocess. Prints one line per compile and exits 1 if
any fails. ``--full``: every autotune config of the masked-linear and small-row kernels in every
variant, not one of each register layout class.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

TARGET_ARCH = 90
Spec = tuple[str, Any, dict[str, str], dict[str, Any], dict[str, int]]  # name, fn, types, constexprs, options


def _jit(kernel: Any) -> Any:
    """The JITFunction under autotune/heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _compile(fn: Any, types: dict[str, str], constexprs: dict[str, Any], options: dict[str, int]) -> Any:
    """The compiled kernel. ``types``: each runtime argument's type; the value ``1`` stands for
    an int argument equal to 1, which Triton's launcher turns into a constant, and a type with
    the suffix ``:16`` for one divisible by 16, which it marks so (``tt.divisibility``). Pointers
    are marked 16-byte aligned, as torch allocations are. These are the specializations a launch
    on a GPU makes, and the contiguity they prove decides vectorized and asynchronous loads."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        t = types.get(p.name)
        if p.is_constexpr or t is None or t == 1:
            sig[p.name] = "constexpr"
            const[p.name] = constexprs.get(p.name) if p.is_constexpr else t
            continue
        t, _, div = t.partition(":")
        sig[p.name] = t
        if t.startswith("*") or div == "16":
            attrs[(i,)] = [["tt.divisibility", 16]]
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexpr {missing}")
    return triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", TARGET_ARCH, 32),
                          options=options)


def _ptr(dtype: str) -> str:
    return "*" + dtype


# Row-major tensors of the benchmark shapes: unit inner strides, the rest divisible by 16.
_ML_DIMS: dict[str, Any] = {"R": "i32", "N": "i32:16", "K": "i32:16", "L": "i32", "R_BUCKET": "i32:16"}
_ML_STRIDES: dict[str, Any] = {
    **{n: "i32:16" for n in ("stride_xr", "stride_wn", "stride_ml", "stride_mn", "stride_yr", "stride_dyr",
                             "stride_dxr", "stride_dwn")},
    **dict.fromkeys(("stride_xk", "stride_wk", "stride_yn", "stride_dyn", "stride_dxk", "stride_dwk"), 1),
}
_MASK_PTR = {0: "*u8", 1: "*u8", 2: "*i32", 3: "*u8"}


def _ml_spec(kernel: str, cfg: Any, dt: str, prec: str, split: bool, mode: int, pathway: bool,
             unaligned: bool = False) -> Spec:
    """One masked-linear compile. ``unaligned``: the odd shapes of the CPU tests (K = 41, 389):
    no divisibility, inner strides still 1."""
    from sparse_rnnt.kernels.masked_linear import fused

    dims = {**_ML_DIMS, **_ML_STRIDES}
    if unaligned:
        dims = {k: 1 if v == 1 else "i32" for k, v in dims.items()}
    types = {**dims, "m_ptr": _MASK_PTR[mode], "perm_ptr": "*i64" if pathway else None,
             "seg_ptr": "*i64" if pathway else None,
             **{a: _ptr(dt) for a in ("x_ptr", "w_ptr", "y_ptr", "dy_ptr", "dx_ptr", "dw_ptr", "b_ptr")}}
    const = {**cfg.kwargs, "MASK_MODE": mode, "PATHWAY": pathway, "PREC": prec, "UPCAST": False,
             "SPLIT_ACC": split, "HAS_BIAS": True, "HARD": pathway, "GROUP": fused._GROUP}
    name = (f"{kernel} {dt} {prec} mode={mode} pathway={pathway} {cfg.kwargs} warps={cfg.num_warps}"
            + (" odd shape" if unaligned else ""))
    return name, _jit(getattr(fused, kernel)), types, const, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _masked_linear(full: bool) -> Iterator[Spec]:
    from sparse_rnnt.kernels.masked_linear import fused

    # (dtype, PREC, SPLIT_ACC): what _prec/_split_acc pick on a GPU; with the mask modes each runs.
    variants = [(dt, prec, split, mode, pathway)
                for dt, prec, split in (("bf16", "ieee", False), ("fp16", "ieee", False), ("fp32", "tf32", False),
                                        ("fp32", "ieee", True))
                for mode in (0, 1, 2, 3) for pathway in (False, True)]
    for kernel, configs in (("_fwd_kernel", fused._FWD_CONFIGS), ("_dx_kernel", fused._DX_CONFIGS),
                            ("_dw_kernel", fused._DW_CONFIGS)):
        # Default: every register layout class in bf16 bit words, and the other dtypes, precisions,
        # mask modes and pathways at the first config. Full: every config in four of those variants,
        # every variant at the first config.
        mixed = [("fp16", "ieee", False, 0, False), ("fp16", "ieee", False, 1, True), ("bf16", "ieee", False, 3, False),
                 ("fp32", "ieee", True, 2, True), ("fp32", "tf32", False, 0, False)]
        if full:
            jobs = list(itertools.product(configs, [("bf16", "ieee", False, 2, False), *mixed[:2], mixed[4]]))
            jobs += [(configs[0], v) for v in variants]
        else:
            jobs = [(c, ("bf16", "ieee", False, 2, False)) for c in _one_per_class(configs)]
            jobs += [(configs[0], v) for v in mixed]
        jobs = [(c, v, False) for c, v in jobs] + [(configs[0], ("bf16", "ieee", False, 1, False), True),
                                                    (configs[0], ("fp32", "ieee", True, 0, True), True)]
        for cfg, (dt, prec, split, mode, pathway), unaligned in jobs:
            if kernel == "_dw_kernel" and mode == 3 and pathway:
                continue  # no mask, no pathway
            yield _ml_spec(kernel, cfg, dt, prec, split, mode, pathway, unaligned)
    from sparse_rnnt.kernels.masked_linear import cast

    fn = _jit(cast._masked_cast_kernel)
    for src, dst in (("fp32", "bf16"), ("fp32", "fp16"), ("bf16", "fp32"), ("fp16", "fp32")):
        for mode in (0, 1, 2):
            yield (f"_masked_cast_kernel {src}->{dst} mode={mode}", fn,
                   {"src_ptr": _ptr(src), "m_ptr": _MASK_PTR[mode], "dst_ptr": _ptr(dst), "N": "i32", "K": "i32:16",
                    "stride_sn": "i32:16", "stride_sk": 1, "stride_mn": "i32:16", "stride_dn": "i32:16",
                    "stride_dk": 1},
                   {"MASK_MODE": mode, "BLOCK_N": cast._BLOCK_N, "BLOCK_K": cast._BLOCK_K}, {"num_warps": cast._WARPS})
    fn = _jit(fused._mask_grad_kernel)
    for mode in (0, 1, 2):
        yield (f"_mask_grad_kernel mode={mode}", fn,
               {"g_ptr": "*bf16", "m_ptr": _MASK_PTR[mode], "N": "i32", "K": "i32", "stride_gn": "i32",
                "stride_gk": "i32", "stride_mn": "i32"},
               {"MASK_MODE": mode, "BLOCK_N": 32, "BLOCK_K": 64}, {"num_warps": 4})


def _one_per_class(configs: list[Any]) -> list[Any]:
    """One config per (orientation, warps): the register layouts that differ between configs."""
    seen, out = set(), []
    for c in configs:
        key = (c.kwargs.get("W_AS_A"), c.num_warps, max(c.kwargs.values(), key=lambda v: int(v)))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _rerank() -> Iterator[Spec]:
    from sparse_rnnt.kernels.rerank import select, window

    tab = dict.fromkeys(("tab_src", "tab_cand", "tab_size", "tab_out", "tab_group", "tab_nan", "tab_apply",
                         "tab_base", "tile_seg", "first_tile", "seg_n"), "*i64")
    warps = {"num_warps": 8}
    for wide, cand, size, aligned in itertools.product((True, False), (True, False), (True, False), (True, False)):
        flags = {"WIDE": wide, "HAS_CAND": cand, "HAS_SIZE": size, "BLOCK": 4096, "ALIGNED": aligned, "LOOP": False}
        tag = f"wide={wide} cand={cand} size={size} aligned={aligned}"
        # The short grids' tile loops (select._IDLE_PROGRAMS) for one table layout of each key width.
        loops = (False, True) if cand and aligned and not size else (False,)
        # Pass 1 plain, bracketed (31-bit keys: with the fine histogram) and on a sample (single
        # weights only), pass 2.
        variants = [(False, False, 1, False), (True, False, 1, False)]
        if not size:
            variants += [(False, True, 1, wide), (False, False, select._SAMPLE, False)]
        for (pass2, bracket, sample, fine), loop in itertools.product(variants, loops):
            codes = pass2 and wide and not size  # pass 2 of single float32 weights writes mask codes
            yield (f"_hist_kernel pass2={pass2} bracket={bracket} fine={fine} sample={sample}{' loop' * loop} {tag}",
                   _jit(select._hist_kernel),
                   {**tab, "n_tiles": "i32", "hist": "*i32", "sel_hi": "*i32", "live": "*i32", "gate": "*i32",
                    "blo": "*i32", "bhi": "*i32", "group_stride": "i32", "copy_stride": "i32", "fine": "*i32", "flo": "*i32",
                    "fine_group_stride": "i32", "codes": "*u8" if codes else None},
                   {**flags, "PASS2": pass2, "COPIES": 64, "BRACKET": bracket, "SAMPLE": sample, "FINE": fine,
                    "SPAN": select._FINE_SPAN if fine else 1, "FCOPIES": select._FINE_COPIES if fine else 1,
                    "LOOP": loop, "CODES": codes},
                   warps if sample == 1 else {"num_warps": 1})
        # ORDERED (several groups in the launch) only where it changes the code: the tie ranks.
        for ordered, loop in itertools.product((False, True), loops):
            yield (f"_tie_count_kernel ordered={ordered}{' loop' * loop} {tag}", _jit(select._tie_count_kernel),
                   {**tab, "n_tiles": "i32", "thr": "*i32", "fits": "*i32", "counts": "*i32",
                    "slot": "*i32" if ordered else None},
                   {**flags, "ORDERED": ordered, "LOOP": loop}, warps)
        for (all_ties, ordered), loop in itertools.product(((True, False), (False, False), (False, True)), loops):
            yield (f"_mask_kernel all_ties={all_ties} ordered={ordered}{' loop' * loop} {tag}",
                   _jit(select._mask_kernel),
                   {**tab, "n_tiles": "i32", "thr": "*i32", "need": "*i64", "fits": "*i32", "bad": "*i32",
                    "excl": "*i64", "slot": "*i32" if ordered else None, "gfirst": "*i32" if ordered else None},
                   {**flags, "ALL_TIES": all_ties, "ORDERED": ordered, "LOOP": loop}, warps)
    yield ("_tie_scan_kernel", _jit(select._tie_scan_kernel),
           {"counts": "*i32", "excl": "*i64", "fits": "*i32", "n": "i32", "G": "i32"},
           {"BLOCK": 1024, "GBLOCK": 128}, {"num_warps": 4})
    for has_miss in (False, True):
        yield (f"_report_kernel has_miss={has_miss}", _jit(select._report_kernel),
               {"result": "*i64", "flags": "*i32", "miss": "*i32", "report": "*i64", "n": "i32"},
               {"BLOCK": 1024, "HAS_MISS": has_miss}, {"num_warps": 4})
    yield ("_next_window_kernel", _jit(select._next_window_kernel),
           {"result": "*i64", "lo": "*i32", "G": "i32", "half": "i32"}, {"GBLOCK": 128}, {"num_warps": 1})
    # The folds and searches at the chunk sizes the select uses (select.fold_layout): one group
    # (the bins split finer to fill the GPU), a few and a hundred (per-tensor scope); the pass-1,
    # pass-2, warm-window and fine histograms.
    layouts = {}
    span = select._FINE_SPAN * 65536
    for groups in (1, 8, 100):
        copies = select._hist_copies(groups, 1 << 20)
        for bins, nsearch, c in ((select.NAN_BIN + 1, select.NAN_BIN, copies), (65536, 65536, min(copies, 4)),
                                 (select._WARM_WINDOW[True], select._WARM_WINDOW[True], min(copies, 8)),
                                 (span, span, min(copies, select._FINE_COPIES))):
            chunk, copy_block, fold_warps = select.fold_layout(groups, bins, nsearch, c)
            layouts[(chunk, copy_block, fold_warps)] = None
    fold_types = {"h": "*i32", "out": "*i32", "tot": "*i64", "gate": "*i32", "nbins": "i32", "nsearch": "i32",
                  "copies": "i32", "group_stride": "i32", "copy_stride": "i32", "out_stride": "i32",
                  "tot_stride": "i32"}
    for chunk, copy_block, fold_warps in layouts:
        yield (f"_fold_kernel chunk={chunk} copy_block={copy_block}", _jit(select._fold_kernel), fold_types,
               {"CHUNK": chunk, "COPY_BLOCK": copy_block}, {"num_warps": fold_warps})
    chunks = sorted({chunk for chunk, _, _ in layouts})
    for chunk, (pass2, bracket, fine) in itertools.product(
            chunks, ((False, False, False), (False, True, False), (True, False, False), (True, False, True))):
        nbins = 65536 if pass2 else select.NAN_BIN
        yield (f"_search_kernel chunk={chunk} pass2={pass2} bracket={bracket} fine={fine}", _jit(select._search_kernel),
               {"hist": "*i32", "row_stride": "i32", "tot": "*i64", "tot_stride": "i32", "nbins": "i32",
                "keep": "*i64", "b1": "*i32", "live2": "*i32", "thr": "*i32", "fits": "*i32", "result": "*i64",
                "bad": "*i32", "gate": "*i32", "blo": "*i32", "bhi": "*i32", "missed": "*i32", "flo": "*i32",
                "need2": "*i32", "G": "i32"},
               {"PASS2": pass2, "CHUNK": chunk, "NCH": nbins // chunk, "BRACKET": bracket, "FINE": fine,
                "SPAN": select._FINE_SPAN if fine else 1}, {"num_warps": 4})
    for chunk in chunks:
        yield (f"_sample_bracket_kernel chunk={chunk}", _jit(select._sample_bracket_kernel),
               {"hist": "*i32", "row_stride": "i32", "tot": "*i64", "tot_stride": "i32", "rank_hi": "*i64",
                "rank_lo": "*i64", "rank_mid": "*i64", "blo": "*i32", "bhi": "*i32", "flo": "*i32", "gate": "*i32",
                "nbins": "i32"}, {"CHUNK": chunk, "NCH": select.NAN_BIN // chunk, "SPAN": select._FINE_SPAN},
               {"num_warps": 4})
    for wide, cand, aligned in itertools.product((True, False), (True, False), (True, False)):
        # 31-bit keys: the mask codes for the warm mask pass (what a warm plan runs).
        yield (f"_near_hist_kernel wide={wide} cand={cand} aligned={aligned}", _jit(select._near_hist_kernel),
               {**tab, "lo": "*i32", "hist": "*i32", "stats": "*i32", "group_stride": "i32", "copy_stride": "i32",
                "codes": "*u8" if wide else None},
               {"NW": select._WARM_WINDOW[wide], "WIDE": wide, "HAS_CAND": cand, "COPIES": 8, "BLOCK": 4096,
                "SCOPIES": select._STAT_COPIES, "ALIGNED": aligned, "CODES": wide}, warps)
    for cand, aligned in itertools.product((True, False), (True, False)):
        yield (f"_coded_mask_kernel cand={cand} aligned={aligned}", _jit(select._coded_mask_kernel),
               {**tab, "thr": "*i32", "keep": "*i64", "fits": "*i32", "bad": "*i32", "stale": "*i32", "codes": "*u8"},
               {"WIDE": True, "HAS_CAND": cand, "BLOCK": 4096, "ALIGNED": aligned}, warps)
    for wide, chunk in itertools.product((True, False), chunks):
        nw = select._WARM_WINDOW[wide]
        yield (f"_near_search_kernel nw={nw} chunk={chunk}", _jit(select._near_search_kernel),
               {"hist": "*i32", "row_stride": "i32", "tot": "*i64", "tot_stride": "i32", "keep": "*i64",
                "lo": "*i32", "stats": "*i32", "thr": "*i32", "fits": "*i32", "result": "*i64", "miss": "*i32",
                "G": "i32"},
               {"NW": nw, "CHUNK": min(chunk, nw), "NCH": max(1, nw // chunk), "SCOPIES": select._STAT_COPIES},
               {"num_warps": 4})
    for wide, cand, first in itertools.product((True, False), (True, False), (True, False)):
        yield (f"_digit_hist_kernel wide={wide} cand={cand} first={first}", _jit(select._digit_hist_kernel),
               {**tab, "hist": "*i32", "prefix": "*i32", "live": "*i32", "nan_count": "*i32", "group_stride": "i32"},
               {"SHIFT": 20 if wide else 7, "BITS": 11 if wide else 8, "FIRST": first, "WIDE": wide,
                "HAS_CAND": cand, "BLOCK": 4096}, warps)
    yield ("_block_sq_kernel", _jit(select._block_sq_kernel),
           {"w": "*bf16", "out": "*fp32", **dict.fromkeys(("n_blocks", "nbc", "rows", "cols", "bh", "bw"), "i32")},
           {"BLOCK": 256}, {"num_warps": 4, "enable_fp_fusion": False})
    for apply in (False, True):
        yield (f"_expand_kernel apply={apply}", _jit(select._expand_kernel),
               {"w": "*i16", "bmask": "*u8", "out": "*u8", **dict.fromkeys(("n", "cols", "nbc", "bh", "bw"), "i32")},
               {"APPLY": apply, "BLOCK": 4096}, warps)
    for wide, cand in itertools.product((True, False), (True, False)):
        yield (f"_nm_kernel wide={wide} cand={cand}", _jit(select._nm_kernel),
               {"src": "*i32" if wide else "*i16", "cand": "*u8" if cand else None, "out": "*u8", "err": "*i32",
                **dict.fromkeys(("n_groups", "gpr", "cols", "n", "m", "nan_above"), "i32")},
               {"WIDE": wide, "HAS_CAND": cand, "BG": 256, "MP": 4}, {"num_warps": 4})
    yield ("_apply_kernel", _jit(select._apply_kernel), {"w": "*i16", "mask": "*u8", "n": "i32"}, {"BLOCK": 4096},
           {"num_warps": 4})
    # The window select.
    for wide, cand in itertools.product((True, False), (True, False)):
        tag = f"wide={wide} cand={cand}"
        yield (f"_sample_kernel {tag}", _jit(window._sample_kernel), {**tab, "sample": "*i64"},
               {"WIDE": wide, "HAS_CAND": cand, "SPT": 16, "STRIDE": 256}, {"num_warps": 1})
        for apply in (False, True):
            yield (f"_window_kernel apply={apply} {tag}", _jit(window._window_kernel),
                   {**tab, "lo": "*i32", "hi": "*i32", "stats": "*i32", "reserved": "*i32", "win_key": "*i64",
                    "win_loc": "*i64", "win_cap": "i32", "undo_loc": "*i64", "undo_bits": "*i32", "undo_cap": "i32"},
                   {"WIDE": wide, "HAS_CAND": cand, "APPLY": apply, "BLOCK": 4096}, {"num_warps": 16})
    yield ("_bracket_kernel", _jit(window._bracket_kernel),
           {"ordered": "*i64", "plan": "*i64", "lo": "*i32", "hi": "*i32", "G": "i32"}, {"BLOCK": 128}, {"num_warps": 4})
    for block in (1, 2, 512):
        yield (f"_check_kernel BLOCK={block}", _jit(window._check_kernel),
               {"counters": "*i32", "plan": "*i64", "caps": "*i64", "group_tab": "*i64", "flag": "*i32", "G": "i32",
                "L": "i32"}, {"BLOCK": block}, {"num_warps": 4})
    for wide in (True, False):
        yield (f"_settle_kernel wide={wide}", _jit(window._settle_kernel),
               {"loc": "*i64", "taken": "*i32", "cap": "i32", "flag": "*i32", "group_tab": "*i64", **tab},
               {"WIDE": wide, "BLOCK": 4096}, warps)
        yield (f"_restore_kernel wide={wide}", _jit(window._restore_kernel),
               {"loc": "*i64", "bits": "*i32", "count": "i32", **tab}, {"WIDE": wide, "BLOCK": 4096}, warps)
        yield (f"_zero_pruned_kernel wide={wide}", _jit(window._zero_pruned_kernel), tab,
               {"WIDE": wide, "BLOCK": 4096}, warps)


def _small_row(full: bool) -> Iterator[Spec]:
    from sparse_rnnt.kernels.small_row import bitmap, bsr

    for dt, cfg, block_r, direct, bias in itertools.product(("bf16", "fp16", "fp32"), bitmap._CONFIGS, (16, 64),
                                                            (True, False), (True, False)):
        first = cfg is bitmap._CONFIGS[0]
        if not full and not ((dt == "bf16" and block_r == 64 and direct and bias)
                             or (first and block_r == 64 and direct and bias) or (first and dt == "bf16" and not direct)):
            continue
        yield (f"_bitmap_kernel {dt} {cfg.kwargs} R={block_r} direct={direct} bias={bias}", _jit(bitmap._bitmap_kernel),
               {"x_ptr": _ptr(dt), "bits_ptr": "*i32", "val_ptr": _ptr(dt), "off_ptr": "*i32", "b_ptr": _ptr(dt),
                "out_ptr": _ptr(dt) if direct else "*fp32",
                **dict.fromkeys(("R", "N", "K", "n_words", "n_tiles", "tiles_per_split", "SPLIT", "stride_xr",
                                 "stride_os", "stride_or"), "i32")},
               {**cfg.kwargs, "TILE": 128, "BLOCK_R": block_r, "HAS_BIAS": bias, "DIRECT": direct,
                "UPCAST": dt == "fp32", "PREC": "ieee"},
               {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    for dt, bias in itertools.product(("bf16", "fp32"), (True, False)):
        yield (f"_reduce_kernel {dt} bias={bias}", _jit(bitmap._reduce_kernel),
               {"part_ptr": "*fp32", "b_ptr": _ptr(dt), "y_ptr": _ptr(dt), "S": "i32", "total": "i32", "N": "i32"},
               {"HAS_BIAS": bias, "BLOCK": 1024}, {"num_warps": 4})
    for dt, cfg, (bh, bw), direct in itertools.product(("bf16", "fp32"), bsr._CONFIGS, ((16, 16), (4, 4), (8, 32)),
                                                        (True, False)):
        first = cfg is bsr._CONFIGS[0]
        if not full and not ((dt == "bf16" and (bh, bw) == (16, 16) and direct) or (first and dt == "fp32" and direct)
                             or (first and dt == "bf16" and (bh, bw) != (16, 16) and not direct)):
            continue
        yield (f"_bsr_kernel {dt} warps={cfg.num_warps} block={bh}x{bw} direct={direct}", _jit(bsr._bsr_kernel),
               {"x_ptr": _ptr(dt), "crow_ptr": "*i32", "col_ptr": "*i32", "val_ptr": _ptr(dt), "b_ptr": _ptr(dt),
                "out_ptr": _ptr(dt) if direct else "*fp32",
                **dict.fromkeys(("R", "N", "K", "cols_per_split", "SPLIT", "stride_xr", "stride_os", "stride_or"),
                                "i32")},
               {"BH": bh, "BW": bw, "PBH": max(16, bh), "PBW": max(16, bw), "BLOCK_R": 32, "HAS_BIAS": True,
                "DIRECT": direct, "UPCAST": dt == "fp32", "PREC": "ieee"},
               {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


SMEM_LIMIT = 232448  # bytes of shared memory a block may use on sm_90
SPILL_LIMIT = 512  # bytes per thread a kept fp32 FMA config may spill


def pruner_rules() -> None:
    """What ``fused._pruner`` keeps per dtype and precision, on the GPU config lists (raises
    ``AssertionError``): every bf16 config; fp32 pipeline buffers within the shared memory; for the
    fp32 FMA dot, small accumulators and the weight tile on the left; never nothing."""
    import torch

    from sparse_rnnt.kernels.masked_linear import fused

    for kernel, configs, arg, (a, b, r) in (
        (fused._fwd_kernel, fused._FWD_CONFIGS, "w_ptr", ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
        (fused._dx_kernel, fused._DX_CONFIGS, "w_ptr", ("BLOCK_M", "BLOCK_K", "BLOCK_N")),
        (fused._dw_kernel, fused._DW_CONFIGS, "x_ptr", ("BLOCK_N", "BLOCK_K", "BLOCK_M")),
    ):
        prune = kernel.early_config_prune

        def smem(c: Any, a: str = a, b: str = b, r: str = r) -> int:
            return c.num_stages * (c.kwargs[a] + c.kwargs[b]) * c.kwargs[r] * 4

        bf16 = prune(configs, {arg: torch.empty(0, dtype=torch.bfloat16)}, PREC="ieee")
        tf32 = prune(configs, {arg: torch.empty(0, dtype=torch.float32)}, PREC="tf32")
        fma = prune(configs, {arg: torch.empty(0, dtype=torch.float32)}, PREC="ieee")
        assert bf16 == configs, "every bf16 config fits"
        assert 0 < len(fma) < len(tf32) < len(configs), (len(fma), len(tf32), len(configs))
        assert all(smem(c) <= SMEM_LIMIT for c in tf32)
        assert all(c.kwargs[a] * c.kwargs[b] <= 32 * 32 * c.num_warps for c in fma)
        assert all(c.kwargs.get("W_AS_A", True) for c in fma)
        big = [c for c in configs if c not in tf32]
        assert prune(big, {arg: torch.empty(0, dtype=torch.float32)}, PREC="tf32") == [min(big, key=smem)]


def check_prune() -> int:
    """Every masked-linear config the autotuner keeps (``fused._pruner``) for fp32 (TF32 or FMA)
    and bf16 compiles within Hopper's shared memory, and the kept FMA configs spill at most
    ``SPILL_LIMIT`` bytes per thread. Prints one line per config; returns the number of failures."""
    import torch

    from sparse_rnnt.kernels.masked_linear import fused

    failures = 0
    kernels = (("_fwd_kernel", fused._FWD_CONFIGS, "w_ptr"), ("_dx_kernel", fused._DX_CONFIGS, "w_ptr"),
               ("_dw_kernel", fused._DW_CONFIGS, "x_ptr"))
    for kernel, configs, elem_arg in kernels:
        prune = getattr(fused, kernel).early_config_prune
        for dt, torch_dt, prec in (("fp32", torch.float32, "ieee"), ("fp32", torch.float32, "tf32"),
                                   ("bf16", torch.bfloat16, "ieee")):
            kept = prune(configs, {elem_arg: torch.empty(0, dtype=torch_dt)}, PREC=prec)
            print(f"{kernel} {dt} {prec}: {len(kept)} of {len(configs)} configs kept", flush=True)
            for cfg in kept:
                name, fn, types, const, options = _ml_spec(kernel, cfg, dt, prec, prec == "ieee" and dt == "fp32", 2,
                                                           False)
                kernel_obj = _compile(fn, types, const, options)
                res = _resources(kernel_obj)
                spill = int(res.split("spill=")[1])
                bad = kernel_obj.metadata.shared > SMEM_LIMIT or (dt == "fp32" and prec == "ieee" and spill > SPILL_LIMIT)
                failures += bad
                print(f"{'FAIL' if bad else 'ok  '} smem={kernel_obj.metadata.shared:6d} {res}  {name}", flush=True)
    return failures


def k_loop(ptx: str) -> str:
    """The PTX of the innermost loop around a kernel's first ``wgmma`` (its K loop): from the
    loop header LLVM labels to the branch back to it."""
    import re

    first = ptx.find("wgmma.mma_async")
    if first < 0:
        raise ValueError("no wgmma in this kernel")
    headers = [m for m in re.finditer(r"\n(\$L__BB\d+_\d+):[^\n]*Loop Header", ptx) if m.start() < first]
    if not headers:
        raise ValueError("no loop header before the first wgmma")
    label = headers[-1].group(1)
    back = re.compile(r"\bbra(?:\.uni)?\s+" + re.escape(label) + ";")
    end = back.search(ptx, first)
    if end is None:
        raise ValueError(f"no branch back to {label}")
    return ptx[headers[-1].start():end.start()]


def loop_structure(ptx: str) -> dict[str, int]:
    """What one K-loop iteration does: ``wgmma`` issued, the fewest ``wgmma`` groups left in
    flight at a wait (0: the loop waits for its own MMAs, so no MMA overlaps the next loads and
    mask work), and shared-memory stores and barriers (a register tile that goes back through
    shared memory to change layout)."""
    import re

    body = k_loop(ptx)
    waits = [int(w) for w in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+);", body)]
    return {
        "wgmma": body.count("wgmma.mma_async"),
        "min_in_flight": min(waits) if waits else -1,
        "st_shared": len(re.findall(r"\bst\.shared", body)),
        "bar_sync": body.count("bar.sync"),
    }


def check_structure() -> int:
    """How the bf16 masked-linear forward and dX K loops compile (not timed: what the code does).

    Required, one line each, failures counted:
    - with the masked weight tile as the left operand (``W_AS_A``), every mask mode keeps its
      MMAs in flight across iterations (``min_in_flight > 0``);
    - so does the unmasked kernel in both orientations;
    - with a byte mask, the forward and dX apply it in the MMA's operand registers: no
      shared-memory store in the loop (the hoist Triton does for elementwise work on a register
      operand whose inputs are all loaded tiles).
    Reported only: the masked tile as the right operand waits for its MMAs every iteration
    (``min_in_flight = 0``; a right operand must come from shared memory, so the masked tile is
    stored back there), and bit masks change the tile's layout through shared memory.
    """
    from sparse_rnnt.kernels.masked_linear import fused

    failures = 0
    for kernel, configs in (("_fwd_kernel", fused._FWD_CONFIGS), ("_dx_kernel", fused._DX_CONFIGS)):
        picked = [c for c in configs if c.num_warps == 8 and c.kwargs["BLOCK_M"] == 128]
        if not any(c.kwargs.get("W_AS_A") for c in picked):
            print(f"FAIL {kernel}: no 8-warp, 128-row config with the masked tile on the left", flush=True)
            failures += 1
        for cfg in picked:
            for mode in (3, 0, 1, 2):
                name, fn, types, const, options = _ml_spec(kernel, cfg, "bf16", "ieee", False, mode, False)
                got = loop_structure(_compile(fn, types, const, options).asm["ptx"])
                w_as_a = cfg.kwargs["W_AS_A"]
                need = []
                if w_as_a or mode == 3:
                    need.append(got["min_in_flight"] > 0)
                if w_as_a and mode == 0:
                    need.append(got["st_shared"] == 0)
                bad = not all(need)
                failures += bad
                tag = "FAIL" if bad else "ok  " if need else "info"
                print(f"{tag} {got}  {name}", flush=True)
    return failures


def split_accumulation(ttir: str) -> bool:
    """Whether a compiled kernel (its TTIR) sums a reduction in partial sums: the result of a loop
    nested in another loop is added into a sum (``SPLIT_ACC``). ``acc + tl.dot(a, b)`` does not
    survive compilation as such (Triton's combine pass makes it ``tl.dot(a, b, acc)``, one
    running sum), so only a loop-carried partial sum, reset per group and then added, shows here.
    A top-level loop's result added once (a bias after the K loop) does not count."""
    import re

    depth_of: dict[str, int] = {}
    open_loops: list[int] = []  # indentation of the enclosing scf.for lines
    for line in ttir.splitlines():
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        if body.startswith("}") and open_loops and indent == open_loops[-1]:
            open_loops.pop()
        m = re.match(r"(%[\w.]+) = scf\.for\b.*\{$", re.sub(r"\s+loc\(.*\)$", "", body))
        if m:
            depth_of[m.group(1)] = len(open_loops)
            open_loops.append(indent)
        elif "arith.addf" in body and ": tensor<" in body:
            operands = re.findall(r"%[\w.]+", body.split("arith.addf", 1)[1].split(":", 1)[0])
            if any(depth_of.get(v, 0) >= 1 for v in operands):
                return True
    return False


def check_split() -> int:
    """What the launcher asks for (``fused._split_acc``) holds in the compiled kernels: the fp32
    FMA kernels (forward, dX, dW; one mask and pathway) sum their reductions in partial sums,
    the bf16 and TF32 ones in one sum; a control kernel written as ``acc + tl.dot(a, b)`` shows
    the fold that made the earlier form one running sum. Prints one line per compile; returns
    the failures."""
    import torch
    import triton
    import triton.language as tl

    from sparse_rnnt.kernels.masked_linear import fused

    failures = 0
    for kernel, configs, arg in (("_fwd_kernel", fused._FWD_CONFIGS, "w_ptr"), ("_dx_kernel", fused._DX_CONFIGS, "w_ptr"),
                                 ("_dw_kernel", fused._DW_CONFIGS, "x_ptr")):
        # The first config the autotuner keeps for fp32 FMA: what runs (and quick to compile).
        cfg = getattr(fused, kernel).early_config_prune(configs, {arg: torch.empty(0)}, PREC="ieee")[0]
        for dt, torch_dt, tf32, pathway, want in (("fp32", torch.float32, False, False, True),
                                                  ("fp32", torch.float32, False, True, True),
                                                  ("bf16", torch.bfloat16, False, False, False),
                                                  ("fp32", torch.float32, True, False, False)):
            probe = torch.empty(0, dtype=torch_dt)
            name, fn, types, const, options = _ml_spec(kernel, cfg, dt, fused._prec(probe, tf32),
                                                       fused._split_acc(probe, tf32), 2, pathway)
            got = split_accumulation(_compile(fn, types, const, options).asm["ttir"])
            failures += got != want
            print(f"{'ok  ' if got == want else 'FAIL'} split={got}  {name}", flush=True)

    @triton.jit
    def folded(x_ptr, y_ptr, K, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            a = tl.load(x_ptr + k0 + offs[:, None] * BLOCK + offs[None, :])
            acc = acc + tl.dot(a, a, input_precision="ieee")
        tl.store(y_ptr + offs[:, None] * BLOCK + offs[None, :], acc)

    control = split_accumulation(_compile(_jit(folded), {"x_ptr": "*fp32", "y_ptr": "*fp32", "K": "i32"},
                                          {"BLOCK": 32}, {"num_warps": 4}).asm["ttir"])
    failures += control
    print(f"{'FAIL' if control else 'ok  '} split={control}  control: acc + tl.dot(a, b) is folded", flush=True)
    return failures


def specs(full: bool = False) -> Iterator[Spec]:
    """Every kernel and constexpr branch; ``full``: also every autotune config in every variant."""
    yield from _rerank()
    yield from _small_row(full)
    yield from _masked_linear(full)


def _resources(kernel: Any) -> str:
    """Registers and spills per thread, from ``ptxas -v`` (Triton's bundled ptxas) on the PTX."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run([get_ptxas(TARGET_ARCH).path, "-v", f"--gpu-name=sm_{TARGET_ARCH}a", ptx, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return f"regs={regs.group(1) if regs else '?':>3} spill={spill.group(1) if spill else '?':>5}"


def check_vectors() -> int:
    """How the re-rank kernels that stream a whole tile compile: with ``ALIGNED`` (what a launch
    of 16-byte aligned segments of lengths divisible by 16 gets) every tile load is 16 bytes wide
    (``ld.global.v4``) and so is the mask kernel's byte store; without it (the control) they are
    one element wide. Found on an H100: the segments' addresses are read from a table, which
    proves no alignment, so every load was scalar. One line per kernel, failures counted."""
    import re

    failures = 0
    for name, fn, types, const, options in _rerank():
        if not name.startswith(("_hist_kernel", "_near_hist_kernel", "_tie_count_kernel", "_mask_kernel")):
            continue
        if "size=True" in name:
            continue  # block units: their sizes come from an unhinted table
        ptx = _compile(fn, types, const, options).asm["ptx"]
        loads = re.findall(r"\bld\.global\.(v\d\.)?b(\d+)", ptx)
        wide_loads = sum(1 for v, _ in loads if v)
        # Scalar loads of tile data: a table or threshold load is one b64/b32 each, a tile's 16
        # elements per thread (BLOCK 4096 over 256 threads) are 16 of one width.
        narrow = {b: sum(1 for v, bb in loads if not v and bb == b) for b in ("8", "16", "32")}
        mask_store = len(re.findall(r"\bst\.global\.v4\.b32", ptx))
        aligned = const.get("ALIGNED", False)
        if aligned:
            bad = wide_loads == 0 or any(c >= 16 for c in narrow.values())
            if name.startswith("_mask_kernel"):
                bad = bad or mask_store == 0
        else:
            bad = wide_loads != 0  # the control: unhinted, as the code was
        failures += bad
        print(f"{'FAIL' if bad else 'ok  '} v4 loads={wide_loads} scalar={narrow} v4 stores={mask_store}  {name}",
              flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="every autotune config of the masked-linear and small-row kernels in every dtype and "
                        "mask variant (hundreds of compiles), not one of each register layout class")
    parser.add_argument("--resources", action="store_true",
                        help="also print registers and spill bytes per thread (ptxas -v)")
    parser.add_argument("--only", default="", help="compile only the kernels whose line starts with this")
    parser.add_argument("--structure", action="store_true",
                        help="check how the bf16 masked-linear K loops compile instead (see check_structure)")
    parser.add_argument("--prune", action="store_true",
                        help="check the masked-linear config pruning instead (see check_prune)")
    parser.add_argument("--split", action="store_true",
                        help="check that the fp32 masked-linear kernels keep their partial sums (see check_split)")
    parser.add_argument("--vectors", action="store_true",
                        help="check that aligned re-rank tiles load and store 16 bytes at a time (see check_vectors)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles", file=sys.stderr)
        return 2
    if args.structure:
        failed = check_structure()
        print(f"loop structure: {failed} failures", flush=True)
        return 1 if failed else 0
    if args.vectors:
        failed = check_vectors()
        print(f"vector widths: {failed} failures", flush=True)
        return 1 if failed else 0
    if args.split:
        failed = check_split()
        print(f"split accumulation: {failed} failures", flush=True)
        return 1 if failed else 0
    if args.prune:
        pruner_rules()
        failed = check_prune()
        print(f"config pruning: {failed} failures", flush=True)
        return 1 if failed else 0
    failed = 0
    t0 = time.perf_counter()
    n = 0
    for name, fn, types, const, options in specs(args.full):
        if not name.startswith(args.only):
            continue
        n += 1
        t = time.perf_counter()
        try:
            kernel = _compile(fn, types, const, options)
            extra = f"  {_resources(kernel)}" if args.resources else ""
            print(f"ok   {time.perf_counter() - t:5.1f}s  smem={kernel.metadata.shared:6d}{extra}  {name}", flush=True)
        except Exception:  # report every failure, not just the first
            failed += 1
            print(f"FAIL {time.perf_counter() - t:5.1f}s  {name}\n{traceback.format_exc()}", flush=True)
    print(f"{n - failed}/{n} kernels compiled for sm_{TARGET_ARCH} in {time.perf_counter() - t0:.0f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
