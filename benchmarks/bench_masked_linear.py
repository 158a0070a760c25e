"""Masked linear ``y = x (W ⊙ M)ᵀ + b``: fused Triton kernels vs dense and unfused PyTorch.

    python -m benchmarks.bench_masked_linear [--device cuda] [--quick]

Shapes are the Emformer feed-forward layers of the ``small``, ``base`` and ``paper-187m`` sizes
(``sparse_rnnt/model/configs.py``): up-projection ``[T, width] x [ffn, width]`` and
down-projection ``[T, ffn] x [width, ffn]`` for T in {4096, 16384, 32768} tokens (``quick``: base
up-projection at 4096 tokens, base down-projection at 16384 and paper-187m up-projection at
32768). Benches: ``fwd``, ``bwd`` (dx, dW, db from a kept graph) and
``fwd+bwd``, all bfloat16 with soft (straight-through) weight gradients.

Providers on CUDA (timed with ``triton.testing.do_bench``, median, L2 flushed):

- ``cublas``: dense ``F.linear`` (no mask; the speed of light);
- ``unfused``: ``W * M`` then ``F.linear``, with autograd (materializes ``W ⊙ M`` every call);
- ``triton``: ours with a bit-packed mask; ``triton-bytes``: ours with a bool mask;
- ``triton-jit-launch``: ``triton`` with every launch through Triton's own ``kernel[grid]`` path
  instead of the package's direct launches (``kernels/launch.py``): the host time they save;
- ``triton-nomask``: our kernels with the mask compiled out (a diagnostic: ``triton-nomask`` vs
  ``cublas`` is how far our tiling is from cuBLAS, ``triton`` vs ``triton-nomask`` what the mask
  costs).

``masked_linear autocast fwd+bwd``: the training case, float32 weights and inputs under bf16
autocast, with the masked layer as training runs it (``sparse_rnnt.model.masked.MaskedLinear``):

- ``cublas-autocast``: dense ``F.linear`` (autocast copies W to bf16, cuBLAS);
- ``unfused-autocast``: ``F.linear(x, W * M)`` (the fp32 product, then autocast's copy);
- ``triton-cast``: ``autocast_path="cast"``, the mask applied in the bf16 copy (``masked_cast``),
  then cuBLAS; ``triton-fused``: ``autocast_path="fused"``, a plain copy, then the fused kernels.

On CPU only the PyTorch providers run (``dense``, ``unfused``), float32, at a tiny shape, timed
with a median of ``time.perf_counter`` repetitions, so the harness can be tested without a GPU.
Each row also gives the stored mask size (``mask_bytes``), per-call temporaries
(``temp_bytes``: the materialized masked weight of ``unfused``) and the host time per call
(``host_ms``: calls issued without waiting for the GPU; near ``ms``, the row is launch-bound).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.rows_cli import print_rows
from benchmarks.timing import host_ms, median_ms
from sparse_rnnt.model.configs import MODEL_SIZES

SIZES = ("small", "base", "paper-187m")
TOKENS = (4096, 16384, 32768)


def _shapes(quick: bool, device: str) -> list[tuple[str, int, int, int]]:
    """(label, R, K, N) rows of the benchmark."""
    if device == "cpu":
        cfg = MODEL_SIZES["tiny"]
        return [(f"tiny ffn-up T=256 [256x{cfg.width}]x[{cfg.transformer_ffn_dim}x{cfg.width}]",
                 256, cfg.width, cfg.transformer_ffn_dim)]
    out = []
    for name in SIZES:
        cfg = MODEL_SIZES[name]
        width, ffn = cfg.width, cfg.transformer_ffn_dim
        for tokens in TOKENS:
            out.append((f"{name} ffn-up T={tokens} [{tokens}x{width}]x[{ffn}x{width}]", tokens, width, ffn))
            out.append((f"{name} ffn-down T={tokens} [{tokens}x{ffn}]x[{width}x{ffn}]", tokens, ffn, width))
    if quick:
        picked = ("base ffn-up T=4096 ", "base ffn-down T=16384 ", "paper-187m ffn-up T=32768 ")
        return [s for s in out if s[0].startswith(picked)]
    return out


def _chosen_configs() -> dict[str, str]:
    """The autotuner's latest choice per kernel (tile sizes, warps, stages, orientation)."""
    from sparse_rnnt.kernels.masked_linear import fused

    out = {}
    for name in ("_fwd_kernel", "_dx_kernel", "_dw_kernel"):
        best = getattr(getattr(fused, name), "best_config", None)
        if best is not None:
            out[name.strip("_").removesuffix("_kernel")] = (
                f"{best.kwargs} warps={best.num_warps} stages={best.num_stages}")
    return out


def _time(fn: Callable[[], object], device: str) -> float:
    return median_ms(fn, device)


def _providers(device: str, mask: torch.Tensor, packed: torch.Tensor) -> dict[str, tuple[Callable, int, int]]:
    """name -> (fn(x, w, b) -> y, mask_bytes, temp_bytes_per_element_of_w)."""
    provs: dict[str, tuple[Callable, int, int]] = {
        "cublas" if device != "cpu" else "dense": (lambda x, w, b: F.linear(x, w, b), 0, 0),
        "unfused": (lambda x, w, b: F.linear(x, w * mask, b), mask.numel(), 1),
    }
    if device != "cpu":
        from sparse_rnnt.kernels.masked_linear import masked_linear
        from sparse_rnnt.kernels.masked_linear.fused import unmasked_linear

        provs["triton"] = (lambda x, w, b: masked_linear(x, w, packed, b), packed.numel(), 0)
        provs["triton-bytes"] = (lambda x, w, b: masked_linear(x, w, mask, b), mask.numel(), 0)
        provs["triton-jit-launch"] = provs["triton"]  # timed inside launch.triton_launches()
        provs["triton-nomask"] = (lambda x, w, b: unmasked_linear(x, w, b), 0, 0)
    return provs


def run(device: str, quick: bool) -> list[dict]:
    """Benchmark rows ``{"bench", "shape", "provider", "ms", ...}`` (see module doc)."""
    from sparse_rnnt.kernels.masked_linear import pack_rows

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows: list[dict] = []
    for label, r, k, n in _shapes(quick, device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(r, k, generator=g).to(device, dtype).requires_grad_(True)
        w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype).requires_grad_(True)
        b = torch.randn(n, generator=g).to(device, dtype).requires_grad_(True)
        dy = torch.randn(r, n, generator=g).to(device, dtype)
        mask = (torch.rand(n, k, generator=g) < 0.3).to(device)
        packed = pack_rows(mask)
        for provider, (fn, mask_bytes, temp) in _providers(device, mask, packed).items():
            with _launch_path(provider):
                rows += _time_provider(label, provider, fn, mask_bytes, temp, x, w, b, dy, r, n, k, device, dtype)
        rows += _autocast_rows(label, r, k, n, device, mask, packed)
    return rows


def _launch_path(provider: str) -> contextlib.AbstractContextManager:
    if provider != "triton-jit-launch":
        return contextlib.nullcontext()
    from sparse_rnnt.kernels.launch import triton_launches

    return triton_launches()


def _time_provider(label: str, provider: str, fn: Callable, mask_bytes: int, temp: int, x: torch.Tensor,
                   w: torch.Tensor, b: torch.Tensor, dy: torch.Tensor, r: int, n: int, k: int, device: str,
                   dtype: torch.dtype) -> list[dict]:
    """The ``fwd``, ``bwd`` and ``fwd+bwd`` rows of one provider."""
    rows = []
    y = fn(x, w, b)

    args = (x, w, b)

    def fwd(fn: Callable = fn, args: tuple = args) -> object:
        with torch.no_grad():
            return fn(*args)

    def bwd(y: torch.Tensor = y, args: tuple = args, dy: torch.Tensor = dy) -> object:
        return torch.autograd.grad(y, args, dy, retain_graph=True)

    def both(fn: Callable = fn, args: tuple = args, dy: torch.Tensor = dy) -> object:
        return torch.autograd.grad(fn(*args), args, dy)

    for bench, call, flops in (("fwd", fwd, 2), ("bwd", bwd, 4), ("fwd+bwd", both, 6)):
        ms = _time(call, device)
        rows.append({
            "bench": f"masked_linear {bench}", "shape": label, "provider": provider, "ms": ms,
            "host_ms": host_ms(call, device) if device == "cuda" else None,  # CPU: it is ms
            "dtype": str(dtype).removeprefix("torch."), "density": 0.3, "hard": False,
            "tflops": flops * r * n * k / (ms * 1e-3) / 1e12,
            "mask_bytes": mask_bytes, "temp_bytes": temp * n * k * x.element_size(),
            **({"configs": _chosen_configs()} if provider.startswith("triton") else {}),
        })
    del y
    return rows


def _autocast_rows(label: str, r: int, k: int, n: int, device: str, mask: torch.Tensor,
                   packed: torch.Tensor) -> list[dict]:
    """``masked_linear autocast fwd+bwd`` rows (module doc): float32 ``x [r, k]`` and layer
    ``[n, k]`` under bf16 autocast."""
    from torch import nn

    from sparse_rnnt.model.masked import MaskedLinear

    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(k, n).to(device)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
    x = torch.randn(r, k, generator=g).to(device).requires_grad_(True)
    dy = torch.randn(r, n, generator=g).to(device, torch.bfloat16)
    args = (x, lin.weight, lin.bias)
    provs: dict[str, Callable[[], torch.Tensor]] = {
        "cublas-autocast" if device != "cpu" else "dense-autocast": lambda: lin(x),
        "unfused-autocast": lambda: F.linear(x, lin.weight * mask, lin.bias),
    }
    if device != "cpu":
        for path in ("cast", "fused"):
            layer = MaskedLinear.wrap(lin, "triton", path)

            def masked(layer: MaskedLinear = layer) -> torch.Tensor:
                # Set the mask at every call, as the pruner does at every step: the layer keeps
                # its masked copy while the weight is unchanged, and the weight does not change
                # between timed calls, so without this "cast" would skip its cast after the first.
                layer.set_mask(packed)
                return layer(x)

            provs[f"triton-{path}"] = masked
    rows = []
    for provider, fn in provs.items():

        def both(fn: Callable[[], torch.Tensor] = fn) -> object:
            with torch.autocast(device, dtype=torch.bfloat16):
                y = fn()
            return torch.autograd.grad(y, args, dy)

        ms = _time(both, device)
        rows.append({
            "bench": "masked_linear autocast fwd+bwd", "shape": label, "provider": provider, "ms": ms,
            "host_ms": host_ms(both, device) if device == "cuda" else None,
            "dtype": "float32+autocast-bf16", "density": 0.3, "hard": False,
            "tflops": 6 * r * n * k / (ms * 1e-3) / 1e12,
            "mask_bytes": 0 if provider.startswith(("cublas", "dense")) else (
                mask.numel() if provider.startswith("unfused") else packed.numel()),
            # per call, beside autocast's own bf16 copy of W: unfused also makes the fp32 W * M
            "temp_bytes": n * k * 4 if provider.startswith("unfused") else 0,
        })
    return rows


if __name__ == "__main__":
    print_rows(run, __doc__.split("\n")[0])
