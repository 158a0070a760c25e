"""Masks that one pruning run hands to the next: level snapshots and ``pruning.init_masks``.

A pruning run writes ``<run>/masks/level-<s>.safetensors`` (``s`` with three decimals) each time
its sparsity steps up, so a later run can start from that run's mask *at any of its levels*
(e.g. Dynamic ASR Pathways from LTH masks at 50%). ``pruning.init_masks`` names the source:

- ``PATH``: one source for every language: a masks file (``MaskSet`` or ``LanguageMasks``), a
  checkpoint directory or a run directory. A single mask (e.g. LAP) is copied to every language
  by per-language methods.
- ``lang=PATH,lang=PATH,...``: one source per language (ASR Pathways stage 1: one monolingual
  IMP/LTH run per language); every language of the run must be given, no other.

With a run directory, ``pruning.init_level`` picks its snapshot at that level; without it, the
masks of the run's latest checkpoint are used.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..pruning.masks import LanguageMasks, MaskSet
from .checkpoint import checkpoint_masks, list_checkpoints, load_checkpoint

MASKS_DIR = "masks"


def level_snapshot_path(run_dir: str | os.PathLike[str], level: float) -> Path:
    """``<run>/masks/level-0.500.safetensors`` for ``level`` 0.5."""
    return Path(run_dir) / MASKS_DIR / f"level-{level:.3f}.safetensors"


def save_level_snapshot(run_dir: str | os.PathLike[str], level: float, masks: MaskSet | LanguageMasks) -> Path:
    """Write the masks in force after a sparsity step (atomically; an existing file is replaced)."""
    path = level_snapshot_path(run_dir, level)
    path.parent.mkdir(parents=True, exist_ok=True)
    masks.save(path)
    return path


def _load_masks_file(path: Path) -> MaskSet | LanguageMasks:
    errors = []
    for cls in (MaskSet, LanguageMasks):
        try:
            return cls.load(path)
        except UserError as e:
            errors.append(str(e))
    raise UserError(f"{path}: not a mask file ({'; '.join(errors)})")


def load_masks_source(source: str | os.PathLike[str], level: float | None = None) -> MaskSet | LanguageMasks:
    """Masks from a masks file, a checkpoint directory or a run directory (see module docstring)."""
    path = Path(source)
    if path.is_file():
        if level is not None:
            raise UserError(f"pruning.init_level applies to run directories, {path} is a file")
        return _load_masks_file(path)
    if not path.is_dir():
        raise UserError(f"pruning.init_masks: {path} does not exist")
    if level is not None:
        snap = level_snapshot_path(path, level)
        if not snap.is_file():
            have = sorted(p.stem.removeprefix("level-") for p in (path / MASKS_DIR).glob("level-*.safetensors"))
            raise UserError(
                f"pruning.init_masks: {path} has no mask saved at level {level:.3f} "
                f"(levels saved: {', '.join(have) or 'none'}; is it a pruning run directory?)"
            )
        return _load_masks_file(snap)
    if not (path / "checkpoint.json").is_file() and not list_checkpoints(path):
        raise UserError(f"pruning.init_masks: {path} is neither a checkpoint nor a run directory")
    masks = checkpoint_masks(load_checkpoint(path))
    if masks is None:
        raise UserError(f"pruning.init_masks: {path} is a dense checkpoint, it holds no pruning masks")
    return masks


def parse_init_masks(spec: str) -> dict[str | None, str]:
    """``"PATH"`` -> ``{None: PATH}``; ``"en=A,fr=B"`` -> ``{"en": A, "fr": B}``."""
    items = [x.strip() for x in spec.split(",") if x.strip()]
    if not items:
        raise UserError("pruning.init_masks is empty")
    if len(items) == 1 and "=" not in items[0]:
        return {None: items[0]}
    out: dict[str | None, str] = {}
    for item in items:
        lang, sep, path = item.partition("=")
        lang, path = lang.strip(), path.strip()
        if not sep or not lang or not path:
            raise UserError(f"pruning.init_masks: expected lang=PATH items separated by commas, got {item!r}")
        if lang in out:
            raise UserError(f"pruning.init_masks: language {lang!r} given twice")
        out[lang] = path
    return out


def resolve_init_masks(
    spec: str, level: float | None, languages: list[str], per_language: bool
) -> MaskSet | LanguageMasks:
    """The starting masks for a run over ``languages``: a :class:`LanguageMasks` over exactly
    those languages when ``per_language``, else one :class:`MaskSet`."""
    sources = parse_init_masks(spec)
    if None in sources:
        masks = load_masks_source(sources[None], level)
        if isinstance(masks, LanguageMasks):
            missing = [lang for lang in languages if lang not in masks]
            if missing:
                raise UserError(
                    f"pruning.init_masks: {sources[None]} has no mask for {', '.join(missing)} "
                    f"(it has {', '.join(masks.languages)})"
                )
            if not per_language:
                raise UserError(
                    f"pruning.init_masks: {sources[None]} holds per-language masks; this method takes one mask"
                )
            return LanguageMasks({lang: masks[lang] for lang in languages})
        if per_language:
            return LanguageMasks({lang: masks.clone() for lang in languages})
        return masks
    if not per_language:
        raise UserError("pruning.init_masks: per-language sources (lang=PATH) need a per-language method")
    given = [lang for lang in sources if lang is not None]
    if sorted(given) != sorted(languages):
        raise UserError(
            f"pruning.init_masks gives masks for {', '.join(given)}; the run trains {', '.join(languages)}: "
            "give exactly one source per language"
        )
    out: dict[str, MaskSet] = {}
    for lang in languages:
        masks = load_masks_source(sources[lang], level)
        if isinstance(masks, LanguageMasks):
            if lang not in masks:
                raise UserError(f"pruning.init_masks: {sources[lang]} has no mask for {lang}")
            masks = masks[lang]
        out[lang] = masks
    try:
        return LanguageMasks(out)
    except ValueError as e:
        raise UserError(f"pruning.init_masks: the per-language masks do not match ({e})") from None
