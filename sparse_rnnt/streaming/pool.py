"""Every open stream's decoder state as one row (a *slot*) of shared device tensors.

A batched chunk step needs its streams' encoder states stacked ``[layers, slots, B, D]`` and
their predictor outputs and LSTM states batched ``[B, ...]``. Kept per stream, that is a stack
per state tensor on the way in and a copy per stream and state tensor on the way out: hundreds of
small kernel launches per step at 64 streams. Kept here, a step gathers its rows with one
``index_select`` per state tensor and writes the new states back with one ``index_copy_``,
whatever the number of streams.

Slots are reused after :meth:`StatePool.release`; the pool doubles its capacity when every slot
is taken (a stream keeps its slot index for its whole life). It never shrinks: after a burst of
streams it keeps their memory (capacity: the most streams open at once, rounded up to a power of
two times the initial capacity) until it is dropped. Shrinking would move live streams' slots.
"""

from __future__ import annotations

import torch

from ..model.decoding import PredictorState
from .encoder import EncoderGeometry, EncoderState


class StatePool:
    """Encoder (left-context keys/values, memory, frames processed) and predictor (output after
    the last token, LSTM state) state of up to ``capacity`` streams, grown on demand.

    ``key``/``value``: ``[layers, left_context, capacity, D]``; ``memory``: ``[layers, max_memory,
    capacity, D]``; ``past``: Emformer frames processed per slot (host ints); ``pred``:
    ``[capacity, 1, D']``; ``pred_state``: per LSTM layer ``[h, c]``, each ``[capacity, H]``.
    """

    def __init__(self, geo: EncoderGeometry, device: torch.device | str, dtype: torch.dtype,
                 capacity: int = 8) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.geo = geo
        self.device = torch.device(device)
        self.dtype = dtype
        self.capacity = 0
        kv = (geo.layers, geo.left_context_reduced, 0, geo.width)
        self.key = torch.zeros(kv, device=self.device, dtype=dtype)
        self.value = torch.zeros(kv, device=self.device, dtype=dtype)
        self.memory = torch.zeros(geo.layers, geo.max_memory, 0, geo.width, device=self.device, dtype=dtype)
        self.past: list[int] = []
        self.pred: torch.Tensor | None = None  # shapes come from the first stream's predictor
        self.pred_state: PredictorState | None = None
        self._free: list[int] = []
        self._grow(capacity)

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)

    def _grow(self, capacity: int) -> None:
        old = self.capacity

        def widen(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = capacity
            new = t.new_zeros(shape)
            new.narrow(dim, 0, old).copy_(t)
            return new

        self.key, self.value, self.memory = (widen(t, 2) for t in (self.key, self.value, self.memory))
        if self.pred is not None and self.pred_state is not None:
            self.pred = widen(self.pred, 0)
            self.pred_state = [[widen(x, 0) for x in layer] for layer in self.pred_state]
        self.past.extend([0] * (capacity - old))
        # Lowest free slot first (pop() from the end), so slot numbers stay small and reproducible.
        self._free = sorted(self._free + list(range(old, capacity)), reverse=True)
        self.capacity = capacity

    def acquire(self, pred: torch.Tensor, state: PredictorState) -> int:
        """A free slot holding the initial encoder state (nothing processed) and the predictor
        output ``pred [1, 1, D']`` and LSTM ``state`` (``[1, H]`` tensors) of a new stream."""
        if not self._free:
            self._grow(2 * self.capacity)
        if self.pred is None or self.pred_state is None:
            self.pred = pred.new_zeros(self.capacity, *pred.shape[1:])
            self.pred_state = [[x.new_zeros(self.capacity, *x.shape[1:]) for x in layer] for layer in state]
        slot = self._free.pop()
        for t in (self.key, self.value, self.memory):
            t[:, :, slot].zero_()
        self.past[slot] = 0
        self.pred[slot] = pred[0]
        for layer, src in zip(self.pred_state, state, strict=True):
            for x, sx in zip(layer, src, strict=True):
                x[slot] = sx[0]
        return slot

    def release(self, slot: int) -> None:
        """Give a slot back (its contents are reset by the next :meth:`acquire`)."""
        if not 0 <= slot < self.capacity or slot in self._free:
            raise ValueError(f"slot {slot} is not in use")
        self._free.append(slot)
        self._free.sort(reverse=True)

    def encoder_rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stacked ``key``, ``value`` ``[layers, lc, B, D]`` and ``memory`` of slots ``idx [B]``."""
        return self.key.index_select(2, idx), self.value.index_select(2, idx), self.memory.index_select(2, idx)

    def store_encoder(self, slots: list[int], idx: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      memory: torch.Tensor) -> None:
        """Write a step's new stacked encoder states back; each slot advanced by one segment."""
        self.key.index_copy_(2, idx, key)
        self.value.index_copy_(2, idx, value)
        self.memory.index_copy_(2, idx, memory)
        for s in slots:
            self.past[s] += self.geo.segment_reduced

    def predictor_rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, PredictorState]:
        """Batched predictor output ``[B, 1, D']`` and LSTM state of slots ``idx [B]``."""
        assert self.pred is not None and self.pred_state is not None
        return self.pred.index_select(0, idx), [[x.index_select(0, idx) for x in layer] for layer in self.pred_state]

    def store_predictor(self, idx: torch.Tensor, pred: torch.Tensor, state: PredictorState) -> None:
        assert self.pred is not None and self.pred_state is not None
        self.pred.index_copy_(0, idx, pred)
        for layer, new in zip(self.pred_state, state, strict=True):
            for x, nx in zip(layer, new, strict=True):
                x.index_copy_(0, idx, nx)

    def encoder_state(self, slot: int) -> EncoderState:
        """A copy of one slot's encoder state (for inspection)."""
        return EncoderState(key=self.key[:, :, slot].clone(), value=self.value[:, :, slot].clone(),
                            memory=self.memory[:, :, slot].clone(), past=self.past[slot])
