"""Load a trained checkpoint as a ready-to-use recognizer and evaluate it on a manifest split."""

from __future__ import annotations

import os
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
from .checkpoint import load_checkpoint
from .evaluate import EvalResult, evaluate
from .trainer import CMVN_FILE, TOKENIZER_FILE, resolve_device


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
    model.to(resolve_device(device)).eval()
    languages = list(ckpt.meta.get("extra", {}).get("languages", []))
    return Recognizer(model, tokenizer, cmvn, cfg, languages, ckpt.path, ckpt.step)


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
    with torch.inference_mode():
        result = evaluate(
            rec.model, utts, rec.tokenizer, rec.cmvn, rec.config.features, method=method,
            beam_width=beam_width, device=dev, progress=progress,
        )
    info = {"checkpoint": str(rec.checkpoint), "step": rec.step, "split": split, "beam_width": beam_width}
    return result, info
