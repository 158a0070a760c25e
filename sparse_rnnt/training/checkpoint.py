"""Checkpoints: safetensors for tensors + JSON for everything else, written atomically, no pickle.

A checkpoint is a directory ``<run>/checkpoints/step-NNNNNNN/``:

- ``model.safetensors``: the model's ``state_dict``;
- ``state.safetensors``: optimizer tensors (``optim.<param index>.<name>``) and RNG states;
- ``checkpoint.json``: step, config, optimizer hyper-parameters, scheduler, sampler and Python RNG
  state, the SHA-256 of every file, and (``meta_sha256``) of its own other content, all checked
  at load time (format 1, before ``meta_sha256``, still loads);
- ``tokenizer.model`` and ``cmvn.safetensors``: so a checkpoint is usable on its own.

``<run>/checkpoints/latest`` names the newest complete checkpoint; it is written only after the
checkpoint directory is in place, so a crash mid-write leaves the previous one as latest.

Crash safety: every file is fsynced before the directory is renamed into place, temporaries left
by a killed writer (``.step-*.tmp``, ``.latest.*.tmp``) are removed by the next save, and loading a
*run* directory (:func:`load_checkpoint`, :func:`load_latest_valid`) verifies the latest
checkpoint and, if it is truncated or corrupt, logs a warning naming the checkpoint and the bad
file and falls back to the newest older checkpoint that verifies. An explicitly named checkpoint
directory is never replaced by another one: if it is corrupt, loading it raises
:class:`UserError` naming the file.

Test hook: when the environment variable ``SPARSE_RNNT_TEST_CHECKPOINT_DELAY`` holds a number of
seconds, :func:`save_checkpoint` sleeps that long in the middle of writing (model tensors written,
metadata not yet), so crash tests can kill the process during a checkpoint write. It is off unless
set and changes nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..io import atomic_path, atomic_write_text, fsync_path, sha256_file
from ..pruning.masks import LanguageMasks, MaskSet

FORMAT_VERSION = 2  # 2: checkpoint.json hashes its own content (meta_sha256); 1 still loads
PRUNER_PREFIX = "pruner/"  # pruner tensors live under "extra.pruner/<key>" in state.safetensors
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Leftovers of a writer killed mid-save: atomic_path's ".step-N.<random>.tmp" directories (and
# ".step-N.old", the replaced copy of a re-saved step), atomic_write_text's ".latest.<random>.tmp".
_STALE_TMP = re.compile(r"^\.((step-\d+|latest)\..+\.tmp|step-\d+\.old)$")
TEST_DELAY_ENV = "SPARSE_RNNT_TEST_CHECKPOINT_DELAY"  # test hook, see the module docstring

log = logging.getLogger(__name__)


def _test_delay() -> None:
    """The crash-test hook (off unless ``SPARSE_RNNT_TEST_CHECKPOINT_DELAY`` is set)."""
    raw = os.environ.get(TEST_DELAY_ENV, "")
    if raw:
        try:
            seconds = float(raw)
        except ValueError:
            return
        if seconds > 0:
            time.sleep(seconds)


def remove_stale_temporaries(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete what a writer killed mid-save left in ``run_dir/checkpoints`` (never a checkpoint
    that ``list_checkpoints`` lists); returns the removed paths. Only one process (rank 0) may
    write a run's checkpoints."""
    root = Path(run_dir) / "checkpoints"
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for p in sorted(root.iterdir()):
        if _STALE_TMP.match(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed


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
    Pruning keeps the new checkpoint and the ``keep - 1`` newest older ones; checkpoints of a
    *later* step than ``step`` are deleted: they belong to the timeline abandoned when the run
    resumed from an older checkpoint (e.g. after the latest one was found corrupt).
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step-{step:07d}"
    remove_stale_temporaries(run_dir)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        model_sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(model_sd, str(tmp / "model.safetensors"))
        _test_delay()
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
        hashes = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "config": config,
            "optimizer": optim_meta,
            "rng_python": _python_rng_to_json(),
            "extra": extra or {},
            "sha256": hashes,
        }
        meta["meta_sha256"] = _meta_digest(meta)
        (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    older = []
    for old in list_checkpoints(run_dir):
        if old == final:
            continue
        if _step_of(old) > step:
            shutil.rmtree(old, ignore_errors=True)
        else:
            older.append(old)
    for old in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of ``checkpoint.json``'s content without its own digest (canonical JSON: a parsed
    and re-serialized file gives the same text, so edits that still parse are caught too)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _step_of(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _is_checkpoint_dir(p: Path) -> bool:
    """A checkpoint directory (as opposed to a run directory): holds ``checkpoint.json``, or is
    named ``step-N`` (then a missing ``checkpoint.json`` is its own problem, not "no checkpoint")."""
    if (p / "checkpoint.json").is_file():
        return True
    return p.is_dir() and bool(_STEP_DIR.match(p.name)) and not (p / "checkpoints").is_dir()


def _candidates(run_dir: Path) -> tuple[list[Path], list[str]]:
    """Checkpoints of a run to try, newest first. A ``step-N`` directory appears only once complete
    (atomic rename), and ``latest`` is written after it, so ``latest`` can lag (a kill between the
    two) but never lead: it is a hint, and problems with it (unreadable, naming no checkpoint,
    naming an older one) are returned."""
    problems: list[str] = []
    order = list(reversed(list_checkpoints(run_dir)))
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        try:
            name = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{latest}: unreadable ({e})")
            name = ""
        if name and _STEP_DIR.match(name) and (run_dir / "checkpoints" / name).is_dir():
            if order and order[0].name != name:
                problems.append(f"{latest}: names {name}, but {order[0].name} is newer (a write cut between "
                                "the two?): the newest is tried first")
        elif name:
            problems.append(f"{latest}: names {name!r}, which is not a checkpoint directory of this run")
    return order, problems


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Accept a checkpoint directory or a run directory (uses its ``latest``, without verifying
    it: :func:`load_checkpoint` verifies and falls back to an older checkpoint when needed)."""
    p = Path(path)
    if _is_checkpoint_dir(p):
        return p
    order, _ = _candidates(p)
    if order:
        return order[0]
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    raise UserError(f"no checkpoint in {p} (expected checkpoint.json or checkpoints/latest)")


def _load_dir(p: Path, verify: bool) -> Checkpoint:
    """Load one checkpoint directory; any defect raises :class:`UserError` naming the file."""
    meta_path = p / "checkpoint.json"
    if not meta_path.is_file():
        raise UserError(f"{p}: checkpoint file checkpoint.json is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: unreadable checkpoint metadata (not a JSON object)")
    version = meta.get("format_version")
    if version not in (1, FORMAT_VERSION) or isinstance(version, bool):
        raise UserError(f"{p}: unsupported checkpoint format {version!r}")
    required = ("step", "config", "optimizer", "rng_python", "sha256") + (("meta_sha256",) if version >= 2 else ())
    missing = [k for k in required if k not in meta]
    if missing:
        raise UserError(f"{meta_path}: corrupt checkpoint metadata (missing {', '.join(missing)})")
    hashes = meta["sha256"]
    try:
        step = int(meta["step"])
        for key in ("config", "sha256"):
            if not isinstance(meta[key], dict):
                raise TypeError(f"{key} is not a mapping")
        if meta["optimizer"] is not None and not isinstance(meta["optimizer"], dict):
            raise TypeError("optimizer is not a mapping")
        # Without their hashes the weights would load unverified: a stripped list is corruption.
        unhashed = [n for n in ("model.safetensors", "state.safetensors") if n not in hashes]
        if unhashed:
            raise ValueError(f"no SHA-256 for {', '.join(unhashed)}")
    except (TypeError, ValueError) as e:
        raise UserError(f"{meta_path}: corrupt checkpoint metadata ({e})") from None
    if version >= 2 and meta["meta_sha256"] != _meta_digest(meta):
        raise UserError(f"{p}: checkpoint file checkpoint.json is corrupted (SHA-256 mismatch)")
    if verify:
        for name, digest in hashes.items():
            f = p / str(name)
            if "/" in str(name) or not f.is_file():
                raise UserError(f"{p}: checkpoint file {name} is missing")
            if sha256_file(f) != digest:
                raise UserError(f"{p}: checkpoint file {name} is corrupted (SHA-256 mismatch)")
    tensors: list[dict[str, torch.Tensor]] = []
    for name in ("model.safetensors", "state.safetensors"):
        try:
            tensors.append(load_file(str(p / name)))
        except Exception as e:  # safetensors raises several types for bad files
            raise UserError(f"{p}: checkpoint file {name} is unreadable ({e})") from None
    return Checkpoint(path=p, step=step, model=tensors[0], state_tensors=tensors[1], meta=meta)


def load_latest_valid(run_dir: str | os.PathLike[str], verify: bool = True) -> tuple[Checkpoint, list[str]]:
    """The newest checkpoint of a run directory that loads and verifies, and the problems found
    on the way (one message per skipped checkpoint, naming it and the bad file).

    Tries the checkpoints newest first (``latest`` is only a hint: see :func:`_candidates`). Each
    problem is also logged as a warning. Raises :class:`UserError` when the run has no checkpoint or none
    is sound (listing every problem).
    """
    p = Path(run_dir)
    order, problems = _candidates(p)
    if not order:
        if not p.exists():
            raise UserError(f"checkpoint not found: {p}")
        raise UserError(f"no checkpoint in {p} (expected checkpoint.json or checkpoints/latest)")
    for problem in problems:
        log.warning("%s", problem)
    for cand in order:
        try:
            ckpt = _load_dir(cand, verify)
        except UserError as e:
            problems.append(str(e))
            log.warning("skipping damaged checkpoint %s: %s", cand.name, e)
            continue
        if problems:
            log.warning("%s: resuming from %s (step %d), the newest sound checkpoint", p, cand.name, ckpt.step)
        return ckpt, problems
    raise UserError(f"{p}: no sound checkpoint ({'; '.join(problems)})")


def load_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> Checkpoint:
    """Load a checkpoint (directory or run directory) without unpickling anything.

    With ``verify``, every file's SHA-256 is checked against ``checkpoint.json``. A checkpoint
    directory with a mismatch, a missing file or unreadable metadata raises :class:`UserError`
    naming the file; for a run directory, a damaged latest checkpoint is reported (logged
    warning naming it and the file) and the newest sound older one is returned instead (see
    :func:`load_latest_valid`).
    """
    p = Path(path)
    if _is_checkpoint_dir(p):
        return _load_dir(p, verify)
    return load_latest_valid(p, verify)[0]


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
