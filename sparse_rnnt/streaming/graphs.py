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
"""

from __future__ import annotations

import logging

import torch
from torchaudio.models import RNNT

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


class StaticEncoderStep:
    """:func:`~sparse_rnnt.streaming.encoder.encoder_step` over fixed-size batch buckets.

    Call it like ``encoder_step`` (without the model): ``step(chunk [B, C, F], valid [B], states)``
    returns ``out [B, segment // stride, encoding_dim]`` and the new states. ``max_batch``
    bounds ``B`` (the largest bucket is the next power of two at or above it).
    """

    def __init__(self, rnnt: RNNT, device: torch.device | str, dtype: torch.dtype, *, mode: str = "static",
                 max_batch: int = 64) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        device = torch.device(device)
        if mode == "cuda-graph" and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, this one is on {device}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.rnnt = rnnt
        self.mode = mode
        self.device = device
        self.dtype = dtype
        self.geometry = geometry(rnnt)
        self.sizes = [1 << i for i in range((max_batch - 1).bit_length() + 1)]
        self.buckets: dict[int, _Bucket] = {}

    def bucket_size(self, batch: int) -> int:
        """The smallest bucket holding ``batch`` rows."""
        for size in self.sizes:
            if size >= batch:
                return size
        raise ValueError(f"{batch} streams in one step, more than max_batch ({self.sizes[-1]})")

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
        # Copies: a graph's outputs are overwritten by its next replay (and a one-row slice of
        # them would be contiguous, so unstacking alone would not copy it).
        keys, vals, mems = (t[:, :, :batch].clone() for t in (keys, vals, mems))
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
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    bucket.run(self.rnnt)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                bucket.outputs = bucket.run(self.rnnt)
            bucket.graph = graph
        except Exception as e:  # an op that cannot be captured: this bucket stays eager
            bucket.failed = True
            bucket.graph = bucket.outputs = None
            log.warning("CUDA graph capture of the %d-stream encoder step failed (%s: %s); "
                        "running it eagerly", bucket.size, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
