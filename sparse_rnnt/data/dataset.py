"""Utterances -> normalized (optionally augmented) features and token targets, and batching.

Unreadable audio at load time (features not cached, file deleted or corrupted since the run
started): ``dataset[i]`` raises :class:`UnreadableAudioError` (a :class:`UserError` naming the
utterance and file), and :meth:`SpeechDataset.load_items` -- what a training loop should call --
skips such items instead, logs a warning once per utterance and records them in
``dataset.unreadable``, so one bad file costs one utterance, not the run.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .audio import AudioError, load_audio
from .features import FeatureConfig, GlobalCMVN, LogMel, SpecAugmentConfig, spec_augment
from .manifest import Utterance
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


class UnreadableAudioError(UserError):
    """An item's audio cannot be loaded; ``key`` and ``path`` name the utterance and file."""

    def __init__(self, key: str, path: str, reason: str) -> None:
        super().__init__(f"utterance {key}: {reason}")
        self.key = key
        self.path = path
        self.reason = reason


@dataclass
class Batch:
    """A padded batch, laid out for ``torchaudio.models.RNNT`` and ``rnnt_loss``."""

    features: torch.Tensor  # [B, T, F] float32, CMVN-normalized, padded with 0
    feature_lengths: torch.Tensor  # [B] int32
    targets: torch.Tensor  # [B, U] int32, padded with 0
    target_lengths: torch.Tensor  # [B] int32
    languages: list[str]
    language_ids: torch.Tensor  # [B] int64: index into the dataset's language list
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy the tensors to ``device`` (lists are shared)."""
        return Batch(
            features=self.features.to(device, non_blocking=non_blocking),
            feature_lengths=self.feature_lengths.to(device, non_blocking=non_blocking),
            targets=self.targets.to(device, non_blocking=non_blocking),
            target_lengths=self.target_lengths.to(device, non_blocking=non_blocking),
            languages=self.languages,
            language_ids=self.language_ids.to(device, non_blocking=non_blocking),
            keys=self.keys,
        )

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``."""
        return Batch(
            features=self.features.pin_memory(),
            feature_lengths=self.feature_lengths.pin_memory(),
            targets=self.targets.pin_memory(),
            target_lengths=self.target_lengths.pin_memory(),
            languages=self.languages,
            language_ids=self.language_ids.pin_memory(),
            keys=self.keys,
        )


class SpeechDataset(torch.utils.data.Dataset):
    """Item ``i``: CMVN-normalized features of ``utterances[i]`` and its token ids.

    Features come from ``features`` (a cache from :func:`compute_features`, keyed by
    ``Utterance.key``) or are computed from the audio on the fly. SpecAugment (when given) is
    applied after normalization with a generator seeded from ``(seed, epoch, i)``, so an item is
    reproducible whatever worker loads it. With a ``DataLoader``, call :meth:`set_epoch` before
    creating each epoch's iterator (persistent workers would keep a stale epoch).
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        tokenizer: Tokenizer,
        cmvn: GlobalCMVN,
        features: dict[str, torch.Tensor] | None = None,
        feature_config: FeatureConfig | None = None,
        spec_augment: SpecAugmentConfig | None = None,
        languages: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        """``languages`` fixes the ``language_ids`` order (default: sorted languages present)."""
        self.utterances = list(utterances)
        self.tokenizer = tokenizer
        self.cmvn = cmvn
        self.features = features
        self.feature_config = feature_config if feature_config is not None else FeatureConfig()
        if self.feature_config.n_mels != cmvn.dim:
            raise UserError(
                f"CMVN has {cmvn.dim} bins but the feature config has {self.feature_config.n_mels}"
            )
        if spec_augment is not None:
            spec_augment.validate()
        self.spec_augment = spec_augment
        self.languages = (
            list(languages)
            if languages is not None
            else sorted({u.language for u in self.utterances})
        )
        self._language_index = {lang: i for i, lang in enumerate(self.languages)}
        self.seed = int(seed)
        self.epoch = 0
        for u in self.utterances:
            if u.language not in self._language_index:
                raise UserError(
                    f"utterance {u.key}: language {u.language!r} not in {', '.join(self.languages)}"
                )
            if features is not None and u.key not in features:
                raise UserError(f"feature cache has no entry for utterance {u.key} ({u.audio})")
        self._targets = [tokenizer.encode(u.text) for u in self.utterances]
        # Unknown characters become <unk>; training on them silently would hide a text problem.
        self.unencodable = [
            u.key for u, t in zip(self.utterances, self._targets, strict=True) if tokenizer.unk in t
        ]
        if self.unencodable:
            warnings.warn(
                f"{len(self.unencodable)} transcript(s) contain characters unknown to the "
                f"tokenizer (first: {self.unencodable[0]}); they map to <unk>",
                stacklevel=2,
            )
        self._logmel: LogMel | None = None
        self.unreadable: dict[str, str] = {}  # key -> reason, filled by load_items

    def __len__(self) -> int:
        return len(self.utterances)

    @property
    def durations(self) -> list[float]:
        return [u.duration for u in self.utterances]

    @property
    def utterance_languages(self) -> list[str]:
        return [u.language for u in self.utterances]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds SpecAugment."""
        self.epoch = int(epoch)

    def _raw_features(self, u: Utterance) -> torch.Tensor:
        if self.features is not None:
            return self.features[u.key]
        if self._logmel is None:
            self._logmel = LogMel(self.feature_config)
        try:
            wave = load_audio(u.audio, expected_rate=self.feature_config.sample_rate)
            with torch.no_grad():
                return self._logmel(wave)
        except (AudioError, ValueError, RuntimeError) as e:
            raise UnreadableAudioError(u.key, u.audio, str(e)) from None

    def _generator(self, index: int) -> torch.Generator:
        words = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"features": [T, F] float32, "targets": [U] int32, "language": str,
        "language_id": int, "key": str}``."""
        u = self.utterances[index]
        feats = self.cmvn.normalize(self._raw_features(u).to(torch.float32))
        if self.spec_augment is not None and self.spec_augment.enabled:
            feats = spec_augment(feats, self.spec_augment, self._generator(index))
        return {
            "features": feats,
            "targets": torch.tensor(self._targets[index], dtype=torch.int32),
            "language": u.language,
            "language_id": self._language_index[u.language],
            "key": u.key,
        }

    def load_items(self, indices: Iterable[int]) -> list[dict[str, Any]]:
        """``[self[i] for i in indices]`` minus the items whose audio cannot be loaded (see the
        module docstring); may return fewer items than asked for, or none."""
        out = []
        for i in indices:
            key = self.utterances[i].key
            if key in self.unreadable:
                continue
            try:
                out.append(self[i])
            except UnreadableAudioError as e:
                self.unreadable[key] = e.reason
                log.warning("skipping %s: %s", key, e.reason)
        return out


def collate(items: list[dict[str, Any]]) -> Batch:
    """Pad items from :class:`SpeechDataset` into a :class:`Batch` (features and targets 0-padded)."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    n_feat = items[0]["features"].shape[1]
    feat_lens = [int(it["features"].shape[0]) for it in items]
    tgt_lens = [int(it["targets"].shape[0]) for it in items]
    features = torch.zeros(len(items), max(feat_lens), n_feat, dtype=torch.float32)
    targets = torch.zeros(len(items), max(tgt_lens), dtype=torch.int32)
    for b, it in enumerate(items):
        features[b, : feat_lens[b]] = it["features"]
        targets[b, : tgt_lens[b]] = it["targets"]
    return Batch(
        features=features,
        feature_lengths=torch.tensor(feat_lens, dtype=torch.int32),
        targets=targets,
        target_lengths=torch.tensor(tgt_lens, dtype=torch.int32),
        languages=[it["language"] for it in items],
        language_ids=torch.tensor([it["language_id"] for it in items], dtype=torch.int64),
        keys=[it["key"] for it in items],
    )
