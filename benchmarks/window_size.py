"""How many weights the window re-rank puts in its window, at the re-rank benchmark's weights.

    python -m benchmarks.window_size [--sizes 10000000,63000000,187000000] > rows.jsonl

A simulation on the CPU, not a timing: the weights of ``bench_rerank`` (8 tensors, pruned to 70%
first, as the timed calls see them), the sample positions of ``kernels/rerank/window.py``
(``SAMPLES_PER_TILE`` keys per GPU tile of 4096 weights) and its interval rule, global scope.
Per row: the sample size, the interval's half-width in sample ranks, the window (weights inside
the interval) and whether the interval held (``above < K <= above + window``). The window sets
the sizes of the buffer the GPU sorts; ``tests/test_benchmarks.py`` checks this simulation
against the kernels' own count (logged at DEBUG) at a small size. The first line printed is the
machine and versions (commit and date included).
"""

from __future__ import annotations

import argparse
import json

import torch

from sparse_rnnt.kernels.rerank import window as win
from sparse_rnnt.kernels.rerank.naive import pruned_count

INT32_MAX = 2**31 - 1


def _keys(w: torch.Tensor) -> torch.Tensor:
    wide = w.dtype == torch.float32
    bits = w.reshape(-1).view(torch.int32 if wide else torch.int16).to(torch.int64)
    return bits & (0x7FFFFFFF if wide else 0x7FFF)


def simulate(weights: list[torch.Tensor], sparsity: float, tile: int = 4096) -> dict[str, float | int | bool]:
    """The window of one global unstructured selection over ``weights`` (one dtype, no candidates)."""
    spt = min(win.SAMPLES_PER_TILE, tile)
    stride = tile // spt
    keys = [_keys(w) for w in weights]
    samples, pid, v = [], 0, 0
    for k in keys:
        n = k.numel()
        tiles = -(-n // tile)
        local = torch.arange(tiles, dtype=torch.int64)
        h = ((local + pid) * win._HASH) % stride
        pos = (local[:, None] * tile + h[:, None] + torch.arange(spt)[None, :] * stride).reshape(-1)
        inside = pos < n
        samples.append(torch.where(inside, k[pos.clamp(max=max(n - 1, 0))], torch.full_like(pos, -1)))
        v += int(inside.sum())
        pid += tiles
    flat = torch.cat(keys)
    total = flat.numel()
    keep = total - pruned_count(sparsity, total)
    ordered = torch.cat(samples).sort(descending=True).values
    ranks = win.interval_ranks(keep, v, total)
    if ranks is None:
        lo, hi, m = 0, INT32_MAX, 0
    else:
        lo_rank, hi_rank, m = ranks
        lo = max(int(ordered[min(lo_rank, len(ordered) - 1)]), 1)
        hi = max(int(ordered[hi_rank]) if hi_rank >= 0 else INT32_MAX, lo)
    above = int((flat > hi).sum())
    window = int(((flat >= lo) & (flat <= hi)).sum())
    return {"units": total, "samples": v, "margin": m, "window": window, "window_frac": window / total,
            "holds": above < keep <= above + window}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench_rerank import SPARSITY, _weights
    from sparse_rnnt.pruning.ranking import magnitude_masks

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000000,63000000,187000000", help="weights per row, comma-separated")
    args = parser.parse_args(argv)
    from benchmarks.env import environment

    print(json.dumps({"environment": environment()}), flush=True)
    for total in (int(x) for x in args.sizes.split(",")):
        for dtype in (torch.float32, torch.bfloat16):
            named = _weights(total, dtype, "cpu")
            # as the timed calls see them: already pruned to the target (the reference masks)
            masks = magnitude_masks(named, SPARSITY)
            ws = [torch.where(masks[k], w, torch.zeros_like(w)) for k, w in named.items()]
            row = {"bench": "window_size", "shape": total, "dtype": str(dtype).removeprefix("torch."),
                   **simulate(ws, SPARSITY)}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
