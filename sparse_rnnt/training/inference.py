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
from ..data.features import GlobalCMVN
from ..data.manifest import cap_per_language, load_split, manifest_path
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
    """Decode ``<manifest_dir>/<split>.jsonl`` (restricted to ``languages``) and count errors."""
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
    dev = next(rec.model.parameters()).device
    groups: dict[str | None, list] = {None: utts}
    if rec.language_masks is not None:  # decode each language with its own pathway
        groups = {}
        for u in utts:
            groups.setdefault(u.language, []).append(u)
    parts = []
    for lang, group in groups.items():
        with rec.masked(lang), torch.inference_mode():
            parts.append(evaluate(
                rec.model, group, rec.tokenizer, rec.cmvn, rec.config.features, method=method,
                beam_width=beam_width, device=dev, progress=progress,
            ))
    result = parts[0] if len(parts) == 1 else merge_results(parts)
    info = {"checkpoint": str(rec.checkpoint), "step": rec.step, "split": split, "beam_width": beam_width}
    return result, info
