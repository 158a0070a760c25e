"""Decoding: batched greedy search and torchaudio's ``RNNTBeamSearch``, both over the frames of
:meth:`EmformerRNNT.encode`, and the beam search continued chunk by chunk for streaming."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchaudio.models import RNNTBeamSearch

from .rnnt import EmformerRNNT


def _select_state(mask: torch.Tensor, new: list[list[torch.Tensor]], old: list[list[torch.Tensor]]):
    return [[torch.where(mask[:, None], n, o) for n, o in zip(ln, lo, strict=True)] for ln, lo in zip(new, old, strict=True)]


PredictorState = list[list[torch.Tensor]]  # per LSTM layer: [h [B, H], c [B, H]]


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
    rnnt = model.rnnt
    ones = torch.ones(enc.size(0), dtype=torch.int32, device=enc.device)
    frame = active = best = emit = enc  # set by the callbacks below before any use

    def begin(t: int) -> None:
        nonlocal frame, active
        frame, active = enc[:, t : t + 1], t < frames

    def score() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal best, emit
        joint, _, _ = rnnt.join(frame, ones, pred, ones)
        best = joint[:, 0, 0].argmax(-1)
        emit = active & (best != model.blank)
        return best, emit

    def advance() -> None:
        nonlocal pred, state, active
        new_pred, _, new_state = rnnt.predict(best[:, None].to(torch.int32), ones, state)
        pred = torch.where(emit[:, None, None], new_pred, pred)
        state = _select_state(emit, new_state, state)
        active = emit

    hyps = greedy_loop(frames, begin, score, advance, max_symbols_per_frame)
    return hyps, pred, state


def greedy_loop(
    frames: torch.Tensor,
    begin: Callable[[int], None],
    score: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    advance: Callable[[], None],
    max_symbols_per_frame: int,
) -> list[list[int]]:
    """The host side of the greedy rule, shared by :func:`greedy_frames` and the fixed-size
    streaming decoder (which runs the same steps as CUDA graphs).

    ``frames [B]``: real frames per row. ``begin(t)`` selects frame ``t`` (rows with ``t <
    frames`` active); ``score()`` returns each row's best token ``[B]`` and whether an active row
    emits it (not blank) ``[B]``; ``advance()`` feeds the emitted tokens to the predictor (rows
    that emit stay active for the next symbol of the frame). One device-to-host transfer per
    ``score`` brings the tokens and the emit flags together: on a GPU each sync stalls the launch
    queue. Returns the new tokens per row.
    """
    hyps: list[list[int]] = [[] for _ in range(frames.numel())]
    for t in range(max(frames.tolist(), default=0)):
        begin(t)
        for _ in range(max_symbols_per_frame):
            best, emit = score()
            best_host, emit_host = torch.stack([best, emit.to(best.dtype)]).tolist()
            if not any(emit_host):
                break
            advance()
            for row, emitted in enumerate(emit_host):
                if emitted:
                    hyps[row].append(best_host[row])
    return hyps


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


class BeamContinuation:
    """torchaudio's RNN-T beam search, fed encoder frames piece by piece.

    ``extend(enc [1, T, D], hyps)`` continues the beam ``hyps`` (None: a fresh utterance) over
    ``T`` more frames. Searching frames in pieces gives exactly the search over all of them at
    once: the beam after a frame depends only on the beam before it and that frame, which is how
    torchaudio's ``infer`` streams. ``best(hyps)`` is :func:`beam_search`'s answer (blank removed).
    """

    def __init__(self, model: EmformerRNNT, beam_width: int = 4, step_max_tokens: int = 100) -> None:
        if beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {beam_width}")
        self.model = model
        self.beam_width = beam_width
        self._search = RNNTBeamSearch(_EncodedFrames(model.rnnt), model.blank, step_max_tokens=step_max_tokens)

    def extend(self, enc: torch.Tensor, hyps: Hypotheses | None) -> Hypotheses:
        """``enc [1, T, D]`` (``T`` may be 0): the beam after these frames, best first."""
        if enc.dim() != 3 or enc.size(0) != 1:
            raise ValueError(f"expected encoder frames [1, T, D], got {tuple(enc.shape)}")
        length = torch.tensor([enc.size(1)], device=enc.device)
        out, _ = self._search.infer(enc, length, self.beam_width, state=None, hypothesis=hyps)
        return out

    def best(self, hyps: Hypotheses | None) -> list[int]:
        if not hyps:
            return []
        return [int(t) for t in hyps[0][0] if t != self.model.blank]


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
