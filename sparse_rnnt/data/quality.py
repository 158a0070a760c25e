"""Screening training utterances for bad data before a run starts.

:func:`check_utterance` returns the reason an utterance must not be trained on (or None):

- ``too_long``: over ``max_duration`` seconds (manifest duration, or the header's if larger);
- ``empty_text`` / ``unencodable``: blank transcript / characters the tokenizer maps to ``<unk>``;
- ``unreadable_audio``: missing, corrupt or truncated file (libsndfile cannot open or decode it),
  or not a regular file (a FIFO, a device);
- ``wrong_sample_rate``: not the feature config's rate;
- ``empty_audio``: a valid header with no samples, or fewer than one feature frame needs
  (``n_fft // 2 + 1``: the centred STFT's reflect padding);
- ``too_short``: fewer than ``min_samples``, the model's minimum for one encoder frame (shorter
  audio has none: its RNN-T loss is meaningless, and alone in a batch it cannot be encoded);
- ``non_finite_audio``: NaN or Inf samples, or samples beyond ``MAX_ABS_SAMPLE`` (float WAV),
  which would make the features NaN or Inf;
- ``clipped``: more than ``clip_fraction`` of the samples at full scale (``|x| >= clip_level``).

:func:`screen` checks a whole list (threads: libsndfile releases the GIL while decoding), keeps
the input order, and raises :class:`BadDataError` when the share of bad utterances exceeds
``max_bad_fraction``: a corpus that bad is more likely a wrong path or format than noise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from .audio import MAX_ABS_SAMPLE, require_regular_file, soundfile_module
from .features import FeatureConfig
from .manifest import Utterance
from .tokenizer import Tokenizer

TOO_LONG = "too_long"
EMPTY_TEXT = "empty_text"
UNENCODABLE = "unencodable"
UNREADABLE_AUDIO = "unreadable_audio"
WRONG_SAMPLE_RATE = "wrong_sample_rate"
EMPTY_AUDIO = "empty_audio"
NON_FINITE_AUDIO = "non_finite_audio"
CLIPPED = "clipped"
TOO_SHORT = "too_short"
REASONS: tuple[str, ...] = (TOO_LONG, EMPTY_TEXT, UNENCODABLE, UNREADABLE_AUDIO, WRONG_SAMPLE_RATE, EMPTY_AUDIO,
                            NON_FINITE_AUDIO, CLIPPED, TOO_SHORT)

_PROGRESS_MIN = 1000  # a bar only for lists long enough to take a while
_CHUNK = 4096  # futures in flight: bounds memory on millions of files
_BLOCK = 1 << 18  # frames decoded at a time when counting clipped samples


class BadDataError(UserError):
    """Too large a share of the training data is unusable; the message gives counts per reason."""

    def __init__(self, message: str, skipped: dict[str, list[str]], total: int) -> None:
        super().__init__(message)
        self.skipped = skipped
        self.total = total


@dataclass(frozen=True)
class QualityLimits:
    """What counts as bad data.

    ``clip_level`` is below 1.0 because 16-bit PCM tops out at 32767/32768; ``check_audio=False``
    skips every audio check (manifest-only screening); ``decode=False`` reads headers only (no
    clipping, non-finite sample or corruption-past-the-header detection, much faster).
    """

    max_duration: float = 30.0  # seconds
    clip_level: float = 0.999
    clip_fraction: float = 0.01  # share of samples at full scale above which audio is "clipped"
    max_bad_fraction: float = 0.05  # screen() raises BadDataError above this share
    check_audio: bool = True
    decode: bool = True
    min_samples: int = 0  # fewer samples than this: too_short (the trainer sets the model's minimum)

    def validate(self) -> None:
        if not self.max_duration > 0:
            raise UserError(f"max_duration must be positive, got {self.max_duration}")
        if not 0 < self.clip_level <= 1:
            raise UserError(f"clip_level must be in (0, 1], got {self.clip_level}")
        if not 0 <= self.clip_fraction <= 1:
            raise UserError(f"clip_fraction must be in [0, 1], got {self.clip_fraction}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise UserError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


def _clipped_fraction(f: Any, level: float) -> tuple[float, bool]:
    """Share of samples (all channels) with ``|x| >= level``, decoded block by block, and
    whether any sample is NaN, Inf or beyond ``MAX_ABS_SAMPLE``."""
    hits = total = 0
    finite = True
    for block in f.blocks(blocksize=_BLOCK, dtype="float32", always_2d=True):
        mag = np.abs(block)
        ok = mag <= MAX_ABS_SAMPLE  # NaN compares False
        finite = finite and bool(ok.all())
        hits += int(np.count_nonzero(ok & (mag >= level)))
        total += block.size
    return (hits / total if total else 0.0), not finite


def _check_audio(path: str, feature_config: FeatureConfig, limits: QualityLimits) -> str | None:
    sf = soundfile_module()  # outside the try: a missing package is not an unreadable file
    try:
        require_regular_file(path)  # a FIFO would block the screening forever
        with sf.SoundFile(path) as f:
            if int(f.samplerate) != int(feature_config.sample_rate):
                return WRONG_SAMPLE_RATE
            if f.frames < feature_config.n_fft // 2 + 1:  # LogMel cannot frame it
                return EMPTY_AUDIO
            if f.frames < limits.min_samples:
                return TOO_SHORT
            if f.frames / f.samplerate > limits.max_duration:
                return TOO_LONG
            if not limits.decode:
                return None
            frac, non_finite = _clipped_fraction(f, limits.clip_level)
    except Exception:  # libsndfile raises several types for missing, corrupt or truncated files
        return UNREADABLE_AUDIO
    if non_finite:
        return NON_FINITE_AUDIO
    return CLIPPED if frac > limits.clip_fraction else None


def check_utterance(
    u: Utterance, tokenizer: Tokenizer | None, feature_config: FeatureConfig, limits: QualityLimits
) -> str | None:
    """The reason (one of :data:`REASONS`) ``u`` must be skipped, or None if it is usable.

    Cheap manifest checks come first (duration, text), then the audio file: the header, then
    (``limits.decode``) every sample, which also catches files corrupt past their header.
    ``tokenizer=None`` skips the encodability check.
    """
    if u.duration > limits.max_duration:
        return TOO_LONG
    if not u.text.strip():
        return EMPTY_TEXT
    if tokenizer is not None and not tokenizer.encodable(u.text):
        return UNENCODABLE
    if not limits.check_audio:
        return None
    return _check_audio(u.audio, feature_config, limits)


def bad_share_error(skipped: dict[str, list[str]], total: int, max_bad_fraction: float) -> BadDataError | None:
    """The :class:`BadDataError` to raise when more than ``max_bad_fraction`` of ``total``
    utterances were skipped (None otherwise); the message gives counts and first keys per reason."""
    n_bad = sum(len(v) for v in skipped.values())
    if total <= 0 or n_bad / total <= max_bad_fraction:
        return None
    parts = [f"{reason} {len(keys)} (e.g. {', '.join(keys[:3])})" for reason, keys in skipped.items() if keys]
    message = (
        f"{n_bad} of {total} training utterances ({100 * n_bad / total:.1f}%) are unusable, more than the "
        f"allowed {100 * max_bad_fraction:g}%: {'; '.join(parts)}. Check the corpus path and format, "
        "or raise the limit"
    )
    return BadDataError(message, skipped, total)


def screen(
    utterances: Sequence[Utterance],
    tokenizer: Tokenizer | None,
    feature_config: FeatureConfig,
    limits: QualityLimits | None = None,
    *,
    workers: int = 0,
    progress: bool = True,
) -> tuple[list[Utterance], dict[str, list[str]]]:
    """Check every utterance; returns ``(kept in input order, {reason: [keys]})`` with every
    reason of :data:`REASONS` present (possibly empty).

    ``workers`` threads read the audio (0: ``min(8, cpu_count)``); a progress bar is shown for
    lists of 1000 or more when ``progress``. Raises :class:`BadDataError` when the skipped share
    exceeds ``limits.max_bad_fraction``.
    """
    limits = limits if limits is not None else QualityLimits()
    limits.validate()
    if workers < 0:
        raise UserError(f"workers must be >= 0, got {workers}")
    items = list(utterances)
    n_workers = workers or min(8, os.cpu_count() or 1)
    bar = tqdm(total=len(items), desc="checking data", unit="utt",
               disable=not progress or len(items) < _PROGRESS_MIN)

    def one(u: Utterance) -> str | None:
        return check_utterance(u, tokenizer, feature_config, limits)

    reasons: list[str | None] = []
    if n_workers <= 1 or len(items) <= 1 or not limits.check_audio:
        for u in items:
            reasons.append(one(u))
            bar.update(1)
    else:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            it = iter(items)
            while chunk := list(islice(it, _CHUNK)):
                for r in pool.map(one, chunk):
                    reasons.append(r)
                    bar.update(1)
    bar.close()
    kept: list[Utterance] = []
    skipped: dict[str, list[str]] = {r: [] for r in REASONS}
    for u, r in zip(items, reasons, strict=True):
        if r is None:
            kept.append(u)
        else:
            skipped[r].append(u.key)
    err = bad_share_error(skipped, len(items), limits.max_bad_fraction)
    if err is not None:
        raise err
    return kept, skipped

