"""Acoustic features: 80-dim log-mel, global CMVN, SpecAugment and a parallel feature cache.

Frame convention (shared with the samplers and streaming code): a waveform of ``T`` samples gives
``1 + T // hop`` frames, because the STFT is centred (``center=True``: the signal is reflect-padded
by ``n_fft // 2`` samples on both sides, so frame ``t`` is centred on sample ``t * hop``).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torchaudio
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save, save_file
from tqdm import tqdm

from ..errors import UserError
from ..io import atomic_path
from .audio import AudioError, load_audio
from .manifest import Utterance

_CMVN_FORMAT = "sparse_rnnt.cmvn.v1"


@dataclass(frozen=True)
class FeatureConfig:
    """Log-mel front end settings (defaults: 80 bins, 25 ms window, 10 ms hop at 16 kHz)."""

    sample_rate: int = 16000
    n_mels: int = 80
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: int = 512
    f_min: float = 0.0
    f_max: float | None = None  # None: Nyquist
    log_floor: float = 1e-6

    @property
    def win_length(self) -> int:
        return round(self.sample_rate * self.win_ms / 1000.0)

    @property
    def hop_length(self) -> int:
        return round(self.sample_rate * self.hop_ms / 1000.0)

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    def validate(self) -> None:
        """Raise :class:`UserError` for inconsistent settings."""
        if (
            self.sample_rate <= 0
            or self.n_mels <= 0
            or self.hop_length <= 0
            or self.win_length <= 0
        ):
            raise UserError(f"feature config: sizes must be positive ({self})")
        if self.n_fft < self.win_length:
            raise UserError(
                f"feature config: n_fft={self.n_fft} is shorter than the window "
                f"({self.win_length} samples = {self.win_ms} ms)"
            )
        nyquist = self.sample_rate / 2
        f_max = nyquist if self.f_max is None else self.f_max
        if not 0.0 <= self.f_min < f_max <= nyquist:
            raise UserError(f"feature config: need 0 <= f_min < f_max <= {nyquist} Hz ({self})")
        if self.log_floor <= 0.0:
            raise UserError(f"feature config: log_floor must be positive, got {self.log_floor}")


class LogMel(torch.nn.Module):
    """Waveform -> log-mel features: ``log(mel_power + floor)``.

    Power spectrum (``|STFT|^2``) of a periodic Hann window of ``win_length`` samples centred in
    ``n_fft``, HTK mel filterbank without area normalization, natural log.
    """

    def __init__(self, config: FeatureConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else FeatureConfig()
        self.config.validate()
        c = self.config
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=c.sample_rate,
            n_fft=c.n_fft,
            win_length=c.win_length,
            hop_length=c.hop_length,
            f_min=c.f_min,
            f_max=c.f_max,
            n_mels=c.n_mels,
            window_fn=torch.hann_window,
            power=2.0,
            normalized=False,
            center=True,
            pad_mode="reflect",
            norm=None,
            mel_scale="htk",
        )

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for ``num_samples`` samples: ``1 + num_samples // hop``."""
        return 1 + num_samples // self.config.hop_length

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``[T]`` -> ``[frames, n_mels]`` or ``[B, T]`` -> ``[B, frames, n_mels]`` (float32)."""
        if wave.dim() not in (1, 2):
            raise ValueError(f"expected a waveform [T] or [B, T], got shape {tuple(wave.shape)}")
        # Reflect padding needs more samples than the pad width.
        min_samples = self.config.n_fft // 2 + 1
        if wave.shape[-1] < min_samples:
            raise ValueError(
                f"waveform of {wave.shape[-1]} samples is shorter than the {min_samples} samples "
                "the centred STFT needs"
            )
        spec = self.mel(wave.to(torch.float32))  # [..., n_mels, frames]
        return torch.log(spec + self.config.log_floor).transpose(-1, -2).contiguous()


@dataclass(eq=False)
class GlobalCMVN:
    """Global per-bin mean/std normalization: ``(feats - mean) / std``; ``mean``, ``std``: ``[F]``."""

    mean: torch.Tensor
    std: torch.Tensor
    count: int = 0  # frames the statistics were fitted on
    min_std: float = field(default=1e-5, repr=False)

    def __post_init__(self) -> None:
        self.mean = torch.as_tensor(self.mean, dtype=torch.float32).detach().cpu().contiguous()
        std = torch.as_tensor(self.std, dtype=torch.float32).detach().cpu()
        if self.mean.dim() != 1 or self.mean.shape != std.shape:
            raise ValueError(
                f"CMVN mean/std must be equal-length vectors, got {tuple(self.mean.shape)} "
                f"and {tuple(std.shape)}"
            )
        # A NaN or negative statistic (a damaged file) would turn every feature into garbage.
        if not bool(torch.isfinite(self.mean).all() & torch.isfinite(std).all()) or bool((std < 0).any()):
            raise ValueError("CMVN mean and std must be finite, and std not negative")
        self.std = std.clamp_min(self.min_std).contiguous()

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, features: Iterable[torch.Tensor], min_std: float = 1e-5) -> GlobalCMVN:
        """Fit over all frames of ``features`` (each ``[T, F]``), streaming.

        Each piece contributes (count, mean, sum of squared deviations) in float64, merged with
        Chan et al.'s pairwise update, so the result does not depend on how frames are split
        into pieces and does not lose precision on long corpora. ``std`` is the population std.
        """
        acc = CMVNAccumulator()
        for feats in features:
            acc.update(feats)
        return acc.finalize(min_std=min_std)

    def normalize(self, feats: torch.Tensor) -> torch.Tensor:
        """``[..., F]`` -> ``[..., F]`` in the dtype and device of ``feats``."""
        if feats.shape[-1] != self.dim:
            raise ValueError(f"CMVN has {self.dim} bins, features have {feats.shape[-1]}")
        mean = self.mean.to(device=feats.device, dtype=feats.dtype)
        std = self.std.to(device=feats.device, dtype=feats.dtype)
        return (feats - mean) / std

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to embed in a checkpoint: ``mean`` and ``std`` ``[F]``, ``count`` ``[]`` int64."""
        return {
            "mean": self.mean.clone(),
            "std": self.std.clone(),
            "count": torch.tensor(self.count, dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> GlobalCMVN:
        """Inverse of :meth:`state_dict`."""
        try:
            return cls(mean=state["mean"], std=state["std"], count=int(state["count"]))
        except KeyError as e:
            raise UserError(f"CMVN state lacks {e.args[0]!r}") from None

    def to_bytes(self) -> bytes:
        """Serialize as safetensors bytes (no pickle)."""
        return save(
            {"mean": self.mean, "std": self.std},
            metadata={"format": _CMVN_FORMAT, "count": str(self.count)},
        )

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "CMVN bytes") -> GlobalCMVN:
        """Inverse of :meth:`to_bytes`; ``source`` names the origin in error messages."""
        try:
            tensors = load(data)
            meta = _safetensors_metadata(data)
        except (SafetensorError, ValueError, OSError) as e:
            raise UserError(f"{source}: not a CMVN safetensors file ({e})") from None
        return cls._from_tensors(tensors, meta, source=source)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file (``mean``, ``std``; ``count`` in the metadata) atomically."""
        with atomic_path(path) as tmp:
            save_file(
                {"mean": self.mean, "std": self.std},
                str(tmp),
                metadata={"format": _CMVN_FORMAT, "count": str(self.count)},
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GlobalCMVN:
        """Read a file written by :meth:`save`; :class:`UserError` if missing or malformed."""
        if not os.path.isfile(path):
            raise UserError(f"CMVN file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        except (SafetensorError, ValueError, OSError) as e:
            raise UserError(f"{path}: not a CMVN safetensors file ({e})") from None
        return cls._from_tensors(tensors, meta, source=str(path))

    @classmethod
    def _from_tensors(
        cls, tensors: dict[str, torch.Tensor], meta: dict[str, str], source: str
    ) -> GlobalCMVN:
        if meta.get("format") != _CMVN_FORMAT:
            raise UserError(f"{source}: not a CMVN file (format {meta.get('format')!r})")
        try:
            count = int(meta.get("count", "0"))
        except ValueError:
            raise UserError(f"{source}: bad frame count {meta.get('count')!r}") from None
        if set(tensors) != {"mean", "std"}:
            raise UserError(f"{source}: expected tensors mean and std, found {sorted(tensors)}")
        try:
            return cls(mean=tensors["mean"], std=tensors["std"], count=count)
        except ValueError as e:
            raise UserError(f"{source}: {e}") from None


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian header size, JSON)."""
    if len(data) < 8:
        raise ValueError("truncated header")
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


class CMVNAccumulator:
    """Streaming mean/variance over frames (float64, Chan's parallel combination)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None  # [F] float64
        self.m2: torch.Tensor | None = None  # [F] float64: sum of squared deviations

    def update(self, feats: torch.Tensor) -> None:
        """Add the frames of ``feats`` ``[T, F]`` (``T`` may be 0)."""
        if feats.dim() != 2:
            raise ValueError(f"expected features [T, F], got shape {tuple(feats.shape)}")
        n_b = int(feats.shape[0])
        if n_b == 0:
            return
        x = feats.detach().to(device="cpu", dtype=torch.float64)
        mean_b = x.mean(dim=0)
        m2_b = ((x - mean_b) ** 2).sum(dim=0)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        if mean_b.shape != self.mean.shape:
            raise ValueError(f"feature dim changed from {self.mean.shape[0]} to {mean_b.shape[0]}")
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta * delta * (n_a * n_b / n)
        self.count = n

    def finalize(self, min_std: float = 1e-5) -> GlobalCMVN:
        """Statistics so far as a :class:`GlobalCMVN`; :class:`UserError` if no frame was seen."""
        if self.mean is None or self.m2 is None or self.count == 0:
            raise UserError("cannot fit CMVN: no feature frames")
        std = torch.sqrt(self.m2 / self.count)
        return GlobalCMVN(
            mean=self.mean.to(torch.float32),
            std=std.to(torch.float32),
            count=self.count,
            min_std=min_std,
        )


@dataclass(frozen=True)
class SpecAugmentConfig:
    """SpecAugment (frequency and time masking only, no time warping)."""

    freq_masks: int = 2
    freq_width: int = 15  # max width of one frequency mask, bins
    time_masks: int = 2
    time_width_ratio: float = 0.05  # max width of one time mask: max(1, ratio * frames)
    p: float = 1.0  # probability to augment an utterance at all
    enabled: bool = True

    def validate(self) -> None:
        if self.freq_masks < 0 or self.time_masks < 0 or self.freq_width < 0:
            raise UserError(f"spec_augment: counts and widths must be >= 0 ({self})")
        if not 0.0 <= self.time_width_ratio <= 1.0 or not 0.0 <= self.p <= 1.0:
            raise UserError(f"spec_augment: time_width_ratio and p must lie in [0, 1] ({self})")


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in ``[low, high]`` (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def spec_augment_masks(
    num_frames: int, num_bins: int, config: SpecAugmentConfig, generator: torch.Generator
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Draw the masks: ``(freq_masks, time_masks)``, each a list of ``(start, width)``.

    Widths are uniform in ``[0, max_width]``; starts uniform over the positions where the mask
    fits. Per-mask widths are also capped at ``(size - 1) // masks`` so that the masks together
    can never cover every bin or every frame. Returns empty lists when the draw of ``p`` says
    not to augment or augmentation is disabled.
    """
    config.validate()
    if not config.enabled or config.p <= 0.0:
        return [], []
    if config.p < 1.0 and float(torch.rand((), generator=generator)) >= config.p:
        return [], []

    def draw(size: int, masks: int, max_width: int) -> list[tuple[int, int]]:
        if masks == 0:
            return []
        max_width = max(0, min(max_width, (size - 1) // masks))
        out = []
        for _ in range(masks):
            width = _randint(0, max_width, generator)
            start = _randint(0, size - width, generator)
            out.append((start, width))
        return out

    freq = draw(num_bins, config.freq_masks, config.freq_width)
    time_max = max(1, int(config.time_width_ratio * num_frames))
    time = draw(num_frames, config.time_masks, time_max)
    return freq, time


def spec_augment(
    feats: torch.Tensor, config: SpecAugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Mask frequency bands and time spans of ``feats`` ``[T, F]`` with 0 (a copy is returned).

    Apply after CMVN, so the fill value is the global mean. Deterministic given ``generator``.
    """
    if feats.dim() != 2:
        raise ValueError(f"expected features [T, F], got shape {tuple(feats.shape)}")
    freq, time = spec_augment_masks(feats.shape[0], feats.shape[1], config, generator)
    out = feats.clone()
    for start, width in freq:
        out[:, start : start + width] = 0.0
    for start, width in time:
        out[start : start + width, :] = 0.0
    return out


# --- Feature cache -------------------------------------------------------------------------

_worker_logmel: LogMel | None = None


def _init_worker(config: FeatureConfig) -> None:
    global _worker_logmel
    # Ctrl-C reaches the whole process group: the parent stops the pool (and says "interrupted"),
    # a worker's own KeyboardInterrupt traceback would only clutter the terminal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One intra-op thread per process: the pool provides the parallelism.
    torch.set_num_threads(1)
    _worker_logmel = LogMel(config)


def _extract(job: tuple[str, str]) -> tuple[str, np.ndarray | None, str]:
    """``(key, audio path)`` -> ``(key, [frames, n_mels] float32 or None, error message)``."""
    key, path = job
    assert _worker_logmel is not None
    try:
        wave = load_audio(path, expected_rate=_worker_logmel.config.sample_rate)
        with torch.inference_mode():
            feats = _worker_logmel(wave)
    except (AudioError, ValueError) as e:
        msg = str(e)  # AudioError messages already name the file
        return key, None, f"{key}: {msg}" if path in msg else f"{key} ({path}): {msg}"
    return key, feats.numpy(), ""


def compute_features(
    utterances: Sequence[Utterance],
    config: FeatureConfig | None = None,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Log-mel features of every utterance: ``{Utterance.key: [frames, n_mels] float32}``.

    Features are not CMVN-normalized. ``workers > 0`` uses a pool of that many processes
    (spawned, one torch thread each); ``0`` computes in this process. An unreadable file raises
    :class:`UserError` naming the utterance and the file.
    """
    config = config if config is not None else FeatureConfig()
    config.validate()
    jobs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for u in utterances:
        if u.key in seen:
            raise UserError(f"duplicate utterance key {u.key!r} ({u.audio})")
        seen.add(u.key)
        jobs.append((u.key, u.audio))
    out: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(jobs), desc="features", unit="utt", disable=not progress)

    def collect(key: str, feats: np.ndarray | None, err: str) -> None:
        if feats is None:
            raise UserError(f"cannot compute features: {err}")
        out[key] = torch.from_numpy(feats)
        bar.update(1)

    try:
        if workers <= 0 or len(jobs) <= 1:
            global _worker_logmel
            _worker_logmel = LogMel(config)
            try:
                for job in jobs:
                    collect(*_extract(job))
            finally:
                _worker_logmel = None
        else:
            # spawn, not fork: forking a process that already runs torch thread pools can hang.
            ctx = multiprocessing.get_context("spawn")
            chunk = max(1, min(64, math.ceil(len(jobs) / (workers * 8))))
            with ctx.Pool(workers, initializer=_init_worker, initargs=(config,)) as pool:
                for result in pool.imap(_extract, jobs, chunksize=chunk):
                    collect(*result)
    finally:
        bar.close()
    return out


def min_eval_samples(features: FeatureConfig, time_reduction_stride: int) -> int:
    """The fewest samples a whole utterance can be decoded from: the centred STFT needs
    ``n_fft // 2 + 1`` (reflect padding) and the encoder one output frame, i.e. ``stride``
    feature frames (``1 + samples // hop`` of them) after ``trim_to_stride``. Shorter audio has
    no encoder frame at all (alone in a batch it cannot even be encoded)."""
    return max(features.n_fft // 2 + 1, (time_reduction_stride - 1) * features.hop_length)
