"""Load a trained checkpoint as a ready-to-use recognizer and evaluate it on a manifest split.

Pruned checkpoints: a single-mask method (IMP, LTH, LAP, adaptive) is loaded as ``theta ⊙ m``
(soft methods store a dense theta). A per-language method (dynamic pathways) keeps theta and the
per-language masks; :meth:`Recognizer.masked` decodes one language with ``theta ⊙ m_language``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ExperimentConfig, from_dict
from ..data.audio import AudioError, audio_info
from ..data.features import FeatureConfig, GlobalCMVN, min_eval_samples
from ..data.manifest import Utterance, cap_per_language, load_split, manifest_path
from ..data.tokenizer import Tokenizer
from ..errors import UserError
from ..model.rnnt import EmformerRNNT
from ..pruning.masks import LanguageMasks, MaskSet
from .checkpoint import checkpoint_masks, load_checkpoint
from .evaluate import EvalResult, evaluate
from .trainer import CMVN_FILE, TOKENIZER_FILE, merge_results, resolve_device


@dataclass
class Recognizer:
    """Everything needed to decode audio: model, tokenizer, CMVN stats and the experiment config."""

    model: EmformerRNNT
    tokenizer: Tokenizer
    cmvn: GlobalCMVN
    config: ExperimentConfig
    languages: list[str]
    checkpoint: Path
    step: int
    masks: MaskSet | None = None  # single-mask pruned model: already applied to the weights
    language_masks: LanguageMasks | None = None  # per-language pruned model: applied by masked()

    @contextmanager
    def masked(self, language: str | None) -> Iterator[None]:
        """Inside, the model's in-scope weights are ``theta ⊙ m_language`` (per-language masks);
        a no-op for dense and single-mask models. Enter it outside ``torch.inference_mode``."""
        if self.language_masks is None:
            yield
            return
        if language not in self.language_masks:
            raise UserError(f"no pruning mask for language {language!r} (masks: {self.language_masks.languages})")
        with self.language_masks[language].substituted(dict(self.model.named_parameters())):
            yield


def load_recognizer(path: str | os.PathLike[str], device: str = "cpu") -> Recognizer:
    """Load a checkpoint directory (or a run directory's latest checkpoint) without pickle."""
    ckpt = load_checkpoint(path)
    cfg = from_dict(ExperimentConfig, ckpt.config)
    tokenizer = Tokenizer.load(ckpt.path / TOKENIZER_FILE)
    cmvn = GlobalCMVN.load(ckpt.path / CMVN_FILE)
    model = EmformerRNNT(cfg.model, tokenizer.num_symbols)
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        raise UserError(f"{ckpt.path}: weights do not fit the model in its config ({str(e).splitlines()[0]})") from None
    masks = checkpoint_masks(ckpt)
    single: MaskSet | None = None
    per_language: LanguageMasks | None = None
    params = dict(model.named_parameters())
    if isinstance(masks, MaskSet):
        missing = [n for n in masks.names if n not in params]
        if missing:
            raise UserError(f"{ckpt.path}: pruning mask for unknown parameter {missing[0]!r}")
        masks.apply_(params)  # theta ⊙ m, once and for all
        single = masks
    elif isinstance(masks, LanguageMasks):
        missing = [n for n in masks.names if n not in params]
        if missing:
            raise UserError(f"{ckpt.path}: pruning mask for unknown parameter {missing[0]!r}")
        per_language = masks
    dev = resolve_device(device)
    model.to(dev).eval()
    if per_language is not None:
        per_language = per_language.to(dev)
    languages = list(ckpt.meta.get("extra", {}).get("languages", []))
    return Recognizer(model, tokenizer, cmvn, cfg, languages, ckpt.path, ckpt.step, single, per_language)


_STALE_HINT = ("if the corpus moved or changed since the manifests were built, re-run `sparse-rnnt data mls`; "
               "otherwise replace the file or remove the utterance from the manifest")


def _audio_problem(u: Utterance, problem: AudioError | str, manifest: Path) -> UserError:
    """One line naming the utterance, its file (``problem`` names it) and the manifest."""
    return UserError(f"utterance {u.key} in {manifest}: {problem}; {_STALE_HINT}")


def check_eval_audio(utts: list[Utterance], features: FeatureConfig, manifest: Path, min_samples: int) -> None:
    """Header checks of every utterance's audio before decoding: it exists, is readable, has the
    feature sample rate and at least ``min_samples`` samples (:func:`min_eval_samples`).

    An evaluation must not quietly drop utterances (its WER would change denominator), so the
    first bad one raises :class:`UserError`. Problems only decoding finds (NaN samples,
    corruption past the header) are reported by :func:`evaluate_checkpoint` the same way.
    """
    ms = 1000 * min_samples / features.sample_rate
    for u in utts:
        try:
            info = audio_info(u.audio)
        except AudioError as e:
            raise _audio_problem(u, e, manifest) from None
        if info.sample_rate != features.sample_rate:
            raise _audio_problem(u, f"{u.audio}: sample rate {info.sample_rate} Hz, expected "
                                    f"{features.sample_rate} Hz", manifest)
        if info.frames < min_samples:
            what = "empty audio" if info.frames <= 0 else f"{info.frames} sample(s)"
            raise _audio_problem(u, f"{u.audio}: {what}, shorter than the {min_samples} samples ({ms:g} ms) "
                                    "the model needs for one output frame", manifest)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    manifest_dir: str | os.PathLike[str],
    *,
    split: str = "test",
    languages: list[str] | None = None,
    method: str = "greedy",
    beam_width: int = 4,
    device: str = "auto",
    progress: bool = True,
    limit: int = 0,
) -> tuple[EvalResult, dict[str, Any]]:
    """Decode ``<manifest_dir>/<split>.jsonl`` (restricted to ``languages``) and count errors.

    Audio that cannot be decoded (missing, unreadable, wrong rate, too short, NaN/Inf samples)
    raises :class:`UserError` naming the utterance and the file: nothing is skipped."""
    if method not in ("greedy", "beam"):
        raise UserError(f"unknown decoding method {method!r} (greedy or beam)")
    rec = load_recognizer(checkpoint, device=device)
    langs = languages or rec.languages or None
    if langs and rec.languages:
        unknown = [lang for lang in langs if lang not in rec.languages]
        if unknown:
            raise UserError(f"the checkpoint was not trained on {', '.join(unknown)} (it knows {', '.join(rec.languages)})")
    utts = cap_per_language(load_split(manifest_dir, split, langs), limit)
    if not utts:
        raise UserError(f"no utterances for {', '.join(langs or ['any language'])} in {manifest_path(manifest_dir, split)}")
    manifest = manifest_path(manifest_dir, split)
    # A language without utterances would drop out of the average unnoticed.
    missing = [lang for lang in langs or [] if not any(u.language == lang for u in utts)]
    if missing:
        present = sorted({u.language for u in utts})
        raise UserError(f"{manifest}: no {split} utterances for {', '.join(missing)}; pass --languages "
                        f"{','.join(present)} to evaluate the others")
    # WER counts errors per reference word: an empty reference has none to count against.
    empty = [u for u in utts if not u.text.split()]
    if empty:
        raise UserError(f"{manifest}: {len(empty)} utterance(s) with an empty transcript (first: {empty[0].key}); "
                        "WER is undefined for them: remove them from the manifest")
    min_samples = min_eval_samples(rec.config.features, rec.config.model.time_reduction_stride)
    check_eval_audio(utts, rec.config.features, manifest, min_samples)  # fail before any decoding
    dev = next(rec.model.parameters()).device
    groups: dict[str | None, list] = {None: utts}
    if rec.language_masks is not None:  # decode each language with its own pathway
        groups = {}
        for u in utts:
            groups.setdefault(u.language, []).append(u)
    parts = []
    for lang, group in groups.items():
        with rec.masked(lang), torch.inference_mode():
            try:
                parts.append(evaluate(
                    rec.model, group, rec.tokenizer, rec.cmvn, rec.config.features, method=method,
                    beam_width=beam_width, device=dev, progress=progress,
                ))
            except AudioError as e:  # found while decoding: NaN samples, corrupt past the header
                u = next((u for u in group if e.path is not None and os.fspath(u.audio) == e.path), None)
                if u is None:
                    raise UserError(f"{manifest}: {e}; {_STALE_HINT}") from None
                raise _audio_problem(u, e, manifest) from None
    result = parts[0] if len(parts) == 1 else merge_results(parts)
    info = {"checkpoint": str(rec.checkpoint), "step": rec.step, "split": split, "beam_width": beam_width}
    return result, info
