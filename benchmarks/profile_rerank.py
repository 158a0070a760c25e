"""Where a re-rank's time goes: device time per kernel (torch.profiler) against the wall time of
the call, for ``rerank_masks(..., apply=True)`` over the benchmark's weights (8 tensors, 70%).

    python -m benchmarks.profile_rerank --device cuda --sizes 10000000,63000000
    python -m benchmarks.profile_rerank --device cuda --sizes 63000000 --dtypes float32 \
        --algorithms plan-graph --copies 16,64,256

Prints a first JSON line with the machine and versions (``environment``), then one per (size,
dtype, algorithm): ``wall_ms`` (median of host wall time per call,
synchronized), ``device_ms`` (sum of every kernel and memset/memcpy the call ran, per call), the
launch count and the top kernels by device time. When ``device_ms`` is far below ``wall_ms`` the
call waits on the host (Python, launches, host syncs), not on memory. ``--copies`` sweeps a
plan's private histogram copies (``hist_copies``; the cold pass is bound by atomics queued on
a few hundred bins, and more copies spread them at the cost of a bigger fold), recorded per row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from benchmarks.bench_rerank import SPARSITY, _weights

ALGORITHMS = ("atomic", "window", "radix", "plan", "plan-warm", "plan-full", "plan-graph", "plan-graph-warm",
              "plan-graph-full")


def profile(total: int, dtype: torch.dtype, device: str, algorithm: str, calls: int = 5,
            hist_copies: int | None = None) -> dict:
    from sparse_rnnt.kernels.rerank import rerank_masks

    ws = _weights(total, dtype, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    plan = None
    if algorithm.startswith("plan"):  # RerankPlan: eager or replayed from a CUDA graph, cold or warm
        from sparse_rnnt.kernels.rerank import RerankPlan

        out = {name: torch.empty(w.shape, dtype=torch.uint8, device=device) for name, w in ws.items()}
        parts = algorithm.split("-")
        plan = RerankPlan(ws, SPARSITY, out, apply=True, graph="graph" in parts, warm_start="warm" in parts,
                          hist_copies=hist_copies, bracket=False if "full" in parts else None)
        hist_copies = plan.hist_copies
        fn = plan.run
    else:
        if hist_copies is not None:
            raise ValueError("hist_copies is a plan's setting: use a plan algorithm")

        def fn() -> object:
            return rerank_masks(ws, SPARSITY, apply=True, algorithm=algorithm)

    for _ in range(2):
        fn()
    sync()
    walls = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        sync()
        walls.append(1e3 * (time.perf_counter() - t0))
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts, acc_events=True) as prof:  # keep every call's events
        for _ in range(calls):
            fn()
        sync()
    per: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per.setdefault(ev.name[:60], []).append(ev.device_time / 1e3)
    device_ms = sum(sum(v) for v in per.values()) / calls
    top = sorted(((sum(v) / calls, len(v) / calls, k) for k, v in per.items()), reverse=True)[:12]
    host = sorted(((e.self_cpu_time_total / 1e3 / calls, e.count / calls, e.key[:60])
                   for e in prof.key_averages()), reverse=True)[:10]
    return {
        "bench": "rerank-profile", "shape": str(sum(w.numel() for w in ws.values())),
        "dtype": str(dtype).removeprefix("torch."), "algorithm": algorithm, "hist_copies": hist_copies,
        "path": plan.last_path if plan is not None else None,
        "wall_ms": statistics.median(walls), "device_ms": device_ms,
        "launches": sum(len(v) for v in per.values()) / calls,
        "top": [{"ms": round(ms, 4), "per_call": n, "name": k} for ms, n, k in top],
        "host_top": [{"self_ms": round(ms, 4), "per_call": n, "name": k} for ms, n, k in host],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda or cpu (cpu: the interpreter, tiny sizes)")
    p.add_argument("--sizes", default="10000000", help="comma-separated weight counts")
    p.add_argument("--algorithms", default="atomic,window,radix,plan,plan-graph,plan-graph-full,plan-graph-warm",
                   help="comma-separated: atomic, window, radix (rerank_masks); plan, plan-warm, plan-graph, "
                        "plan-graph-warm (RerankPlan eager or in a CUDA graph, without or with a warm start); "
                        "a '-full' suffix (plan-full, plan-graph-full) turns the sampled bracket of the cold "
                        "pass 1 off"),
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    p.add_argument("--copies", default="",
                   help="comma-separated hist_copies for the plan algorithms (default: the plan's own choice)")
    a = p.parse_args(argv)
    algorithms = a.algorithms.split(",")
    unknown = [x for x in algorithms if x not in ALGORITHMS]
    if unknown:  # a misspelt plan name ran a cold plan under the wrong label
        p.error(f"--algorithms: unknown {', '.join(unknown)}; choose from {', '.join(ALGORITHMS)}")
    try:
        sizes = [int(s) for s in a.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {a.sizes!r}")
    if any(n < 1 for n in sizes):
        p.error("--sizes must be >= 1")
    if a.device == "cpu":
        # The kernels run on CPU only under the interpreter, which is read when triton is first imported.
        os.environ["TRITON_INTERPRET"] = "1"
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if not set(a.dtypes.split(",")) <= set(names):
        p.error(f"--dtypes: choose from float32, bfloat16, got {a.dtypes!r}")
    dtypes = [names[d] for d in a.dtypes.split(",")]
    try:
        copies: list[int | None] = [int(c) for c in a.copies.split(",")] if a.copies else [None]
    except ValueError:
        p.error(f"--copies must be comma-separated integers, got {a.copies!r}")
    if any(c is not None and c < 1 for c in copies):
        p.error("--copies must be >= 1")
    from benchmarks.env import environment

    print(json.dumps({"environment": environment()}), flush=True)
    for total in sizes:
        for dtype in dtypes:
            for alg in algorithms:
                for c in copies if alg.startswith("plan") else [None]:
                    print(json.dumps(profile(total, dtype, a.device, alg, hist_copies=c)), flush=True)


if __name__ == "__main__":
    main()
