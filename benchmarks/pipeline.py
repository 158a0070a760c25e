"""CPU pipeline benchmark: the hot paths of the backbone, each against a baseline in one run.

    python -m benchmarks.pipeline [--out benchmarks/results/pipeline-cpu.json]

- log-mel features: ours (``LogMel``) vs torchaudio's Kaldi-compatible ``fbank``;
- greedy decoding: our batched greedy search vs one utterance at a time (the reference loop);
- one training step of the ``tiny`` model at the demo's batch size.

Timings are medians of repeated runs; ratios are against the baseline measured in the same process.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torchaudio

from sparse_rnnt.data.features import LogMel
from sparse_rnnt.io import atomic_write_json
from sparse_rnnt.model import build_model, model_config
from sparse_rnnt.model.decoding import greedy_search

from .env import environment
from .timing import median_ms


def median_time(fn: Callable[[], object], repeat: int = 7, warmup: int = 2) -> float:
    """Median CPU seconds of ``fn()`` (see :mod:`benchmarks.timing`)."""
    return median_ms(fn, "cpu", repeat=repeat, warmup=warmup) / 1e3


def bench_features() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    waves = [0.1 * torch.randn(int(16000 * s), generator=g) for s in (1.3, 2.1, 2.9, 3.7, 4.4)]
    ours = LogMel()
    seconds = sum(w.numel() for w in waves) / 16000

    def run_ours():
        with torch.inference_mode():
            for w in waves:
                ours(w)

    def run_kaldi():
        with torch.inference_mode():
            for w in waves:
                torchaudio.compliance.kaldi.fbank(w[None], num_mel_bins=80, frame_length=25.0, frame_shift=10.0,
                                                  dither=0.0, sample_frequency=16000)

    base = median_time(run_kaldi)
    t = median_time(run_ours)
    return [
        {"op": "log-mel 80", "provider": "torchaudio.compliance.kaldi.fbank", "seconds": base,
         "x_real_time": seconds / base, "speedup_vs_baseline": 1.0},
        {"op": "log-mel 80", "provider": "sparse_rnnt LogMel", "seconds": t,
         "x_real_time": seconds / t, "speedup_vs_baseline": base / t},
    ]


def _greedy_one_by_one(model, x, lengths):
    return [greedy_search(model, x[b : b + 1, : int(lengths[b])], lengths[b : b + 1])[0] for b in range(x.size(0))]


def bench_greedy() -> list[dict]:
    torch.manual_seed(0)
    model = build_model(model_config("tiny"), 45, verbose=False).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(150, 400, (16,), generator=g, dtype=torch.int32)
    x = torch.randn(16, int(lengths.max()), 80, generator=g)
    base = median_time(lambda: _greedy_one_by_one(model, x, lengths), repeat=3, warmup=1)
    t = median_time(lambda: greedy_search(model, x, lengths), repeat=3, warmup=1)
    return [
        {"op": "greedy decode, 16 utts", "provider": "one utterance at a time", "seconds": base, "speedup_vs_baseline": 1.0},
        {"op": "greedy decode, 16 utts", "provider": "batched greedy_search", "seconds": t, "speedup_vs_baseline": base / t},
    ]


def _train_step_rows(name: str, device: str, batch: int, frames: int, units: int) -> list[dict]:
    torch.manual_seed(0)
    vocab = 45 if name == "tiny" else 1025
    model = build_model(model_config(name), vocab, verbose=False).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, frames, 80, generator=g).to(device)
    xl = torch.full((batch,), frames, dtype=torch.int32, device=device)
    y = torch.randint(0, vocab - 1, (batch, units), generator=g, dtype=torch.int32).to(device)
    yl = torch.full((batch,), units, dtype=torch.int32, device=device)
    providers: list[tuple[str, torch.dtype | None]] = [("fp32 eager", None)]
    if device == "cuda":
        providers.append(("bf16 autocast", torch.bfloat16))
    rows: list[dict] = []
    base = None
    for provider, dtype in providers:
        def step(dtype: torch.dtype | None = dtype) -> None:
            opt.zero_grad()
            with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = model(x, xl, y, yl).loss
            loss.backward()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()

        t = median_time(step, repeat=5, warmup=2)
        base = base or t
        rows.append({"op": f"train step {name}, {batch} x {frames / 100:.1f} s", "provider": provider,
                     "seconds": t, "audio_seconds_per_second": batch * frames / 100 / t,
                     "speedup_vs_baseline": base / t})
    return rows


def bench_train_step(device: str = "cpu") -> list[dict]:
    """One Adam step of named sizes: fp32 eager vs bf16 autocast (CUDA only), same batch."""
    if device == "cpu":
        return _train_step_rows("tiny", device, 24, 250, 40)
    return [row for name in ("tiny", "small", "base") for row in _train_step_rows(name, device, 64, 1000, 120)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/pipeline-<device>.json)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to time the training steps")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    out = args.out or f"benchmarks/results/pipeline-{args.device}.json"
    from benchmarks.env import unwritable

    why = unwritable(Path(out).parent)
    if why:
        parser.error(why)
    rows = bench_features() + bench_greedy() + bench_train_step(args.device)
    result = {"environment": environment(), "results": rows}
    print(f"{'op':<34}{'provider':<38}{'seconds':>10}{'ratio':>8}")
    for r in rows:
        ratio = r.get("speedup_vs_baseline")
        print(f"{r['op']:<34}{r['provider']:<38}{r['seconds']:>10.4f}{'' if ratio is None else f'{ratio:>7.2f}x'}")
    atomic_write_json(Path(out), result)
    print(json.dumps(result["environment"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
