"""Fixed-size (bucketed) encoder steps and their CUDA-graph replay equal the eager step.

The bucket logic (padding a step to 1, 2, 4, ... streams with idle rows, copying states in and
out) runs eagerly on CPU with ``mode="static"``; the CUDA tests replay the same buckets as
captured graphs and compare them with the eager step on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from sparse_rnnt.streaming import StreamingDecoder, encoder_step, geometry, initial_state
from sparse_rnnt.streaming.graphs import StaticEncoderStep
from tests.streaming.test_stream import _chunks, random_sizes, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _streams_at_positions(model, device="cpu"):
    """Three streams advanced alone to chunk 0, 3 and 5 (the third's next segment is short)."""
    geo = geometry(model.rnnt)
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(n, 80, generator=g) for n in (40, 96, 88)]
    chunk_lists = [list(_chunks(model, f)) for f in feats]
    states = []
    with torch.inference_mode():
        for chunks, k in zip(chunk_lists, (0, 3, 5), strict=True):
            st = [initial_state(geo, device)]
            for chunk, valid in chunks[:k]:
                _, st = encoder_step(model.rnnt, chunk.to(device), torch.tensor([valid], device=device), st)
            states.append(st[0])
    nxt = [chunks[k] for chunks, k in zip(chunk_lists, (0, 3, 5), strict=True)]
    batch = torch.cat([c for c, _ in nxt]).to(device)
    valid = torch.tensor([v for _, v in nxt], device=device)
    return batch, valid, states


def _assert_steps_equal(a, b, valid, stride, atol):
    (out_a, st_a), (out_b, st_b) = a, b
    for row, v in enumerate(valid.tolist()):
        n = v // stride
        torch.testing.assert_close(out_a[row, :n], out_b[row, :n], rtol=0, atol=atol)
        for name in ("key", "value", "memory"):
            torch.testing.assert_close(getattr(st_a[row], name), getattr(st_b[row], name), rtol=0, atol=atol)
        assert st_a[row].past == st_b[row].past


@pytest.mark.parametrize("max_batch", [3, 4, 64])
def test_static_buckets_equal_the_eager_step(max_batch: int) -> None:
    model = tiny_model(6, 2)
    geo = geometry(model.rnnt)
    batch, valid, states = _streams_at_positions(model)
    static = StaticEncoderStep(model.rnnt, "cpu", torch.float32, max_batch=max_batch)
    assert static.sizes[-1] >= max_batch and static.bucket_size(3) == 4
    with torch.inference_mode():
        eager = encoder_step(model.rnnt, batch, valid, states)
        for _ in range(2):  # the second call reuses the bucket's buffers
            _assert_steps_equal(static(batch, valid, states), eager, valid, geo.stride, atol=1e-5)
        # One stream in the 1-row bucket: its state must not alias the bucket's buffers.
        one = static(batch[1:2], valid[1:2], states[1:2])
        _assert_steps_equal(one, encoder_step(model.rnnt, batch[1:2], valid[1:2], states[1:2]),
                            valid[1:2], geo.stride, atol=1e-5)
        kept = one[1][0].key.clone()
        static(batch[:1], valid[:1], states[:1])
        assert torch.equal(one[1][0].key, kept)
    assert sorted(static.buckets) == [1, 4]


def test_static_step_errors() -> None:
    model = tiny_model(6, 2)
    batch, valid, states = _streams_at_positions(model)
    with pytest.raises(ValueError, match="mode"):
        StaticEncoderStep(model.rnnt, "cpu", torch.float32, mode="graph")
    with pytest.raises(ValueError, match="CUDA"):
        StaticEncoderStep(model.rnnt, "cpu", torch.float32, mode="cuda-graph")
    with pytest.raises(ValueError, match="max_batch"):
        StaticEncoderStep(model.rnnt, "cpu", torch.float32, max_batch=0)
    static = StaticEncoderStep(model.rnnt, "cpu", torch.float32, max_batch=2)
    with pytest.raises(ValueError, match="more than max_batch"):
        static(batch, valid, states)
    with pytest.raises(ValueError, match="states"):
        static(batch, valid, states[:2])


def test_static_decoder_equals_eager_decoder_with_split_steps() -> None:
    from sparse_rnnt.data.features import GlobalCMVN, LogMel
    from tests.streaming.test_stream import LENGTHS, synth

    model = tiny_model()
    waves = [synth(n, seed=i) for i, n in enumerate(LENGTHS)]
    cmvn = GlobalCMVN.fit([LogMel()(w) for w in waves])
    eager = StreamingDecoder(model, cmvn).run_concurrent(waves, piece_samples=2560, start_ticks=[0, 0, 1, 1, 2])
    dec = StreamingDecoder(model, cmvn, step_mode="static", max_batch=2)
    static = dec.run_concurrent(waves, piece_samples=2560, start_ticks=[0, 0, 1, 1, 2])
    assert [r.tokens for r in static] == [r.tokens for r in eager]
    assert max(t.batch_size for t in dec.step_timings) == 2  # steps of more streams were split
    assert StreamingDecoder(model, cmvn, step_mode="static").transcribe(waves[1], random_sizes(5)).tokens == \
        eager[1].tokens
    with pytest.raises(ValueError, match="step_mode"):
        StreamingDecoder(model, cmvn, step_mode="graphs")
    with pytest.raises(ValueError, match="single-pathway"):
        StreamingDecoder(model, cmvn, step_mode="cuda-graph", mask_context=lambda lang: None)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_step_equals_eager_step(dtype) -> None:
    cpu_model = tiny_model(6, 2)
    geo = geometry(cpu_model.rnnt)
    batch, valid, states = _streams_at_positions(cpu_model)
    model = cpu_model.to("cuda", dtype)
    batch, valid = batch.to("cuda", dtype), valid.cuda()
    states = [type(s)(s.key.to("cuda", dtype), s.value.to("cuda", dtype), s.memory.to("cuda", dtype), s.past)
              for s in states]
    graphed = StaticEncoderStep(model.rnnt, "cuda", dtype, mode="cuda-graph")
    static = StaticEncoderStep(model.rnnt, "cuda", dtype, mode="static")
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        for _ in range(3):  # capture, then replays with new states each time
            got = graphed(batch, valid, states)
            _assert_steps_equal(got, static(batch, valid, states), valid, geo.stride, atol=atol)
            states = got[1]  # would be overwritten by the next replay if they aliased its outputs
    assert graphed.buckets[4].graph is not None and not graphed.buckets[4].failed
