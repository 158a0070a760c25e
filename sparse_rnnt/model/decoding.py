"""Decoding: batched greedy search and torchaudio's ``RNNTBeamSearch``, both over the frames of
:meth:`EmformerRNNT.encode`, and the beam search continued chunk by chunk for streaming."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchaudio.models import RNNTBeamSearch

from ..errors import UserError
from .rnnt import EmformerRNNT


def _select_state(mask: torch.Tensor, new: list[list[torch.Tensor]], old: list[list[torch.Tensor]]):
    return [[torch.where(mask[:, None], n, o) for n, o in zip(ln, lo, strict=True)] for ln, lo in zip(new, old, strict=True)]


PredictorState = list[list[torch.Tensor]]  # per LSTM layer: [h [B, H], c [B, H]]


def _score(model: EmformerRNNT, frame: torch.Tensor, pred: torch.Tensor, active: torch.Tensor,
           ones: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's best token ``[B]`` at ``frame [B, 1, D]``, and whether an active row emits it."""
    joint, _, _ = model.rnnt.join(frame, ones, pred, ones)
    best = joint[:, 0, 0].argmax(-1)
    return best, active & (best != model.blank)


def _advance(model: EmformerRNNT, best: torch.Tensor, emit: torch.Tensor, pred: torch.Tensor,
             state: PredictorState, ones: torch.Tensor) -> tuple[torch.Tensor, PredictorState]:
    """The predictor after the emitted tokens; rows that did not emit keep theirs."""
    new_pred, _, new_state = model.rnnt.predict(best[:, None].to(torch.int32), ones, state)
    return torch.where(emit[:, None, None], new_pred, pred), _select_state(emit, new_state, state)


def greedy_frames(
    model: EmformerRNNT,
    enc: torch.Tensor,
    frames: torch.Tensor,
    pred: torch.Tensor,
    state: PredictorState,
    max_symbols_per_frame: int = 4,
) -> tuple[list[list[int]], torch.Tensor, PredictorState]:
    """The greedy RNN-T rule over encoder frames, from a given predictor state.

    ``enc [B, T, D]`` with ``frames [B]`` real frames per row, ``pred [B, 1, D]`` the predictor
    output after each row's last token and ``state`` its LSTM state. At each frame every row emits
    tokens until the joiner's argmax is blank (or ``max_symbols_per_frame`` is reached); the
    predictor advances only for rows that emitted. Returns the new tokens per row and the final
    ``pred`` and ``state`` (so a stream can continue from them).
    """
    ones = torch.ones(enc.size(0), dtype=torch.int32, device=enc.device)
    hyps: list[list[int]] = [[] for _ in range(enc.size(0))]
    for t in range(max(frames.tolist(), default=0)):
        frame, active = enc[:, t : t + 1], t < frames
        for _ in range(max_symbols_per_frame):
            best, emit = _score(model, frame, pred, active, ones)
            # One device-to-host transfer per joiner call (on a GPU each one stalls the queue).
            best_host, emit_host = torch.stack([best, emit.to(best.dtype)]).tolist()
            if not any(emit_host):
                break
            pred, state = _advance(model, best, emit, pred, state, ones)
            active = emit
            for row, emitted in enumerate(emit_host):
                if emitted:
                    hyps[row].append(best_host[row])
    return hyps, pred, state


def greedy_frames_on_device(
    model: EmformerRNNT,
    enc: torch.Tensor,
    frames: torch.Tensor,
    pred: torch.Tensor,
    state: PredictorState,
    max_symbols_per_frame: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, PredictorState]:
    """:func:`greedy_frames`'s rule with no host synchronization, so that a CUDA graph can capture
    it and the host never waits on the device.

    Every frame runs ``max_symbols_per_frame`` joiner and predictor steps whatever the rows emit:
    a row that emitted blank, or is past its ``frames``, is masked out (its token is -1 and its
    predictor state kept), so the result equals the host loop's, which stops as soon as no row
    emits. Fixed work instead of early exits: worth it where each step costs kernel launches and
    a host round trip (GPU), not where it costs arithmetic (CPU).

    ``enc [B, T, D]``, ``frames [B]``, ``pred [B, 1, D]``, ``state`` as in :func:`greedy_frames`.
    Returns ``tokens [B, T, max_symbols_per_frame]`` (int64, -1 where nothing was emitted; see
    :func:`token_lists`) and the final ``pred`` and ``state``.
    """
    batch, n_frames = enc.shape[:2]
    ones = torch.ones(batch, dtype=torch.int32, device=enc.device)
    tokens = torch.full((batch, n_frames, max_symbols_per_frame), -1, dtype=torch.int64, device=enc.device)
    for t in range(n_frames):
        frame, active = enc[:, t : t + 1], t < frames
        for sym in range(max_symbols_per_frame):
            best, emit = _score(model, frame, pred, active, ones)
            tokens[:, t, sym] = torch.where(emit, best, -1)
            pred, state = _advance(model, best, emit, pred, state, ones)
            active = emit
    return tokens, pred, state


def token_lists(tokens: torch.Tensor) -> list[list[int]]:
    """``[B, ...]`` token ids with -1 for none -> each row's tokens in order (one device-to-host
    transfer)."""
    return [[t for t in row if t >= 0] for row in tokens.reshape(tokens.size(0), -1).tolist()]


@torch.no_grad()
def greedy_search(
    model: EmformerRNNT,
    features: torch.Tensor,
    lengths: torch.Tensor,
    max_symbols_per_frame: int = 4,
) -> list[list[int]]:
    """Batched greedy RNN-T decoding. ``features [B, T, F]``, ``lengths [B]`` -> token ids per
    utterance (the rule of :func:`greedy_frames`, from the blank start symbol)."""
    enc, enc_lengths = model.encode(features, lengths)
    batch = enc.size(0)
    ones = torch.ones(batch, dtype=torch.int32, device=enc.device)
    start = torch.full((batch, 1), model.blank, dtype=torch.int32, device=enc.device)
    pred, _, state = model.rnnt.predict(start, ones, None)
    hyps, _, _ = greedy_frames(model, enc, enc_lengths, pred, state, max_symbols_per_frame)
    return hyps


@torch.no_grad()
def beam_search(
    model: EmformerRNNT,
    features: torch.Tensor,
    lengths: torch.Tensor,
    beam_width: int = 4,
    step_max_tokens: int = 100,
) -> list[list[int]]:
    """torchaudio's RNN-T beam search over the full-utterance encoder output (:meth:`encode`,
    the same frames as :func:`greedy_search`), one utterance at a time.

    ``features [B, T, F]``, ``lengths [B]`` -> the best hypothesis's token ids per utterance.
    """
    search = BeamContinuation(model, beam_width, step_max_tokens)
    enc, enc_lengths = model.encode(features, lengths)
    return [search.best(search.extend(enc[b : b + 1, : int(n)], None)) for b, n in enumerate(enc_lengths.tolist())]


class _EncodedFrames(torch.nn.Module):
    """Stand-in for torchaudio's ``RNNT`` whose transcriber is the identity: its
    ``transcribe_streaming`` hands back encoder frames that were already computed, so
    ``RNNTBeamSearch.infer`` (torchaudio's public streaming entry) continues a beam over them.
    The predictor and joiner are the real model's."""

    def __init__(self, rnnt: torch.nn.Module) -> None:
        super().__init__()
        self.rnnt = rnnt

    def transcribe_streaming(self, enc: torch.Tensor, lengths: torch.Tensor, state: object) -> tuple:
        return enc, lengths, state

    def predict(self, *args: torch.Tensor | object) -> tuple:
        return self.rnnt.predict(*args)

    def join(self, *args: torch.Tensor) -> tuple:
        return self.rnnt.join(*args)


Hypotheses = list  # torchaudio ``Hypothesis`` tuples: (tokens with a leading blank, pred_out, state, score)


@dataclass(frozen=True)
class _Prefix:
    """A link of a beam's shared prefix: the non-blank ``tokens`` moved out of the hypotheses by
    one :meth:`BeamContinuation.extend`, after ``start`` non-blank tokens moved before them
    (``parent``). Immutable: a beam extended from shares its chain, nothing is copied."""

    tokens: tuple[int, ...]
    start: int
    parent: _Prefix | None

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass(frozen=True)
class Beam:
    """A beam between :meth:`BeamContinuation.extend` calls.

    The tokens that every hypothesis shares are moved out of them: ``hyps`` are torchaudio
    hypotheses whose token lists hold only what follows (each keeps at least its last token),
    ``prefix_len`` counts the moved tokens (the leading blank included) and ``prefix`` holds the
    moved non-blank ones. torchaudio's per-hypothesis work (its key ``str(tokens)``, compared to
    merge hypotheses) then grows with the tails, not with the stream's age.
    """

    hyps: Hypotheses
    prefix_len: int = 0
    prefix: _Prefix | None = None

    @property
    def committed(self) -> int:
        """Non-blank tokens in the prefix: the first ``committed`` tokens of every hypothesis."""
        return 0 if self.prefix is None else self.prefix.end


class BeamContinuation:
    """torchaudio's RNN-T beam search, fed encoder frames piece by piece.

    ``extend(enc [1, T, D], beam)`` continues ``beam`` (None: a fresh utterance) over ``T`` more
    frames. Searching frames in pieces gives exactly the search over all of them at once: the
    beam after a frame depends only on the beam before it and that frame, which is how
    torchaudio's ``infer`` streams. ``best(beam)`` is :func:`beam_search`'s answer (blank removed).

    Between calls the prefix all hypotheses share is kept apart (:class:`Beam`), and the search
    ranks hypotheses with torchaudio's default key, ``score / (len(tokens) + 1)``, on their full
    length (prefix included): the same floats, so the same beam as one search over every frame.
    """

    def __init__(self, model: EmformerRNNT, beam_width: int = 4, step_max_tokens: int = 100) -> None:
        if beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {beam_width}")
        if beam_width > model.num_symbols - 1:  # torchaudio's first step takes top-k of the tokens
            raise UserError(f"beam width {beam_width} exceeds the model's {model.num_symbols - 1} non-blank "
                            f"symbols, the most torchaudio's beam search can keep")
        self.model = model
        self.beam_width = beam_width
        self._offset = 0  # prefix_len of the beam being extended (read by _sort_key)
        self._search = RNNTBeamSearch(_EncodedFrames(model.rnnt), model.blank, hypo_sort_key=self._sort_key,
                                      step_max_tokens=step_max_tokens)

    def _sort_key(self, hypo: tuple) -> float:
        """torchaudio's default ranking on the hypothesis's full length (moved prefix included)."""
        return hypo[3] / (self._offset + len(hypo[0]) + 1)

    def extend(self, enc: torch.Tensor, beam: Beam | None) -> Beam:
        """``enc [1, T, D]`` (``T`` may be 0): the beam after these frames, best first. ``beam``
        is not changed (a failed call can be retried from it)."""
        if enc.dim() != 3 or enc.size(0) != 1:
            raise ValueError(f"expected encoder frames [1, T, D], got {tuple(enc.shape)}")
        length = torch.tensor([enc.size(1)], device=enc.device)
        self._offset = 0 if beam is None else beam.prefix_len
        out, _ = self._search.infer(enc, length, self.beam_width, state=None,
                                    hypothesis=None if beam is None else beam.hyps)
        return self._shared_out(out, beam)

    def _shared_out(self, hyps: Hypotheses, beam: Beam | None) -> Beam:
        """``hyps`` with the tokens they all share moved to the prefix (each keeps its last)."""
        tokens = [h[0] for h in hyps]
        first, limit = tokens[0], min(len(t) for t in tokens) - 1
        n = 0
        while n < limit and all(t[n] == first[n] for t in tokens[1:]):
            n += 1
        prefix_len, prefix = (0, None) if beam is None else (beam.prefix_len, beam.prefix)
        if n == 0:
            return Beam(hyps, prefix_len, prefix)
        moved = tuple(t for t in first[:n] if t != self.model.blank)
        if moved:
            prefix = _Prefix(moved, 0 if prefix is None else prefix.end, prefix)
        return Beam([(t[n:], *h[1:]) for t, h in zip(tokens, hyps, strict=True)], prefix_len + n, prefix)

    def best_since(self, beam: Beam | None, start: int) -> list[int]:
        """The best hypothesis's non-blank tokens from index ``start`` on (``start`` at most
        the ``committed`` count of a beam this one was extended from): the work is the tokens
        returned, not the hypothesis's length."""
        if beam is None:
            return []
        if start > beam.committed:
            raise ValueError(f"start {start} is past this beam's shared prefix ({beam.committed} tokens)")
        parts = [[int(t) for t in beam.hyps[0][0] if t != self.model.blank]]
        node = beam.prefix
        while node is not None and node.end > start:
            parts.append(list(node.tokens[max(0, start - node.start) :]))
            node = node.parent
        return [t for part in reversed(parts) for t in part]

    def best(self, beam: Beam | None) -> list[int]:
        """The best hypothesis's non-blank tokens (all of them)."""
        return self.best_since(beam, 0)


def decode(
    model: EmformerRNNT,
    features: torch.Tensor,
    lengths: torch.Tensor,
    method: str = "greedy",
    beam_width: int = 4,
) -> list[list[int]]:
    if method == "greedy":
        return greedy_search(model, features, lengths)
    if method == "beam":
        return beam_search(model, features, lengths, beam_width=beam_width)
    raise ValueError(f"unknown decoding method {method!r} (greedy or beam)")
