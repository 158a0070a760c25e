"""Direct launches (``kernels/launch.py``) against Triton's own launch path, on a machine without a GPU.

    python -m tests.kernels.launch_check

Runs with :class:`benchmarks.host_driver.HostOnlyDriver`: kernels compile for sm_90 and every
launch reaches a launcher that records it instead of running it. Three checks, each printing one
line per case and a summary; exit status 1 on any failure:

- ``specialization``: a probe kernel (and an autotuned one) launched over arguments that Triton
  specializes differently (aligned and misaligned tensors, dtypes, ints equal to 1, divisible by
  16, past int32, past int64, bools, floats, None). For each, the compiled kernel a
  :class:`DirectLauncher` uses on its direct path must be the one Triton's ``run`` picks for the
  same arguments, with the same arguments and meta-parameters passed on; after all cases are
  cached, replaying each must still find its own kernel (no two signatures share an entry).
- ``uncacheable``: call sites the cache cannot key turn their launcher off and still launch.
- ``ops``: the package's ops (masked linear forward and backward in every mask mode, pathway,
  hard gradients, fp32; ``masked_cast``; the bitmap and BSR small-row kernels, split and not).
  Each runs once through Triton's path, then twice with direct launches: the second run must
  take the direct path for every launch and launch what Triton's path launched (kernel, grid,
  argument dtypes, shapes, strides and scalar values, in order).

Must run without ``TRITON_INTERPRET`` (the test in ``test_launch.py`` runs it in a subprocess).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from benchmarks.host_driver import HostOnlyDriver, Launch, single_config


@triton.jit
def _probe_kernel(x_ptr, y_ptr, n, s, f, flag, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    v = tl.load(x_ptr + offs * s, mask=ok, other=0.0)
    tl.store(y_ptr + offs, v * f + flag, mask=ok)


def _by_n(configs: list[triton.Config], nargs: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    # The autotuner's choice depends on n's value, not only on its specialization class (2**31 and
    # 2**32 + 16 share one), as a real tuning would: a cache keyed by class alone gets it wrong.
    return [configs[0] if nargs["n"] % 5 < 3 else configs[1]]


@triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32}, num_warps=2)], key=["n"],
                 prune_configs_by={"early_config_prune": _by_n})
@triton.jit
def _tuned_probe_kernel(x_ptr, y_ptr, n, s, f, flag, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    v = tl.load(x_ptr + offs * s, mask=ok, other=0.0)
    tl.store(y_ptr + offs, v * f * SCALE + flag, mask=ok)


def _probe_cases() -> list[tuple[str, tuple]]:
    base = torch.zeros(64)
    y = torch.zeros(64)
    half = torch.zeros(64, dtype=torch.bfloat16)
    cases = []
    for xname, x in (("f32", base), ("f32+1", base[1:]), ("f32+4", base[4:]), ("bf16", half), ("bf16+1", half[1:])):
        for n in (1, 16, 17, 2**31 - 1, 2**31, 2**32 + 16, 2**63):
            for s in (1, 2, 32):
                cases.append((f"x={xname} n={n} s={s}", (x, y, n, s, 0.5, True)))
    cases.append(("flag=False f=2.0", (base, y, 5, 1, 2.0, False)))
    cases.append(("f=-3e38 (another float, same kernel)", (base, y, 5, 1, -3e38, False)))
    cases.append(("y+1 (misaligned output)", (base, y[1:], 5, 1, 2.0, False)))
    return cases


def check_specialization(drv: HostOnlyDriver) -> int:
    from sparse_rnnt.kernels.launch import DirectLauncher

    failures = 0
    for kernel, constexprs in ((_probe_kernel, {"BLOCK": 16}), (_tuned_probe_kernel, {"SCALE": 3})):
        name = kernel.fn.__name__ if hasattr(kernel, "configs") else kernel.__name__
        launcher = DirectLauncher(kernel)
        seen: list[tuple[str, tuple, int, tuple]] = []
        for label, args in _probe_cases():
            compiled = kernel[(1,)](*args, **constexprs)  # Triton's own choice for these arguments
            tail = tuple({**constexprs, **getattr(kernel, "best_config", triton.Config({})).kwargs}[p]
                         for p in launcher._names[len(args):])
            launcher[(1,)](*args, **constexprs)  # Triton's path, unless an earlier case has this signature
            drv.recorded.clear()
            hits = launcher.hits
            launcher[(1,)](*args, **constexprs)  # direct
            direct = drv.recorded[-1]
            ok = (launcher.hits == hits + 1 and direct.function == compiled.function
                  and direct.packed_metadata == compiled.packed_metadata
                  and len(direct.args) == len(args) + len(tail)
                  and all(a is b for a, b in zip(direct.args, args, strict=False)) and direct.args[len(args):] == tail)
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} specialization {name} {label}")
            seen.append((label, args, compiled.function, tail))
        # Every signature cached: each replay must still find its own kernel.
        for label, args, function, tail in seen:
            drv.recorded.clear()
            hits = launcher.hits
            launcher[(1,)](*args, **constexprs)
            ok = launcher.hits == hits + 1 and drv.recorded[-1].function == function and \
                drv.recorded[-1].args[len(args):] == tail
            failures += not ok
            if not ok:
                print(f"FAIL specialization {name} replay {label}")
        print(f"specialization {name}: {len(seen)} signatures, {len(launcher._cache)} cached")
    return failures


@triton.jit
def _default_probe_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr = 16):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def check_uncacheable(drv: HostOnlyDriver) -> int:
    """Call sites the cache cannot key (a runtime argument by keyword, a parameter left to its
    default): the launcher turns itself off after the first call and every call still launches,
    through Triton, the kernel Triton picks."""
    from sparse_rnnt.kernels.launch import DirectLauncher

    x, y = torch.zeros(32), torch.zeros(32)
    failures = 0
    for label, kernel, args, kwargs in (
        ("runtime argument by keyword", _probe_kernel, (x, y, 5, 1, 0.5), {"flag": True, "BLOCK": 16}),
        ("parameter left to its default", _default_probe_kernel, (x, y, 5), {}),
    ):
        launcher = DirectLauncher(kernel)
        compiled = kernel[(1,)](*args, **kwargs)
        drv.recorded.clear()
        for _ in range(3):
            launcher[(1,)](*args, **kwargs)
        ok = (not launcher.enabled and launcher.hits == 0 and launcher.misses == 1 and not launcher._cache
              and [r.function for r in drv.recorded] == [compiled.function] * 3)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} uncacheable: {label}")
    return failures


def _shape_of(launch: Launch) -> tuple:
    return launch.grid, launch.function, tuple(
        (a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a
        for a in launch.args)


def _ops() -> list[tuple[str, Callable[[], object]]]:
    from sparse_rnnt.kernels.masked_linear import (
        masked_cast,
        masked_linear,
        pack_rows,
        pathway_masked_linear,
    )
    from sparse_rnnt.kernels.small_row import BitmapWeight, BsrWeight, bitmap_linear, bsr_linear

    g = torch.Generator().manual_seed(0)
    out: list[tuple[str, Callable[[], object]]] = []
    for dtype in (torch.bfloat16, torch.float32):
        r, k, n = 37, 96, 40
        x = torch.randn(r, k, generator=g).to(dtype).requires_grad_(True)
        w = torch.randn(n, k, generator=g).to(dtype).requires_grad_(True)
        b = torch.randn(n, generator=g).to(dtype).requires_grad_(True)
        dy = torch.randn(r, n, generator=g).to(dtype)
        keep = torch.rand(n, k, generator=g) < 0.3
        d = str(dtype).removeprefix("torch.")
        for mname, mask in (("bits", pack_rows(keep)), ("bytes", keep)):
            for hard in (False, True):
                def both(mask: torch.Tensor = mask, hard: bool = hard, x: torch.Tensor = x, w: torch.Tensor = w,
                         b: torch.Tensor = b, dy: torch.Tensor = dy) -> object:
                    return torch.autograd.grad(masked_linear(x, w, mask, b, hard=hard), (x, w, b), dy)

                out.append((f"masked_linear {d} {mname} hard={hard}", both))
        masks = torch.stack([keep, torch.rand(n, k, generator=g) < 0.5])
        lang = torch.randint(0, 2, (r,), generator=g)
        out.append((f"pathway_masked_linear {d}", lambda x=x, w=w, b=b, masks=masks, lang=lang, dy=dy: torch.autograd.grad(
            pathway_masked_linear(x, w, masks, lang, b, hard=True), (x, w, b), dy)))
        out.append((f"masked_cast {d}", lambda w=w, keep=keep: masked_cast(w.detach(), keep, torch.bfloat16)))
    wd = torch.randn(48, 160, generator=g).to(torch.bfloat16)
    keep = torch.rand(48, 160, generator=g) < 0.3
    xs = torch.randn(5, 160, generator=g).to(torch.bfloat16)
    bias = torch.randn(48, generator=g).to(torch.bfloat16)
    bm, bs = BitmapWeight.from_dense(wd, keep), BsrWeight.from_dense(wd, keep)
    for split in (None, 2):
        out.append((f"bitmap_linear split={split}", lambda split=split: bitmap_linear(xs, bm, bias, split_k=split)))
        out.append((f"bsr_linear split={split}", lambda split=split: bsr_linear(xs, bs, bias, split_k=split)))
    return out


def check_ops(drv: HostOnlyDriver) -> int:
    from sparse_rnnt.kernels.launch import package_launchers, triton_launches

    launchers = package_launchers()
    failures = 0
    for label, op in _ops():
        drv.recorded.clear()
        with triton_launches():
            op()
        triton_path = [_shape_of(x) for x in drv.recorded]
        for lau in launchers:
            lau.clear()
        op()
        hits = sum(lau.hits for lau in launchers)
        drv.recorded.clear()
        op()
        direct_path = [_shape_of(x) for x in drv.recorded]
        all_direct = sum(lau.hits for lau in launchers) - hits == len(direct_path)
        ok = bool(triton_path) and direct_path == triton_path and all_direct
        failures += not ok
        names = " ".join(drv.utils.names[x.function] for x in drv.recorded)
        print(f"{'ok  ' if ok else 'FAIL'} ops {label}: {len(direct_path)} launches ({names})"
              f"{'' if all_direct else ', not all direct'}{'' if direct_path == triton_path else ', launches differ'}")
    return failures


def main() -> int:
    drv = HostOnlyDriver.install()
    drv.record = True
    single_config()
    failures = check_specialization(drv)
    failures += check_uncacheable(drv)
    failures += check_ops(drv)
    print(f"direct launches: {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
