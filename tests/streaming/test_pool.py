"""The state pool: slots acquired, grown, released and reused; a step's rows gathered and stored
in place; a decoder's per-step work no longer grows by a copy per stream and state tensor."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_rnnt.streaming import StreamingDecoder, geometry
from sparse_rnnt.streaming.pool import StatePool
from tests.streaming.test_stream import random_sizes, synth, tiny_model


def _pool(capacity: int = 2) -> tuple[StatePool, torch.Tensor, list[list[torch.Tensor]]]:
    model = tiny_model(6, 2)
    pool = StatePool(geometry(model.rnnt), "cpu", torch.float32, capacity=capacity)
    start = torch.full((1, 1), model.blank, dtype=torch.int32)
    with torch.inference_mode():
        pred, _, state = model.rnnt.predict(start, torch.ones(1, dtype=torch.int32), None)
    return pool, pred, state


def _idx(slots: list[int]) -> torch.Tensor:
    return torch.tensor(slots, dtype=torch.int64)


def test_slots_grow_keep_their_contents_and_are_reused() -> None:
    pool, pred, state = _pool(capacity=2)
    a, b = pool.acquire(pred, state), pool.acquire(pred, state)
    assert (a, b) == (0, 1) and pool.capacity == 2
    idx = _idx([a, b])
    key, value, memory = (torch.randn_like(t) for t in pool.encoder_rows(idx))
    pool.store_encoder([a, b], idx, key, value, memory)
    c = pool.acquire(pred, state)  # full: the pool doubles, rows 0 and 1 move along
    assert c == 2 and pool.capacity == 4 and pool.in_use == 3
    got = pool.encoder_rows(idx)
    for new, old in zip(got, (key, value, memory), strict=True):
        assert torch.equal(new, old)
    assert pool.past[:3] == [geometry(tiny_model(6, 2).rnnt).segment_reduced] * 2 + [0]
    assert torch.equal(pool.encoder_state(c).key, torch.zeros_like(key[:, :, 0]))
    # A released slot comes back reset: nothing processed, the initial predictor state.
    pool.release(a)
    pred_rows, state_rows = pool.predictor_rows(_idx([b]))
    pool.store_predictor(_idx([b]), pred_rows + 1, [[x + 1 for x in layer] for layer in state_rows])
    assert pool.acquire(pred, state) == a  # lowest free slot first
    assert pool.past[a] == 0 and pool.encoder_state(a).memory.abs().sum() == 0
    again, again_state = pool.predictor_rows(_idx([a, b]))
    torch.testing.assert_close(again[0], pred[0], rtol=0, atol=0)
    torch.testing.assert_close(again[1], pred_rows[0] + 1, rtol=0, atol=0)
    torch.testing.assert_close(again_state[0][0][0], state[0][0][0], rtol=0, atol=0)


def test_pool_errors() -> None:
    pool, pred, state = _pool()
    with pytest.raises(ValueError, match="capacity"):
        StatePool(pool.geo, "cpu", torch.float32, capacity=0)
    slot = pool.acquire(pred, state)
    pool.release(slot)
    with pytest.raises(ValueError, match="not in use"):
        pool.release(slot)
    with pytest.raises(ValueError, match="not in use"):
        pool.release(99)


def test_many_streams_joining_and_leaving_through_growth_equal_each_alone() -> None:
    # 11 streams on a pool of 8 slots that must grow while streams are live, with slots freed by
    # finished streams reused by later ones; each stream's tokens equal it decoded alone.
    model = tiny_model()
    waves = [synth(4000 + 1700 * (i % 5), seed=i) for i in range(11)]
    starts = [0, 0, 0, 1, 1, 2, 2, 2, 3, 9, 10]
    dec = StreamingDecoder(model, None)
    together = dec.run_concurrent(waves, piece_samples=1280, start_ticks=starts)
    assert dec.pool.capacity == 16 and dec.pool.in_use == 0
    for wave, got in zip(waves, together, strict=True):
        alone = StreamingDecoder(model, None).transcribe(wave, random_sizes(1))
        assert got.tokens == alone.tokens


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(streams: int, mode: str) -> int:
    dec = StreamingDecoder(tiny_model(), None, step_mode=mode)
    group = [dec.open() for _ in range(streams)]
    for i, s in enumerate(group):
        dec.accept(s, synth(16000, seed=i))
    dec.step(group)
    ops = _CountOps()
    with ops:
        dec.step(group)
    return ops.count


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_step_work_does_not_grow_by_a_copy_per_stream_and_state(mode: str) -> None:
    # Per extra stream only the host-side chunk assembly remains (4 ops: a zero chunk, a copy,
    # two slices of the feature buffer); per-stream states cost 13 ops per stream before.
    per_stream = (_ops_per_step(16, mode) - _ops_per_step(2, mode)) / 14
    assert per_stream <= 4.5


def test_streams_give_their_slots_back_on_every_exit() -> None:
    import contextlib

    @contextlib.contextmanager
    def pathway(language):
        if language == "xx":
            raise ValueError("no pathway for language 'xx'")
        yield

    dec = StreamingDecoder(tiny_model(), None, mask_context=pathway)
    with pytest.raises(ValueError, match="no pathway"):
        dec.open(language="xx")
    assert dec.pool.in_use == 0
    closed, finished, short = dec.open("en"), dec.open("en"), dec.open("en")
    assert dec.pool.in_use == 3
    dec.close(closed)
    dec.accept(finished, synth(8000, seed=1))
    dec.finalize(finished)
    dec.end(short)  # no audio at all: no frame, an empty hypothesis, and the slot back
    assert dec.pool.in_use == 1
    assert dec.finalize(short).tokens == []
    assert dec.pool.in_use == 0 and not dec.streams
