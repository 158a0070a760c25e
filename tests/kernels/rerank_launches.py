"""What a re-rank plan queues on an H100-sized layout, without a GPU: run as a module.

    python -m tests.kernels.rerank_launches   (without TRITON_INTERPRET)

On :class:`benchmarks.host_driver.HostOnlyDriver` (kernels compiled for sm_90, launches recorded,
nothing run) a :class:`~sparse_rnnt.kernels.rerank.RerankPlan` over 10M weights (8 tensors of
1248 x 1000) queues its cold and warm selects, followed by the host's read of the counts, and
prints one JSON line per (dtype, scope, warm): each Triton launch's kernel and grid, and the
torch operations that launch device work (memsets, copies, casts, scans) as torch's profiler
lists them, and the kernels it loaded (compiled) while queuing. Before, each plan does what
``RerankPlan.run`` does before it captures a CUDA graph: a cold run, then ``compile_warm``; a
kernel first loaded in a later select would be loaded inside the capture, which the CUDA driver
refuses. ``tests/kernels/test_rerank.py`` checks the lines; the kernels' results are meaningless
here (nothing runs), so the read of the counts may raise, which is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

# Torch ops that launch device work on a GPU (their CPU counterparts here).
DEVICE_OPS = frozenset({"aten::fill_", "aten::zero_", "aten::copy_", "aten::cumsum", "aten::sub", "aten::clamp",
                        "aten::cat", "aten::index_put_", "aten::index", "aten::to", "aten::add", "aten::rsub"})


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels this records", file=sys.stderr)
        return 2
    from benchmarks.host_driver import HostOnlyDriver

    drv = HostOnlyDriver.install()
    import torch

    from sparse_rnnt.kernels.rerank import RerankPlan

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        ws = {f"w{i}": torch.randn(1248, 1000).to(dtype) for i in range(8)}
        out = {k: torch.empty(v.shape, dtype=torch.uint8) for k, v in ws.items()}
        for scope in ("global", "per_tensor"):
            sel = RerankPlan(ws, 0.7, out, apply=True, warm_start=True, scope=scope)._select
            sel.enqueue(warm=False)  # as a graph plan's first run, then what precedes its capture
            sel.compile_warm()
            drv.record = True
            for warm in (True, False):
                drv.recorded.clear()
                loaded = len(drv.utils.names)
                with torch.profiler.profile() as prof:
                    sel.enqueue(warm=warm)
                    with contextlib.suppress(Exception):  # the counts are garbage: nothing ran
                        sel.finish(warm=warm)
                launches = [[drv.utils.names[ln.function], ln.grid[0]] for ln in drv.recorded]
                ops = [e.name for e in prof.events() if e.name in DEVICE_OPS and e.cpu_parent is None]
                print(json.dumps({"dtype": str(dtype).removeprefix("torch."), "scope": scope, "warm": warm,
                                  "tiles": int(sum(-(-w.numel() // 4096) for w in ws.values())),
                                  "launches": launches, "torch_ops": ops,
                                  "loaded": list(drv.utils.names.values())[loaded:]}), flush=True)
            drv.record = False
    return 0


if __name__ == "__main__":
    sys.exit(main())
