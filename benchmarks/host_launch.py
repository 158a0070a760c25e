"""Host time per call of the package's kernel ops: Triton's launch path against direct launches.

    python -m benchmarks.host_launch [--out benchmarks/results/host-launch-cpu.json] [--samples 2000]

For the CPU machine, which has no GPU: Triton's driver is replaced by
:class:`benchmarks.host_driver.HostOnlyDriver`, so every launch compiles for sm_90, goes through
the real Python launch path and reaches a launcher that does nothing. What is timed is the host
side of each op, on tiny CPU tensors: argument checks, autograd, allocations and the launches.
Providers, measured in one process and interleaved in rounds so that the machine's drift hits
both alike:

- ``triton-launch``: every launch through ``kernel[grid](...)`` (``DirectLauncher.enabled`` off);
- ``direct``: the package's default, repeated launches straight to the compiled kernel
  (``kernels/launch.py``);
- ``torch`` (context, not a like-for-like baseline): ``F.linear`` on the same CPU tensors, its
  small matmuls computed on the CPU. On a GPU host the corresponding cost is cuBLAS's launches.

The real launcher's C code (reading the tensors' addresses, ``cuLaunchKernelEx``) is not in
these numbers: a few µs per launch on a GPU host, alike for both providers. On the H100, the
kernel benchmark's ``host_ms`` column is the measured counterpart.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F


def _ops() -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], object]]]:
    """Our ops, and ``F.linear`` on the same tensors for the ops it compares with."""
    from sparse_rnnt.kernels.masked_linear import (
        masked_cast,
        masked_linear,
        pack_rows,
        pathway_masked_linear,
    )
    from sparse_rnnt.kernels.small_row import BitmapWeight, bitmap_linear

    g = torch.Generator().manual_seed(0)
    r, k, n = 16, 64, 64
    dt = torch.bfloat16
    x = torch.randn(r, k, generator=g).to(dt).requires_grad_(True)
    w = torch.randn(n, k, generator=g).to(dt).requires_grad_(True)
    b = torch.randn(n, generator=g).to(dt).requires_grad_(True)
    dy = torch.randn(r, n, generator=g).to(dt)
    keep = torch.rand(n, k, generator=g) < 0.3
    bits = pack_rows(keep)
    masks = torch.stack([keep, torch.rand(n, k, generator=g) < 0.5])
    lang = torch.randint(0, 2, (r,), generator=g)
    w32 = w.detach().float()
    bm = BitmapWeight.from_dense(w.detach(), keep)
    xs = x.detach()[:4]

    def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return fn()

        return call

    ours = {
        "masked_linear fwd": no_grad(lambda: masked_linear(x, w, bits, b)),
        "masked_linear fwd+bwd": lambda: torch.autograd.grad(masked_linear(x, w, bits, b), (x, w, b), dy),
        "masked_linear fwd+bwd hard": lambda: torch.autograd.grad(
            masked_linear(x, w, bits, b, hard=True), (x, w, b), dy),
        "pathway_masked_linear fwd+bwd": lambda: torch.autograd.grad(
            pathway_masked_linear(x, w, masks, lang, b), (x, w, b), dy),
        "masked_cast": lambda: masked_cast(w32, keep, dt),
        "bitmap_linear (4 rows)": lambda: bitmap_linear(xs, bm),
    }
    torch_ops = {"masked_linear fwd": no_grad(lambda: F.linear(x, w, b)),
                 "masked_linear fwd+bwd": lambda: torch.autograd.grad(F.linear(x, w, b), (x, w, b), dy)}
    return ours, torch_ops


def _samples(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def run(samples: int, rounds: int = 10) -> list[dict]:
    """Rows ``{"op", "provider", "us", ...}``: median µs per call over ``samples`` calls."""
    from benchmarks.host_driver import HostOnlyDriver, single_config

    drv = HostOnlyDriver.install()
    from sparse_rnnt.kernels.launch import triton_launches

    single_config()

    def path(provider: str) -> contextlib.AbstractContextManager:
        return triton_launches() if provider == "triton-launch" else contextlib.nullcontext()

    rows = []
    ours, torch_ops = _ops()
    for op, fn in ours.items():
        calls = {"triton-launch": fn, "direct": fn, **({"torch": torch_ops[op]} if op in torch_ops else {})}
        times: dict[str, list[float]] = {provider: [] for provider in calls}
        for provider, call in calls.items():  # warm-up: compiles, autotuning, the allocator
            with path(provider):
                _samples(call, 20)
        launches = dict.fromkeys(calls, 0)
        for _ in range(rounds):
            for provider, call in calls.items():
                with path(provider):
                    before = drv.launches
                    times[provider] += _samples(call, samples // rounds)
                    launches[provider] += drv.launches - before
        base = statistics.median(times["triton-launch"])
        for provider, ts in times.items():
            if not ts:
                continue
            us = 1e6 * statistics.median(ts)
            rows.append({"op": op, "provider": provider, "us": us,
                         "triton_launches_per_call": launches[provider] / len(ts),
                         "vs_triton_launch": base / statistics.median(ts)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/host-launch-cpu.json",
                        help="JSON file for the rows and the machine (written atomically)")
    parser.add_argument("--samples", type=int, default=2000, help="timed calls per op and provider")
    args = parser.parse_args(argv)
    if args.samples < 10:
        parser.error("--samples must be at least 10")
    from benchmarks.env import environment, unwritable

    why = unwritable(Path(args.out).parent)
    if why:
        parser.error(why)
    from sparse_rnnt.io import atomic_write_json

    env = environment()
    rows = run(args.samples)
    print(f"{'op':32s} {'provider':14s} {'µs/call':>9s} {'launches':>8s} {'vs triton-launch':>16s}")
    for row in rows:
        print(f"{row['op']:32s} {row['provider']:14s} {row['us']:9.1f} {row['triton_launches_per_call']:8.0f} "
              f"{row['vs_triton_launch']:15.2f}×")
    atomic_write_json(Path(args.out), {"environment": env, "samples": args.samples, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
