"""Chunk-by-chunk streaming recognition with an Emformer RNN-T, one or many streams at once.

Pipeline per stream: PCM pieces -> :class:`~sparse_rnnt.streaming.features.StreamingLogMel`
(the full front end's frames, computed incrementally) -> global CMVN -> every time
``segment + right_context`` frames are buffered, one Emformer chunk (``segment`` new frames plus
``right_context`` look-ahead frames) -> RNN-T decoding (greedy, or torchaudio's beam search) of
the ``segment // stride`` new encoder frames, continuing from the stream's predictor state and
hypothesis (greedy) or its beam.

All streams that have a chunk ready in a :meth:`StreamingDecoder.step` are encoded in ONE batched
encoder call (:func:`~sparse_rnnt.streaming.encoder.encoder_step_tensors` on their rows of the
:class:`~sparse_rnnt.streaming.pool.StatePool`, masking per-stream state so that streams at
different positions batch exactly) and decoded in one batched greedy loop (beam search: one
search per stream); a stream with no chunk ready is left out of that step. A step stores
nothing until its encoder and decoder both succeeded, so one that raises leaves its streams as
they were. When the decoder has a ``mask_context`` (per-language pathway masks), one call is
made per language present in the step.

End of stream matches the full-utterance path (:meth:`EmformerRNNT.encode`): the features are
trimmed to a multiple of the time-reduction stride (``trim_to_stride``), and after the last real
frame the look-ahead is zeros (``pad_right_context``); a last segment shorter than
``segment_length`` is encoded with its padded frames masked, like the full path's short last
segment. The final hypothesis therefore equals :func:`~sparse_rnnt.model.decoding.greedy_search`
(beam: :func:`~sparse_rnnt.model.decoding.beam_search`) on the whole utterance, up to float
rounding (encoder outputs agree to ~1e-6). Any length can be streamed: audio too short for a
single feature frame (under ``n_fft // 2 + 1`` samples, no audio at all included) ends with no
frames and an empty hypothesis.

Audio is mono float PCM at the feature config's ``sample_rate`` (the model's training rate;
16 kHz by default): durations and RTF are computed with that rate. Integer PCM is refused:
convert it (int16: divide by 32768).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import operator
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..data.features import FeatureConfig, GlobalCMVN, LogMel
from ..model.decoding import Beam, BeamContinuation, PredictorState, greedy_frames
from ..model.rnnt import EmformerRNNT
from .encoder import EncoderState, encoder_step_tensors, geometry
from .features import StreamingLogMel
from .graphs import StaticEncoderStep, StaticGreedyDecoder
from .pool import StatePool

if TYPE_CHECKING:
    from ..data.tokenizer import Tokenizer
    from ..export.artifact import Artifact
    from ..training.inference import Recognizer

LATENCY_WINDOW = 4096  # chunks per stream kept in chunk_latencies_s (the latest)
STEP_WINDOW = 65536  # steps kept in step_timings (the latest): latency_stats()' percentiles


@dataclass
class StepTiming:
    """Wall time of one batched chunk step (seconds). ``language``: the mask group, if any."""

    step: int
    batch_size: int
    encoder_s: float  # chunk assembly + state gather + encoder
    decoder_s: float  # greedy or beam search + predictor state gather + storing every state
    language: str | None = None

    @property
    def total_s(self) -> float:
        return self.encoder_s + self.decoder_s


@dataclass
class PartialResult:
    """A stream's hypothesis after one chunk."""

    stream_id: str
    # 0-based chunk index within the stream. A closing partial (see ``final``) repeats the last
    # chunk's index (-1 for a stream that had none): it adds no chunk.
    chunk: int
    tokens: list[int]  # hypothesis so far, this chunk's tokens included
    new_tokens: list[int]  # emitted by this chunk
    text: str | None  # tokenizer.decode(tokens) when the decoder has a tokenizer
    latency_s: float  # encoder + decoder time of the step this chunk was in (closing partial: 0)
    # True exactly once per finished stream: for its last chunk when that chunk is encoded after
    # end(), else (no right context: the last chunk may be encoded before end() is known; or no
    # chunk at all) for a closing partial with no new tokens, from the step after end().
    final: bool
    # Beam search may change its mind: the last ``revised`` tokens of the previous hypothesis
    # were replaced, so ``tokens == previous[:len(previous) - revised] + new_tokens`` (greedy: 0).
    revised: int = 0
    audio_end_s: float = 0.0  # the stream's audio this hypothesis covers (its segments' frames)


@dataclass(frozen=True)
class WordStarts:
    """Where a hypothesis's text can be split (see :class:`HypothesisText`), from the
    tokenizer's sentencepiece pieces: ``words``, pieces that start a word and go on with a
    visible character (``"\u2581the"``); ``space``, the piece ``"\u2581"`` alone; ``visible``,
    pieces that begin with a visible character (not a word start, a space, ``<unk>``'s
    ``" \u2047 "`` or another ``<...>`` piece)."""

    words: frozenset[int]
    space: frozenset[int]
    visible: frozenset[int]

    @classmethod
    def of(cls, tokenizer: Any) -> WordStarts | None:
        """None for a tokenizer without ``id_to_piece`` and ``vocab_size`` (a duck-typed one)."""
        if tokenizer is None or not hasattr(tokenizer, "id_to_piece") or not hasattr(tokenizer, "vocab_size"):
            return None
        blank = getattr(tokenizer, "blank", -1)
        pieces = {i: str(tokenizer.id_to_piece(i)) for i in range(int(tokenizer.vocab_size)) if i != blank}

        def shown(c: str) -> bool:
            return c != "\u2581" and c != "<" and not c.isspace()

        return cls(words=frozenset(i for i, p in pieces.items() if len(p) > 1 and p[0] == "\u2581" and shown(p[1])),
                   space=frozenset(i for i, p in pieces.items() if p == "\u2581"),
                   visible=frozenset(i for i, p in pieces.items() if p and shown(p[0])))

    def at(self, tokens: list[int], m: int) -> bool:
        """Whether the text of ``tokens[m:]`` is one space and then ``decode(tokens[m:])``."""
        t = tokens[m]
        return t in self.words or (t in self.space and m + 1 < len(tokens) and tokens[m + 1] in self.visible)


class HypothesisText:
    """``tokenizer.decode(tokens)`` of one hypothesis that grows at its end (a beam may replace
    its last tokens), in time proportional to the tokens since its last word start rather than
    to the whole hypothesis: decoding a 3000-token hypothesis took 1.8 ms here
    (``benchmarks/hypothesis_text.py``), and a stream decoded it at every chunk.

    Sentencepiece writes each ``"\u2581"`` as a space and strips the text's leading spaces, so
    ``decode(a + b) == decode(a) + " " + decode(b)`` when ``decode(a)`` is not empty and ``b``
    begins with exactly one space and then a visible character (:meth:`WordStarts.at`; a second
    space, or ``<unk>``'s spaced surface, would break it): the text of the tokens before the last
    such word start is kept. ``starts``: :meth:`WordStarts.of` the tokenizer; None decodes every
    text whole."""

    def __init__(self, tokenizer: Any, starts: WordStarts | None) -> None:
        self.tokenizer = tokenizer
        self.starts = starts
        self.n = 0  # tokens[:n] have the text self.prefix (not empty); n is 0 or a word start
        self.prefix = ""

    def __call__(self, tokens: list[int], kept: int) -> str:
        """The text of ``tokens``, of which the first ``kept`` are those of the last call."""
        if self.starts is None:
            return str(self.tokenizer.decode(tokens))
        if self.n > min(kept, len(tokens)) or (self.n and self.n < len(tokens) and not self.starts.at(tokens, self.n)):
            self.n, self.prefix = 0, ""  # tokens of the kept text, or the word start after it, changed
        m = len(tokens) - 1
        while m > self.n and not self.starts.at(tokens, m):
            m -= 1
        if m > self.n:
            prefix = self._joined(tokens[self.n:m])
            if prefix:  # an empty text would let sentencepiece strip the next word's space
                self.prefix, self.n = prefix, m
        return self._joined(tokens[self.n:])

    def _joined(self, rest: list[int]) -> str:
        """The text of ``tokens[:n] + rest`` (``rest`` begins at a word start when ``n > 0``)."""
        if self.n == 0:
            return str(self.tokenizer.decode(rest))
        return self.prefix + " " + str(self.tokenizer.decode(rest)) if rest else self.prefix


@dataclass
class StreamResult:
    """Final result of a stream.

    ``processing_s`` is the stream's own feature time plus the full wall time of every batched
    step it took part in (the latency it saw); ``rtf = processing_s / audio_s``, this stream's
    real-time factor. (:meth:`StreamingDecoder.latency_stats` gives the throughput of many
    streams, ``compute_s_per_audio_s``.) ``chunk_latencies_s`` holds the latest
    ``LATENCY_WINDOW`` chunks' step times only (4096, about 11 minutes of 160 ms chunks), so a
    stream of hours stays bounded; ``num_chunks`` counts them all.
    """

    stream_id: str
    language: str | None
    tokens: list[int]
    text: str | None
    audio_s: float
    processing_s: float
    rtf: float
    chunk_latencies_s: list[float]
    num_chunks: int


@dataclass
class Stream:
    """One audio stream's incremental state (create with :meth:`StreamingDecoder.open`).

    Its encoder and predictor state live in row ``slot`` of the decoder's :class:`StatePool`
    (:meth:`StreamingDecoder.encoder_state` returns a copy).
    """

    id: str
    language: str | None
    frontend: StreamingLogMel
    slot: int
    frames: torch.Tensor  # [n, F] CMVN-normalized frames from utterance frame ``start`` on
    start: int = 0  # utterance frame where the next segment begins
    received_frames: int = 0  # frames produced by the front end so far
    ended: bool = False
    total_frames: int | None = None  # after end: frames kept by trim_to_stride
    tokens: list[int] = field(default_factory=list)
    hyps: Beam | None = None  # beam decoding: the beam so far (None before the first frame)
    chunks: int = 0
    final_sent: bool = False  # its final partial was emitted
    text: HypothesisText | None = None  # the hypothesis's text, kept between chunks (with a tokenizer)
    feature_s: float = 0.0
    step_s: float = 0.0  # whole steps it took part in (the latency it saw)
    step_share_s: float = 0.0  # its share of them (a step's time over the streams in it)
    # Bounded: a stream that runs for hours must not grow (the latest LATENCY_WINDOW chunks).
    chunk_latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    @property
    def audio_s(self) -> float:
        return self.frontend.num_samples / self.frontend.config.sample_rate

    @property
    def done(self) -> bool:
        """Ended and every segment encoded."""
        return self.ended and self.total_frames is not None and self.start >= self.total_frames


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (0..100) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class StreamingDecoder:
    """Streaming RNN-T recognition (greedy or beam search) for any number of concurrent streams.

    Typical single-stream use::

        dec = StreamingDecoder(model, cmvn, tokenizer=tok)
        s = dec.open()
        for piece in pcm_pieces:            # float32 at feature_config.sample_rate, any sizes
            for partial in dec.feed(s, piece):
                print(partial.text)
        result = dec.finalize(s)

    Many streams: :meth:`open` each, :meth:`accept` audio as it arrives, call :meth:`step` (one
    batched chunk for every stream that has one ready) and :meth:`finish` the streams that end.

    ``step_mode``: ``"eager"`` encodes and greedily decodes each step at its own batch size;
    ``"static"`` pads it to a fixed bucket (1, 2, 4, ... ``max_batch`` streams) with preallocated
    buffers, and ``"cuda-graph"`` replays that bucket's encoder step and the chunk's whole greedy
    search as captured CUDA graphs (see :mod:`.graphs`). Steps with more than ``max_batch`` ready
    streams are split. ``min_batch`` (static modes) is the smallest bucket: with
    ``min_batch = max_batch`` every step runs at one batch size, so a stream's output does not
    depend on how many streams share its steps. Matmuls may round a row differently at different
    batch sizes (bf16 does, on CPU and GPU), which changes greedy choices between near-equal
    logits; one fixed size removes that, at the cost of padded rows. Every stream's state is a row
    of :attr:`pool` (a :class:`StatePool`).

    Each batched call of a step (one per language, and per ``max_batch`` streams in static
    modes) is all or nothing: an exception inside it (a model error, CUDA out of memory,
    ``KeyboardInterrupt``) leaves its streams and their pool rows as they were, so calling
    :meth:`step` again decodes exactly as if it had not failed (calls that completed before it
    stay done).

    ``mask_context(language)``: a context manager under which the model's weights are those of
    ``language`` (e.g. :meth:`Recognizer.masked`); when given, each step batches streams per
    language and every stream must be opened with a language (``languages``, when given, lists
    them in the error). The default is a no-op and all ready streams share one encoder call.

    Bad arguments (a count below 1, an unknown mode) raise ``ValueError`` here, not later in a
    step: ``max_symbols_per_frame``, ``beam_width``, ``step_max_tokens``, ``max_batch`` and
    ``min_batch`` must be integers >= 1, with ``min_batch <= max_batch``.
    """

    def __init__(
        self,
        model: EmformerRNNT,
        cmvn: GlobalCMVN | None,
        feature_config: FeatureConfig | None = None,
        *,
        tokenizer: Tokenizer | None = None,
        max_symbols_per_frame: int = 4,
        mask_context: Callable[[str | None], AbstractContextManager[None]] | None = None,
        on_partial: Callable[[PartialResult], None] | None = None,
        decoding: str = "greedy",
        beam_width: int = 4,
        step_max_tokens: int = 100,
        step_mode: str = "eager",
        max_batch: int = 64,
        min_batch: int = 1,
        languages: Sequence[str] | None = None,
    ) -> None:
        # Checked up front: a count of 0 would otherwise decode nothing silently (greedy, beam),
        # search without bound (negative step_max_tokens) or fail deep inside a step.
        max_symbols_per_frame = _positive_int("max_symbols_per_frame", max_symbols_per_frame)
        beam_width = _positive_int("beam_width", beam_width)
        step_max_tokens = _positive_int("step_max_tokens", step_max_tokens)
        max_batch = _positive_int("max_batch", max_batch)
        min_batch = _positive_int("min_batch", min_batch)
        if min_batch > max_batch:
            raise ValueError(f"min_batch must be in [1, max_batch={max_batch}], got {min_batch}")
        if decoding not in ("greedy", "beam"):
            raise ValueError(f"decoding must be 'greedy' or 'beam', got {decoding!r}")
        if step_mode not in ("eager", "static", "cuda-graph"):
            raise ValueError(f"step_mode must be 'eager', 'static' or 'cuda-graph', got {step_mode!r}")
        if min_batch != 1 and step_mode == "eager":
            raise ValueError("min_batch needs step_mode 'static' or 'cuda-graph' (eager steps are unpadded)")
        if step_mode == "cuda-graph" and mask_context is not None:
            # A graph replays the weights and masks it captured; pathways switch them.
            raise ValueError("CUDA graphs need a single-pathway model (no mask_context)")
        model.eval()  # dropout off: streaming must equal full-utterance inference
        self.decoding = decoding
        # Beam: torchaudio's search continued chunk by chunk, per stream (as decoding.beam_search).
        self._beam = BeamContinuation(model, beam_width, step_max_tokens) if decoding == "beam" else None
        self.model = model
        self.cmvn = cmvn
        self.logmel = LogMel(feature_config)
        self.tokenizer = tokenizer
        self._word_starts = WordStarts.of(tokenizer)
        self.max_symbols_per_frame = max_symbols_per_frame
        self._mask_context = mask_context
        self.languages = list(languages) if languages is not None else None  # named in open()'s error
        self.on_partial = on_partial
        self.geometry = geometry(model.rnnt)
        self.device = next(model.parameters()).device
        # Features, encoder state and caches in the model's activation dtype (float32 for an
        # artifact, whose bf16 layers hand back float32; bf16 for a model cast whole).
        self.dtype = model.activation_dtype
        self.step_mode = step_mode
        self.max_batch = max_batch
        self._static = (
            None if step_mode == "eager"
            else StaticEncoderStep(model.rnnt, self.device, self.dtype, mode=step_mode, max_batch=max_batch,
                                   min_batch=min_batch)
        )
        self._static_greedy = (
            None if step_mode == "eager"
            else StaticGreedyDecoder(model, self.device, mode=step_mode, max_batch=max_batch, min_batch=min_batch,
                                     max_symbols_per_frame=max_symbols_per_frame)
        )
        self.pool = StatePool(self.geometry, self.device, self.dtype)
        self.streams: dict[str, Stream] = {}
        self._steps = 0  # steps run, ever (StepTiming.step)
        self.reset_stats()
        self._ids = itertools.count()
        if cmvn is not None and cmvn.dim != self.logmel.config.n_mels:
            raise ValueError(f"CMVN has {cmvn.dim} bins, the front end {self.logmel.config.n_mels}")

    @classmethod
    def from_recognizer(cls, recognizer: Recognizer, **kwargs: object) -> StreamingDecoder:
        """A decoder for a loaded checkpoint; per-language pruned models get its mask hook."""
        lm = recognizer.language_masks
        return cls(
            recognizer.model, recognizer.cmvn, recognizer.config.features,
            tokenizer=recognizer.tokenizer, mask_context=recognizer.masked if lm is not None else None,
            languages=lm.languages if lm is not None else None, **kwargs,  # type: ignore[arg-type]
        )

    # --- stream lifecycle -------------------------------------------------------------------

    @classmethod
    def from_artifact(cls, artifact: Artifact, **kwargs: object) -> StreamingDecoder:
        """A decoder for an exported artifact; a multilingual one switches pathway per stream (each
        stream needs a language), a single-pathway one needs none."""
        ml = artifact.multilingual
        return cls(
            artifact.model, artifact.cmvn, artifact.features, tokenizer=artifact.tokenizer,
            mask_context=artifact.pathway if ml else None, languages=artifact.languages if ml else None,
            **kwargs,  # type: ignore[arg-type]
        )

    def mask_context(self, language: str | None) -> AbstractContextManager[None]:
        """The weights to use for ``language``; a no-op unless a hook was given."""
        if self._mask_context is None:
            return contextlib.nullcontext()
        return self._mask_context(language)

    def open(self, language: str | None = None, stream_id: str | None = None) -> Stream:
        """Start a stream (it joins the next :meth:`step` that finds a chunk ready for it).

        A decoder that switches pathways (a ``mask_context``, e.g. a multilingual artifact) needs
        ``language``: without one the stream would run with whichever pathway was set last.
        """
        self._check_language(language)
        if stream_id is not None and not isinstance(stream_id, str):
            raise ValueError(f"stream_id must be a str, got {type(stream_id).__name__}")
        sid = stream_id if stream_id is not None else f"s{next(self._ids)}"
        if sid in self.streams:
            raise ValueError(f"stream {sid!r} is already open")
        frontend = StreamingLogMel(self.logmel)
        with self.mask_context(language), torch.inference_mode():
            start = torch.full((1, 1), self.model.blank, dtype=torch.int32, device=self.device)
            ones = torch.ones(1, dtype=torch.int32, device=self.device)
            pred_out, _, pred_state = self.model.rnnt.predict(start, ones, None)
            slot = self.pool.acquire(pred_out, pred_state)  # last: nothing after it can fail
        stream = Stream(id=sid, language=language, frontend=frontend, slot=slot,
                        frames=torch.zeros(0, self.logmel.config.n_mels))
        self.streams[sid] = stream
        return stream

    def _check_language(self, language: str | None) -> None:
        """``ValueError`` for a language :meth:`open` cannot serve on a pathway-switching decoder."""
        if self._mask_context is None:
            return
        known = f" (one of {', '.join(self.languages)})" if self.languages else ""
        if language is None:
            raise ValueError(f"this decoder has one pathway per language: open() needs a language{known}")
        if self.languages is not None and language not in self.languages:
            raise ValueError(f"this decoder has no pathway for {language!r}{known}")

    def _drop(self, s: Stream) -> None:
        """Forget a stream and give its state slot back."""
        if self.streams.pop(s.id, None) is not None:
            self.pool.release(s.slot)

    def encoder_state(self, stream: Stream | str) -> EncoderState:
        """A copy of an open stream's encoder state."""
        return self.pool.encoder_state(self._get(stream).slot)

    def _get(self, stream: Stream | str) -> Stream:
        if not isinstance(stream, (Stream, str)):
            raise ValueError(f"expected a Stream or a stream id, got {type(stream).__name__}")
        sid = stream if isinstance(stream, str) else stream.id
        if sid not in self.streams:
            raise ValueError(f"no open stream {sid!r}")
        return self.streams[sid]

    def _listed(self, streams: Iterable[Stream | str], method: str) -> list[Stream]:
        """The open streams named in ``streams``, each at most once.

        A stream listed twice would take two chunks from the same state in one batch (both rows
        read the state before either is stored): its tokens would be wrong, with no error.
        """
        if isinstance(streams, (Stream, str)):  # a str would iterate as characters
            raise ValueError(f"{method}() takes a list of streams, got a single one: pass [stream]")
        group = [self._get(s) for s in streams]
        seen: set[str] = set()
        for s in group:
            if s.id in seen:
                raise ValueError(f"{method}(): stream {s.id!r} is listed more than once")
            seen.add(s.id)
        return group

    def _add_frames(self, stream: Stream, frames: torch.Tensor) -> None:
        if frames.numel():
            if self.cmvn is not None:
                frames = self.cmvn.normalize(frames)
            stream.frames = torch.cat([stream.frames, frames])
            stream.received_frames += frames.size(0)

    def accept(self, stream: Stream | str, samples: torch.Tensor) -> None:
        """Buffer ``samples [n]`` (float mono at the feature config's sample rate, any ``n``) and
        compute the frames they complete.

        NaN or Inf samples raise ``ValueError`` (the stream stays open, without them): they would
        turn every frame they touch, and through the encoder state the rest of the stream, to NaN.
        So do integer and complex samples: cast, int16 PCM would be 32768 times too loud."""
        s = self._get(stream)
        if s.ended:
            raise ValueError(f"stream {s.id!r} has ended; it accepts no more audio")
        # The frontend computes features on the CPU; check the CPU copy so a CUDA input costs
        # one transfer, not an extra device sync for the check.
        samples = _pcm(samples, "samples").detach().to(device="cpu", dtype=torch.float32)
        if not bool(torch.isfinite(samples).all()):
            raise ValueError(f"stream {s.id!r}: non-finite samples (NaN or Inf)")
        t0 = time.perf_counter()
        with torch.inference_mode():
            self._add_frames(s, s.frontend.accept(samples))
        s.feature_s += time.perf_counter() - t0

    def end(self, stream: Stream | str) -> None:
        """Mark the end of a stream's audio: compute the last frames and trim to the stride
        (a stream too short for one frame ends with none)."""
        s = self._get(stream)
        if s.ended:
            return
        t0 = time.perf_counter()
        with torch.inference_mode():
            self._add_frames(s, s.frontend.flush())
        s.feature_s += time.perf_counter() - t0
        s.ended = True
        stride = self.geometry.stride
        s.total_frames = s.received_frames - s.received_frames % stride

    def ready(self, stream: Stream | str) -> bool:
        """Whether :meth:`step` has work for the stream now: a chunk to encode, or (ended) its
        final partial to emit."""
        s = self._get(stream)
        if s.ended:
            return not s.done or not s.final_sent
        return s.received_frames >= s.start + self.geometry.chunk

    def close(self, stream: Stream | str) -> None:
        """Drop a stream without a result."""
        self._drop(self._get(stream))

    # --- processing -------------------------------------------------------------------------

    def _next_chunk(self, s: Stream) -> tuple[torch.Tensor, int]:
        """The stream's next ``[segment + right_context, F]`` chunk and its real segment frames
        (the stream is not changed: :meth:`_step_group` advances it once the step succeeded).

        Past the (trimmed) end of an ended stream, frames are zeros, as in the full path's
        right-context padding; the segment part of a short last chunk is masked in the encoder.
        """
        geo = self.geometry
        limit = s.total_frames if s.ended else s.received_frames
        assert limit is not None
        avail = min(geo.chunk, limit - s.start)
        chunk = torch.zeros(geo.chunk, s.frames.size(1))
        chunk[:avail] = s.frames[:avail]
        return chunk, min(geo.segment, avail)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, streams: Iterable[Stream | str] | None = None) -> list[PartialResult]:
        """Encode and decode one chunk of every given (default: every open) stream that has one.

        Returns one :class:`PartialResult` per processed stream (also passed to ``on_partial``),
        and the closing partial of every given stream that has ended with its last chunk already
        encoded (see :attr:`PartialResult.final`). A stream listed twice raises ``ValueError``.

        Each batched call (one per language, and per ``max_batch`` streams in static modes) is
        all or nothing: if it raises, its streams are as before it; calls that completed before
        it stay done (their partials went to ``on_partial``).
        """
        pool = self.streams.values() if streams is None else self._listed(streams, "step")
        ready = [s for s in pool if self.ready(s)]
        # Ended with every chunk encoded: only the final partial is left to emit.
        results = [self._closing(s) for s in ready if s.done]
        batch = [s for s in ready if not s.done]
        groups: dict[str | None, list[Stream]] = {}
        if self._mask_context is None:
            if batch:
                groups[None] = batch
        else:
            for s in batch:
                groups.setdefault(s.language, []).append(s)
        # Fixed-size steps hold at most max_batch streams: larger groups take several calls.
        limit = self.max_batch if self._static is not None else len(batch)
        for language, group in groups.items():
            with self.mask_context(language):
                for i in range(0, len(group), limit):
                    results.extend(self._step_group(group[i : i + limit], language))
        return results

    def _closing(self, s: Stream) -> PartialResult:
        """The final partial of a stream whose last chunk was encoded before it ended (or that
        had none): its hypothesis, no new tokens."""
        fc = self.logmel.config
        s.final_sent = True
        partial = PartialResult(
            stream_id=s.id, chunk=s.chunks - 1, tokens=list(s.tokens), new_tokens=[],
            text=self._text_of(s, len(s.tokens)),
            latency_s=0.0, final=True, audio_end_s=min(s.start * fc.hop_length / fc.sample_rate, s.audio_s),
        )
        if self.on_partial is not None:
            self.on_partial(partial)
        return partial

    def _step_group(self, group: list[Stream], language: str | None) -> list[PartialResult]:
        """One batched chunk of every stream in ``group``, all or nothing.

        Everything is computed first (chunks read, not taken; encoder and decoder outputs kept
        aside), then stored: pool rows, the streams' frames and hypotheses. An exception before
        that changes nothing; one while storing (Ctrl-C) puts back the pool rows gathered for
        the step and each stream's O(1) snapshot (references, lengths, the replaced tail)."""
        geo = self.geometry
        t0 = time.perf_counter()
        with torch.inference_mode():
            taken = [self._next_chunk(s) for s in group]
            chunk = torch.stack([c for c, _ in taken]).to(self.device, self.dtype)  # [B, chunk, F]
            slots = [s.slot for s in group]
            # Real frames, frames processed and state slot of every stream: one host-to-device copy.
            past_host = [self.pool.past[i] for i in slots]
            valid, past, idx = torch.tensor([[v for _, v in taken], past_host, slots]).to(self.device).unbind(0)
            old_enc = self.pool.encoder_rows(idx)  # copies: the step's input, and its undo
            args = (chunk, valid, past, *old_enc)
            if self._static is None:
                enc, keys, vals, mems = encoder_step_tensors(self.model.rnnt, *args)
            else:
                # Views of the bucket's outputs: stored (copied) below, before its next run.
                enc, keys, vals, mems = self._static.run_stacked(*args)
            self._sync()
            t1 = time.perf_counter()
            frames = valid // geo.stride
            old_pred = None
            if self._beam is None:
                old_pred = self.pool.predictor_rows(idx)
                new_tokens, pred, state = self._greedy(enc, frames, *old_pred)
                keep = [len(s.tokens) for s in group]
                beams: list[Beam | None] = [s.hyps for s in group]
            else:
                beams, keep, new_tokens = self._beam_step(group, enc, frames)
            self._sync()
            # Every computation succeeded: store. Undo data first (O(1) per stream, plus the
            # tokens a beam revision replaces).
            undo = [(s.frames, s.start, s.hyps, k, s.tokens[k:], s.final_sent) for s, k in zip(group, keep, strict=True)]
            try:
                self.pool.store_encoder(slots, idx, keys, vals, mems)
                if old_pred is not None:
                    self.pool.store_predictor(idx, pred, state)
                for s, k, new, beam in zip(group, keep, new_tokens, beams, strict=True):
                    del s.tokens[k:]
                    s.tokens.extend(new)
                    s.hyps = beam
                    # The next segment starts after this one; its frames stay buffered (they
                    # are this chunk's look-ahead).
                    s.frames = s.frames[geo.segment :]
                    s.start += geo.segment
                    s.final_sent = s.done
            except BaseException:
                self.pool.store_encoder(slots, idx, *old_enc)  # advances past: set back below
                for slot, p in zip(slots, past_host, strict=True):
                    self.pool.past[slot] = p
                if old_pred is not None:
                    self.pool.store_predictor(idx, *old_pred)
                for s, (frames_, start, hyps, k, tail, final_sent) in zip(group, undo, strict=True):
                    del s.tokens[k:]
                    s.tokens.extend(tail)
                    s.frames, s.start, s.hyps, s.final_sent = frames_, start, hyps, final_sent
                raise
        t2 = time.perf_counter()
        # Committed. Statistics and partials (a failing on_partial leaves the step done).
        timing = StepTiming(self._steps, len(group), t1 - t0, t2 - t1, language)
        self._record(timing)
        results = []
        fc = self.logmel.config
        for s, new, (_, _, _, _, tail, _) in zip(group, new_tokens, undo, strict=True):
            s.step_s += timing.total_s
            s.step_share_s += timing.total_s / len(group)
            s.chunk_latencies_s.append(timing.total_s)
            results.append(PartialResult(
                stream_id=s.id, chunk=s.chunks, tokens=list(s.tokens), new_tokens=new,
                text=self._text_of(s, len(s.tokens) - len(new)), latency_s=timing.total_s, final=s.done,
                revised=len(tail),
                audio_end_s=min(s.start * fc.hop_length / fc.sample_rate, s.audio_s),
            ))
            s.chunks += 1
        if self.on_partial is not None:
            for partial in results:
                self.on_partial(partial)
        return results

    def _greedy(self, enc: torch.Tensor, frames: torch.Tensor, pred: torch.Tensor,
                state: PredictorState) -> tuple[list[list[int]], torch.Tensor, PredictorState]:
        """Batched greedy search over ``enc [B, T, D]`` (row ``b`` has ``frames[b]`` real frames),
        continuing from predictor output ``pred [B, 1, D']`` and LSTM ``state``; the rule of
        ``greedy_search``. Returns the new tokens per row and the final predictor (not stored)."""
        if self._static_greedy is None:
            return greedy_frames(self.model, enc, frames, pred, state, self.max_symbols_per_frame)
        return self._static_greedy.decode(enc, frames, pred, state)

    def _beam_step(self, group: list[Stream], enc: torch.Tensor,
                   frames: torch.Tensor) -> tuple[list[Beam | None], list[int], list[list[int]]]:
        """Continue each stream's beam over its real frames of ``enc [B, T, D]`` (the streams are
        not changed). Returns per stream the new beam, how many tokens of its current hypothesis
        the new best keeps (their common prefix) and the best's tokens after them.

        The first ``committed`` tokens of the old beam are in every hypothesis since, so only
        what follows them is compared: work per chunk that does not grow with the stream's age."""
        assert self._beam is not None
        beams: list[Beam | None] = []
        keep, new = [], []
        for b, (s, n) in enumerate(zip(group, frames.tolist(), strict=True)):
            beam = self._beam.extend(enc[b : b + 1, :n], s.hyps)
            start = 0 if s.hyps is None else s.hyps.committed  # s.tokens[:start] is settled
            best, old = self._beam.best_since(beam, start), s.tokens[start:]
            k = 0
            while k < min(len(best), len(old)) and best[k] == old[k]:
                k += 1
            beams.append(beam)
            keep.append(start + k)
            new.append(best[k:])
        return beams, keep, new

    def _text_of(self, s: Stream, kept: int) -> str | None:
        """``tokenizer.decode(s.tokens)`` (None without a tokenizer); ``kept``: how many leading
        tokens are unchanged since the last call (see :class:`HypothesisText`)."""
        if self.tokenizer is None:
            return None
        if s.text is None:
            s.text = HypothesisText(self.tokenizer, self._word_starts)
        return s.text(s.tokens, kept)

    def feed(self, stream: Stream | str, samples: torch.Tensor) -> list[PartialResult]:
        """Single-stream convenience: :meth:`accept` then process every chunk now ready."""
        s = self._get(stream)
        self.accept(s, samples)
        out: list[PartialResult] = []
        while self.ready(s):
            out.extend(self.step([s]))
        return out

    def finish(self, streams: Iterable[Stream | str]) -> list[StreamResult]:
        """End the given streams, encode their remaining chunks (batched) and close them; one
        result per stream, in the given order (a stream listed twice raises ``ValueError``)."""
        group = self._listed(streams, "finish")
        for s in group:
            self.end(s)
        while any(self.ready(s) for s in group):
            self.step(group)
        return [self._result(s) for s in group]

    def finalize(self, stream: Stream | str) -> StreamResult:
        """End one stream, flush its tail and return its final result (the stream is closed)."""
        return self.finish([stream])[0]

    def _result(self, s: Stream) -> StreamResult:
        self._drop(s)
        self.total_audio_s += s.audio_s
        self.total_feature_s += s.feature_s
        self.total_compute_s += s.feature_s + s.step_share_s
        processing = s.feature_s + s.step_s
        audio = s.audio_s
        return StreamResult(
            stream_id=s.id, language=s.language, tokens=list(s.tokens), text=self._text_of(s, len(s.tokens)),
            audio_s=audio, processing_s=processing, rtf=processing / audio if audio > 0 else math.nan,
            chunk_latencies_s=list(s.chunk_latencies_s), num_chunks=s.chunks,
        )

    # --- convenience and statistics ---------------------------------------------------------

    def transcribe(
        self, wave: torch.Tensor, piece_sizes: Iterable[int] | None = None, language: str | None = None
    ) -> StreamResult:
        """Stream ``wave [T]`` (or ``[1, T]``) through a fresh stream in pieces of ``piece_sizes``
        samples (cycled positive integers; default 100 ms) and return the final result."""
        wave = _pcm(wave, "wave")  # before the stream opens
        if piece_sizes is None:
            piece_sizes = [max(1, self.logmel.config.sample_rate // 10)]
        pieces = iter_pieces(wave, piece_sizes)  # validates the sizes before the stream opens
        s = self.open(language=language)
        for piece in pieces:
            self.feed(s, piece)
        return self.finalize(s)

    def run_concurrent(
        self,
        waves: Sequence[torch.Tensor],
        piece_samples: int = 1600,
        start_ticks: Sequence[int] | None = None,
        languages: Sequence[str | None] | None = None,
    ) -> list[StreamResult]:
        """Simulate ``S`` live streams: on every tick each started stream receives its next
        ``piece_samples`` samples, then one :meth:`step` (repeated while chunks are ready) runs
        all streams with a chunk ready in one batch. Stream ``i`` joins at ``start_ticks[i]`` and
        leaves (is finished, batched with others ending on that tick) after its last piece.
        ``waves``: ``S`` mono tensors ``[T_i]`` (or ``[1, T_i]``); ``piece_samples`` an integer
        >= 1 (1600 = 100 ms at 16 kHz); ``start_ticks`` integers >= 0. Returns the results in input order."""
        piece_samples = _positive_int("piece_samples", piece_samples)  # 0 would never end a stream
        waves = [_pcm(w, f"waves[{i}]") for i, w in enumerate(waves)]
        n = len(waves)
        starts = list(start_ticks) if start_ticks is not None else [0] * n
        langs = list(languages) if languages is not None else [None] * n
        if len(starts) != n or len(langs) != n:
            raise ValueError("start_ticks and languages need one entry per wave")
        starts = [_positive_int(f"start_ticks[{i}]", t, minimum=0) for i, t in enumerate(starts)]
        for lang in langs:  # streams open lazily: refuse before the first one runs
            self._check_language(lang)
        opened: dict[int, Stream] = {}
        results: dict[int, StreamResult] = {}
        pos = [0] * n
        try:
            for tick in itertools.count():
                if len(results) == n:
                    break
                ending = []
                for i in range(n):
                    if i in results or tick < starts[i]:
                        continue
                    if i not in opened:
                        opened[i] = self.open(language=langs[i])
                    wave = waves[i]
                    self.accept(opened[i], wave[pos[i] : pos[i] + piece_samples])
                    pos[i] += piece_samples
                    if pos[i] >= wave.numel():
                        ending.append(i)
                live = [s for i, s in opened.items() if i not in results]
                while self.step(live):
                    pass
                for i, res in zip(ending, self.finish([opened[i] for i in ending]), strict=True):
                    results[i] = res
        except BaseException:
            for s in opened.values():  # a failed run leaves no stream holding a state slot
                self._drop(s)
            raise
        return [results[i] for i in range(n)]

    def reset_stats(self) -> None:
        """Start the statistics afresh (e.g. after a warm-up): step timings and every total.
        Open streams keep their own counters; their audio counts when they finish."""
        self.step_timings: deque[StepTiming] = deque(maxlen=STEP_WINDOW)  # bounded, latest steps
        self.total_steps = 0  # running totals, over every step since the last reset
        self.total_batch = 0
        self.total_audio_s = 0.0  # finished streams: their audio,
        self.total_feature_s = 0.0  # their front-end time,
        self.total_compute_s = 0.0  # and that plus their share of every step

    def _record(self, timing: StepTiming) -> None:
        self._steps += 1
        self.total_steps += 1
        self.total_batch += timing.batch_size
        self.step_timings.append(timing)

    def latency_stats(self) -> dict[str, float]:
        """Step latency and throughput since the decoder was made (or :meth:`reset_stats`).

        - ``steps``: batched chunk steps run; ``mean_batch``: streams per step, over all of them.
        - ``p50_s``, ``p99_s``, ``encoder_p50_s``, ``decoder_p50_s``: percentiles of the step
          time (encoder + decoder) over the latest ``window_steps`` steps (at most
          ``STEP_WINDOW``). With few steps a p99 is close to the maximum.
        - ``audio_s``: audio of the finished streams, summed over streams.
        - ``processing_s``: their compute: each one's front-end time plus its share of every
          step it was in (the step's time over its streams), so a step shared by S streams
          counts once. Open and closed (:meth:`close`) streams count in neither.
        - ``compute_s_per_audio_s`` = ``processing_s / audio_s``: compute seconds per second of
          audio, a throughput figure. With S streams per step it is about 1/S of a stream's
          own :attr:`StreamResult.rtf`, the latency each stream saw. ``rtf`` is the same value
          (the CLI's "overall RTF"), kept for its readers.
        """
        timings = self.step_timings
        totals = [t.total_s for t in timings]
        audio = self.total_audio_s
        throughput = self.total_compute_s / audio if audio > 0 else math.nan
        return {
            "steps": float(self.total_steps),
            "window_steps": float(len(totals)),
            "mean_batch": self.total_batch / self.total_steps if self.total_steps else math.nan,
            "p50_s": percentile(totals, 50),
            "p99_s": percentile(totals, 99),
            "encoder_p50_s": percentile([t.encoder_s for t in timings], 50),
            "decoder_p50_s": percentile([t.decoder_s for t in timings], 50),
            "audio_s": audio,
            "processing_s": self.total_compute_s,
            "compute_s_per_audio_s": throughput,
            "rtf": throughput,
        }


def iter_pieces(wave: torch.Tensor, sizes: Iterable[int]) -> Iterator[torch.Tensor]:
    """Split ``wave [T]`` into consecutive pieces of the given sizes (cycled) -> ``[n_i]`` each.

    ``sizes``: at least one integer, all >= 1 (checked when called, not at the first piece)."""
    sizes = list(sizes)
    if not sizes:
        raise ValueError("piece sizes must be positive, got []")
    sizes = [_positive_int("piece sizes", n) for n in sizes]
    return _pieces(wave, sizes)


def _pieces(wave: torch.Tensor, sizes: list[int]) -> Iterator[torch.Tensor]:
    """The generator behind :func:`iter_pieces` (its sizes already checked)."""
    pos = 0
    for n in itertools.cycle(sizes):
        if pos >= wave.numel():
            return
        yield wave[pos : pos + n]
        pos += n


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an ``int >= minimum``; else ``ValueError`` naming ``name`` (bools and floats
    too: a float count would fail later, in slicing)."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if n < minimum:
        raise ValueError(f"{name} must be {what}, got {n}")
    return n


def _pcm(wave: torch.Tensor, name: str) -> torch.Tensor:
    """:func:`_mono`, refusing samples that are not real floats (int16 PCM cast to float is
    32768 times too loud and decodes to garbage; complex would lose its imaginary part)."""
    wave = _mono(wave, name)
    if not wave.is_floating_point():  # complex dtypes are not floating point either
        raise ValueError(f"{name}: expected float PCM samples in [-1, 1], got {wave.dtype}; convert first "
                         f"(e.g. int16 PCM / 32768: pcm.float() / 32768)")
    return wave


def _mono(wave: torch.Tensor, name: str) -> torch.Tensor:
    """``wave [T]`` or ``[1, T]`` (any leading 1s) -> ``[T]``; a multi-channel tensor raises
    instead of being flattened into one channel of interleaved samples."""
    if not isinstance(wave, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(wave).__name__}")
    if wave.dim() > 1 and wave.numel() != wave.shape[-1]:
        raise ValueError(f"{name}: expected mono samples [T], got shape {tuple(wave.shape)}")
    return wave.reshape(-1)
