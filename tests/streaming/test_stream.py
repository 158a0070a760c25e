"""Streaming recognition equals full-utterance recognition (tiny random Emformer RNN-T, CPU)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from sparse_rnnt.data.features import GlobalCMVN, LogMel
from sparse_rnnt.model import EmformerRNNT, build_model, model_config
from sparse_rnnt.model.decoding import greedy_search
from sparse_rnnt.streaming import (
    PartialResult,
    StreamingDecoder,
    StreamingLogMel,
    encoder_step,
    geometry,
    initial_state,
    iter_pieces,
    percentile,
)

SR = 16000


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny ops: thread hand-off costs more than it saves on a loaded 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(left_context: int = 6, memory: int = 0, seed: int = 0, **overrides: object) -> EmformerRNNT:
    """2-layer random model; left context of 6 Emformer frames (< 2 chunks) so the
    left-context window fills and slides within a short utterance. ``overrides``: more
    :func:`model_config` fields (e.g. ``right_context_length``)."""
    torch.manual_seed(seed)
    cfg = model_config(
        "tiny", encoding_dim=64, time_reduction_input_dim=16, transformer_ffn_dim=64,
        transformer_num_layers=2, symbol_embedding_dim=32, transformer_left_context_length=left_context,
        transformer_max_memory_size=memory, **overrides,  # type: ignore[arg-type]
    )
    model = build_model(cfg, 12, verbose=False).eval()
    with torch.no_grad():  # random joiner emits on every frame; make blank win about half the time
        model.rnnt.joiner.linear.bias[model.blank] += 1.0
    return model


def synth(num_samples: int, seed: int) -> torch.Tensor:
    """Noise plus two sines, ``[num_samples]``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples) / SR
    f1, f2 = 200 + 600 * torch.rand(2, generator=g)
    return 0.3 * torch.sin(2 * math.pi * f1 * t) + 0.2 * torch.sin(2 * math.pi * f2 * t) + 0.05 * torch.randn(
        num_samples, generator=g
    )


# Lengths (samples) covering: a whole number of chunks, a partial last segment, a frame count
# that is not a multiple of the time-reduction stride, and a very short utterance.
LENGTHS = (16000, 23457, 41000, 9001, 30720)


@pytest.fixture(scope="module")
def setup() -> tuple[EmformerRNNT, GlobalCMVN, list[torch.Tensor]]:
    waves = [synth(n, seed=i) for i, n in enumerate(LENGTHS)]
    cmvn = GlobalCMVN.fit([LogMel()(w) for w in waves])
    return tiny_model(), cmvn, waves


def full_greedy(model: EmformerRNNT, cmvn: GlobalCMVN, wave: torch.Tensor) -> list[int]:
    """The reference: full-utterance front end + CMVN + batched greedy_search."""
    x = cmvn.normalize(LogMel()(wave))
    return greedy_search(model, x[None], torch.tensor([x.size(0)]))[0]


def full_beam(model: EmformerRNNT, cmvn: GlobalCMVN, wave: torch.Tensor, beam_width: int) -> list[int]:
    """The beam reference: full-utterance front end + CMVN + beam_search."""
    from sparse_rnnt.model.decoding import beam_search

    x = cmvn.normalize(LogMel()(wave))
    return beam_search(model, x[None], torch.tensor([x.size(0)]), beam_width=beam_width)[0]


def random_sizes(seed: int, count: int = 64, high: int = 4000) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, high, (count,), generator=g).tolist()


# --- front end -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples", [257, 400, 16000, 16159, 16160, 16161, 23457])
def test_streaming_logmel_equals_full_frontend(num_samples: int) -> None:
    logmel = LogMel()
    wave = synth(num_samples, seed=num_samples)
    ref = logmel(wave)
    assert ref.shape[0] == 1 + num_samples // 160
    for seed in range(3):
        fe = StreamingLogMel(logmel)
        parts = [fe.accept(p) for p in iter_pieces(wave, random_sizes(seed, high=700))]
        parts.append(fe.flush())
        got = torch.cat(parts)
        assert got.shape == ref.shape
        # Same window/FFT/filterbank; only batched-kernel rounding may differ (~1 ulp of log-mel).
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_streaming_logmel_emits_frames_as_soon_as_final() -> None:
    fe = StreamingLogMel(LogMel())
    assert fe.accept(torch.zeros(256)).shape[0] == 0  # reflect pad needs 257 samples
    # Frame t needs samples up to t*160 + 256: 1000 samples -> frames 0..4 (4*160+256 = 896).
    assert fe.accept(torch.zeros(744)).shape[0] == 5
    assert fe.flush().shape[0] == 1 + 1000 // 160 - 5


@pytest.mark.parametrize("num_samples", [0, 1, 100, 256])
def test_streaming_logmel_too_short_has_no_frames(num_samples: int) -> None:
    # The full front end cannot reflect-pad fewer than n_fft // 2 + 1 = 257 samples...
    if num_samples:
        with pytest.raises(ValueError, match="shorter than the 257 samples"):
            LogMel()(torch.zeros(num_samples))
    # ...so the stream has no frame at all, and ending it is not an error.
    fe = StreamingLogMel(LogMel())
    assert fe.accept(synth(num_samples, seed=1)).shape == (0, 80)
    assert fe.flush().shape == (0, 80)
    assert fe.flush().shape == (0, 80)  # idempotent
    with pytest.raises(RuntimeError, match="after flush"):
        fe.accept(torch.zeros(10))


# --- encoder ---------------------------------------------------------------------------------


def _chunks(model: EmformerRNNT, feats: torch.Tensor) -> Iterator[tuple[torch.Tensor, int]]:
    """``feats [T, F]`` -> the streaming chunks ``[1, chunk, F]`` and real segment frames."""
    geo = geometry(model.rnnt)
    frames = feats.size(0) - feats.size(0) % geo.stride
    padded = torch.cat([feats[:frames], torch.zeros(geo.chunk, feats.size(1))])
    for start in range(0, frames, geo.segment):
        chunk = padded[start : start + geo.chunk].clone()
        valid = min(geo.segment, frames - start)
        chunk[valid : geo.segment] = 0
        yield chunk[None], valid


@pytest.mark.parametrize(("left_context", "memory"), [(6, 0), (6, 2), (0, 0), (30, 0)])
@pytest.mark.parametrize("frames", [64, 68, 83, 100, 36])
def test_encoder_chunks_equal_full_encode(left_context: int, memory: int, frames: int) -> None:
    model = tiny_model(left_context, memory, seed=frames)
    geo = geometry(model.rnnt)
    feats = torch.randn(frames, 80, generator=torch.Generator().manual_seed(frames))
    with torch.inference_mode():
        ref, ref_len = model.encode(feats[None], torch.tensor([frames]))
        states = [initial_state(geo)]
        outs = []
        for chunk, valid in _chunks(model, feats):
            out, states = encoder_step(model.rnnt, chunk, torch.tensor([valid]), states)
            outs.append(out[:, : valid // geo.stride])
    got = torch.cat(outs, dim=1)
    assert got.shape[1] == int(ref_len[0]) == (frames - frames % 4) // 4
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)


def test_encoder_full_chunks_equal_torchaudio_streaming() -> None:
    """Peer check: for whole segments, one stream alone, torchaudio's own transcribe_streaming."""
    model = tiny_model(6, 2)
    geo = geometry(model.rnnt)
    feats = torch.randn(96, 80, generator=torch.Generator().manual_seed(1))
    states = [initial_state(geo)]
    ta_state = None
    with torch.inference_mode():
        for chunk, valid in _chunks(model, feats):
            assert valid == geo.segment
            ours, states = encoder_step(model.rnnt, chunk, torch.tensor([valid]), states)
            theirs, _, ta_state = model.rnnt.transcribe_streaming(chunk, torch.tensor([geo.chunk]), ta_state)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_encoder_batch_of_streams_at_different_positions() -> None:
    """Rows at different chunk indices (and one short last segment) in one call equal each row alone."""
    model = tiny_model(6, 2)
    geo = geometry(model.rnnt)
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(n, 80, generator=g) for n in (40, 96, 88)]
    chunk_lists = [list(_chunks(model, f)) for f in feats]
    # Advance the streams alone to different positions: 0, 3 and 5 chunks done.
    done = [0, 3, 5]
    states = []
    with torch.inference_mode():
        for chunks, k in zip(chunk_lists, done, strict=True):
            st = [initial_state(geo)]
            for chunk, valid in chunks[:k]:
                _, st = encoder_step(model.rnnt, chunk, torch.tensor([valid]), st)
            states.append(st[0])
        nxt = [chunks[k] for chunks, k in zip(chunk_lists, done, strict=True)]
        assert nxt[0][1] == geo.segment and nxt[2][1] < geo.segment  # includes a short last segment
        batch = torch.cat([c for c, _ in nxt])
        valid = torch.tensor([v for _, v in nxt])
        out, new_states = encoder_step(model.rnnt, batch, valid, states)
        for b, (chunk, v) in enumerate(nxt):
            alone, alone_state = encoder_step(model.rnnt, chunk, torch.tensor([v]), [states[b]])
            n = v // geo.stride
            torch.testing.assert_close(out[b : b + 1, :n], alone[:, :n], rtol=0, atol=1e-5)
            torch.testing.assert_close(new_states[b].key, alone_state[0].key, rtol=0, atol=1e-5)
            assert new_states[b].past == alone_state[0].past == (done[b] + 1) * geo.segment_reduced


# --- decoding --------------------------------------------------------------------------------


def test_streaming_equals_full_utterance_greedy(setup) -> None:
    model, cmvn, waves = setup
    dec = StreamingDecoder(model, cmvn)
    geo = dec.geometry
    for i, wave in enumerate(waves):
        ref = full_greedy(model, cmvn, wave)
        frames = (1 + wave.numel() // 160) // geo.stride
        assert 0 < len(ref) < 4 * frames  # the reference emits tokens and blanks
        result = dec.transcribe(wave, random_sizes(i))
        assert result.tokens == ref
        assert result.num_chunks == math.ceil(frames * geo.stride / geo.segment)


def test_piece_sizes_do_not_change_results(setup) -> None:
    model, cmvn, waves = setup
    wave = waves[1]
    runs = []
    for sizes in ([wave.numel()], [1], [160], [2560], random_sizes(7), random_sizes(8, high=50)):
        partials: list[PartialResult] = []
        dec = StreamingDecoder(model, cmvn, on_partial=partials.append)
        s = dec.open()
        # [1] would be 23k pieces: feed single samples only for the first 2000.
        pieces = [*iter_pieces(wave[:2000], sizes), wave[2000:]] if sizes == [1] else iter_pieces(wave, sizes)
        for p in pieces:
            dec.feed(s, p)
        final = dec.finalize(s)
        runs.append((final.tokens, [p.tokens for p in partials]))
    assert all(r == runs[0] for r in runs[1:])


def test_partial_hypotheses_grow_per_chunk(setup) -> None:
    model, cmvn, waves = setup
    wave = waves[2]
    seen: list[PartialResult] = []
    dec = StreamingDecoder(model, cmvn, on_partial=seen.append)
    s = dec.open(language="en")
    returned = []
    for piece in iter_pieces(wave, [2560]):  # 160 ms pieces: about one chunk each
        returned.extend(dec.feed(s, piece))
    assert returned and returned == seen  # feed returns what the callback got
    final = dec.finalize(s)
    assert [p.chunk for p in seen] == list(range(final.num_chunks))
    assert [p.final for p in seen] == [False] * (final.num_chunks - 1) + [True]
    hyp: list[int] = []
    for p in seen:
        assert p.tokens == hyp + p.new_tokens and p.stream_id == s.id  # hypothesis so far
        hyp = p.tokens
    assert hyp == final.tokens == full_greedy(model, cmvn, wave)
    assert final.language == "en" and s.id not in dec.streams


def test_multi_stream_batches_equal_single_stream(setup) -> None:
    model, cmvn, waves = setup
    singles = [StreamingDecoder(model, cmvn).transcribe(w).tokens for w in waves]
    dec = StreamingDecoder(model, cmvn)
    # 160 ms per tick: every live stream has about one chunk per tick, at different positions.
    results = dec.run_concurrent(waves, piece_samples=2560, start_ticks=[0, 2, 3, 3, 7])
    assert [r.tokens for r in results] == singles
    assert [r.tokens for r in results] == [full_greedy(model, cmvn, w) for w in waves]
    sizes = [t.batch_size for t in dec.step_timings]
    assert max(sizes) >= 3  # streams really shared encoder calls
    # One encoder call per step: every chunk of every stream is in exactly one step.
    assert sum(sizes) == sum(r.num_chunks for r in results)
    assert not dec.streams


def test_streams_join_and_leave_between_steps(setup) -> None:
    model, cmvn, waves = setup
    dec = StreamingDecoder(model, cmvn)
    a, b = dec.open(), dec.open()
    pos = {a.id: 0, b.id: 0}
    wave = {a.id: waves[0], b.id: waves[3]}
    results = {}
    c = None
    for tick in range(200):
        if c is not None and not dec.streams:
            break
        for s in list(dec.streams.values()):
            w = wave[s.id]
            dec.accept(s, w[pos[s.id] : pos[s.id] + 1000])
            pos[s.id] += 1000
            if pos[s.id] >= w.numel():
                results[s.id] = dec.finalize(s)  # leaves; the others go on
        if tick == 4:  # joins late
            c = dec.open()
            pos[c.id], wave[c.id] = 0, waves[2]
        ready = [s.id for s in dec.streams.values() if dec.ready(s)]
        stepped = dec.step()
        assert sorted(p.stream_id for p in stepped) == sorted(ready)  # not-ready streams sit out
    assert c is not None and set(results) == {a.id, b.id, c.id}
    for sid, res in results.items():
        assert res.tokens == full_greedy(model, cmvn, wave[sid])


def test_mask_context_per_language(setup) -> None:
    """A pathway hook that zeroes half of one encoder weight for 'fr': each stream is decoded
    with its own language's weights, also when both share steps."""
    model, cmvn, waves = setup
    param = model.rnnt.transcriber.input_linear.weight
    keep = (torch.arange(param.numel()) % 2 == 0).view_as(param).to(param.dtype)
    entered: list[str | None] = []

    @contextlib.contextmanager
    def masked(language: str | None) -> Iterator[None]:
        entered.append(language)
        if language != "fr":
            yield
            return
        saved = param.detach().clone()
        with torch.no_grad():
            param.mul_(keep)
        try:
            yield
        finally:
            with torch.no_grad():
                param.copy_(saved)

    with masked("fr"):
        ref_fr = full_greedy(model, cmvn, waves[1])
    ref_en = full_greedy(model, cmvn, waves[0])
    assert ref_fr != ref_en
    dec = StreamingDecoder(model, cmvn, mask_context=masked)
    entered.clear()
    en, fr = dec.run_concurrent([waves[0], waves[1]], piece_samples=2560, languages=["en", "fr"])
    assert en.tokens == ref_en and fr.tokens == ref_fr
    assert {"en", "fr"} <= set(entered)
    assert all(t.language in ("en", "fr") and t.batch_size == 1 for t in dec.step_timings)
    # Without a hook there is a single group per step, languages kept as labels.
    plain = StreamingDecoder(model, cmvn)
    en2, fr2 = plain.run_concurrent([waves[0], waves[1]], piece_samples=2560, languages=["en", "fr"])
    assert fr2.language == "fr" and max(t.batch_size for t in plain.step_timings) == 2
    assert en2.tokens == ref_en and fr2.tokens == full_greedy(model, cmvn, waves[1])


# --- timing, text, errors --------------------------------------------------------------------


def test_timing_and_rtf(setup) -> None:
    model, cmvn, waves = setup
    dec = StreamingDecoder(model, cmvn)
    results = [dec.transcribe(w) for w in waves[:2]]
    for r, w in zip(results, waves[:2], strict=True):
        assert r.audio_s == pytest.approx(w.numel() / SR)
        assert len(r.chunk_latencies_s) == r.num_chunks and all(x > 0 for x in r.chunk_latencies_s)
        assert r.processing_s >= sum(r.chunk_latencies_s) > 0
        assert r.rtf == pytest.approx(r.processing_s / r.audio_s)
    timings = dec.step_timings
    assert len(timings) == sum(r.num_chunks for r in results)
    assert all(t.encoder_s > 0 and t.decoder_s > 0 and t.total_s == t.encoder_s + t.decoder_s for t in timings)
    stats = dec.latency_stats()
    totals = [t.total_s for t in timings]
    assert stats["p50_s"] == pytest.approx(float(np.percentile(totals, 50)))
    assert stats["p99_s"] == pytest.approx(float(np.percentile(totals, 99)))
    assert stats["audio_s"] == pytest.approx(sum(r.audio_s for r in results))
    assert stats["rtf"] == pytest.approx(stats["processing_s"] / stats["audio_s"])


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4, 0.05]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert math.isnan(percentile([], q))


def test_text_from_tokenizer(setup) -> None:
    model, cmvn, waves = setup

    class Letters:  # duck-typed tokenizer: id i -> letter i
        def decode(self, ids: list[int]) -> str:
            return "".join(chr(ord("a") + i) for i in ids)

    dec = StreamingDecoder(model, cmvn, tokenizer=Letters())  # type: ignore[arg-type]
    r = dec.transcribe(waves[3])
    assert r.text == "".join(chr(ord("a") + i) for i in full_greedy(model, cmvn, waves[3]))


def test_errors(setup) -> None:
    model, cmvn, _ = setup
    dec = StreamingDecoder(model, cmvn)
    s = dec.open(stream_id="x")
    with pytest.raises(ValueError, match="already open"):
        dec.open(stream_id="x")
    with pytest.raises(ValueError, match="non-finite"):
        dec.accept(s, torch.tensor([0.1, float("nan"), 0.2]))
    with pytest.raises(ValueError, match="non-finite"):
        dec.accept(s, torch.tensor([float("inf")]))
    with pytest.raises(ValueError, match="non-finite"):  # finite in float64, Inf as the float32 features use
        dec.accept(s, torch.tensor([0.5, 1e39], dtype=torch.float64))
    with pytest.raises(ValueError, match="samples: expected mono"):  # not interleaved into one channel
        dec.accept(s, torch.zeros(2, 10))
    assert s.frontend.num_samples == 0  # the rejected pieces were not buffered
    dec.close(s)
    t = dec.open()
    dec.accept(t, torch.zeros(1000))
    dec.end(t)
    with pytest.raises(ValueError, match="has ended"):
        dec.accept(t, torch.zeros(10))
    with pytest.raises(ValueError, match="no open stream"):
        dec.step(["nope"])


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Fail (TimeoutError) instead of hanging: a call that never returns is a test failure."""
    import signal

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_stream_listed_twice_is_refused_and_left_intact(setup) -> None:
    # Listed twice, a stream would take two chunks from one state in the same batch (the audit's
    # repro: 137 tokens against 99 for the full utterance). The error comes before any work.
    model, cmvn, waves = setup
    wave = waves[2]
    ref = full_greedy(model, cmvn, wave)
    dec = StreamingDecoder(model, cmvn)
    s, other = dec.open(), dec.open(stream_id="other")
    dec.accept(s, wave)
    dec.accept(other, waves[3])
    for listed in ([s, s], [s, other, s.id]):
        with pytest.raises(ValueError, match=f"step\\(\\): stream '{s.id}' is listed more than once"):
            dec.step(listed)
    assert s.chunks == 0 and s.start == 0  # nothing was taken from the stream
    with pytest.raises(ValueError, match="takes a list of streams"):
        dec.step(s.id)  # a str would iterate as characters
    while dec.ready(s):
        dec.step([s, other])
    with pytest.raises(ValueError, match=f"finish\\(\\): stream '{s.id}' is listed more than once"):
        dec.finish([s, s])
    assert s.id in dec.streams and not s.ended  # not ended, not closed
    got, got_other = dec.finish([s, other])
    assert len(ref) > 0 and got.tokens == ref
    assert got_other.tokens == full_greedy(model, cmvn, waves[3])


def test_bad_streaming_arguments_raise_instead_of_hanging(setup) -> None:
    model, cmvn, waves = setup
    dec = StreamingDecoder(model, cmvn)
    wave = waves[3]
    # Before the fix: 0 never returned (the stream never reached its end), -1 walked backwards
    # forever, 2.5 raised a TypeError from slicing.
    for bad in (2.5, 0, -1, True):
        with _deadline(20), pytest.raises(ValueError, match="piece_samples must be a positive integer"):
            dec.run_concurrent([wave], piece_samples=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"start_ticks\[1\] must be an integer >= 0"):
        dec.run_concurrent([wave, wave], start_ticks=[0, -2])
    stereo = torch.stack([wave, wave])
    with pytest.raises(ValueError, match=r"waves\[1\]: expected mono samples"):  # not flattened into one channel
        dec.run_concurrent([wave, stereo])
    with pytest.raises(ValueError, match="wave: expected mono samples"):
        dec.transcribe(stereo)
    with pytest.raises(ValueError, match="piece sizes must be a positive integer"):
        dec.transcribe(wave, piece_sizes=[1600, 0.5])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="stream_id must be a str"):
        dec.open(stream_id=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected a Stream or a stream id"):
        dec.step([3])  # type: ignore[list-item]
    assert not dec.streams  # nothing was left open by the refused calls
    # [1, T] is mono; the refused calls left the decoder usable.
    assert dec.run_concurrent([wave[None]], piece_samples=1000)[0].tokens == full_greedy(model, cmvn, wave)
    # Constructor counts: 0 would decode nothing without an error (greedy, beam), a negative
    # step_max_tokens never stops a beam step, max_batch 0 failed inside a step.
    for kwargs, name in (
        ({"max_symbols_per_frame": 0}, "max_symbols_per_frame"),
        ({"decoding": "beam", "step_max_tokens": 0}, "step_max_tokens"),
        ({"decoding": "beam", "step_max_tokens": -1}, "step_max_tokens"),
        ({"beam_width": 0}, "beam_width"),
        ({"max_batch": 0}, "max_batch"),
        ({"max_batch": 2.0}, "max_batch"),
        ({"step_mode": "static", "max_batch": 4, "min_batch": 8}, "min_batch"),
    ):
        with pytest.raises(ValueError, match=name):
            StreamingDecoder(model, cmvn, **kwargs)  # type: ignore[arg-type]


def _recording_pathway() -> tuple[Callable[[str | None], contextlib.AbstractContextManager[None]], list[str | None]]:
    """A ``mask_context`` hook that records the languages it is entered with, and that list."""
    entered: list[str | None] = []

    @contextlib.contextmanager
    def pathway(language: str | None) -> Iterator[None]:
        entered.append(language)
        yield

    return pathway, entered


def test_a_pathway_decoder_needs_a_language(setup) -> None:
    # With per-language weights, a stream without a language would run with whichever pathway
    # was set last; open() refuses it and names the languages.
    model, cmvn, waves = setup
    pathway, entered = _recording_pathway()
    with pytest.raises(ValueError, match=r"open\(\) needs a language$"):  # the hook alone: no list
        StreamingDecoder(model, cmvn, mask_context=pathway).open()
    dec = StreamingDecoder(model, cmvn, mask_context=pathway, languages=["en", "fr"])
    with pytest.raises(ValueError, match=r"open\(\) needs a language \(one of en, fr\)"):
        dec.open()
    with pytest.raises(ValueError, match="needs a language"):
        dec.run_concurrent([waves[3]])
    with pytest.raises(ValueError, match="needs a language"):
        dec.transcribe(waves[3])
    assert entered == [] and not dec.streams and dec.pool.in_use == 0
    assert dec.transcribe(waves[3], language="fr").tokens == full_greedy(model, cmvn, waves[3])
    assert entered and set(entered) == {"fr"}
    # Without a hook (one pathway) no language is needed.
    assert StreamingDecoder(model, cmvn).transcribe(waves[3]).tokens == full_greedy(model, cmvn, waves[3])


def test_run_concurrent_checks_every_language_before_any_stream_runs(setup) -> None:
    # Streams open lazily at their start tick; a bad language of a later stream must not let
    # an earlier one run first and keep its state slot.
    model, cmvn, waves = setup
    pathway, entered = _recording_pathway()
    dec = StreamingDecoder(model, cmvn, mask_context=pathway, languages=["en", "fr"])
    for langs, message in ((["en", "de"], r"no pathway for 'de' \(one of en, fr\)"),
                           (["en", None], "needs a language")):
        with pytest.raises(ValueError, match=message):
            dec.run_concurrent([waves[0], waves[1]], start_ticks=[0, 3], languages=langs)
        assert entered == [] and not dec.streams and dec.pool.in_use == 0

    # A failure mid-run (here the pathway hook, at the second stream's first step) closes the
    # streams already opened.
    @contextlib.contextmanager
    def failing(language: str | None) -> Iterator[None]:
        if language == "fr":
            raise RuntimeError("pathway unavailable")
        yield

    dec = StreamingDecoder(model, cmvn, mask_context=failing, languages=["en", "fr"])
    with pytest.raises(RuntimeError, match="pathway unavailable"):
        dec.run_concurrent([waves[0], waves[1]], start_ticks=[0, 3], languages=["en", "fr"])
    assert not dec.streams and dec.pool.in_use == 0


def test_from_recognizer(setup) -> None:
    from pathlib import Path

    from sparse_rnnt.config import ExperimentConfig
    from sparse_rnnt.training.inference import Recognizer

    model, cmvn, waves = setup

    class Letters:
        def decode(self, ids: list[int]) -> str:
            return "".join(chr(ord("a") + i) for i in ids)

    rec = Recognizer(model, Letters(), cmvn, ExperimentConfig(), ["en"], Path("ckpt"), 0)  # type: ignore[arg-type]
    dec = StreamingDecoder.from_recognizer(rec)
    assert dec._mask_context is None  # dense model: no per-language grouping
    r = dec.transcribe(waves[3], [1234])
    assert r.tokens == full_greedy(model, cmvn, waves[3])
    assert r.text == Letters().decode(r.tokens)


def test_bfloat16_model_streams_like_its_full_utterance_decoding(setup) -> None:
    # GPU artifacts are bf16: features and encoder state must follow the weights' dtype.
    _, cmvn, waves = setup
    m16 = tiny_model().to(torch.bfloat16)
    dec = StreamingDecoder(m16, cmvn)
    s = dec.open()
    state = dec.encoder_state(s)
    assert state.key.dtype == state.memory.dtype == torch.bfloat16
    dec.close(s)
    for wave in waves[:2]:
        x = cmvn.normalize(LogMel()(wave))
        ref = greedy_search(m16, x[None].to(torch.bfloat16), torch.tensor([x.size(0)]))[0]
        assert len(ref) > 0 and dec.transcribe(wave, random_sizes(3)).tokens == ref


# --- beam search -----------------------------------------------------------------------------


@pytest.mark.parametrize("beam_width", [1, 3, 5])
def test_streaming_beam_equals_full_utterance_beam(setup, beam_width: int) -> None:
    from sparse_rnnt.model.decoding import beam_search

    model, cmvn, waves = setup
    dec = StreamingDecoder(model, cmvn, decoding="beam", beam_width=beam_width)
    revised = 0
    for i, wave in enumerate(waves):
        x = cmvn.normalize(LogMel()(wave))
        ref = beam_search(model, x[None], torch.tensor([x.size(0)]), beam_width=beam_width)[0]
        partials: list[PartialResult] = []
        dec.on_partial = partials.append
        result = dec.transcribe(wave, random_sizes(10 + i))
        assert len(ref) > 0 and result.tokens == ref
        prev: list[int] = []
        for p in partials:  # the best hypothesis so far, revisions accounted for
            assert p.tokens == prev[: len(prev) - p.revised] + p.new_tokens
            prev = p.tokens
            revised += p.revised
        assert prev == ref
    if beam_width > 1:
        assert revised > 0  # the beam did change its mind: the revision path was exercised


def test_beam_search_is_torchaudios_on_stride_aligned_input(setup) -> None:
    # Independent reference: torchaudio's own RNNTBeamSearch (transcribe + search) on features
    # trimmed to the time-reduction stride and padded with the right context, as encode() does.
    from torchaudio.models import RNNTBeamSearch

    from sparse_rnnt.model.decoding import beam_search

    model, cmvn, waves = setup
    searcher = RNNTBeamSearch(model.rnnt, model.blank)
    for wave in waves:
        x = cmvn.normalize(LogMel()(wave))
        n = x.size(0) - x.size(0) % geometry(model.rnnt).stride
        with torch.no_grad():
            hyps = searcher(model.pad_right_context(x[None, :n])[0], torch.tensor([n]), 4)
        expected = [int(t) for t in hyps[0][0] if t != model.blank]
        assert beam_search(model, x[None], torch.tensor([x.size(0)]), beam_width=4)[0] == expected


def test_batched_beam_streams_equal_single_stream(setup) -> None:
    model, cmvn, waves = setup
    singles = [StreamingDecoder(model, cmvn, decoding="beam", beam_width=3).transcribe(w).tokens for w in waves]
    dec = StreamingDecoder(model, cmvn, decoding="beam", beam_width=3)
    results = dec.run_concurrent(waves, piece_samples=2560, start_ticks=[0, 1, 1, 4, 2])
    assert [r.tokens for r in results] == singles
    assert max(t.batch_size for t in dec.step_timings) >= 3
    with pytest.raises(ValueError, match="decoding"):
        StreamingDecoder(model, cmvn, decoding="sample")
    with pytest.raises(ValueError, match="beam_width"):
        StreamingDecoder(model, cmvn, decoding="beam", beam_width=0)


@pytest.mark.parametrize("num_samples", [0, 1, 256])
def test_audio_too_short_for_a_frame_decodes_to_an_empty_hypothesis(setup, num_samples: int) -> None:
    model, cmvn, _ = setup
    dec = StreamingDecoder(model, cmvn)
    r = dec.transcribe(synth(num_samples, seed=7))
    assert r.tokens == [] and r.num_chunks == 0
    assert r.audio_s == num_samples / SR
    assert dec.streams == {}  # finished and closed
    # The decoder goes on serving streams of any length.
    s = dec.open()
    dec.accept(s, torch.zeros(0))
    assert dec.finalize(s).tokens == []
    assert dec.transcribe(synth(16000, seed=3)).tokens == full_greedy(model, cmvn, synth(16000, seed=3))


def test_short_streams_around_one_encoder_frame(setup) -> None:
    model, cmvn, _ = setup
    dec = StreamingDecoder(model, cmvn)
    # 257..479 samples: 2-3 feature frames, trimmed to the stride (4) -> no encoder frame, empty
    # hypothesis (the full path cannot encode zero frames at all).
    for n in (257, 479):
        r = dec.transcribe(synth(n, seed=n), piece_sizes=[100])
        assert r.tokens == [] and r.num_chunks == 0
    for n in (480, 641, 1119):  # 4, 5 and 7 frames -> one encoder frame: as the full path
        wave = synth(n, seed=n)
        assert dec.transcribe(wave, piece_sizes=[100]).tokens == full_greedy(model, cmvn, wave)


def test_partials_say_how_much_audio_they_cover(setup) -> None:
    # Chunk k's hypothesis covers its segments' frames: (k + 1) * segment * 10 ms, at most the audio.
    model, cmvn, waves = setup
    dec = StreamingDecoder(model, cmvn)
    seg = dec.geometry.segment
    wave = waves[1]
    s = dec.open()
    parts = []
    for piece in iter_pieces(wave, [700, 1300]):
        parts.extend(dec.feed(s, piece))
    dec.end(s)
    while dec.ready(s):
        parts.extend(dec.step([s]))
    audio_s = wave.numel() / 16000
    assert [p.chunk for p in parts] == list(range(len(parts))) and parts[-1].final
    for p in parts:
        assert p.audio_end_s == pytest.approx(min((p.chunk + 1) * seg * 0.01, audio_s), abs=1e-9)
    assert parts[-1].audio_end_s == pytest.approx(audio_s, abs=0.04 + 1e-9)  # the trimmed < stride tail


# --- a step that fails -------------------------------------------------------------------------


class _Fault:
    """Raises ``exc`` at its ``after``-th call once armed, then never again (a transient error: a
    CUDA OOM, a model error, Ctrl-C). Use as a forward pre-hook or call it from a wrapper."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.countdown: int | None = None
        self.fired = 0

    def arm(self, after: int) -> None:
        self.countdown = after

    def __call__(self, *args: object) -> None:
        if self.countdown is not None:
            self.countdown -= 1
            if self.countdown == 0:
                self.countdown = None
                self.fired += 1
                raise self.exc


def _snapshot(dec: StreamingDecoder, streams: list) -> list:
    """Everything a step may change, by value: the streams' fields and their pool rows."""
    out: list = [dec._steps, len(dec.step_timings)]
    for s in streams:
        st = dec.encoder_state(s)
        idx = torch.tensor([s.slot])
        pred, state = dec.pool.predictor_rows(idx)
        out.append((s.start, s.frames.clone(), list(s.tokens), s.chunks, s.hyps, st.key, st.value, st.memory,
                    st.past, pred, [x for layer in state for x in layer], list(s.chunk_latencies_s)))
    return out


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and not isinstance(a, str):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a is b or a == b


@pytest.mark.parametrize("step_mode", ["eager", "static"])
@pytest.mark.parametrize("decoding", ["greedy", "beam"])
@pytest.mark.parametrize("where", ["encoder", "decoder"])
def test_a_failed_step_leaves_its_streams_as_before(setup, step_mode: str, decoding: str, where: str) -> None:
    # A step that raises part way (the encoder, or the decoder after some of its work) must leave
    # every stream of the step and the state pool as they were: retrying the step then gives the
    # full-utterance result. Before the fix the chunk was taken before the encoder ran and the
    # encoder state stored before decoding: the streams silently skipped audio.
    model, cmvn, waves = setup
    pair = [waves[1], waves[2]]
    width = 3
    refs = [full_greedy(model, cmvn, w) if decoding == "greedy" else full_beam(model, cmvn, w, width) for w in pair]
    dec = StreamingDecoder(model, cmvn, decoding=decoding, beam_width=width, step_mode=step_mode, max_batch=4)
    streams = [dec.open(), dec.open()]
    partials: list[PartialResult] = []
    dec.on_partial = partials.append
    if where == "encoder":
        fault = _Fault(RuntimeError("CUDA out of memory (injected)"))
        handle = model.rnnt.transcriber.input_linear.register_forward_pre_hook(fault)
        after = 1
    elif decoding == "greedy":  # within the greedy loop, after the predictor has advanced
        fault = _Fault(KeyboardInterrupt())
        handle = model.rnnt.joiner.register_forward_pre_hook(fault)
        after = 3
    else:  # the second stream's beam, after the first stream's beam was extended
        fault = _Fault(KeyboardInterrupt())
        extend = dec._beam.extend

        def failing_extend(*args: object) -> object:
            fault()
            return extend(*args)

        dec._beam.extend = failing_extend  # type: ignore[method-assign]
        handle = None
        after = 2
    try:
        for tick, start in enumerate(range(0, max(w.numel() for w in pair), 2560)):
            for s, w in zip(streams, pair, strict=True):
                dec.accept(s, w[start : start + 2560])
            if tick in (3, 6):
                assert all(dec.ready(s) for s in streams)  # the failing step holds both streams
                before = _snapshot(dec, streams)
                seen = len(partials)
                fault.arm(after)
                with pytest.raises(type(fault.exc)):
                    dec.step(streams)
                assert _same(_snapshot(dec, streams), before) and len(partials) == seen
            while dec.step(streams):
                pass
        results = dec.finish(streams)
    finally:
        if handle is not None:
            handle.remove()
    assert fault.fired == 2
    assert all(len(r) > 0 for r in refs)
    assert [r.tokens for r in results] == refs
    geo = dec.geometry
    for r, w in zip(results, pair, strict=True):
        frames = (1 + w.numel() // 160) // geo.stride * geo.stride
        assert r.num_chunks == math.ceil(frames / geo.segment) == len(r.chunk_latencies_s)
    for s in streams:  # every chunk's partial once, in order, the last one final
        mine = [p for p in partials if p.stream_id == s.id]
        assert [p.chunk for p in mine] == list(range(len(mine))) and [p.final for p in mine][-1]


# --- aggregate statistics ----------------------------------------------------------------------


def test_aggregate_compute_covers_the_finished_streams_only(setup) -> None:
    # A short stream finished while a long one is still open: the aggregate is the finished
    # stream's own compute over its own audio (before the fix the open stream's steps were
    # counted over the finished stream's audio: 2.0 s per audio second where each stream took 0.06).
    model, cmvn, waves = setup
    dec = StreamingDecoder(model, cmvn)
    short, long_ = dec.open(), dec.open()
    dec.feed(short, waves[1][:8000])
    r_short = dec.finalize(short)  # alone in its steps: all their time is its own
    for piece in iter_pieces(waves[2], [2560]):
        dec.feed(long_, piece)
    stats = dec.latency_stats()
    assert stats["audio_s"] == pytest.approx(0.5)
    assert stats["processing_s"] == pytest.approx(r_short.processing_s)
    assert stats["compute_s_per_audio_s"] == pytest.approx(r_short.rtf) == pytest.approx(stats["rtf"])
    assert stats["steps"] == r_short.num_chunks + long_.chunks  # every step run, the open stream's too
    r_long = dec.finalize(long_)
    stats = dec.latency_stats()
    assert stats["processing_s"] == pytest.approx(r_short.processing_s + r_long.processing_s)
    assert stats["compute_s_per_audio_s"] == pytest.approx(
        (r_short.processing_s + r_long.processing_s) / (r_short.audio_s + r_long.audio_s))


def test_aggregate_totals_outlive_the_step_window(setup, monkeypatch) -> None:
    # The percentiles are over the last STEP_WINDOW steps; the totals (steps, compute, audio)
    # are running sums over everything (before the fix the step time came from the window, the
    # audio from every finished stream).
    import sparse_rnnt.streaming.stream as stream_mod

    model, cmvn, waves = setup
    monkeypatch.setattr(stream_mod, "STEP_WINDOW", 5)
    dec = StreamingDecoder(model, cmvn)
    results = [dec.transcribe(w, [2560]) for w in waves[:3]]
    stats = dec.latency_stats()
    assert stats["window_steps"] == 5 and len(dec.step_timings) == 5
    assert stats["steps"] == sum(r.num_chunks for r in results) > 5
    assert stats["mean_batch"] == 1.0
    assert stats["processing_s"] == pytest.approx(sum(r.processing_s for r in results))  # one stream at a time
    assert stats["compute_s_per_audio_s"] == pytest.approx(stats["processing_s"] / stats["audio_s"])


def test_aggregate_counts_a_shared_step_once(setup) -> None:
    # Concurrent streams: each step's time is split between the streams in it, so the total is
    # every step once plus every stream's front end; a stream's own rtf counts the whole steps
    # it waited for (its latency), so the aggregate is below every stream's rtf.
    model, cmvn, waves = setup
    dec = StreamingDecoder(model, cmvn)
    results = dec.run_concurrent(waves[:4], piece_samples=2560)
    stats = dec.latency_stats()
    steps = list(dec.step_timings)
    assert stats["steps"] == len(steps) and max(t.batch_size for t in steps) == 4
    assert stats["mean_batch"] == pytest.approx(sum(t.batch_size for t in steps) / len(steps))
    features = sum(r.processing_s for r in results) - sum(
        t.total_s * t.batch_size for t in steps)  # each stream's processing_s counts its steps whole
    assert stats["processing_s"] == pytest.approx(features + sum(t.total_s for t in steps))
    assert stats["audio_s"] == pytest.approx(sum(r.audio_s for r in results))
    assert all(stats["compute_s_per_audio_s"] < r.rtf for r in results)


def test_reset_stats_starts_the_totals_afresh(setup) -> None:
    model, cmvn, waves = setup
    dec = StreamingDecoder(model, cmvn)
    dec.transcribe(waves[0])
    dec.reset_stats()
    stats = dec.latency_stats()
    assert stats["steps"] == 0 and stats["audio_s"] == 0 and math.isnan(stats["compute_s_per_audio_s"])
    r = dec.transcribe(waves[3])
    stats = dec.latency_stats()
    assert stats["steps"] == r.num_chunks and stats["processing_s"] == pytest.approx(r.processing_s)


# --- input checks and the final partial --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
                                   torch.complex64])
def test_integer_and_complex_pcm_are_refused(setup, dtype: torch.dtype) -> None:
    # int16 PCM cast to float would be 32768x too loud (garbage tokens, no error); complex would
    # lose its imaginary part.
    model, cmvn, waves = setup
    dec = StreamingDecoder(model, cmvn)
    s = dec.open()
    with pytest.raises(ValueError, match=r"float.*e\.g\. int16 PCM / 32768"):
        dec.accept(s, torch.zeros(1000, dtype=dtype))
    assert s.frontend.num_samples == 0
    with pytest.raises(ValueError, match="float"):
        dec.transcribe(torch.zeros(1000, dtype=dtype))
    assert list(dec.streams) == [s.id]  # refused before a stream was opened for it
    wave = waves[3]
    pcm = (wave * 32768).round().to(torch.int16)
    for ok in (pcm.float() / 32768, pcm.double() / 32768):  # converted as the message says: accepted
        dec.accept(s, ok[:4000])
    dec.close(s)
    assert dec.transcribe((pcm.float() / 32768).half()).tokens == full_greedy(model, cmvn, pcm.half().float() / 32768)


@pytest.mark.parametrize("right_context", [0, 4])
def test_every_stream_ends_with_exactly_one_final_partial(setup, right_context: int) -> None:
    # With no right context the last chunk can be encoded before end(): its partial could not
    # know it was the last, and no partial was ever final (e.g. 23457 samples). Now end()
    # leaves a final partial to emit, with no new tokens; audio too short for a frame also ends
    # with one (chunk -1: after no chunk).
    model = tiny_model(right_context_length=right_context)
    _, cmvn, waves = setup
    assert geometry(model.rnnt).chunk == geometry(model.rnnt).segment + right_context
    for wave in [*waves, synth(300, seed=1), synth(0, seed=1)]:
        parts: list[PartialResult] = []
        dec = StreamingDecoder(model, cmvn, on_partial=parts.append)
        r = dec.transcribe(wave, [2560])
        ref = full_greedy(model, cmvn, wave) if wave.numel() > 479 else []
        assert r.tokens == ref
        assert [p.final for p in parts] == [False] * (len(parts) - 1) + [True]
        last = parts[-1]
        assert last.tokens == r.tokens and last.stream_id == r.stream_id
        chunks = [p.chunk for p in parts]
        if len(parts) == r.num_chunks:  # the last chunk was encoded after end(): it is the final one
            assert chunks == list(range(r.num_chunks))
        else:  # a closing partial after the last chunk: no new tokens, same chunk index
            assert chunks == [*range(r.num_chunks), r.num_chunks - 1]
            assert last.new_tokens == [] and last.revised == 0 and last.latency_s == 0.0
            assert last.audio_end_s == pytest.approx(min(r.audio_s, parts[-2].audio_end_s if len(parts) > 1 else 0))
    # The case that failed: 23457 samples, 9 chunks, the last one encoded before end().
    parts = []
    dec = StreamingDecoder(model, cmvn, on_partial=parts.append)
    r = dec.transcribe(waves[1], [2560])
    if right_context == 0:
        assert len(parts) == r.num_chunks + 1 and parts[-1].final and not parts[-2].final


# --- beam search on long streams ---------------------------------------------------------------


@pytest.mark.parametrize("beam_width", [3, 5])
def test_beam_hypotheses_stay_short_on_a_long_stream(setup, beam_width: int) -> None:
    # torchaudio keys every hypothesis by str(tokens) and merges hypotheses by comparing those
    # keys, so with whole histories in the hypotheses a beam step grew with the stream's age
    # (about 3x slower per chunk after 1000 chunks). The prefix all hypotheses share is kept
    # apart: their token lists stay a few tokens long, and the output is still exactly the
    # full-utterance beam search's (partials too, revisions included).
    model, cmvn, waves = setup
    wave = torch.cat([waves[2]] * 4)  # 10 s, 63 chunks
    ref = full_beam(model, cmvn, wave, beam_width)
    partials: list[PartialResult] = []
    dec = StreamingDecoder(model, cmvn, decoding="beam", beam_width=beam_width, on_partial=partials.append)
    s = dec.open()
    longest = 0
    for piece in iter_pieces(wave, [2560]):
        dec.feed(s, piece)
        beam = s.hyps
        hyps = getattr(beam, "hyps", beam) or []  # (before: a list of torchaudio hypotheses)
        longest = max([longest, *(len(h[0]) for h in hyps)])
    r = dec.finalize(s)
    assert len(ref) > 200 and r.tokens == ref
    assert longest <= 40  # measured 10; the whole hypothesis (over 200 tokens) before
    prev: list[int] = []
    for p in partials:
        assert p.tokens == prev[: len(prev) - p.revised] + p.new_tokens
        prev = p.tokens
    assert prev == ref


def test_beam_in_pieces_equals_one_search_hypothesis_for_hypothesis(setup) -> None:
    # Every hypothesis of the beam (its full tokens: shared prefix + its own tail) and its score
    # equal those of one torchaudio search over all frames, bit for bit; the ranking key counts
    # the moved prefix, so the length-normalised order is torchaudio's.
    from sparse_rnnt.model.decoding import BeamContinuation

    model, cmvn, waves = setup
    x = cmvn.normalize(LogMel()(torch.cat([waves[2], waves[4]])))
    with torch.inference_mode():
        enc, n = model.encode(x[None], torch.tensor([x.size(0)]))
    enc = enc[:, : int(n)]
    search = BeamContinuation(model, beam_width=4)

    def full(beam: object) -> list[tuple[list[int], float]]:
        prefix = search.best(beam)[: beam.committed]  # type: ignore[attr-defined]
        return [(prefix + [t for t in h[0] if t != model.blank], h[3]) for h in beam.hyps]  # type: ignore[attr-defined]

    with torch.inference_mode():
        once = search.extend(enc, None)
        beam = None
        for a, b in zip([0, *range(1, enc.size(1), 7)], [*range(1, enc.size(1), 7), enc.size(1)], strict=True):
            beam = search.extend(enc[:, a:b], beam)
            tokens = search.best(beam)
            assert search.best_since(beam, beam.committed) == tokens[beam.committed :]
    assert beam is not None and beam.committed > 50  # most of the hypothesis was moved out
    assert full(beam) == full(once)
    # And torchaudio's own search, default ranking key, over every frame at once.
    from torchaudio.models import RNNTBeamSearch

    from sparse_rnnt.model.decoding import _EncodedFrames

    with torch.inference_mode():
        plain, _ = RNNTBeamSearch(_EncodedFrames(model.rnnt), model.blank, step_max_tokens=100).infer(
            enc, torch.tensor([enc.size(1)]), 4)
    assert full(beam) == [([t for t in h[0] if t != model.blank], h[3]) for h in plain]
    assert search.best(beam) == search.best(once)
    with pytest.raises(ValueError, match="past this beam's shared prefix"):
        search.best_since(beam, beam.committed + 1)


@pytest.mark.parametrize("model_type", ["char", "unigram", "bpe"])
def test_hypothesis_text_equals_decoding_the_whole_hypothesis(model_type, tmp_path) -> None:
    # The text kept between chunks equals tokenizer.decode of the whole hypothesis after every
    # extension and every replaced tail (a beam's revision), for char, unigram and bpe models,
    # and decodes each token a bounded number of times (the whole hypothesis was decoded at
    # every chunk: quadratic in the stream's length).
    import random

    from sparse_rnnt.data.tokenizer import Tokenizer, TokenizerConfig
    from sparse_rnnt.streaming.stream import HypothesisText, WordStarts

    texts = ["het is één uur en de zon schijnt", "the quick brown fox jumps over the lazy dog",
             "zij zeggen dat 't niet kan", "la ruïne est près de la rivière", "ab ba aab  abba"] * 4
    cfg = TokenizerConfig(model_type=model_type, vocab_size=0 if model_type == "char" else 40)
    tok = Tokenizer.train(texts, cfg, tmp_path / "t.model")
    starts = WordStarts.of(tok)
    assert starts is not None and (starts.words or starts.space) and starts.visible
    assert all(tok.id_to_piece(i).startswith("\u2581") for i in starts.words | starts.space)
    decoded: list[int] = []

    class Counting:
        vocab_size = tok.vocab_size

        def decode(self, ids: list[int]) -> str:
            decoded.append(len(ids))
            return tok.decode(ids)

    rng = random.Random(model_type)
    ids = [i for i in range(tok.vocab_size) if i != tok.blank]  # <unk> and every piece included
    word = sorted(starts.words | starts.space)

    def token() -> int:  # about one word start in five, as in text
        return rng.choice(word) if rng.random() < 0.2 else rng.choice(ids)

    text = HypothesisText(Counting(), starts)
    tokens: list[int] = []
    whole = 0  # what decoding the whole hypothesis every time would have decoded
    for step in range(600):
        kept = len(tokens)
        if step % 7 == 3 and tokens:  # a beam replaces its last tokens
            kept = max(0, len(tokens) - rng.randint(1, 6))
            tokens = tokens[:kept]
        tokens = tokens + [token() for _ in range(rng.randint(0, 4))]
        assert text(tokens, kept) == tok.decode(tokens), step
        whole += len(tokens)
    # linear in the stream, not quadratic: a few words per call, not the whole hypothesis
    assert len(tokens) > 500 and sum(decoded) * 10 < whole
    assert HypothesisText(tok, None)(tokens, 0) == tok.decode(tokens)  # no pieces: decoded whole


def test_stream_texts_are_the_tokenizer_decode_of_their_tokens(setup, tmp_path) -> None:
    # End to end with a real tokenizer: every partial's and the result's text is
    # tokenizer.decode(tokens), greedy and beam (whose partials may revise their last tokens).
    from sparse_rnnt.data.tokenizer import Tokenizer, TokenizerConfig

    model, cmvn, waves = setup
    # 9 letters, the word start and <unk>: 11 pieces, the model's symbols before its blank
    tok = Tokenizer.train(["abc def ghi", "ih gf edc ba"], TokenizerConfig(model_type="char"), tmp_path / "t.model")
    assert tok.vocab_size == model.blank
    for decoding in ("greedy", "beam"):
        seen = []
        dec = StreamingDecoder(model, cmvn, tokenizer=tok, decoding=decoding, beam_width=3,
                               on_partial=seen.append)
        r = dec.transcribe(waves[2])
        assert seen and all(p.text == tok.decode(p.tokens) for p in seen)
        assert r.text == tok.decode(r.tokens)
