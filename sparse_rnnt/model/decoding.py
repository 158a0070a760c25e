"""Decoding: batched greedy search and torchaudio's ``RNNTBeamSearch``."""

from __future__ import annotations

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
    blank = model.blank
    batch = enc.size(0)
    ones = torch.ones(batch, dtype=torch.int32, device=enc.device)
    hyps: list[list[int]] = [[] for _ in range(batch)]
    for t in range(int(frames.max()) if batch else 0):
        active = t < frames
        if not bool(active.any()):
            break
        frame = enc[:, t : t + 1]
        for _ in range(max_symbols_per_frame):
            joint, _, _ = rnnt.join(frame, ones, pred, ones)
            best = joint[:, 0, 0].argmax(-1)
            emit = active & (best != blank)
            if not bool(emit.any()):
                break
            new_pred, _, new_state = rnnt.predict(best[:, None].to(torch.int32), ones, state)
            pred = torch.where(emit[:, None, None], new_pred, pred)
            state = _select_state(emit, new_state, state)
            for b in emit.nonzero().flatten().tolist():
                hyps[b].append(int(best[b]))
            active = emit
    return hyps, pred, state


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
    """Beam search with torchaudio's ``RNNTBeamSearch``, one utterance at a time.

    ``features [B, T, F]``, ``lengths [B]`` -> the best hypothesis's token ids per utterance.
    """
    searcher = RNNTBeamSearch(model.rnnt, model.blank, step_max_tokens=step_max_tokens)
    out: list[list[int]] = []
    for b in range(features.size(0)):
        n = int(lengths[b])
        x = model.pad_right_context(features[b : b + 1, :n])
        hyps = searcher(x[0], torch.tensor([n], device=features.device), beam_width)
        tokens = hyps[0][0]
        out.append([int(t) for t in tokens if t != model.blank])
    return out


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
