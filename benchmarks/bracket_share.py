"""How many weights the sampled bracket of the cold pass 1 lets take an atomic, at the re-rank
benchmark's weights.

    python -m benchmarks.bracket_share [--sizes 10000000,63000000,187000000] > rows.jsonl

A simulation on the CPU, not a timing: the weights of ``bench_rerank`` (8 tensors, dense as a
first re-rank sees them, and pruned to 70% as the timed calls see them), the sample chunks of
``_sample_tile`` (one of 16 chunks per GPU tile of 4096 weights), and the bracket rule of
``select._bracket_ranks``, global scope, float32. Per row: the bracket in pass-1 bins, the bin of
the K-th largest and whether the bracket holds it, whether the fine span (``_FINE_SPAN`` bins
around the sample's estimate, which stand in for pass 2) holds it too, and the share of weights
that take a pass-1 atomic with the bracket (candidates inside it, zeros excluded) and without it
(every nonzero candidate). The atomics are what bound the cold pass on an H100. ``tests/test_benchmarks.py``
checks the bracket against the one the kernels pick at a small size. The first line printed is
the machine and versions (commit and date included).
"""

from __future__ import annotations

import argparse
import json

import torch

from sparse_rnnt.kernels.rerank import select
from sparse_rnnt.kernels.rerank._segments import Segment, _bits
from sparse_rnnt.kernels.rerank.naive import pruned_count


def _high_bins(w: torch.Tensor) -> torch.Tensor:
    return (_bits(w).reshape(-1).to(torch.int64) & 0x7FFFFFFF) >> 16


def simulate(weights: list[torch.Tensor], sparsity: float, tile: int = 4096) -> dict[str, int | float | bool]:
    """The bracket of one global float32 selection over ``weights`` (no candidates)."""
    segs = [Segment(_bits(w).reshape(-1), None, None, torch.empty(0, dtype=torch.uint8), 0, 0x7F800000)
            for w in weights]
    (ln,), _, _ = select._launches(segs, 1, tile)
    total = sum(w.numel() for w in weights)
    keep = total - pruned_count(sparsity, total)
    ranks = select._bracket_ranks([ln], [keep], tile)[0]
    chunk = tile // select._SAMPLE
    hist = torch.zeros(select.NAN_BIN, dtype=torch.int64)
    bins = [_high_bins(w) for w in weights]
    for b, (_, n, tiles, first) in zip(bins, ln.host, strict=True):
        local = torch.arange(tiles, dtype=torch.int64)
        start = local * tile + ((first + local) * 40503 % select._SAMPLE) * chunk
        pos = (start[:, None] + torch.arange(chunk)[None, :]).reshape(-1)
        hist += torch.bincount(b[pos[pos < n]], minlength=select.NAN_BIN)
    cum = hist.flip(0).cumsum(0)  # weight of the top j+1 bins

    def bin_at(rank: int, default: int) -> int:
        j = int((cum < rank).sum())
        return select.NAN_BIN - 1 - j if j < select.NAN_BIN else default

    hi, lo = bin_at(ranks[0], select.NAN_BIN - 1), bin_at(ranks[1], 0)
    nonzero = int(hist[1:].sum())  # a rank past the sample's nonzero keys: the smallest nonzero bin
    mid = bin_at(min(ranks[2], nonzero) if nonzero else ranks[2], 0)
    span = select._FINE_SPAN
    flo = max(min(mid - span // 2 + 1, hi - span + 1), lo)
    flat = torch.cat(bins)
    kth = int(flat.sort(descending=True).values[keep - 1]) if keep else 0
    nonzero = flat != 0
    inside = int((nonzero & (flat >= lo) & (flat <= hi)).sum())
    return {"units": total, "keep": keep, "sample_ranks": ranks, "bracket": [lo, hi], "kth_bin": kth,
            "holds": lo <= kth <= hi, "fine_span": [flo, flo + span - 1],
            "fine_holds": lo <= kth <= hi and flo <= kth < flo + span, "atomic_share": inside / total,
            "atomic_share_without": int(nonzero.sum()) / total}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench_rerank import SPARSITY, _weights
    from sparse_rnnt.pruning.ranking import magnitude_masks

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000000,63000000,187000000", help="weights per row, comma-separated")
    args = parser.parse_args(argv)
    from benchmarks.env import environment

    print(json.dumps({"environment": environment()}), flush=True)
    for total in (int(x) for x in args.sizes.split(",")):
        named = _weights(total, torch.float32, "cpu")
        masks = magnitude_masks(named, SPARSITY)
        for state in ("dense", "pruned"):
            ws = list(named.values())
            if state == "pruned":  # as the timed calls see them: already pruned to the target
                ws = [torch.where(masks[k], w, torch.zeros_like(w)) for k, w in named.items()]
            row = {"bench": "bracket_share", "shape": total, "dtype": "float32", "weights": state,
                   **simulate(ws, SPARSITY)}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
