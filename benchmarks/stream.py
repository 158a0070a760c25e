"""Streaming benchmark: per-chunk latency and real-time factor of exported formats, side by side.

    python -m benchmarks.stream [--device cuda|cpu] [--quick] [--sizes base,paper-187m] [--load-minutes M]
        [--out-dir DIR]

For each model size (CUDA: ``base`` and ``paper-187m``; CPU: ``tiny``), random weights pruned to
70% by global magnitude (2:4 is 50% by construction), every format (dense, 2:4, bsr, bitmap; on
CUDA also ``2:4-cutlass``, the 2:4 layers on torch's CUTLASS backend instead of its default, and
``<fmt>+auto``, the format with ``--layer-runtime auto`` chosen at the row's stream count) and
1 / 8 / 32 / 64 concurrent streams (CPU: 1 / 8 / 64): S streams of random audio are fed one
160 ms chunk per tick through :class:`~sparse_rnnt.streaming.StreamingDecoder` (one batched
encoder call per chunk step + greedy decoding), after a warm-up, and the per-step latency
p50 / p99 (encoder + decoder, device synchronized) and the compute seconds per second of audio
(``compute_s_per_audio_s``: all streams' compute over all their audio, a throughput figure; the
rows of earlier results call it ``rtf``) are recorded. Each row's percentiles are over the
``timed_steps`` steps of its run: 2 s of audio on CPU (13 steps), 4 s on CUDA (25), so its p99
is about the maximum of those steps. The floor of a step is the bytes of the in-scope weights in
that format read once at the bandwidth of a measured device copy. CUDA runs bf16 weights, CPU
fp32. Ratios are against ``dense`` of the same size, stream count and step mode, measured in the
same process; ``--cuda-graphs`` adds rows with each step (encoder and greedy decoding) replayed
as CUDA graphs (``step_mode``).

The last format, ``linear-free``, is a ceiling, not a format: every layer the formats convert is
replaced by :class:`FreeLinear`, which launches nothing and makes greedy decoding emit nothing.
Its step time is a floor for every format and its ``speedup_vs_dense_p50`` the most any sparse
layer could gain at that size and stream count: the rest of the step (attention, norms, the
decoder's loop) is not theirs to speed up.

``--load-minutes M`` adds the load test: 64 streams fed M minutes of audio each (CPU: tiny,
CUDA: base, dense), memory sampled along the way (RSS; CUDA: allocated) to show no growth per
stream, two streams re-decoded alone to check identical outputs, and the p99 step latency (over
every step of the run, ``timed_steps``).
Results: ``stream-<device>.json`` with machine, versions, commit and date, rewritten after each
format's rows, so a run cut short (a device lease's limit) keeps what it measured
(``"complete": false`` until the end).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.env import environment
from sparse_rnnt.io import atomic_write_json

SPARSITY = 0.7
CHUNK = 2560  # samples per tick: 160 ms at 16 kHz


class FreeLinear(torch.nn.Module):
    """A linear layer that costs nothing: a view of a buffer it keeps, no kernel at all.

    The ``linear-free`` rows replace every layer the sparse formats convert with one. No format's
    layer can be cheaper. The buffer is zeros but for its last column, 1: where it stands for the
    joiner's output (in scope), whose last symbol is blank, greedy decoding emits nothing, so its
    eager loop does the least work (graph steps run every frame's ``max_symbols_per_frame`` steps
    whatever they emit). With zeros alone it would emit symbol 0 at every step, the most work.
    So those rows' step time is a floor for every format, and their speed-up over dense a
    ceiling: the most that any sparse layer could gain at that size and stream count.
    """

    runtime = "free"

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.buf: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [*, in]`` -> ``[*, out]`` in x's dtype, zeros but the last column (a view of the
        kept buffer)."""
        rows = x.numel() // max(x.shape[-1], 1)
        b = self.buf
        if b is None or b.shape[0] < rows or b.dtype != x.dtype or b.device != x.device:
            b = self.buf = torch.zeros(max(rows, 1), self.out_features, dtype=x.dtype, device=x.device)
            b[:, -1] = 1
        return b[:rows].view(*x.shape[:-1], self.out_features)


def _build(size: str, fmt: str, device: str, dtype: torch.dtype, seed: int = 0):
    if fmt == "linear-free":
        model, masks, _, runtimes = _build(size, "dense", device, dtype, seed)
        for name in masks:
            mod_name = name.removesuffix(".weight")
            parent, _, attr = mod_name.rpartition(".")
            layer = model.get_submodule(mod_name)
            setattr(model.get_submodule(parent) if parent else model, attr, FreeLinear(layer.in_features, layer.out_features))
        return model, masks, 0, dict.fromkeys(runtimes, FreeLinear.runtime)
    fmt, _, semi = fmt.partition("-")  # "2:4-cutlass": format 2:4 on that semi-structured backend
    from sparse_rnnt.export.artifact import convert_linears
    from sparse_rnnt.model import MODEL_SIZES, build_model
    from sparse_rnnt.pruning.ranking import Granularity, magnitude_masks
    from sparse_rnnt.pruning.scope import ScopeConfig, select_parameters

    torch.manual_seed(seed)
    model = build_model(MODEL_SIZES[size], 256, verbose=False).eval()
    params = {n: p for n, p in select_parameters(model, ScopeConfig()).items()}
    linear = {f"{n}.weight" for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    weights = {n: p.detach() for n, p in params.items() if n in linear}
    if fmt == "2:4":
        ok = {n: w for n, w in weights.items() if w.shape[1] % 4 == 0}
        masks = magnitude_masks(ok, 0.5, Granularity(kind="nm", n=2, m=4))
    else:
        masks = magnitude_masks(weights, SPARSITY)
    nbytes = 0
    runtimes = convert_linears(model, masks, fmt, dtype=dtype, device=device, semi_structured=semi or "auto")
    for m in model.modules():
        if hasattr(m, "packed"):
            nbytes += sum(t.numel() * t.element_size() for t in m.packed.tensors().values())
        elif hasattr(m, "runtime") and isinstance(getattr(m, "weight", None), torch.Tensor):
            w = m.weight
            nbytes += w.numel() * w.element_size() if w.layout == torch.strided else _semi_bytes(w)
    return model, masks, nbytes, runtimes


def _semi_bytes(w: Any) -> int:
    try:
        return sum(t.numel() * t.element_size() for t in (w.packed, w.meta) if t is not None)
    except AttributeError:
        return w.numel() * 2 // 2


def _bandwidth_gbps(device: str) -> float:
    n = (256 << 20) if device == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if device == "cuda":
        from triton.testing import do_bench

        ms = float(do_bench(lambda: dst.copy_(src), return_mode="median"))
    else:
        dst.copy_(src)
        t0 = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        ms = (time.perf_counter() - t0) / 5 * 1e3
    return 2 * n / (ms * 1e-3) / 1e9  # a copy reads and writes n bytes


def _run_streams(model, device: str, n_streams: int, seconds: float, seed: int = 1,
                 step_mode: str = "eager") -> dict[str, float]:
    from sparse_rnnt.streaming import StreamingDecoder

    dec = StreamingDecoder(model, None, step_mode=step_mode)
    g = torch.Generator().manual_seed(seed)
    # warm-up: autotuning and allocator, not timed
    warm = [dec.open() for _ in range(n_streams)]
    for s in warm:
        dec.accept(s, 0.1 * torch.randn(CHUNK * 3, generator=g))
    while dec.step(warm):
        pass
    dec.finish(warm)
    dec.reset_stats()
    streams = [dec.open() for _ in range(n_streams)]
    samples = int(seconds * 16000)
    audio = [0.1 * torch.randn(samples, generator=g) for _ in range(n_streams)]
    for start in range(0, samples, CHUNK):
        for s, a in zip(streams, audio, strict=True):
            dec.accept(s, a[start:start + CHUNK])
        dec.step(streams)
    dec.finish(streams)
    return dec.latency_stats()


def all_formats(device: str) -> tuple[str, ...]:
    """The stream table's formats on ``device``, in table order. ``<fmt>+auto``: that format with
    ``--layer-runtime auto``, each sparse layer timed against its dense weight at the row's stream
    count and the faster kept (on CPU, bsr and bitmap only: 2:4 layers run dense there)."""
    cuda = device == "cuda"
    return (("dense", "2:4", "bsr", "bitmap") + (("2:4-cutlass",) if cuda else ())
            + (("2:4+auto",) if cuda else ()) + ("bsr+auto", "bitmap+auto", "linear-free"))


def _auto_choose(model: Any, streams: int, graphs: bool = True) -> dict[str, Any]:
    """``--layer-runtime auto`` on ``model`` at the row counts of ``streams`` streams (``graphs``:
    timed as CUDA-graph replays, else as eager calls); what it chose. The table chooses once per
    format and stream count, by graph replays, and runs its eager and graph rows on that choice
    (``stream --layer-runtime auto`` times eagerly unless ``--cuda-graphs``)."""
    from sparse_rnnt.export.autoselect import choose_layer_runtimes, probe_rows, summarize

    return summarize(choose_layer_runtimes(model, probe_rows(model, (streams,)), graphs=graphs))


def bench(device: str, quick: bool, cuda_graphs: bool = False,
          streams: tuple[int, ...] | None = None, sizes: tuple[str, ...] | None = None,
          on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
          formats: tuple[str, ...] | None = None, repeats: int = 1) -> list[dict[str, Any]]:
    """Format × stream count × step mode rows; ``streams`` replaces the default stream counts,
    ``sizes`` the default model sizes, ``formats`` the formats (dense, the baseline of every
    ratio, always runs first); ``on_rows`` gets the rows so far after each format.

    ``repeats`` > 1 runs the whole table that many rounds, every format's models built once and
    kept, so each format's runs are spread over the same stretch of time as dense's. A row then
    holds the median of its rounds (``p50_runs_ms`` lists them) and ``speedup_runs`` the ratio
    to dense of each round: the spread tells a real difference from drift."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if sizes is None:
        sizes = ("tiny",) if device == "cpu" else (("base",) if quick else ("base", "paper-187m"))
    counts = (1, 8, 64) if device == "cpu" else ((1, 32) if quick else (1, 8, 32, 64))
    counts = streams or counts
    seconds = 2.0 if device == "cpu" else 4.0
    bw = _bandwidth_gbps(device)
    modes = ("eager", "cuda-graph") if cuda_graphs else ("eager",)
    # (size, fmt, streams, mode) -> the row's fixed fields and its runs' stats, or an error row
    cells: dict[tuple[Any, ...], dict[str, Any]] = {}
    for size in sizes:
        fmts = ("dense", *(f for f in formats or all_formats(device) if f != "dense"))
        kept: dict[tuple[str, int | None], tuple[Any, int, dict[str, str], dict[str, Any]]] = {}
        for _round in range(repeats):
            for fmt in fmts:
                if (size, fmt, None, None) in cells:  # could not be built
                    continue
                base, auto = fmt.removesuffix("+auto"), fmt.endswith("+auto")
                for n, mode in ((n, mode) for n in counts for mode in modes):
                    key = (fmt, n if auto else None)
                    if key not in kept:
                        try:
                            model, _, nbytes, runtimes = _build(size, base, device, dtype)
                        except Exception as e:  # a format this machine cannot build: recorded, not hidden
                            cells[(size, fmt, None, None)] = {"error": {
                                "bench": "stream", "size": size, "format": fmt, "error": str(e).splitlines()[0]}}
                            break
                        # auto: chosen at this row's stream count, on its own model (the choice
                        # replaces layers in place)
                        kept[key] = (model, nbytes, runtimes, _auto_choose(model, n) if auto else {})
                    model, nbytes, runtimes, chosen = kept[key]
                    cell = cells.setdefault((size, fmt, n, mode), {"runs": []})
                    if "error" in cell:
                        continue
                    try:
                        cell["runs"].append(_run_streams(model, device, n, seconds, step_mode=mode))
                    except Exception as e:  # built, but this machine cannot run it (CUTLASS 2:4 on sm_90)
                        cells[(size, fmt, n, mode)] = {"error": {
                            "bench": "stream", "size": size, "format": fmt, "streams": n, "step_mode": mode,
                            "error": str(e).splitlines()[0]}}
                        continue
                    extra = {k: v for k, v in chosen.items() if k != "auto_runtimes"}
                    held = nbytes + extra.get("auto_extra_bytes", 0)  # with the dense copies auto made
                    cell["fixed"] = {
                        "bench": "stream", "size": size, "format": fmt, "streams": n, "dtype": str(dtype)[6:],
                        "step_mode": mode,
                        "sparsity": 0.5 if fmt.startswith("2:4") else SPARSITY, "weight_bytes": held,
                        "floor_ms": 1e3 * held / (bw * 1e9),
                        "runtimes": chosen.get("auto_runtimes") or sorted(set(runtimes.values())), **extra,
                    }
                if repeats == 1:  # nothing comes back to it: free it now
                    for k in [k for k in kept if k[0] == fmt]:
                        del kept[k]
                    if device == "cuda":
                        torch.cuda.empty_cache()
                if on_rows is not None:
                    on_rows(_with_ratios(_rows(cells)))
        kept.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
    return _with_ratios(_rows(cells))


def _rows(cells: dict[tuple[Any, ...], dict[str, Any]]) -> list[dict[str, Any]]:
    """The table's rows from its cells: an error, or the median of the runs so far."""
    rows = []
    for cell in cells.values():
        if "error" in cell:
            rows.append(dict(cell["error"]))
            continue
        runs = cell["runs"]
        if not runs:
            continue

        def med(k: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r[k] for r in runs)

        # timed_steps: how many steps the percentiles are over (with ~25, a p99 is about the max)
        row = {**cell["fixed"], "p50_ms": 1e3 * med("p50_s"), "p99_ms": 1e3 * med("p99_s"),
               "timed_steps": int(min(r["window_steps"] for r in runs)),
               "encoder_p50_ms": 1e3 * med("encoder_p50_s"), "compute_s_per_audio_s": med("compute_s_per_audio_s"),
               "mean_batch": med("mean_batch")}
        if len(runs) > 1:
            row["p50_runs_ms"] = [1e3 * r["p50_s"] for r in runs]
        rows.append(row)
    return rows


def _with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with ``speedup_vs_dense_p50`` where their dense baseline is among them, and
    ``speedup_runs`` (round by round) where both have several rounds."""
    # Every row against dense of the same size, stream count and step mode (the baseline to
    # beat: graphs sped dense up 5-10x on the H100, so a graph row against dense eager flatters it).
    dense = {(r["size"], r["streams"], r["step_mode"]): r for r in rows
             if r.get("format") == "dense" and "p50_ms" in r}
    for r in rows:
        key = (r["size"], r.get("streams"), r.get("step_mode"))
        if "p50_ms" in r and key in dense:
            d = dense[key]
            r["speedup_vs_dense_p50"] = d["p50_ms"] / r["p50_ms"]
            if "p50_runs_ms" in r and "p50_runs_ms" in d:
                r["speedup_runs"] = [a / b for a, b in zip(d["p50_runs_ms"], r["p50_runs_ms"], strict=False)]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The stream rows as a Markdown table; each p99 labelled with the steps it is over
    (``n``), error rows listed after it."""
    timed = [r for r in rows if "p50_ms" in r]
    counts = {r["timed_steps"] for r in timed}
    same = len(counts) == 1
    p99 = f"p99 ms (n={counts.pop()})" if same else "p99 ms (n steps)"
    lines = [f"| size | format | streams | step mode | p50 ms | {p99} | encoder p50 ms | compute s / audio s "
             "| vs dense (p50) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in timed:
        n = "" if same else f" (n={r['timed_steps']})"
        ratio = f"{r['speedup_vs_dense_p50']:.2f}x" if "speedup_vs_dense_p50" in r else ""
        lines.append(f"| {r['size']} | {r['format']} | {r['streams']} | {r['step_mode']} | {r['p50_ms']:.2f} "
                     f"| {r['p99_ms']:.2f}{n} | {r['encoder_p50_ms']:.2f} | {r['compute_s_per_audio_s']:.4f} | {ratio} |")
    lines += [f"error: {r.get('size')} {r.get('format')} {r.get('streams', '')}: {r['error']}"
              for r in rows if "error" in r]
    return "\n".join(lines)


def _memory(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.memory_allocated())
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def keep_feeding(elapsed_s: float, fed_ticks: int, step_alone_s: float, compare: int, max_wall_s: float) -> bool:
    """Whether the load test may feed one more chunk to every stream: the time spent, plus the
    re-decode of ``compare`` streams alone over ``fed_ticks + 1`` chunks at ``step_alone_s``
    each (1.5x, for the noise of a short estimate), stays within 90% of ``max_wall_s``."""
    redecode = 1.5 * compare * (fed_ticks + 1) * step_alone_s
    return elapsed_s + redecode <= 0.9 * max_wall_s


def _step_alone_s(model: Any, step_mode: str, fixed: dict[str, int]) -> float:
    """Seconds per chunk of one stream decoded alone, as the re-decodes run (median of 5 chunks
    after 3 warm-up ones, which also capture graphs)."""
    from sparse_rnnt.streaming import StreamingDecoder

    dec = StreamingDecoder(model, None, step_mode=step_mode, **fixed)
    s = dec.open()
    g = torch.Generator().manual_seed(99)
    times = []
    for i in range(8):
        t = time.perf_counter()
        dec.accept(s, 0.1 * torch.randn(CHUNK, generator=g))
        dec.step([s])
        if i >= 3:
            times.append(time.perf_counter() - t)
    dec.finalize(s)
    return statistics.median(times)


def load_test(device: str, minutes: float, n_streams: int = 64, max_wall_s: float = 0.0,
              dtype: torch.dtype | None = None, step_mode: str = "eager", compare: int = 2) -> dict[str, Any]:
    """``n_streams`` streams fed ``minutes`` of audio each; memory along the way; outputs vs alone
    (``compare`` streams, evenly spread from the first to the last, decoded again alone; 0: all).

    ``max_wall_s`` > 0 bounds the run (a device lease is short): feeding stops when the time
    spent plus the single-stream re-decodes' estimated time would pass 90% of it
    (:func:`keep_feeding`; the first chunk is always fed), and ``minutes_fed`` records how much
    audio each stream actually got. ``dtype``: the weights' (default: bf16 on CUDA, fp32 on
    CPU). ``step_mode``: the decoders' (``"cuda-graph"`` replays each step as CUDA graphs; the
    single-stream re-decodes use the same mode). Batched bf16 matmuls round a row differently at
    different batch sizes, so in ``"eager"`` mode bitwise-identical hypotheses are only expected
    in float32. The static modes run every step at one batch size (``min_batch = max_batch =
    n_streams``, the single-stream re-decodes too), where they are expected in bf16 as well."""
    from sparse_rnnt.streaming import StreamingDecoder

    size = "tiny" if device == "cpu" else "base"
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model, _, _, _ = _build(size, "dense", device, dtype)
    fixed = {} if step_mode == "eager" else {"max_batch": n_streams, "min_batch": n_streams}
    dec = StreamingDecoder(model, None, step_mode=step_mode, **fixed)
    g = torch.Generator().manual_seed(7)
    samples = int(minutes * 60 * 16000)
    seeds = list(range(n_streams))
    if compare < 0:
        raise ValueError(f"compare must be >= 0, got {compare}")
    k = n_streams if compare == 0 else min(compare, n_streams)
    t0 = time.perf_counter()
    # What one chunk of one single-stream re-decode costs, timed before feeding, so that feeding
    # can run until the re-decodes' estimated time is all that is left of max_wall_s.
    step_alone_s = _step_alone_s(model, step_mode, fixed) if max_wall_s > 0 else 0.0
    streams = [dec.open(stream_id=f"s{i}") for i in seeds]
    memory = []
    t_feed = time.perf_counter()
    ticks = (samples + CHUNK - 1) // CHUNK
    gens = [torch.Generator().manual_seed(1000 + i) for i in seeds]
    fed = 0
    for tick in range(ticks):
        # The first chunk is always fed, so that a bound too short still gives a result.
        if tick and max_wall_s > 0 and not keep_feeding(time.perf_counter() - t0, tick, step_alone_s, k, max_wall_s):
            break
        fed = tick + 1
        n = min(CHUNK, samples - tick * CHUNK)
        for s, gi in zip(streams, gens, strict=True):
            dec.accept(s, 0.1 * torch.randn(n, generator=gi))
        dec.step(streams)
        if tick % max(1, ticks // 20) == 0:
            memory.append({"tick": tick, "audio_s": tick * CHUNK / 16000, "bytes": _memory(device),
                           "hypothesis_tokens": sum(len(s.tokens) for s in streams)})
    results = {r.stream_id: r.tokens for r in dec.finish(streams)}
    wall = time.perf_counter() - t_feed  # feeding and decoding only (t0 also counts the set-up)
    stats = dec.latency_stats()
    same = {}
    picked = sorted({round(j * (n_streams - 1) / max(k - 1, 1)) for j in range(k)})
    for i in picked:  # the same audio alone, in one piece per tick
        alone = StreamingDecoder(model, None, step_mode=step_mode, **fixed)
        gi = torch.Generator().manual_seed(1000 + i)
        s = alone.open()
        for tick in range(fed):
            alone.accept(s, 0.1 * torch.randn(min(CHUNK, samples - tick * CHUNK), generator=gi))
            alone.step([s])
        same[f"s{i}"] = alone.finalize(s).tokens == results[f"s{i}"]
    del g
    a, b = (memory[1] if len(memory) > 1 else memory[0]), memory[-1]
    first, last = a["bytes"], b["bytes"]
    # The hypotheses themselves grow with the audio (8 bytes per token in a list of small ints).
    hyp_bytes = 8 * (b["hypothesis_tokens"] - a["hypothesis_tokens"])
    return {
        "bench": "load", "size": size, "dtype": str(dtype).removeprefix("torch."), "streams": n_streams,
        "step_mode": step_mode, "min_batch": fixed.get("min_batch", 1),
        "minutes_per_stream": minutes,
        "minutes_fed": min(fed * CHUNK, samples) / 16000 / 60, "truncated": fed < ticks,
        "p50_ms": 1e3 * stats["p50_s"], "p99_ms": 1e3 * stats["p99_s"], "timed_steps": int(stats["window_steps"]),
        "compute_s_per_audio_s": stats["compute_s_per_audio_s"], "wall_s": wall,
        "memory": memory, "memory_growth_bytes": last - first,
        "memory_growth_per_stream_bytes": (last - first) / n_streams,
        "hypothesis_growth_bytes": hyp_bytes,
        "state_growth_per_stream_bytes": (last - first - hyp_bytes) / n_streams, "identical_to_alone": same,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and stream counts")
    parser.add_argument("--streams", default=None,
                        help="comma-separated stream counts of the table (default: 1,8,64 on cpu; cuda 1,32 with --quick, else 1,8,32,64)")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated model sizes of the table (default: tiny on cpu; cuda base with --quick, "
                             "else base,paper-187m)")
    parser.add_argument("--formats", default=None,
                        help="comma-separated formats of the table (default: all of dense, 2:4, bsr, bitmap, "
                             "2:4-cutlass on cuda, linear-free); dense, every ratio's baseline, always runs")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of the whole table, every model kept between them: each row is the median "
                             "of its rounds and records each round's ratio to dense (default 1)")
    parser.add_argument("--load-minutes", type=float, default=0.0, help="also run the load test (minutes per stream)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time every format with the encoder step replayed as CUDA graphs")
    parser.add_argument("--load-only", action="store_true", help="run the load test alone (no format table)")
    parser.add_argument("--max-wall-s", type=float, default=0.0,
                        help="bound the load test's wall time (feeding stops when the single-stream re-decodes' estimated time is what is left of 90%% of it; 0: no bound)")
    parser.add_argument("--load-dtype", choices=("float32", "bfloat16"), default=None,
                        help="weights of the load test (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--load-step-mode", choices=("eager", "static", "cuda-graph"), default="eager",
                        help="how the load test runs each step (cuda-graph: replayed as CUDA graphs; static: the same fixed-size path eagerly)")
    parser.add_argument("--load-compare", type=int, default=2,
                        help="streams the load test decodes again alone to compare outputs, spread from the first "
                             "to the last (0: all; default 2)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    from benchmarks.env import unwritable

    why = unwritable(Path(args.out_dir) / "load" if args.load_only else args.out_dir)
    if why:
        parser.error(why)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.load_compare < 0:
        parser.error("--load-compare must be >= 0")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.load_only and args.load_minutes <= 0:
        parser.error("--load-only needs --load-minutes > 0")
    if args.cuda_graphs and args.device != "cuda":
        parser.error("--cuda-graphs needs --device cuda")
    if args.load_step_mode == "cuda-graph" and args.device != "cuda":
        parser.error("--load-step-mode cuda-graph needs --device cuda")
    try:
        streams = tuple(int(n) for n in args.streams.split(",")) if args.streams else None
    except ValueError:
        parser.error(f"--streams must be comma-separated integers, got {args.streams!r}")
    if streams is not None and min(streams) < 1:
        parser.error("--streams counts must be >= 1")
    sizes = tuple(x.strip() for x in args.sizes.split(",") if x.strip()) if args.sizes else None
    if sizes is not None:
        from sparse_rnnt.model import MODEL_SIZES

        unknown = [x for x in sizes if x not in MODEL_SIZES]
        if unknown or not sizes:
            parser.error(f"--sizes: unknown model size(s) {unknown or args.sizes!r}; choose from {', '.join(MODEL_SIZES)}")
    formats = tuple(x.strip() for x in args.formats.split(",") if x.strip()) if args.formats else None
    if formats is not None:
        unknown = [x for x in formats if x not in all_formats(args.device)]
        if unknown or not formats:
            parser.error(f"--formats: unknown format(s) {unknown or args.formats!r} on {args.device}; "
                         f"choose from {', '.join(all_formats(args.device))}")
    out = Path(args.out_dir) / f"stream-{args.device}.json"
    result: dict[str, Any] = {"environment": environment(), "device": args.device, "rows": [],
                              "threads": torch.get_num_threads(), "complete": False}

    def save(rows: list[dict[str, Any]]) -> None:
        result["rows"] = rows
        atomic_write_json(out, result)

    rows = [] if args.load_only else bench(args.device, args.quick, cuda_graphs=args.cuda_graphs, streams=streams,
                                           sizes=sizes, on_rows=save, formats=formats, repeats=args.repeats)
    result["rows"] = rows
    if args.load_minutes > 0:
        dtype = getattr(torch, args.load_dtype) if args.load_dtype else None
        result["load"] = load_test(args.device, args.load_minutes, max_wall_s=args.max_wall_s, dtype=dtype,
                                   compare=args.load_compare,
                                   step_mode=args.load_step_mode)
    result["complete"] = True
    atomic_write_json(out, result)
    for r in rows:
        print(json.dumps(r))
    if rows:
        print(table(rows))
    if "load" in result:
        print(json.dumps({k: v for k, v in result["load"].items() if k != "memory"}))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
