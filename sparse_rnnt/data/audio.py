"""Audio I/O through soundfile (libsndfile: FLAC, OPUS, WAV; no FFmpeg needed)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch

SAMPLE_RATE = 16000


class AudioError(Exception):
    """An audio file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    frames: int
    channels: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def audio_info(path: str | os.PathLike[str]) -> AudioInfo:
    """Header information without decoding the samples."""
    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile raises several types for unreadable files
        raise AudioError(f"{path}: unreadable audio ({e})") from None
    return AudioInfo(sample_rate=int(info.samplerate), frames=int(info.frames), channels=int(info.channels))


def load_audio(path: str | os.PathLike[str], expected_rate: int | None = SAMPLE_RATE) -> torch.Tensor:
    """Decode a file to mono float32 in [-1, 1]: ``[T]``.

    Raises :class:`AudioError` for unreadable files, a sample rate other than ``expected_rate``
    (when given) or empty audio. Multichannel audio is averaged to mono.
    """
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{path}: unreadable audio ({e})") from None
    if expected_rate is not None and rate != expected_rate:
        raise AudioError(f"{path}: sample rate {rate} Hz, expected {expected_rate} Hz")
    if data.shape[0] == 0:
        raise AudioError(f"{path}: empty audio")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return torch.from_numpy(np.ascontiguousarray(mono))


def save_audio(path: str | os.PathLike[str], wave: np.ndarray | torch.Tensor, rate: int = SAMPLE_RATE) -> None:
    """Write mono audio; the format follows the suffix (``.flac``, ``.opus`` in Ogg, ``.wav``)."""
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    wave = np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0)
    suffix = os.fspath(path).rsplit(".", 1)[-1].lower()
    if suffix == "opus":
        sf.write(str(path), wave, rate, format="OGG", subtype="OPUS")
    elif suffix == "flac":
        sf.write(str(path), wave, rate, format="FLAC", subtype="PCM_16")
    else:
        sf.write(str(path), wave, rate)
