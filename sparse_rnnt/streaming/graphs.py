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

Greedy decoding gets the same treatment (:class:`StaticGreedyDecoder`): one graph per bucket
runs the whole chunk's greedy search (:func:`~sparse_rnnt.model.decoding.greedy_frames_on_device`:
every frame's ``max_symbols_per_frame`` joiner and predictor steps, rows that stopped emitting
masked), and one transfer brings the chunk's tokens to the host. Beam search stays eager
(torchaudio's search is host-driven by design).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torchaudio.models import RNNT

from ..model.decoding import PredictorState, greedy_frames_on_device, token_lists
from ..model.rnnt import EmformerRNNT
from .encoder import EncoderState, encoder_step_tensors, geometry, per_stream

log = logging.getLogger(__name__)

MODES = ("static", "cuda-graph")
WARMUP_RUNS = 3  # eager runs on a side stream before capture (autotuning, allocator, cuBLAS)


class _GraphBucket(ABC):
    """Static buffers of one batch size, and the captured graph once there is one."""

    size: int
    graph: torch.cuda.CUDAGraph | None = None
    outputs: tuple | None = None
    failed = False

    @abstractmethod
    def run(self) -> tuple:
        """Compute from the buffers only and return the outputs (the graph's outputs on replay)."""


class _Bucket(_GraphBucket):
    """The encoder step's buffers: chunk, valid frames, past and the stacked states."""

    def __init__(self, rnnt: RNNT, size: int, device: torch.device, dtype: torch.dtype) -> None:
        geo = geometry(rnnt)
        n_mels = rnnt.transcriber.input_linear.in_features
        self.rnnt = rnnt
        self.size = size
        self.chunk = torch.zeros(size, geo.chunk, n_mels, device=device, dtype=dtype)
        self.valid = torch.zeros(size, dtype=torch.int64, device=device)
        self.past = torch.zeros(size, dtype=torch.int64, device=device)
        kv = (geo.layers, geo.left_context_reduced, size, geo.width)
        self.key = torch.zeros(kv, device=device, dtype=dtype)
        self.value = torch.zeros(kv, device=device, dtype=dtype)
        self.memory = torch.zeros(geo.layers, geo.max_memory, size, geo.width, device=device, dtype=dtype)

    def run(self) -> tuple[torch.Tensor, ...]:
        return encoder_step_tensors(self.rnnt, self.chunk, self.valid, self.past, self.key, self.value, self.memory)


class _Bucketed:
    """Mode, device and the batch buckets (1, 2, 4, ... ``max_batch`` rounded up to a power of
    two) shared by the fixed-size encoder step and greedy decoder."""

    def __init__(self, device: torch.device | str, mode: str, max_batch: int, min_batch: int = 1) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        device = torch.device(device)
        if mode == "cuda-graph" and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, this one is on {device}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 1 <= min_batch <= max_batch:
            raise ValueError(f"min_batch must be in [1, max_batch={max_batch}], got {min_batch}")
        self.mode = mode
        self.device = device
        # Buckets from min_batch (rounded up to a power of two) on: min_batch = max_batch gives
        # one bucket, so a stream's rows run in the same shapes whatever else shares its step.
        floor = 1 << (min_batch - 1).bit_length()
        self.sizes = [1 << i for i in range((max_batch - 1).bit_length() + 1) if 1 << i >= floor]

    def bucket_size(self, batch: int) -> int:
        """The smallest bucket holding ``batch`` rows."""
        for size in self.sizes:
            if size >= batch:
                return size
        raise ValueError(f"{batch} streams in one step, more than max_batch ({self.sizes[-1]})")

    def _execute(self, bucket: _GraphBucket, what: str) -> tuple:
        """``bucket.run()``: eagerly (``static``, or a failed capture), else by graph replay,
        capturing the graph on first use."""
        if self.mode == "static" or bucket.failed:
            return bucket.run()
        if bucket.graph is None:
            try:
                bucket.graph, bucket.outputs = _capture(bucket.run, self.device)
            except Exception as e:  # an op that cannot be captured: this bucket stays eager
                bucket.failed = True
                bucket.graph = bucket.outputs = None
                first = str(e).splitlines()[0] if str(e) else ""
                log.warning("CUDA graph capture of the %d-stream %s failed (%s: %s); running it eagerly",
                            bucket.size, what, type(e).__name__, first)
                return bucket.run()
        assert bucket.graph is not None and bucket.outputs is not None
        bucket.graph.replay()
        return bucket.outputs


class StaticEncoderStep(_Bucketed):
    """:func:`~sparse_rnnt.streaming.encoder.encoder_step` over fixed-size batch buckets.

    Call it like ``encoder_step`` (without the model): ``step(chunk [B, C, F], valid [B], states)``
    returns ``out [B, segment // stride, encoding_dim]`` and the new states. ``max_batch``
    bounds ``B`` (the largest bucket is the next power of two at or above it); ``min_batch`` is
    the smallest bucket (rounded up to a power of two).
    """

    def __init__(self, rnnt: RNNT, device: torch.device | str, dtype: torch.dtype, *, mode: str = "static",
                 max_batch: int = 64, min_batch: int = 1) -> None:
        super().__init__(device, mode, max_batch, min_batch)
        self.rnnt = rnnt
        self.dtype = dtype
        self.geometry = geometry(rnnt)
        self.buckets: dict[int, _Bucket] = {}

    def __call__(self, chunk: torch.Tensor, valid_frames: torch.Tensor,
                 states: list[EncoderState]) -> tuple[torch.Tensor, list[EncoderState]]:
        # Copies out: a graph's outputs are overwritten by its next replay.
        return per_stream(self.run_stacked, chunk, valid_frames, states, self.geometry.segment_reduced)

    def run_stacked(self, chunk: torch.Tensor, valid_frames: torch.Tensor, past: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:func:`~sparse_rnnt.streaming.encoder.encoder_step_tensors` (same arguments, stacked
        states of ``B`` streams) through the bucket of ``B``. The results are views of the
        bucket's outputs, valid until its next run: copy what must outlive it."""
        batch = chunk.size(0)
        size = self.bucket_size(batch)
        bucket = self.buckets.get(size)
        if bucket is None:
            bucket = self.buckets[size] = _Bucket(self.rnnt, size, self.device, self.dtype)
        # Rows >= batch are idle streams: no audio, nothing valid, no past (their outputs are
        # never read; with nothing to attend to but zeros they stay finite).
        for dst, src in ((bucket.chunk, chunk), (bucket.valid, valid_frames), (bucket.past, past)):
            dst[:batch].copy_(src)
            dst[batch:].zero_()
        for dst, src in ((bucket.key, key), (bucket.value, value), (bucket.memory, memory)):
            dst[:, :, :batch].copy_(src)
            dst[:, :, batch:].zero_()
        out, keys, vals, mems = self._execute(bucket, "encoder step")
        return out[:batch], keys[:, :, :batch], vals[:, :, :batch], mems[:, :, :batch]


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


class _GreedyBucket(_GraphBucket):
    """Greedy decoding's buffers: a chunk's encoder frames, real frames per row, the predictor
    output and LSTM state of every row. Idle rows have no real frames, so they never emit."""

    def __init__(self, model: EmformerRNNT, size: int, enc: torch.Tensor, pred: torch.Tensor,
                 state: PredictorState, max_symbols_per_frame: int) -> None:
        self.model = model
        self.size = size
        self.max_symbols_per_frame = max_symbols_per_frame
        self.enc = enc.new_zeros(size, *enc.shape[1:])
        self.frames = torch.zeros(size, dtype=torch.int64, device=enc.device)
        self.pred = pred.new_zeros(size, *pred.shape[1:])
        self.state = [[x.new_zeros(size, *x.shape[1:]) for x in layer] for layer in state]

    def run(self) -> tuple[torch.Tensor, torch.Tensor, PredictorState]:
        return greedy_frames_on_device(self.model, self.enc, self.frames, self.pred, self.state,
                                       self.max_symbols_per_frame)


class StaticGreedyDecoder(_Bucketed):
    """:func:`~sparse_rnnt.model.decoding.greedy_frames` over fixed-size batch buckets, as one
    :func:`~sparse_rnnt.model.decoding.greedy_frames_on_device` call (one graph) per chunk.

    ``decode(enc [B, T, D], frames [B], pred [B, 1, D], state)`` returns the same as
    ``greedy_frames``: new tokens per row, the final predictor output and state. Like
    :meth:`StaticEncoderStep.run_stacked`, the tensors are views of the bucket's outputs, valid
    until its next run: copy what must outlive it. Buckets are kept per (batch size, ``T``).
    """

    def __init__(self, model: EmformerRNNT, device: torch.device | str, *, mode: str = "static",
                 max_batch: int = 64, min_batch: int = 1, max_symbols_per_frame: int = 4) -> None:
        super().__init__(device, mode, max_batch, min_batch)
        self.model = model
        self.max_symbols_per_frame = max_symbols_per_frame
        self.buckets: dict[tuple[int, int], _GreedyBucket] = {}

    def decode(self, enc: torch.Tensor, frames: torch.Tensor, pred: torch.Tensor,
               state: PredictorState) -> tuple[list[list[int]], torch.Tensor, PredictorState]:
        batch, n_frames = enc.shape[:2]
        size = self.bucket_size(batch)
        b = self.buckets.get((size, n_frames))
        if b is None:
            b = self.buckets[size, n_frames] = _GreedyBucket(self.model, size, enc, pred, state,
                                                            self.max_symbols_per_frame)
        b.enc[:batch].copy_(enc)
        b.enc[batch:].zero_()
        b.frames[:batch].copy_(frames)
        b.frames[batch:].zero_()
        b.pred[:batch].copy_(pred)
        b.pred[batch:].zero_()
        for layer, src in zip(b.state, state, strict=True):
            for x, sx in zip(layer, src, strict=True):
                x[:batch].copy_(sx)
                x[batch:].zero_()
        tokens, new_pred, new_state = self._execute(b, "greedy decoder")
        return token_lists(tokens[:batch]), new_pred[:batch], [[x[:batch] for x in layer] for layer in new_state]
