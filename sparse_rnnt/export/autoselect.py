"""Per-layer choice between a sparse layer's kernel and its dense weight, timed on the device.

At streaming shapes a linear layer reads a few MB for a handful of rows, and on the H100 cuBLAS
is latency-bound there: a sparse kernel that reads 2.6-3.4x fewer bytes still took longer
(``benchmarks/results/h100-2026-11-27``). ``choose_layer_runtimes`` times every sparse layer of a
loaded model against its dense weight at the row counts it will see, and replaces the layers whose
dense product is faster with that product (``runtime="cublas-auto"``; ``"torch-auto"`` off CUDA). The artifact on
disk stays compact; the dense copies cost device memory, which the returned choices state.

Row counts come from :func:`probe_rows`, which runs a few chunk steps of S streams and records
what each layer was called with, so the choice is made at the shapes of that use, weighted by how
often each shape occurs.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formats import DenseExported, ExportedLinear, SemiStructuredExported, SmallRowExported

log = logging.getLogger(__name__)

# (fn) -> milliseconds per call of fn
Timer = Callable[[Callable[[], Any]], float]


@dataclass(frozen=True)
class LayerChoice:
    """What :func:`choose_layer_runtimes` decided for one layer. ``rows``: the row counts timed,
    ``calls``: how often each occurred in the probe; ``sparse_ms``/``dense_ms``: time per call at
    each; ``kept``: ``"sparse"`` or ``"dense"``; ``extra_bytes``: device memory the dense copy
    adds over the compressed weight (0 when sparse is kept)."""

    name: str
    fmt: str
    sparse_runtime: str
    rows: tuple[int, ...]
    calls: tuple[int, ...]
    sparse_ms: tuple[float, ...]
    dense_ms: tuple[float, ...]
    kept: str
    runtime: str
    extra_bytes: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sparse_layers(model: nn.Module) -> dict[str, ExportedLinear]:
    """The model's layers that compute from a compressed weight with a sparse kernel (BSR and
    bitmap small-row layers, on CUDA or the CPU kernel; 2:4 layers on torch's semi-structured
    tensors), by module name. Layers decompressed at load (CPU without its kernel) and 2:4 layers
    kept dense are not among them."""
    out: dict[str, ExportedLinear] = {}
    for name, m in model.named_modules():
        if isinstance(m, SmallRowExported) or (isinstance(m, SemiStructuredExported)
                                               and m.runtime.startswith("semi-structured")):
            out[name] = m
    return out


def probe_rows(model: nn.Module, streams: Sequence[int] = (1,), *, chunks: int = 3, seed: int = 0,
               decoding: str = "greedy", beam_width: int = 4) -> dict[str, Counter[int]]:
    """Row counts each sparse layer is called with while ``S`` streams (for each S in ``streams``)
    decode ``chunks`` chunks of noise with eager steps; ``{module name: Counter(rows)}``.

    Eager steps batch exactly the ready streams, so the counts are those of S concurrent streams
    (graph steps pad to their bucket, which for S a power of two is S). ``decoding`` and
    ``beam_width`` as the stream will decode: a beam runs the predictor and joiner on up to
    ``beam_width`` rows per stream, greedy search on one."""
    from ..streaming import StreamingDecoder
    from ..streaming.encoder import geometry

    if not streams or min(streams) < 1:
        raise ValueError(f"streams must be counts >= 1, got {list(streams)}")
    layers = sparse_layers(model)
    seen: dict[str, Counter[int]] = {name: Counter() for name in layers}

    def hook(name: str) -> Callable[..., None]:
        def record(mod: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0]
            seen[name][x.numel() // max(x.shape[-1], 1)] += 1
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        g = torch.Generator().manual_seed(seed)
        dec = StreamingDecoder(model, None, step_mode="eager", decoding=decoding,  # type: ignore[arg-type]
                               beam_width=beam_width)
        hop = dec.logmel.config.hop_length
        chunk = geometry(model.rnnt).segment * hop  # samples of one segment (input frames x hop)
        for s in streams:
            opened = [dec.open() for _ in range(s)]
            for st in opened:
                dec.accept(st, 0.1 * torch.randn(chunk * chunks, generator=g))
            with torch.no_grad():
                while dec.step(opened):
                    pass
                dec.finish(opened)
    finally:
        for h in handles:
            h.remove()
    return seen


def device_timer(device: torch.device, *, graphs: bool = True) -> Timer:
    """Milliseconds per call, as the step that will run them pays it. On CUDA with ``graphs``: 20
    calls captured in a CUDA graph and replayed (a graph step pays no launch cost), median of 5
    replays; eagerly timed with events if capture fails. On CUDA without ``graphs`` (eager
    steps): the wall time of 20 back-to-back calls and a sync, median of 5, so a kernel whose
    host-side launch outlasts its work is charged for it. On CPU, the median of 20 timed calls."""
    if device.type != "cuda":
        def cpu(fn: Callable[[], Any]) -> float:
            fn()
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return 1e3 * statistics.median(times)
        return cpu

    calls = 20

    def cuda_eager(fn: Callable[[], Any]) -> float:
        for _ in range(3):  # autotuning, allocator, lazy init
            fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) / calls)
        return 1e3 * statistics.median(times)

    if not graphs:
        return cuda_eager

    def cuda(fn: Callable[[], Any]) -> float:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # autotuning, allocator, lazy init outside the capture
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        run: Callable[[], Any]
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
            run = graph.replay
        except RuntimeError as e:  # a kernel that cannot be captured: eager calls
            log.debug("timing eagerly (capture failed: %s)", str(e).splitlines()[0])
            torch.cuda.synchronize(device)

            def run() -> None:
                for _ in range(calls):
                    fn()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
        return statistics.median(times)
    return cuda


def dense_weight(layer: ExportedLinear) -> Tensor:
    """The layer's weight as a dense ``[out, in]`` tensor in its compute dtype."""
    if isinstance(layer, SmallRowExported):
        return layer.packed.to_dense().to(layer.compute_dtype)
    w = layer.weight.detach()  # type: ignore[union-attr]
    return w if type(w) is torch.Tensor else w.to_dense()  # torch's semi-structured tensor subclass


def compressed_bytes(layer: ExportedLinear) -> int:
    """Bytes of the layer's compressed weight on the device."""
    if isinstance(layer, SmallRowExported):
        return int(layer.packed.nbytes)
    w = layer.weight.detach()  # type: ignore[union-attr]
    parts = [getattr(w, a, None) for a in ("packed", "meta")]
    if any(isinstance(p, Tensor) for p in parts):
        return sum(p.numel() * p.element_size() for p in parts if isinstance(p, Tensor))
    return w.numel() * w.element_size()


def choose_layer_runtimes(
    model: nn.Module,
    rows: Mapping[str, Mapping[int, int]] | Mapping[str, Iterable[int]],
    *,
    timer: Timer | None = None,
    graphs: bool = True,
) -> list[LayerChoice]:
    """In place: each sparse layer of ``model`` (:func:`sparse_layers`) named in ``rows`` is timed
    at its row counts against ``F.linear`` on its dense weight, and replaced by a
    :class:`DenseExported` of that weight where the dense product takes less time in total
    (each row count weighted by its number of calls: ``rows[name]`` maps rows to calls, or is an
    iterable of row counts, each weighted 1). Layers not named keep their kernel. ``timer``:
    ms per call of a function (default :func:`device_timer` of the layer's device, timing graph
    replays or eager calls as ``graphs`` says the model will run). Outputs are
    unchanged up to the products' rounding: both compute ``x Wᵀ + b`` with the same ``W``."""
    layers = sparse_layers(model)
    unknown = sorted(set(rows) - set(layers))
    if unknown:
        raise ValueError(f"not sparse layers of this model: {unknown}")
    choices = []
    for name, layer in layers.items():
        if name not in rows:
            continue
        spec = rows[name]
        weights = dict(spec) if isinstance(spec, Mapping) else dict.fromkeys(spec, 1)
        if not weights or min(weights) < 1:
            raise ValueError(f"{name}: row counts must be >= 1, got {sorted(weights)}")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in weights.values()):
            raise ValueError(f"{name}: call counts must be integers >= 1, got {weights}")
        w = dense_weight(layer)
        dev, dt = w.device, layer.compute_dtype
        time_it = timer or device_timer(dev, graphs=graphs)
        bias = None if layer.bias is None else layer.bias.detach().to(dt)
        rs = tuple(sorted(weights))
        sparse_ms, dense_ms = [], []
        with torch.no_grad():
            for r in rs:
                x = torch.randn(r, layer.in_features, device=dev, dtype=dt)
                sparse_ms.append(float(time_it(lambda x=x, m=layer: m._linear(x))))
                dense_ms.append(float(time_it(lambda x=x, w=w, b=bias: F.linear(x, w, b))))
        cost_sparse = sum(weights[r] * t for r, t in zip(rs, sparse_ms, strict=True))
        cost_dense = sum(weights[r] * t for r, t in zip(rs, dense_ms, strict=True))
        dense_wins = cost_dense < cost_sparse
        runtime = layer.runtime
        extra = 0
        if dense_wins:
            new = DenseExported(w, bias, fmt=layer.fmt)
            new.runtime += "-auto"  # cublas-auto (torch-auto off CUDA): dense by this choice
            extra = max(0, w.numel() * w.element_size() - compressed_bytes(layer))
            runtime = new.runtime
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
        choices.append(LayerChoice(name, layer.fmt, layer.runtime, rs, tuple(weights[r] for r in rs),
                                   tuple(sparse_ms), tuple(dense_ms), "dense" if dense_wins else "sparse",
                                   runtime, extra))
    kept = sum(c.kept == "sparse" for c in choices)
    log.info("auto layer runtimes: %d of %d sparse layers kept their kernel, %d run dense (+%.1f MB of memory)",
             kept, len(choices), len(choices) - kept, sum(c.extra_bytes for c in choices) / 1e6)
    return choices


def summarize(choices: Sequence[LayerChoice]) -> dict[str, Any]:
    """Counts of what :func:`choose_layer_runtimes` decided: ``layers_sparse``,
    ``layers_dense_auto``, ``auto_extra_bytes`` (the dense copies' device memory) and
    ``auto_runtimes`` (the runtimes the layers now use)."""
    dense = sum(c.kept == "dense" for c in choices)
    return {"layers_sparse": len(choices) - dense, "layers_dense_auto": dense,
            "auto_extra_bytes": sum(c.extra_bytes for c in choices),
            "auto_runtimes": sorted({c.runtime for c in choices})}
