"""Fixed-size (bucketed) encoder steps and their CUDA-graph replay equal the eager step.

The bucket logic (padding a step to 1, 2, 4, ... streams with idle rows, copying states in and
out) runs eagerly on CPU with ``mode="static"``; the CUDA tests replay the same buckets as
captured graphs and compare them with the eager step on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sparse_rnnt.model.decoding import greedy_frames, greedy_frames_on_device, token_lists
from sparse_rnnt.streaming import StreamingDecoder, encoder_step, geometry, initial_state
from sparse_rnnt.streaming.graphs import (
    StaticEncoderStep,
    StaticGreedyDecoder,
    _Bucket,
    _GreedyBucket,
)
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


@pytest.mark.parametrize("batch", [1, 3])
def test_unstacked_states_do_not_alias_the_stacked_buffers(batch: int) -> None:
    from sparse_rnnt.streaming.encoder import unstack_states

    keys, vals, mems = (torch.randn(2, 5, batch, 4) for _ in range(3))
    states = unstack_states(keys, vals, mems, [7] * batch, segment_reduced=4)
    expected = [s.key.clone() for s in states]
    for t in (keys, vals, mems):
        t.zero_()  # the next replay of a graph overwrites its output buffers like this
    for s, e in zip(states, expected, strict=True):
        assert torch.equal(s.key, e) and s.value.abs().sum() > 0 and s.memory.abs().sum() > 0
        assert s.past == 11 and s.key.is_contiguous()


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


def test_one_bucket_makes_bf16_streams_equal_to_decoding_alone() -> None:
    # bf16 matmuls round a row differently at different batch sizes, which can flip a greedy
    # choice between near-equal logits (here, with min_batch=1, one of the five streams differs
    # from its decoding alone). With min_batch = max_batch every step runs at one batch size.
    from sparse_rnnt.data.features import GlobalCMVN, LogMel
    from tests.streaming.test_stream import LENGTHS, synth

    model = tiny_model().to(torch.bfloat16)
    waves = [synth(n, seed=i) for i, n in enumerate(LENGTHS)]
    cmvn = GlobalCMVN.fit([LogMel()(w) for w in waves])
    dec = StreamingDecoder(model, cmvn, step_mode="static", max_batch=8, min_batch=8)
    together = dec.run_concurrent(waves, piece_samples=2560, start_ticks=[0, 0, 1, 1, 2])
    assert dec._static is not None and sorted(dec._static.buckets) == [8]
    assert dec._static_greedy is not None and {size for size, _ in dec._static_greedy.buckets} == {8}
    for wave, got in zip(waves, together, strict=True):
        alone = StreamingDecoder(model, cmvn, step_mode="static", max_batch=8, min_batch=8)
        assert alone.transcribe(wave, random_sizes(3)).tokens == got.tokens
    assert sum(len(r.tokens) for r in together) > 0
    # a min_batch that is not a power of two rounds up; bad values are refused
    assert StaticEncoderStep(model.rnnt, "cpu", torch.bfloat16, max_batch=64, min_batch=5).sizes == [8, 16, 32, 64]
    for bad in (0, 9):
        with pytest.raises(ValueError, match="min_batch"):
            StreamingDecoder(model, cmvn, step_mode="static", max_batch=8, min_batch=bad)
    with pytest.raises(ValueError, match="min_batch"):
        StreamingDecoder(model, cmvn, min_batch=2)  # eager steps are not padded


def _greedy_inputs(model, batch=3, frames=(4, 1, 3), device="cpu"):
    """Encoder frames of ``batch`` rows (random, so the joiner emits) and each row's predictor
    state after a few different tokens."""
    g = torch.Generator().manual_seed(3)
    enc = 2 * torch.randn(batch, 4, model.rnnt.joiner.linear.in_features, generator=g)
    tokens = torch.randint(0, model.blank, (batch, 3), generator=g, dtype=torch.int32)
    with torch.inference_mode():
        pred, _, state = model.rnnt.predict(tokens, torch.full((batch,), 3, dtype=torch.int32), None)
    return enc.to(device), torch.tensor(frames, device=device), pred[:, -1:].to(device), \
        [[x.to(device) for x in layer] for layer in state]


def test_static_greedy_equals_greedy_frames() -> None:
    model = tiny_model()
    enc, frames, pred, state = _greedy_inputs(model)
    dec = StaticGreedyDecoder(model, "cpu", max_batch=8, max_symbols_per_frame=3)
    with torch.inference_mode():
        want = greedy_frames(model, enc, frames, pred, state, 3)
        for _ in range(2):  # the bucket's buffers are reused
            got = dec.decode(enc, frames, pred, state)
            assert got[0] == want[0] and sum(map(len, want[0])) > 0
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)
            for layer, want_layer in zip(got[2], want[2], strict=True):
                for x, y in zip(layer, want_layer, strict=True):
                    torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
        assert list(dec.buckets) == [(4, 4)]
        with pytest.raises(ValueError, match="more than max_batch"):
            StaticGreedyDecoder(model, "cpu", max_batch=2).decode(enc, frames, pred, state)
    with pytest.raises(ValueError, match="CUDA"):
        StaticGreedyDecoder(model, "cpu", mode="cuda-graph")


def _greedy_case(seed: int):
    """A tiny model, 5 rows of 6 encoder frames (loud frames emit, quiet ones often do not), real
    frames per row (one row has none) and each row's predictor state after two tokens."""
    model = tiny_model(seed=seed)
    g = torch.Generator().manual_seed(seed)
    loudness = torch.tensor([3, 3, 0.3, 3, 0.0, 3.0])[None, :, None]
    enc = loudness * torch.randn(5, 6, model.rnnt.joiner.linear.in_features, generator=g)
    tokens_in = torch.randint(0, model.blank, (5, 2), generator=g, dtype=torch.int32)
    with torch.inference_mode():
        pred, _, state = model.rnnt.predict(tokens_in, torch.full((5,), 2, dtype=torch.int32), None)
    return model, enc, torch.tensor([6, 0, 3, 1, 5]), pred[:, -1:], state


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_symbols", [1, 2, 4])
def test_greedy_on_device_equals_the_host_loop(seed: int, max_symbols: int) -> None:
    # The fixed-work loop (every frame runs max_symbols steps, stopped rows masked) against the
    # host loop that stops when no row emits: same tokens, same predictor state, bit for bit.
    model, enc, frames, pred, state = _greedy_case(seed)
    with torch.inference_mode():
        want, want_pred, want_state = greedy_frames(model, enc, frames, pred, state, max_symbols)
        tokens, got_pred, got_state = greedy_frames_on_device(model, enc, frames, pred, state, max_symbols)
    assert tokens.shape == (5, 6, max_symbols)
    assert token_lists(tokens) == want and want[1] == []
    assert (tokens[frames[:, None] <= torch.arange(6)] == -1).all()  # nothing past a row's frames
    torch.testing.assert_close(got_pred, want_pred, rtol=0, atol=0)
    for layer, want_layer in zip(got_state, want_state, strict=True):
        for x, y in zip(layer, want_layer, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_greedy_on_device_cases_are_exercised() -> None:
    # Across the seeds above, the comparison sees rows that hit the symbol limit and frames where
    # no row emits (the host loop's early exit).
    at_limit = silent_frame = False
    for seed in range(4):
        model, enc, frames, pred, state = _greedy_case(seed)
        with torch.inference_mode():
            tokens, _, _ = greedy_frames_on_device(model, enc, frames, pred, state, 2)
        emitted = tokens >= 0
        at_limit |= bool(emitted.all(-1).any())
        silent_frame |= bool((~emitted[:, :, 0]).all(0).any())
    assert at_limit and silent_frame


@pytest.mark.gpu
@cuda
def test_cuda_graph_greedy_equals_greedy_frames() -> None:
    cpu_model = tiny_model()
    enc, frames, pred, state = _greedy_inputs(cpu_model)
    model = cpu_model.cuda()
    enc, frames, pred = enc.cuda(), frames.cuda(), pred.cuda()
    state = [[x.cuda() for x in layer] for layer in state]
    dec = StaticGreedyDecoder(model, "cuda", mode="cuda-graph", max_symbols_per_frame=3)
    with torch.inference_mode():
        want = greedy_frames(model, enc, frames, pred, state, 3)
        for _ in range(3):  # capture, then replays
            got = dec.decode(enc, frames, pred, state)
            assert got[0] == want[0]
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)
    bucket = dec.buckets[4, 4]
    assert not bucket.failed and bucket.graph is not None


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


_HOST_READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique2",
               "aten.item", "aten.is_nonzero", "aten.equal"}


class _CaptureRules(TorchDispatchMode):
    """Records ops a CUDA graph cannot capture: reading a device value on the host (``item``,
    ``bool(t)``, data-dependent shapes) and tensors with data on the host (a host-to-device copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.broken: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        host = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.device.type == "cpu"
                and t.dim() > 0]
        if name in _HOST_READS or host:
            self.broken.append(f"{func} ({len(host)} host tensors)")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_regions_never_read_the_device_from_the_host(dtype) -> None:
    # The CPU counterpart of the CUDA capture tests: on the meta device there are no values to
    # read, so a host sync raises, and the dispatch mode catches the ones that would only stall.
    model = tiny_model(6, 2).to("meta", dtype)
    meta = torch.device("meta")
    bucket = _Bucket(model.rnnt, 4, meta, dtype)
    rules = _CaptureRules()
    with torch.inference_mode(), rules:
        out, keys, vals, mems = bucket.run()
    assert mems.shape == bucket.memory.shape and vals.shape == bucket.value.shape
    assert rules.broken == [] and out.shape[0] == 4 and keys.shape == bucket.key.shape

    cpu_model = tiny_model()
    enc, _, pred, state = _greedy_inputs(cpu_model)
    greedy = _GreedyBucket(cpu_model.to("meta", dtype), 4, enc.to(meta, dtype), pred.to(meta, dtype),
                           [[x.to(meta, dtype) for x in layer] for layer in state], max_symbols_per_frame=3)
    rules = _CaptureRules()
    with torch.inference_mode(), rules:
        tokens, _, _ = greedy.run()
    assert rules.broken == [] and tokens.shape == (4, enc.size(1), 3)
    # The rules do catch what breaks a capture: a host-to-device copy, a host read.
    with torch.inference_mode(), rules:
        torch.ones(3).to(meta)
        with pytest.raises(RuntimeError, match="meta"):
            tokens.sum().item()
    assert len(rules.broken) == 2 and "1 host tensors" in rules.broken[0]
    assert rules.broken[1].startswith("aten.item")


@pytest.mark.gpu
@cuda
def test_cuda_graph_decoder_equals_eager_decoder() -> None:
    # End to end on the GPU: state pool, bucket outputs read as views before the next replay,
    # whole-chunk greedy graphs; streams joining and leaving, steps split by max_batch (fp32, so
    # batched and single-row matmuls agree closely enough for identical tokens).
    from sparse_rnnt.data.features import GlobalCMVN, LogMel
    from tests.streaming.test_stream import LENGTHS, synth

    model = tiny_model().cuda()
    waves = [synth(n, seed=i) for i, n in enumerate(LENGTHS)]
    cmvn = GlobalCMVN.fit([LogMel()(w) for w in waves])
    starts = [0, 0, 1, 1, 2]
    eager = StreamingDecoder(model, cmvn).run_concurrent(waves, piece_samples=2560, start_ticks=starts)
    graphed = StreamingDecoder(model, cmvn, step_mode="cuda-graph", max_batch=2)
    got = graphed.run_concurrent(waves, piece_samples=2560, start_ticks=starts)
    assert [r.tokens for r in got] == [r.tokens for r in eager] and sum(len(r.tokens) for r in got) > 0
    assert graphed._static is not None and graphed._static_greedy is not None
    assert all(b.graph is not None and not b.failed for b in graphed._static.buckets.values())
    assert all(b.graph is not None and not b.failed for b in graphed._static_greedy.buckets.values())


@pytest.mark.gpu
@cuda
def test_cuda_graph_one_bucket_bf16_equals_decoding_alone() -> None:
    # The GPU side of test_one_bucket_makes_bf16_streams_equal_to_decoding_alone: cuBLAS picks
    # kernels by shape, so one bucket size should give every stream its tokens decoded alone.
    from sparse_rnnt.data.features import GlobalCMVN, LogMel
    from tests.streaming.test_stream import LENGTHS, synth

    model = tiny_model().cuda().to(torch.bfloat16)
    waves = [synth(n, seed=i) for i, n in enumerate(LENGTHS)]
    cmvn = GlobalCMVN.fit([LogMel()(w) for w in waves])
    dec = StreamingDecoder(model, cmvn, step_mode="cuda-graph", max_batch=8, min_batch=8)
    together = dec.run_concurrent(waves, piece_samples=2560, start_ticks=[0, 0, 1, 1, 2])
    for wave, got in zip(waves, together, strict=True):
        alone = StreamingDecoder(model, cmvn, step_mode="cuda-graph", max_batch=8, min_batch=8)
        assert alone.transcribe(wave, random_sizes(3)).tokens == got.tokens
    assert sum(len(r.tokens) for r in together) > 0
