"""Evaluation: decode a manifest split and report WER per language and on average."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..data.audio import load_audio
from ..data.features import FeatureConfig, GlobalCMVN, LogMel
from ..data.manifest import Utterance
from ..data.tokenizer import Tokenizer
from ..model.decoding import decode
from ..model.rnnt import EmformerRNNT
from .metrics import ErrorCounts, align_counts


@dataclass
class EvalResult:
    per_language: dict[str, ErrorCounts] = field(default_factory=dict)
    hypotheses: list[dict[str, str]] = field(default_factory=list)
    method: str = "greedy"

    @property
    def average_wer(self) -> float:
        """Unweighted mean of the per-language WERs (the paper's "avg" column)."""
        if not self.per_language:
            return float("nan")
        return sum(c.wer for c in self.per_language.values()) / len(self.per_language)

    @property
    def overall(self) -> ErrorCounts:
        total = ErrorCounts()
        for c in self.per_language.values():
            total += c
        return total

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "average_wer": self.average_wer,
            "overall": self.overall.to_dict(),
            "per_language": {k: v.to_dict() for k, v in self.per_language.items()},
            "hypotheses": self.hypotheses,
        }

    def format_table(self, title: str = "WER (%)") -> str:
        langs = sorted(self.per_language)
        lines = [title, f"{'language':<10}{'WER %':>8}{'sub':>7}{'del':>7}{'ins':>7}{'words':>8}{'utts':>7}"]
        for lang in langs:
            c = self.per_language[lang]
            lines.append(
                f"{lang:<10}{100 * c.wer:>8.2f}{c.substitutions:>7}{c.deletions:>7}"
                f"{c.insertions:>7}{c.reference_words:>8}{c.utterances:>7}"
            )
        o = self.overall
        lines.append(f"{'avg':<10}{100 * self.average_wer:>8.2f}   (mean over languages)")
        lines.append(f"{'overall':<10}{100 * o.wer:>8.2f}{o.substitutions:>7}{o.deletions:>7}{o.insertions:>7}"
                     f"{o.reference_words:>8}{o.utterances:>7}")
        return "\n".join(lines)


def _batches(utts: Sequence[Utterance], max_frames: int, frames_per_second: float) -> list[list[int]]:
    """Indices sorted by duration, cut into batches of at most ``max_frames`` padded frames."""
    order = sorted(range(len(utts)), key=lambda i: utts[i].duration)
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        # Sorted ascending: utterance i is the longest of the batch it would join.
        if cur and (len(cur) + 1) * utts[i].duration * frames_per_second > max_frames:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@torch.no_grad()
def evaluate(
    model: EmformerRNNT,
    utterances: Sequence[Utterance],
    tokenizer: Tokenizer,
    cmvn: GlobalCMVN,
    feature_config: FeatureConfig,
    *,
    features: dict[str, torch.Tensor] | None = None,
    method: str = "greedy",
    beam_width: int = 4,
    max_frames: int = 40000,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> EvalResult:
    """Decode ``utterances`` and count word errors per language.

    ``features`` optionally holds precomputed un-normalized log-mel ``[T, 80]`` per utterance key.
    """
    was_training = model.training
    model.eval()
    logmel = LogMel(feature_config)
    result = EvalResult(method=method)
    bar = tqdm(total=len(utterances), desc=f"decode ({method})", unit="utt", disable=not progress, leave=False)
    try:
        for idx in _batches(utterances, max_frames, feature_config.frames_per_second):
            feats = []
            for i in idx:
                u = utterances[i]
                f = features.get(u.key) if features is not None else None
                if f is None:
                    f = logmel(load_audio(u.audio, feature_config.sample_rate))
                feats.append(cmvn.normalize(f))
            lengths = torch.tensor([f.size(0) for f in feats], dtype=torch.int32)
            x = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
            hyps = decode(model, x.to(device), lengths.to(device), method=method, beam_width=beam_width)
            for i, tokens in zip(idx, hyps, strict=True):
                u = utterances[i]
                text = tokenizer.decode(tokens)
                # NFC both sides (read_manifest already does; hand-built utterances may not).
                counts = align_counts(unicodedata.normalize("NFC", u.text).split(),
                                      unicodedata.normalize("NFC", text).split())
                result.per_language.setdefault(u.language, ErrorCounts())
                result.per_language[u.language] += counts
                result.hypotheses.append({"key": u.key, "reference": u.text, "hypothesis": text})
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    result.hypotheses.sort(key=lambda h: h["key"])
    return result
