"""Audio I/O through soundfile (libsndfile: FLAC, OPUS, WAV; no FFmpeg needed)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from ..errors import UserError

SAMPLE_RATE = 16000
# Decoded samples are in [-1, 1] (float files may overshoot a little). Beyond this, 80 dB over
# full scale, a sample is corrupt, and one of ~1e19 already overflows the float32 log-mel.
MAX_ABS_SAMPLE = 1e4


def soundfile_module() -> ModuleType:
    """soundfile, imported when a file is read or written: in-memory paths (streaming tensors,
    the model, export of loaded weights) then run where it is not installed (the GPU image)."""
    try:
        import soundfile
    except ImportError as e:
        raise UserError(f"reading or writing audio files needs the soundfile package ({e})") from None
    return soundfile


class AudioError(UserError):
    """An audio file that cannot be used (missing, unreadable, wrong rate, empty, non-finite
    samples); the message names the file and ``path`` holds it.

    A :class:`UserError`: bad input that the CLI reports as one line. Code that can go on without
    the file (training's bad-item skipping, the MLS reader) catches it explicitly.
    """

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)


def require_regular_file(path: str | os.PathLike[str]) -> None:
    """:class:`AudioError` for a path that exists but is not a regular file (after links): a FIFO
    or a device would block or never end inside libsndfile."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or a dangling link: libsndfile's error names it
    if not stat.S_ISREG(mode):
        raise AudioError(f"{path}: not a regular file", path)


def _unreadable(path: str | os.PathLike[str], e: Exception) -> AudioError:
    if not os.path.lexists(path):  # libsndfile only says "System error."
        return AudioError(f"{path}: audio file not found", path)
    return AudioError(f"{path}: unreadable audio ({e})", path)


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
    sf = soundfile_module()  # outside the try: a missing package is not an unreadable file
    require_regular_file(path)
    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile raises several types for unreadable files
        raise _unreadable(path, e) from None
    return AudioInfo(sample_rate=int(info.samplerate), frames=int(info.frames), channels=int(info.channels))


def load_audio(
    path: str | os.PathLike[str], expected_rate: int | None = SAMPLE_RATE, *, allow_empty: bool = False
) -> torch.Tensor:
    """Decode a file to mono float32 in [-1, 1]: ``[T]``.

    Raises :class:`AudioError` for unreadable files or anything but a regular file, a sample rate
    other than ``expected_rate`` (when given), empty audio (unless ``allow_empty``) or NaN/Inf
    samples or samples beyond ``MAX_ABS_SAMPLE`` (float WAV can hold them; they would turn every
    feature frame they touch into NaN or Inf). Multichannel audio is
    averaged to mono.
    """
    sf = soundfile_module()
    require_regular_file(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise _unreadable(path, e) from None
    if expected_rate is not None and rate != expected_rate:
        raise AudioError(f"{path}: sample rate {rate} Hz, expected {expected_rate} Hz", path)
    if data.shape[0] == 0 and not allow_empty:
        raise AudioError(f"{path}: empty audio", path)
    bad = data.size - int(np.count_nonzero(np.abs(data) <= MAX_ABS_SAMPLE))  # NaN compares False
    if bad:
        raise AudioError(f"{path}: {bad} non-finite or out-of-range sample(s) (NaN, Inf or beyond "
                         f"±{MAX_ABS_SAMPLE:g})", path)
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return torch.from_numpy(np.ascontiguousarray(mono))


def save_audio(path: str | os.PathLike[str], wave: np.ndarray | torch.Tensor, rate: int = SAMPLE_RATE) -> None:
    """Write mono audio; the format follows the suffix (``.flac``, ``.opus`` in Ogg, ``.wav``)."""
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    wave = np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0)
    suffix = os.fspath(path).rsplit(".", 1)[-1].lower()
    sf = soundfile_module()
    if suffix == "opus":
        sf.write(str(path), wave, rate, format="OGG", subtype="OPUS")
    elif suffix == "flac":
        sf.write(str(path), wave, rate, format="FLAC", subtype="PCM_16")
    else:
        sf.write(str(path), wave, rate)
