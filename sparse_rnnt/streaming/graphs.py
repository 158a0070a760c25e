"""The streaming encoder step at fixed batch sizes, replayed as CUDA graphs.

A chunk step of a streaming Emformer is hundreds of small kernels, so on a GPU its time is the
host launching them, not the weights being read (``base`` on an H200: 11 ms per encoder step
against 0.03 ms of weight bytes). A CUDA graph launches the whole step at once. A graph has fixed
shapes and addresses, so :class:`StaticEncoderStep` keeps one set of input/output buffers per
*bucket* (batch sizes 1, 2, 4, ... up to ``max_batch``): the ``B`` streams of a step are copied
into the smallest bucket that holds them, the rows beyond ``B`` are idle streams (zero audio,
nothing valid, no past), and the outputs of the first ``B`` rows are copied out.

``mode="static"`` runs exactly that bucketed path eagerly (any device; the CPU tests use it),
``mode="cuda-graph"`` captures one graph per bucket on first use (after warm-up runs that let
Triton autotune outside the capture) and replays it. A bucket whose capture fails (an op that
cannot be captured) logs once and stays eager.

Greedy decoding gets the same treatment (:class:`StaticGreedyDecoder`): per joiner call, one
graph scores the frame and picks each row's token, one transfer brings the tokens to the host,
and a second graph advances the predictor of the rows that emitted, in place in the bucket's
buffers. Beam search stays eager (torchaudio's search is host-driven by design).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torchaudio.models import RNNT

from ..model.decoding import PredictorState, greedy_loop
from ..model.rnnt import EmformerRNNT
from .encoder import EncoderState, encoder_step_tensors, geometry, unstack_states

log = logging.getLogger(__name__)

MODES = ("static", "cuda-graph")
WARMUP_RUNS = 3  # eager runs on a side stream before capture (autotuning, allocator, cuBLAS)


class _Bucket:
    """Static buffers of one batch size, and the captured graph once there is one."""

    def __init__(self, rnnt: RNNT, size: int, device: torch.device, dtype: torch.dtype) -> None:
        geo = geometry(rnnt)
        n_mels = rnnt.transcriber.input_linear.in_features
        self.size = size
        self.chunk = torch.zeros(size, geo.chunk, n_mels, device=device, dtype=dtype)
        self.valid = torch.zeros(size, dtype=torch.int64, device=device)
        self.past = torch.zeros(size, dtype=torch.int64, device=device)
        kv = (geo.layers, geo.left_context_reduced, size, geo.width)
        self.key = torch.zeros(kv, device=device, dtype=dtype)
        self.value = torch.zeros(kv, device=device, dtype=dtype)
        self.memory = torch.zeros(geo.layers, geo.max_memory, size, geo.width, device=device, dtype=dtype)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, ...] | None = None
        self.failed = False

    def run(self, rnnt: RNNT) -> tuple[torch.Tensor, ...]:
        return encoder_step_tensors(rnnt, self.chunk, self.valid, self.past, self.key, self.value, self.memory)


class _Bucketed:
    """Mode, device and the batch buckets (1, 2, 4, ... ``max_batch`` rounded up to a power of
    two) shared by the fixed-size encoder step and greedy decoder."""

    def __init__(self, device: torch.device | str, mode: str, max_batch: int) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        device = torch.device(device)
        if mode == "cuda-graph" and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, this one is on {device}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.mode = mode
        self.device = device
        self.sizes = [1 << i for i in range((max_batch - 1).bit_length() + 1)]

    def bucket_size(self, batch: int) -> int:
        """The smallest bucket holding ``batch`` rows."""
        for size in self.sizes:
            if size >= batch:
                return size
        raise ValueError(f"{batch} streams in one step, more than max_batch ({self.sizes[-1]})")


class StaticEncoderStep(_Bucketed):
    """:func:`~sparse_rnnt.streaming.encoder.encoder_step` over fixed-size batch buckets.

    Call it like ``encoder_step`` (without the model): ``step(chunk [B, C, F], valid [B], states)``
    returns ``out [B, segment // stride, encoding_dim]`` and the new states. ``max_batch``
    bounds ``B`` (the largest bucket is the next power of two at or above it).
    """

    def __init__(self, rnnt: RNNT, device: torch.device | str, dtype: torch.dtype, *, mode: str = "static",
                 max_batch: int = 64) -> None:
        super().__init__(device, mode, max_batch)
        self.rnnt = rnnt
        self.dtype = dtype
        self.geometry = geometry(rnnt)
        self.buckets: dict[int, _Bucket] = {}

    def __call__(self, chunk: torch.Tensor, valid_frames: torch.Tensor,
                 states: list[EncoderState]) -> tuple[torch.Tensor, list[EncoderState]]:
        batch = chunk.size(0)
        if len(states) != batch:
            raise ValueError(f"{len(states)} states for a batch of {batch}")
        size = self.bucket_size(batch)
        bucket = self.buckets.get(size)
        if bucket is None:
            bucket = self.buckets[size] = _Bucket(self.rnnt, size, self.device, self.dtype)
        # Rows >= batch are idle streams: no audio, nothing valid, no past (their outputs are
        # never read; with nothing to attend to but zeros they stay finite).
        bucket.chunk[:batch].copy_(chunk)
        bucket.chunk[batch:].zero_()
        bucket.valid[:batch].copy_(valid_frames)
        bucket.valid[batch:].zero_()
        past = [s.past for s in states]
        bucket.past.copy_(torch.tensor(past + [0] * (size - batch)))
        for dst, name in ((bucket.key, "key"), (bucket.value, "value"), (bucket.memory, "memory")):
            dst[:, :, :batch].copy_(torch.stack([getattr(s, name) for s in states], dim=2))
            dst[:, :, batch:].zero_()
        out, keys, vals, mems = self._run(bucket)
        # A graph's outputs are overwritten by its next replay: the caller gets copies
        # (unstack_states copies every row).
        return out[:batch].clone(), unstack_states(keys, vals, mems, past, self.geometry.segment_reduced)

    def _run(self, bucket: _Bucket) -> tuple[torch.Tensor, ...]:
        if self.mode == "static" or bucket.failed:
            return bucket.run(self.rnnt)
        if bucket.graph is None:
            self._capture(bucket)
            if bucket.failed:
                return bucket.run(self.rnnt)
        assert bucket.graph is not None and bucket.outputs is not None
        bucket.graph.replay()
        return bucket.outputs

    def _capture(self, bucket: _Bucket) -> None:
        try:
            bucket.graph, bucket.outputs = _capture(lambda: bucket.run(self.rnnt), self.device)
        except Exception as e:  # an op that cannot be captured: this bucket stays eager
            bucket.failed = True
            bucket.graph = bucket.outputs = None
            _log_capture_failure("encoder step", bucket.size, e)


def _capture(fn: Callable[[], object], device: torch.device) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm ``fn`` up on a side stream (autotuning and allocations happen there), then capture it."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def _log_capture_failure(what: str, size: int, e: Exception) -> None:
    first = str(e).splitlines()[0] if str(e) else ""
    log.warning("CUDA graph capture of the %d-stream %s failed (%s: %s); running it eagerly",
                size, what, type(e).__name__, first)


class _GreedyBucket:
    """Static buffers of greedy decoding for one batch size: the frame being decoded, the
    predictor output and LSTM state of every row, which rows are still active, their tokens."""

    def __init__(self, size: int, frame: torch.Tensor, pred: torch.Tensor, state: PredictorState) -> None:
        self.size = size
        self.frame = frame.new_zeros(size, *frame.shape[1:])
        self.pred = pred.new_zeros(size, *pred.shape[1:])
        self.state = [[x.new_zeros(size, *x.shape[1:]) for x in layer] for layer in state]
        self.active = torch.zeros(size, dtype=torch.bool, device=frame.device)
        self.best = torch.zeros(size, dtype=torch.int64, device=frame.device)
        self.emit = torch.zeros(size, dtype=torch.bool, device=frame.device)
        self.ones = torch.ones(size, dtype=torch.int32, device=frame.device)
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.failed = False


class StaticGreedyDecoder(_Bucketed):
    """:func:`~sparse_rnnt.model.decoding.greedy_frames` over fixed-size batch buckets.

    ``decode(enc [B, T, D], frames [B], pred [B, 1, D], state)`` returns the same as
    ``greedy_frames``: new tokens per row, the final predictor output and state (copies, owned by
    the caller). Idle rows of a bucket are never active, so they never emit.
    """

    def __init__(self, model: EmformerRNNT, device: torch.device | str, *, mode: str = "static",
                 max_batch: int = 64, max_symbols_per_frame: int = 4) -> None:
        super().__init__(device, mode, max_batch)
        self.model = model
        self.max_symbols_per_frame = max_symbols_per_frame
        self.buckets: dict[int, _GreedyBucket] = {}

    def _score(self, b: _GreedyBucket) -> None:
        """Each row's best token for the current frame, and whether an active row emits it."""
        joint, _, _ = self.model.rnnt.join(b.frame, b.ones, b.pred, b.ones)
        b.best.copy_(joint[:, 0, 0].argmax(-1))
        b.emit.copy_(b.active & (b.best != self.model.blank))

    def _advance(self, b: _GreedyBucket) -> None:
        """Feed the emitted tokens to the predictor; rows that did not emit keep their state."""
        new_pred, _, new_state = self.model.rnnt.predict(b.best[:, None].to(torch.int32), b.ones, b.state)
        keep = b.emit[:, None]
        b.pred.copy_(torch.where(keep[:, :, None], new_pred, b.pred))
        for layer, new_layer in zip(b.state, new_state, strict=True):
            for x, nx in zip(layer, new_layer, strict=True):
                x.copy_(torch.where(keep, nx, x))
        b.active.copy_(b.emit)

    def _replay(self, b: _GreedyBucket, name: str) -> None:
        fn = self._score if name == "score" else self._advance
        if self.mode == "static" or b.failed:
            fn(b)
            return
        graph = b.graphs.get(name)
        if graph is None:
            # Capture runs fn on the buffers (warm-up included): save and restore what it changes.
            saved = (b.pred.clone(), [[x.clone() for x in layer] for layer in b.state], b.active.clone())
            try:
                graph, _ = _capture(lambda: fn(b), self.device)
                b.graphs[name] = graph
            except Exception as e:
                b.failed = True
                _log_capture_failure(f"greedy {name}", b.size, e)
            b.pred.copy_(saved[0])
            for layer, old in zip(b.state, saved[1], strict=True):
                for x, ox in zip(layer, old, strict=True):
                    x.copy_(ox)
            b.active.copy_(saved[2])
            if b.failed:
                fn(b)
                return
        graph.replay()

    def decode(self, enc: torch.Tensor, frames: torch.Tensor, pred: torch.Tensor,
               state: PredictorState) -> tuple[list[list[int]], torch.Tensor, PredictorState]:
        batch = enc.size(0)
        size = self.bucket_size(batch)
        b = self.buckets.get(size)
        if b is None:
            b = self.buckets[size] = _GreedyBucket(size, enc[:, :1], pred, state)
        b.pred[:batch].copy_(pred)
        b.pred[batch:].zero_()
        for layer, src in zip(b.state, state, strict=True):
            for x, sx in zip(layer, src, strict=True):
                x[:batch].copy_(sx)
                x[batch:].zero_()

        def begin(t: int) -> None:
            b.frame[:batch].copy_(enc[:, t : t + 1])
            b.active.zero_()
            b.active[:batch].copy_(t < frames)

        def score() -> tuple[torch.Tensor, torch.Tensor]:
            self._replay(b, "score")
            return b.best[:batch], b.emit[:batch]

        hyps = greedy_loop(frames, begin, score, lambda: self._replay(b, "advance"), self.max_symbols_per_frame)
        new_state = [[x[:batch].clone() for x in layer] for layer in b.state]
        return hyps, b.pred[:batch].clone(), new_state
