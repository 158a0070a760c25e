"""Checkpoints: safetensors for tensors + JSON for everything else, written atomically, no pickle.

A checkpoint is a directory ``<run>/checkpoints/step-NNNNNNN/``:

- ``model.safetensors``: the model's ``state_dict``;
- ``state.safetensors``: optimizer tensors (``optim.<param index>.<name>``) and RNG states;
- ``checkpoint.json``: step, config, optimizer hyper-parameters, scheduler, sampler and Python RNG
  state, and the SHA-256 of every file, checked at load time;
- ``tokenizer.model`` and ``cmvn.safetensors``: so a checkpoint is usable on its own.

``<run>/checkpoints/latest`` names the newest complete checkpoint; it is written only after the
checkpoint directory is in place, so a crash mid-write leaves the previous one as latest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..io import atomic_path, atomic_write_text
from ..pruning.masks import LanguageMasks, MaskSet

FORMAT_VERSION = 1
PRUNER_PREFIX = "pruner/"  # pruner tensors live under "extra.pruner/<key>" in state.safetensors
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able values."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    # JSON turned tuples (Adam's betas) into lists.
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _python_rng_to_json() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _python_rng_from_json(state: list[Any]) -> None:
    random.setstate((state[0], tuple(state[1]), state[2]))


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    state_tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.meta["config"]

    def optimizer_state(self) -> dict[str, Any]:
        return optimizer_from_flat(self.state_tensors, self.meta["optimizer"])

    def restore_rng(self) -> None:
        torch.set_rng_state(self.state_tensors["rng.torch"])
        if "rng.cuda" in self.state_tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(self.state_tensors["rng.cuda"])
        _python_rng_from_json(self.meta["rng_python"])


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    model: torch.nn.Module,
    *,
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    files: dict[str, str | os.PathLike[str]] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``run_dir/checkpoints/step-<step>`` atomically, point ``latest`` at it, prune old ones.

    ``files`` maps a name inside the checkpoint to a file to copy there (tokenizer, CMVN stats).
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step-{step:07d}"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        model_sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(model_sd, str(tmp / "model.safetensors"))
        state: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["rng.cuda"] = torch.cuda.get_rng_state()
        optim_meta: dict[str, Any] | None = None
        if optimizer is not None:
            tensors, optim_meta = optimizer_to_flat(optimizer)
            state.update(tensors)
        for key, value in (extra_tensors or {}).items():
            state[f"extra.{key}"] = value.detach().cpu().contiguous()
        save_file(state, str(tmp / "state.safetensors"))
        for name, src in (files or {}).items():
            shutil.copyfile(src, tmp / name)
        hashes = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "config": config,
            "optimizer": optim_meta,
            "rng_python": _python_rng_to_json(),
            "extra": extra or {},
            "sha256": hashes,
        }
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Accept a checkpoint directory or a run directory (uses its ``latest``)."""
    p = Path(path)
    if (p / "checkpoint.json").is_file():
        return p
    latest = p / "checkpoints" / "latest"
    if latest.is_file():
        target = p / "checkpoints" / latest.read_text().strip()
        if (target / "checkpoint.json").is_file():
            return target
    ckpts = list_checkpoints(p)
    if ckpts:
        return ckpts[-1]
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    raise UserError(f"no checkpoint in {p} (expected checkpoint.json or checkpoints/latest)")


def load_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> Checkpoint:
    """Load a checkpoint (directory or run directory) without unpickling anything.

    With ``verify``, every file's SHA-256 is checked against ``checkpoint.json``; a mismatch or a
    missing file raises :class:`UserError` naming the file.
    """
    p = resolve_checkpoint(path)
    try:
        meta = json.loads((p / "checkpoint.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{p / 'checkpoint.json'}: unreadable checkpoint metadata ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{p}: unsupported checkpoint format {meta.get('format_version')!r}")
    if verify:
        for name, digest in meta.get("sha256", {}).items():
            f = p / name
            if not f.is_file():
                raise UserError(f"{p}: checkpoint file {name} is missing")
            if _sha256(f) != digest:
                raise UserError(f"{p}: checkpoint file {name} is corrupted (SHA-256 mismatch)")
    try:
        model = load_file(str(p / "model.safetensors"))
        state = load_file(str(p / "state.safetensors"))
    except Exception as e:
        raise UserError(f"{p}: unreadable checkpoint tensors ({e})") from None
    return Checkpoint(path=p, step=int(meta["step"]), model=model, state_tensors=state, meta=meta)


def checkpoint_masks(ckpt: Checkpoint) -> MaskSet | LanguageMasks | None:
    """The masks a pruned checkpoint stored (``Pruner.state_dict`` layout): one :class:`MaskSet`
    (single-mask methods), a :class:`LanguageMasks` (per-language methods), or None (dense)."""
    meta = ckpt.meta.get("extra", {}).get("pruner")
    if meta is None:
        return None
    prefix = "extra." + PRUNER_PREFIX + "mask/"
    packed = {k[len(prefix):]: v for k, v in ckpt.state_tensors.items() if k.startswith(prefix)}
    try:
        shapes: dict[str, list[int]] = {n: list(s) for n, s in meta["shapes"].items()}
        languages = [str(x) for x in meta.get("languages", [])]
        per_language = bool(languages) and all(f"{languages[0]}/{n}" in packed for n in shapes)
        if per_language:
            return LanguageMasks({
                lang: MaskSet.unpack({n: packed[f"{lang}/{n}"] for n in shapes}, shapes) for lang in languages
            })
        return MaskSet.unpack({n: packed[n] for n in shapes}, shapes)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{ckpt.path}: unreadable pruning masks ({e})") from None
