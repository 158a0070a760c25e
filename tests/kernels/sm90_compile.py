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


def _compile(fn: Any, types: dict[str, str], constexprs: dict[str, Any], options: dict[str, int]) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, const = {}, {}
    for p in fn.params:
        if p.is_constexpr or types.get(p.name) is None:
            sig[p.name] = "constexpr"
            const[p.name] = constexprs.get(p.name) if p.is_constexpr else None
        else:
            sig[p.name] = types[p.name]
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexpr {missing}")
    triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", TARGET_ARCH, 32), options=options)


def _ptr(dtype: str) -> str:
    return "*" + dtype


def _masked_linear(full: bool) -> Iterator[Spec]:
    from sparse_rnnt.kernels.masked_linear import fused

    dims = dict.fromkeys(("R", "N", "K", "L", "R_BUCKET"), "i32")
    strides = {n: "i32" for n in ("stride_xr", "stride_xk", "stride_wn", "stride_wk", "stride_ml", "stride_mn",
                                  "stride_yr", "stride_yn", "stride_dyr", "stride_dyn", "stride_dxr", "stride_dxk",
                                  "stride_dwn", "stride_dwk")}
    mask_ptr = {0: "*u8", 1: "*u8", 2: "*i32", 3: "*u8"}
    # (dtype, PREC, SPLIT_ACC): what _prec/_split_acc pick on a GPU; with the mask modes each runs.
    variants = [(dt, prec, split, mode, pathway)
                for dt, prec, split in (("bf16", "ieee", False), ("fp16", "ieee", False), ("fp32", "tf32", True),
                                        ("fp32", "ieee", True))
                for mode in (0, 1, 2, 3) for pathway in (False, True)]
    for kernel, configs in (("_fwd_kernel", fused._FWD_CONFIGS), ("_dx_kernel", fused._DX_CONFIGS),
                            ("_dw_kernel", fused._DW_CONFIGS)):
        fn = _jit(getattr(fused, kernel))
        # Default: every register layout class in bf16 bit words, and the other dtypes, precisions,
        # mask modes and pathways at the first config. Full: every config in four of those variants,
        # every variant at the first config.
        mixed = [("fp16", "ieee", False, 0, False), ("fp16", "ieee", False, 1, True), ("bf16", "ieee", False, 3, False),
                 ("fp32", "ieee", True, 2, True), ("fp32", "tf32", True, 0, False)]
        if full:
            jobs = list(itertools.product(configs, [("bf16", "ieee", False, 2, False), *mixed[:2], mixed[4]]))
            jobs += [(configs[0], v) for v in variants]
        else:
            jobs = [(c, ("bf16", "ieee", False, 2, False)) for c in _one_per_class(configs)]
            jobs += [(configs[0], v) for v in mixed]
        for cfg, (dt, prec, split, mode, pathway) in jobs:
            if kernel == "_dw_kernel" and mode == 3 and pathway:
                continue  # no mask, no pathway
            types = {**dims, **strides, "m_ptr": mask_ptr[mode], "perm_ptr": "*i64" if pathway else None,
                     "seg_ptr": "*i64" if pathway else None}
            for a in ("x_ptr", "w_ptr", "y_ptr", "dy_ptr", "dx_ptr", "dw_ptr", "b_ptr"):
                types[a] = _ptr(dt)
            const = {**cfg.kwargs, "MASK_MODE": mode, "PATHWAY": pathway, "PREC": prec, "UPCAST": False,
                     "SPLIT_ACC": split, "HAS_BIAS": True, "HARD": pathway}
            name = f"{kernel} {dt} {prec} mode={mode} pathway={pathway} {cfg.kwargs} warps={cfg.num_warps}"
            yield name, fn, types, const, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    fn = _jit(fused._mask_grad_kernel)
    for mode in (0, 1, 2):
        yield (f"_mask_grad_kernel mode={mode}", fn,
               {"g_ptr": "*bf16", "m_ptr": mask_ptr[mode], "N": "i32", "K": "i32", "stride_gn": "i32",
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
    for wide, cand, size in itertools.product((True, False), (True, False), (True, False)):
        flags = {"WIDE": wide, "HAS_CAND": cand, "HAS_SIZE": size, "BLOCK": 4096}
        tag = f"wide={wide} cand={cand} size={size}"
        for pass2 in (False, True):
            yield (f"_hist_kernel pass2={pass2} {tag}", _jit(select._hist_kernel),
                   {**tab, "hist": "*i32", "sel_hi": "*i32", "live": "*i32", "group_stride": "i32",
                    "copy_stride": "i32"}, {**flags, "PASS2": pass2, "COPIES": 64}, warps)
        yield (f"_tie_count_kernel {tag}", _jit(select._tie_count_kernel),
               {**tab, "thr": "*i32", "counts": "*i32"}, flags, warps)
        for all_ties in (False, True):
            yield (f"_mask_kernel all_ties={all_ties} {tag}", _jit(select._mask_kernel),
                   {**tab, "thr": "*i32", "need": "*i64", "tile_start": "*i32"}, {**flags, "ALL_TIES": all_ties},
                   warps)
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
                   {"WIDE": wide, "HAS_CAND": cand, "APPLY": apply, "BLOCK": 4096}, warps)
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


def specs(full: bool = False) -> Iterator[Spec]:
    """Every kernel and constexpr branch; ``full``: also every autotune config in every variant."""
    yield from _rerank()
    yield from _small_row(full)
    yield from _masked_linear(full)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="every autotune config of the masked-linear and small-row kernels in every dtype and "
                        "mask variant (hundreds of compiles), not one of each register layout class")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles", file=sys.stderr)
        return 2
    failed = 0
    t0 = time.perf_counter()
    n = 0
    for name, fn, types, const, options in specs(args.full):
        n += 1
        t = time.perf_counter()
        try:
            _compile(fn, types, const, options)
            print(f"ok   {time.perf_counter() - t:5.1f}s  {name}", flush=True)
        except Exception:  # report every failure, not just the first
            failed += 1
            print(f"FAIL {time.perf_counter() - t:5.1f}s  {name}\n{traceback.format_exc()}", flush=True)
    print(f"{n - failed}/{n} kernels compiled for sm_{TARGET_ARCH} in {time.perf_counter() - t0:.0f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
