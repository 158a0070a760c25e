"""The training loop: data set-up, Adam + warmup, clipping, bf16 autocast on CUDA, periodic dev
evaluation, JSONL metrics, atomic resumable checkpoints, and (with ``cfg.pruning``) a
:class:`~sparse_rnnt.pruning.methods.Pruner` driven by its protocol, optionally starting from a
dense checkpoint (``init_checkpoint``) whose tokenizer and CMVN stats the pruned run reuses.

Resuming restores the model, optimizer, scheduler, sampler position and RNG states, so a run
interrupted at step k and resumed reaches the same weights as an uninterrupted run (bit-exact on
CPU with the same thread count).

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) the trainer runs data-parallel: see
:mod:`sparse_rnnt.training.distributed` for the batch split, the gradient all-reduce, the mask
checks and what rank 0 does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from ..config import ExperimentConfig, from_dict, load_config, save_config, to_dict
from ..data.dataset import Batch, SpeechDataset, collate
from ..data.features import GlobalCMVN, compute_features, min_eval_samples
from ..data.manifest import Utterance, cap_per_language, load_split, manifest_path
from ..data.quality import QualityLimits, bad_share_error, screen
from ..data.sampler import BucketBatchSampler
from ..data.tokenizer import Tokenizer
from ..errors import UserError
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..model.rnnt import EmformerRNNT, LossOutput, build_model
from ..pruning.analytics import (
    churn_series,
    mask_report,
    plot_overlap,
    plot_sparsity_and_churn,
    write_report,
)
from ..pruning.masks import LanguageMasks, MaskSet
from ..pruning.methods import MULTILINGUAL_METHODS, Pruner, check_initial_sparsity
from .checkpoint import (
    PRUNER_PREFIX,
    Checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .distributed import Distributed, Shard, as_shard, read_env, split_batch
from .evaluate import EvalResult, evaluate
from .guard import LossGuard
from .stage_masks import MASKS_DIR, resolve_init_masks, save_level_snapshot

log = logging.getLogger(__name__)

_T = TypeVar("_T")

TOKENIZER_FILE = "tokenizer.model"
CMVN_FILE = "cmvn.safetensors"
# Everything a run writes at the top of its directory; a fresh run refuses a folder holding
# anything else, so a mistyped --out cannot scatter a run among a user's files.
RUN_ENTRIES = frozenset({
    "config.yaml", "data_report.json", "skipped.jsonl", TOKENIZER_FILE, CMVN_FILE, "metrics.jsonl",
    "checkpoints", "analytics", "tensorboard", MASKS_DIR,
})


def merge_results(parts: list[EvalResult]) -> EvalResult:
    """One :class:`EvalResult` from per-language decodes (disjoint languages)."""
    out = EvalResult(method=parts[0].method if parts else "greedy")
    for part in parts:
        out.per_language.update(part.per_language)
        out.hypotheses.extend(part.hypotheses)
    out.hypotheses.sort(key=lambda h: h["key"])
    return out


def resolve_device(spec: str, what: str = "train.device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA device this machine lacks is a
    :class:`UserError` naming ``what`` (the config key or option that asked for it)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{what} {spec}: CUDA is not available on this machine (use cpu)")
        index = int(spec[5:]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"{what} {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(spec)


def lr_lambda(step: int, cfg: ExperimentConfig) -> float:
    """Multiplier of ``optim.lr`` at ``step`` (linear warmup, then the configured decay)."""
    o = cfg.optim
    warm = max(o.warmup_steps, 0)
    if warm and step < warm:
        return (step + 1) / warm
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "inverse_sqrt":
        return math.sqrt(max(warm, 1) / max(step + 1, 1))
    span = max(cfg.train.max_steps - warm, 1)
    progress = min(max(step - warm, 0) / span, 1.0)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class DataReport:
    """What was kept and skipped (and why) when setting up the training data."""

    kept: dict[str, int]
    skipped: dict[str, list[str]]
    dev_skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> dev utterance keys
    # Training audio that became unreadable after the check (skipped when its batch was built).
    late_skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def counts(d: dict[str, list[str]]) -> dict[str, Any]:
            return {k: {"count": len(v), "first": v[:20]} for k, v in d.items()}

        out = {"kept": self.kept, "skipped": counts(self.skipped),
               "dev_skipped": counts({k: v for k, v in self.dev_skipped.items() if v})}
        if self.late_skipped:
            out["unreadable_during_training"] = {"count": len(self.late_skipped), "first": self.late_skipped[:20]}
        return out


def select_languages(cfg: ExperimentConfig, train: list[Utterance]) -> list[str]:
    present = sorted({u.language for u in train})
    if not cfg.data.languages:
        return present
    missing = [lang for lang in cfg.data.languages if lang not in present]
    if missing:
        raise UserError(
            f"language(s) {', '.join(missing)} not in {manifest_path(cfg.data.manifest_dir, 'train')} "
            f"(present: {', '.join(present) or 'none'})"
        )
    return list(cfg.data.languages)


# Limits of the fault handling, which change no computation: a resumed run may raise them (to
# skip past a stretch of non-finite losses, say); what is shown and logged (the progress bar,
# the metrics rows' spacing); and the machine's share (threads, feature workers: a run moved to
# another machine). Everything else must equal the checkpoint's.
RESUME_MAY_CHANGE = ("train.max_nonfinite_steps", "data.max_bad_fraction", "train.progress", "train.log_every",
                     "train.threads", "data.workers")


def train_items_fingerprint(utts: Sequence[Utterance]) -> dict[str, Any]:
    """``{"count", "sha256"}`` of the training items (keys and durations, in order): what a
    resumed sampler's saved position indexes into."""
    h = hashlib.sha256()
    for u in utts:
        h.update(f"{u.key}\t{u.duration!r}\n".encode("utf-8", "surrogatepass"))
    return {"count": len(utts), "sha256": h.hexdigest()}


def finite_features(pairs: Iterable[tuple[str, torch.Tensor]]) -> Iterator[torch.Tensor]:
    """The features of ``(utterance key, [T, F])`` pairs, or a :class:`UserError` naming the first
    utterance whose features hold NaN or Inf (screening bounds the samples; this names any that
    still slips by, where the CMVN fit would only say its statistics are not finite)."""
    for key, feats in pairs:
        if not bool(torch.isfinite(feats).all()):
            raise UserError(f"utterance {key}: its log-mel features hold NaN or Inf (check its audio)")
        yield feats


def checkpoint_config(ckpt: Checkpoint) -> dict[str, Any]:
    """The config a checkpoint was saved with, as a plain tree with every key of today's config
    (an older checkpoint lacks keys added since; their defaults are what it ran with)."""
    try:
        return to_dict(from_dict(ExperimentConfig, ckpt.config))
    except (UserError, TypeError, ValueError):  # a key since removed: compare the tree as saved
        return dict(ckpt.config)


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` wherever two config trees differ."""
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(a) | set(b), key=str):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(config_diff(va, vb, f"{prefix}{key}."))
        elif va != vb:
            out.append((f"{prefix}{key}", va, vb))
    return out


class Trainer:
    """Multilingual training of an Emformer RNN-T: dense, or pruned when ``cfg.pruning`` is set.

    ``init_checkpoint`` (a checkpoint or run directory) gives the starting weights, tokenizer and
    CMVN stats (copied into the run directory); a resumed run takes its weights from its own
    checkpoint instead.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        out_dir: str | os.PathLike[str],
        *,
        resume: bool = False,
        init_checkpoint: str | os.PathLike[str] | None = None,
    ) -> None:
        # The whole config first: a bad value must fail here, before anything below uses it (the
        # thread count, the device) and before the run directory is created or written.
        cfg.validate()
        self.cfg = cfg
        self.out = Path(out_dir)
        self.resume = resume
        self.init_checkpoint = init_checkpoint
        self.pruner: Pruner | None = None
        self.guard = LossGuard(cfg.train.max_nonfinite_steps)
        self._history_logged = 0
        self._last_lr = 0.0  # the LR of the latest optimizer step (the scheduler already holds the next)
        # Resume: the newest sound checkpoint, read once (by _check_out_dir); its verified
        # tokenizer and CMVN copies take precedence over the run directory's.
        self._resume_ckpt: Checkpoint | None = None
        self._saved_config: ExperimentConfig | None = None
        env = read_env()  # torchrun: data-parallel over WORLD_SIZE processes
        self.is_main = env is None or env.rank == 0  # only rank 0 writes files and evaluates
        self.progress = cfg.train.progress and self.is_main
        self.device = resolve_device(cfg.train.device)
        if env is not None and self.device.type == "cuda":
            if self.device.index is not None:
                raise UserError(
                    f"train.device={cfg.train.device} under torchrun: use auto or cuda (each rank takes "
                    "cuda:LOCAL_RANK)"
                )
            if env.local_rank >= torch.cuda.device_count():
                raise UserError(f"LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} GPU(s)")
            self.device = torch.device("cuda", env.local_rank)
            torch.cuda.set_device(self.device)
        if self.device.type == "cpu":
            per_process = (os.cpu_count() or 1) // (env.local_world_size if env is not None else 1)
            torch.set_num_threads(cfg.train.threads or max(per_process, 1))
        self._check_out_dir()
        self.dist: Distributed | None = Distributed(env, self.device) if env is not None else None

    # -- set-up -------------------------------------------------------------------------------

    def _check_out_dir(self) -> None:
        has_ckpt = bool(list_checkpoints(self.out))
        diff: list[tuple[str, Any, Any]] = []
        if self.resume:
            if not has_ckpt:
                raise UserError(f"--resume: no checkpoint in {self.out}")
            saved_path = self.out / "config.yaml"
            if not saved_path.is_file():
                raise UserError(f"--resume: {saved_path} is missing")
            self._saved_config = load_config(saved_path)  # damaged YAML: a one-line error naming the file
            # The checkpoint's config (hashed with it) is what its weights, optimizer and sampler
            # belong to; config.yaml is only an editable copy of it.
            self._resume_ckpt = load_checkpoint(self.out)
            saved = checkpoint_config(self._resume_ckpt)
            if saved != to_dict(self.cfg):
                diff = config_diff(saved, to_dict(self.cfg))
                allowed = [d for d in diff if d[0] in RESUME_MAY_CHANGE]
                diff = [d for d in diff if d[0] not in RESUME_MAY_CHANGE]
                if not diff and self.is_main:
                    for key, a, b in allowed:
                        log.warning("--resume: %s is now %r (was %r)", key, b, a)
            if diff:
                shown = ", ".join(f"{k} (saved {a!r}, given {b!r})" for k, a, b in diff[:3])
                more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
                raise UserError(
                    f"--resume: the config differs from the one {self._resume_ckpt.path} was saved with in "
                    f"{shown}{more}; resume with that config (undo edits to {saved_path} and drop the "
                    "--config/--set that change it)"
                )
        elif has_ckpt:
            raise UserError(f"{self.out} already holds a training run: pass --resume or choose another --out")
        elif self.out.is_dir():
            # A run that stopped before its first checkpoint may be re-run in place; hidden names
            # are interrupted atomic writes.
            foreign = sorted(p.name for p in self.out.iterdir() if p.name not in RUN_ENTRIES and not p.name.startswith("."))
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise UserError(
                    f"{self.out} holds files that are not a training run's ({shown}): choose a new or empty --out"
                )
        elif self.out.exists():
            raise UserError(f"--out {self.out} exists and is not a directory")

    def setup(self) -> None:
        """Read the data, build the model (and pruner), restore a resumed run.

        Under torchrun rank 0 sets up first (it writes the config, tokenizer, CMVN stats and data
        report) while the others wait; then they set up from its files, and all ranks check that
        they hold the same weights and masks."""
        if self.dist is None:
            self._setup()
            return
        self.dist.on_main(self._setup, "set up the run")
        self.dist.everywhere(lambda: None if self.is_main else self._setup(), "set up the run")
        self.dist.check_model(self.model, self.step)
        if self.pruner is not None:
            self.dist.check_masks(self.pruner, self.step)

    def _setup(self) -> None:
        cfg = self.cfg
        if not cfg.data.manifest_dir:
            raise UserError("data.manifest_dir is not set (the directory with train.jsonl and dev.jsonl)")
        train_manifest = manifest_path(cfg.data.manifest_dir, "train")
        if not train_manifest.is_file():  # before anything is written, and saying where the path came from
            where = (f" (relative to the working directory {Path.cwd()}; a config saved by another run keeps "
                     "the path as it was given there: pass --set data.manifest_dir=DIR)"
                     if not Path(cfg.data.manifest_dir).is_absolute() else "")
            raise UserError(f"manifest not found: {train_manifest}: data.manifest_dir={cfg.data.manifest_dir}{where}")
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        # Read the dense checkpoint first: a bad --init must fail before anything is written.
        self.init: Checkpoint | None = load_checkpoint(self.init_checkpoint) if self.init_checkpoint else None
        train = load_split(cfg.data.manifest_dir, "train")
        if not train:
            raise UserError(f"no training utterances in {manifest_path(cfg.data.manifest_dir, 'train')}")
        self.languages = select_languages(cfg, train)
        train = [u for u in train if u.language in self.languages]
        dev_path = manifest_path(cfg.data.manifest_dir, "dev")
        dev = load_split(cfg.data.manifest_dir, "dev", self.languages) if dev_path.is_file() else []
        dev = cap_per_language(dev, cfg.data.dev_max_utterances)
        # Starting masks are read (and checked against the schedule) before anything is written
        # and before the data work.
        initial_masks = self._initial_masks()

        self.out.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            config_path = self.out / "config.yaml"
            if not self.resume:
                save_config(cfg, config_path)
            elif self._saved_config is not None and to_dict(self._saved_config) != to_dict(cfg):
                # Resumed with --config equal to the checkpoint's: put config.yaml back in line.
                self._say(f"--resume: {config_path} differs from the checkpoint's config: rewritten")
                save_config(cfg, config_path)

        self.tokenizer = self._tokenizer(train)
        # Bad items (unreadable, empty, wrong-rate, clipped or too long audio; empty or
        # untokenizable text) are skipped with a reason; above data.max_bad_fraction the run stops.
        limits = QualityLimits(max_duration=cfg.data.max_duration, clip_fraction=cfg.data.clip_fraction,
                               max_bad_fraction=cfg.data.max_bad_fraction,
                               min_samples=min_eval_samples(cfg.features, cfg.model.time_reduction_stride))
        if self.is_main:
            kept, skipped = screen(train, self.tokenizer, cfg.features, limits,
                                   workers=min(8, self._feature_workers()), progress=self.progress)
        else:  # rank 0 screened first: the same items, without reading every file again
            kept, skipped = self._screened_by_main(train, "train")
        for reason, keys in skipped.items():
            if keys:
                self._say(f"data: skipped {len(keys)} training utterance(s): {reason} (e.g. {', '.join(keys[:3])})",
                          logging.WARNING)
        if not kept:
            why = ", ".join(f"{len(keys)} {reason}" for reason, keys in skipped.items() if keys)
            raise UserError(f"every training utterance was skipped ({why})")
        # Dev audio the periodic evaluation could not decode (unreadable, wrong rate, too short,
        # NaN/Inf) is left out of it, counted in the report: it must not stop a training run.
        dev_limits = QualityLimits(max_duration=math.inf, clip_fraction=1.0, max_bad_fraction=1.0,
                                   min_samples=limits.min_samples)
        if self.is_main:
            dev, dev_skipped = screen(dev, None, cfg.features, dev_limits,
                                      workers=min(8, self._feature_workers()), progress=self.progress)
        else:
            dev, dev_skipped = self._screened_by_main(dev, "dev")
        for reason, keys in dev_skipped.items():
            if keys:
                self._say(f"data: left {len(keys)} dev utterance(s) out of evaluation: {reason} "
                          f"(e.g. {', '.join(keys[:3])})", logging.WARNING)
        self.train_utts, self.dev_utts = kept, dev
        self._train_items = train_items_fingerprint(kept)  # fixed from here on: hashed once, not per checkpoint
        counts = {lang: sum(u.language == lang for u in kept) for lang in self.languages}
        self.report = DataReport(kept=counts, skipped=skipped, dev_skipped=dev_skipped)
        if self.is_main:
            atomic_write_json(self.out / "data_report.json", self.report.to_dict())
            # Every skipped item (the report keeps 20 per reason): {"split", "reason", "key"} per line.
            atomic_write_text(self.out / "skipped.jsonl", "".join(
                json.dumps({"split": split, "reason": reason, "key": key}) + "\n"
                for split, table in (("train", skipped), ("dev", dev_skipped))
                for reason, keys in table.items() for key in keys
            ))
        n_skip = sum(len(v) for v in skipped.values())
        self._say(f"data: {len(kept)} training utterances ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
                  f"{n_skip} skipped, {len(dev)} dev")

        self.features: dict[str, torch.Tensor] | None = None
        if cfg.data.cache_features:
            self.features = compute_features(
                kept + dev, cfg.features, workers=self._feature_workers(), progress=self.progress
            )
        self.cmvn = self._cmvn()
        self.dataset = SpeechDataset(
            kept, self.tokenizer, self.cmvn, features=self.features, feature_config=cfg.features,
            spec_augment=cfg.spec_augment, languages=self.languages, seed=cfg.train.seed,
        )
        self._utterance_languages = self.dataset.utterance_languages
        self.sampler = BucketBatchSampler(
            self.dataset.durations, self.dataset.utterance_languages, cfg.batch,
            frames_per_second=cfg.features.frames_per_second,
        )
        # ASR Pathways with summed updates: one batch of every language per optimizer step, each
        # language from its own sampler (index lists map back into the dataset).
        self.language_samplers: dict[str, tuple[list[int], BucketBatchSampler]] | None = None
        p = cfg.pruning
        if p is not None and p.method == "pathways" and p.aggregation == "sum":
            self.language_samplers = {}
            for lang in self.languages:
                idx = [i for i, x in enumerate(self.dataset.utterance_languages) if x == lang]
                if not idx:
                    raise UserError(f"pathways with summed updates: no training utterances for {lang}")
                sampler = BucketBatchSampler(
                    [self.dataset.durations[i] for i in idx], [lang] * len(idx), cfg.batch,
                    frames_per_second=cfg.features.frames_per_second,
                )
                self.language_samplers[lang] = (idx, sampler)
        self.model: EmformerRNNT = build_model(cfg.model, self.tokenizer.num_symbols, verbose=self.progress)
        self.model.to(self.device)
        if self.init is not None and not self.resume:
            self._load_init_weights(self.init)
        if cfg.pruning is not None:
            self.pruner = Pruner(cfg.pruning, self.model, languages=self.languages)
            if not self.resume:
                self.pruner.prepare(initial_masks=initial_masks)
                self._snapshot_levels(0)
        o = cfg.optim
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_lambda(s, cfg))
        self.step = 0
        if self.resume:
            self._restore()

    def _initial_masks(self) -> MaskSet | LanguageMasks | None:
        """``pruning.init_masks`` for a fresh pruning run (None otherwise), checked against the
        schedule's first level."""
        p = self.cfg.pruning
        if p is None or self.resume or not p.init_masks.strip():
            return None
        masks = resolve_init_masks(p.init_masks, p.init_level, self.languages,
                                   per_language=p.method in MULTILINGUAL_METHODS)
        check_initial_sparsity(p, masks)
        return masks

    def _say(self, msg: str, level: int = logging.INFO) -> None:
        """Print ``msg`` above the progress bar; without one, log it at ``level`` (the CLI shows
        WARNING and above, so a skip summary is not lost with ``train.progress=false``)."""
        if self.progress:
            log.info(msg)
            tqdm.write(msg)
        else:
            log.log(level, msg)

    def _feature_workers(self) -> int:
        return self.cfg.data.workers or os.cpu_count() or 1

    def _load_init_weights(self, ckpt: Checkpoint) -> None:
        try:
            self.model.load_state_dict(ckpt.model)
        except RuntimeError as e:
            raise UserError(
                f"{ckpt.path}: its weights do not fit the model of this config ({str(e).splitlines()[0]})"
            ) from None

    def _screened_by_main(self, utts: list[Utterance], split: str) -> tuple[list[Utterance], dict[str, list[str]]]:
        """DDP ranks other than 0: rank 0's screening of ``split`` (its ``skipped.jsonl``)."""
        path = self.out / "skipped.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        skipped: dict[str, list[str]] = {}
        for row in rows:
            if row["split"] == split:
                skipped.setdefault(row["reason"], []).append(row["key"])
        gone = {key for keys in skipped.values() for key in keys}
        return [u for u in utts if u.key not in gone], skipped

    def _from_resume_checkpoint(self, name: str) -> Path | None:
        """The run directory's ``name``, made equal to the resumed checkpoint's copy (which its
        SHA-256 vouches for); None when there is no such copy."""
        if self._resume_ckpt is None or not (self._resume_ckpt.path / name).is_file():
            return None
        src, dst = self._resume_ckpt.path / name, self.out / name
        data = src.read_bytes()
        if not dst.is_file() or dst.read_bytes() != data:
            self._say(f"--resume: {dst} is missing or differs from the checkpoint's copy: restored from {src}")
            atomic_write_bytes(dst, data)
        return dst

    def _tokenizer(self, train: list[Utterance]) -> Tokenizer:
        path = self.out / TOKENIZER_FILE
        if not self.is_main:  # rank 0 set up first: read its (checked) tokenizer
            return Tokenizer.load(path)
        if (restored := self._from_resume_checkpoint(TOKENIZER_FILE)) is not None:
            return Tokenizer.load(restored)
        if self.init is not None:
            # The pruned model must share the dense model's vocabulary.
            src_tok = self.init.path / TOKENIZER_FILE
            if not src_tok.is_file():
                raise UserError(f"{self.init.path}: no {TOKENIZER_FILE} in the initial checkpoint")
            tok = Tokenizer.load(src_tok)
            want = self.init.meta.get("extra", {}).get("num_symbols")
            if want is not None and int(want) != tok.num_symbols:
                raise UserError(
                    f"{self.init.path}: tokenizer has {tok.num_symbols} symbols but the checkpoint was "
                    f"trained with {want}"
                )
            self._write_tokenizer(tok)
            return tok
        if self.cfg.data.tokenizer:
            tok = Tokenizer.load(Path(self.cfg.data.tokenizer))
            self._write_tokenizer(tok)
            return tok
        if path.exists() and self.resume:
            return Tokenizer.load(path)
        return Tokenizer.train([u.text for u in train], self.cfg.tokenizer, path)

    def _write_tokenizer(self, tok: Tokenizer) -> None:
        """Make the run's tokenizer.model the one this run trains with: a copy left by an earlier
        attempt in this directory would otherwise end up in every checkpoint."""
        path = self.out / TOKENIZER_FILE
        data = tok.to_bytes()
        if not path.is_file() or path.read_bytes() != data:
            atomic_write_bytes(path, data)

    def _cmvn(self) -> GlobalCMVN:
        path = self.out / CMVN_FILE
        if not self.is_main:  # rank 0 set up first: read its statistics
            return GlobalCMVN.load(path)
        if (restored := self._from_resume_checkpoint(CMVN_FILE)) is not None:
            return GlobalCMVN.load(restored)
        if self.resume and path.exists():
            return GlobalCMVN.load(path)
        if self.init is not None:
            src = self.init.path / CMVN_FILE
            if not src.is_file():
                raise UserError(f"{self.init.path}: no {CMVN_FILE} in the initial checkpoint")
            shutil.copyfile(src, path)
            return GlobalCMVN.load(path)
        if self.features is not None:
            feats = ((u.key, self.features[u.key]) for u in self.train_utts)
        else:
            feats = iter(compute_features(self.train_utts, self.cfg.features, workers=self._feature_workers(),
                                          progress=self.progress).items())
        cmvn = GlobalCMVN.fit(finite_features(feats))
        cmvn.save(path)
        return cmvn

    def _restore(self) -> None:
        ckpt = self._resume_ckpt
        assert ckpt is not None
        self._resume_ckpt = None  # its tensors are not needed once loaded
        try:
            self.model.load_state_dict(ckpt.model)
            self.optimizer.load_state_dict(ckpt.optimizer_state())
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(
                f"--resume: {ckpt.path}: its weights or optimizer state do not fit the model of this "
                f"config ({str(e).splitlines()[0]})"
            ) from None
        self.step = ckpt.step
        try:  # a format-1 checkpoint.json has no digest: its training state may be malformed
            extra = ckpt.meta["extra"]
            self.scheduler.load_state_dict({**self.scheduler.state_dict(), **extra["scheduler"]})
            if "loss_guard" in extra:
                self.guard.load_state_dict(extra["loss_guard"])
            if self.language_samplers is not None:
                states = extra["language_samplers"]
                for lang, (_, sampler) in self.language_samplers.items():
                    sampler.load_state_dict(states[lang])
            else:
                self.sampler.load_state_dict(extra["sampler"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"--resume: {ckpt.path}: damaged training state in checkpoint.json "
                            f"({type(e).__name__}: {e})") from None
        saved_items, items = extra.get("train_items"), self._train_items
        if saved_items is not None and saved_items != items and self.is_main:  # older checkpoints lack it
            log.warning(
                "--resume: the training set differs from the one %s was trained on (%s utterances then, %d now: "
                "manifest edits, or audio that became unreadable or readable again); the sampler's saved position "
                "now points into another batch plan, so the run will not match an uninterrupted one",
                ckpt.path, saved_items.get("count", "?") if isinstance(saved_items, dict) else "?", items["count"])
        if self.pruner is not None:
            extra = ckpt.meta["extra"]
            n = len("extra." + PRUNER_PREFIX)
            tensors = {k[n:]: v for k, v in ckpt.state_tensors.items() if k.startswith("extra." + PRUNER_PREFIX)}
            if "pruner" not in extra:
                raise UserError(f"--resume: {ckpt.path} holds no pruner state (a dense checkpoint?)")
            self.pruner.load_state_dict({"meta": extra["pruner"], "tensors": tensors})
            self._history_logged = len(self.pruner.history)
        ckpt.restore_rng()
        # The global batch schedule does not depend on the world size: resuming on another number
        # of ranks re-splits the remaining global batches (see distributed.py).
        saved_world = int(ckpt.meta["extra"].get("world_size", 1))
        world = self.dist.world_size if self.dist is not None else 1
        if saved_world != world:
            self._say(f"resuming a run saved on {saved_world} process(es) on {world}: the global batches "
                      "continue unchanged, split over the new number of ranks")
        self._say(f"resumed from {ckpt.path} at step {self.step}")

    # -- loop ---------------------------------------------------------------------------------

    def _autocast(self):
        amp = self.cfg.train.amp
        if self.device.type == "cuda" and amp in ("auto", "bf16"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if amp == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _batch_language(self, batch: Batch | Shard) -> str | None:
        """The batch's language for per-language pruners (monolingual batches), else None. Under
        DDP it is the global batch's language, the same on every rank."""
        if self.pruner is None or not self.pruner.multilingual:
            return None
        langs = as_shard(batch).languages
        if len(langs) != 1:
            raise RuntimeError(f"per-language pruning needs monolingual batches, got {list(langs)}")
        return langs[0]

    def _forward_backward(self, shard: Shard, language: str | None) -> LossOutput | None:
        """Loss and backward pass on this rank's part of the batch (None if it has no utterance)."""
        if shard.batch is None:
            return None
        batch = shard.batch.to(self.device)
        pruner = self.pruner
        masked = pruner.masked_forward(language) if pruner is not None else contextlib.nullcontext()
        with masked:  # soft masks: the backward pass must see the masked weights too
            with self._autocast():
                out = self.model(batch.features, batch.feature_lengths, batch.targets, batch.target_lengths)
            # DDP: weight by this rank's share of the global batch; the all-reduce SUMs (distributed.py).
            (out.loss if self.dist is None else out.loss * shard.weight).backward()
        return out

    def _reduce(self, outs: list[tuple[LossOutput | None, Shard]]) -> list[dict[str, float]]:
        """Losses per forward pass (``loss``, ``rnnt``, ``ctc``). DDP: first all-reduce the gradients
        into the global batch's mean gradient (identical on every rank); the losses returned are
        then the global batches' means."""
        if self.dist is None:
            done = [out for out, _ in outs if out is not None]  # single process: every part has utterances
            return [{"loss": float(out.loss.detach()), "rnnt": float(out.rnnt),
                     **({"ctc": float(out.ctc)} if out.ctc is not None else {})} for out in done]
        keys = ("loss", "rnnt", "ctc") if self.model.ctc_head is not None else ("loss", "rnnt")
        values = []
        for out, shard in outs:
            for k in keys:
                value = None if out is None else getattr(out, k)
                values.append(0.0 if value is None else float(value.detach()) * shard.weight)
        summed = self.dist.reduce_gradients(list(self.model.parameters()), values)
        return [dict(zip(keys, summed[i * len(keys):(i + 1) * len(keys)], strict=True)) for i in range(len(outs))]

    def train_step(self, batch: Batch | Shard | dict[str, Batch] | dict[str, Shard]) -> dict[str, float]:
        """One optimizer step on ``batch`` (a dict ``{language: Batch}`` for pathways "sum"; under
        DDP a :class:`Shard`: this rank's part of the global batch)."""
        if isinstance(batch, dict):
            return self._summed_step(batch)
        self.model.train()
        shard = as_shard(batch)
        pruner = self.pruner
        language = self._batch_language(shard)
        self.optimizer.zero_grad(set_to_none=True)
        out = self._forward_backward(shard, language)
        # --- DDP: the gradients become the global-batch mean on every rank HERE, before the
        # pruner masks them (same masks on all ranks: masking commutes with the averaging).
        losses = self._reduce([(out, shard)])[0]
        # Decided on the reduced (global) loss, so every rank skips the same steps.
        if not self._loss_ok(losses, [shard]):
            return {**losses, "skipped": 1.0}
        if pruner is not None:
            pruner.before_optimizer_step(self.step + 1, language)
        norm = self._optimizer_step()
        stats = {**losses, "grad_norm": float(norm)}
        if pruner is not None:
            pruner.after_optimizer_step(self.step)
            pruner.update_mask(self.step, language)
        return stats

    def _optimizer_step(self) -> torch.Tensor:
        """Clip the global gradient norm (returned, before clipping), step Adam and the LR schedule."""
        clip = self.cfg.optim.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        self.optimizer.step()
        self._last_lr = float(self.optimizer.param_groups[0]["lr"])  # what this update used
        self.scheduler.step()
        self.step += 1
        return norm

    def _loss_ok(self, losses: dict[str, float], shards: list[Shard]) -> bool:
        """False for a non-finite loss: the step is skipped (gradients dropped, no optimizer
        step), counted, and too many in a row stop the run naming the batches."""
        keys = [k for s in shards if s.batch is not None for k in s.batch.keys]
        if self.dist is not None and not math.isfinite(losses["loss"]):
            # The loss is the global batch's, the same on every rank: name all of its utterances.
            keys = [k for part in self.dist.gather(keys) for k in part]
        if self.guard.check(torch.tensor(losses["loss"]), keys, self.step + 1):
            return True
        self.optimizer.zero_grad(set_to_none=True)
        self._say(f"step {self.step + 1}: non-finite loss, step skipped ({self.guard.skipped} so far)")
        return False

    def _summed_step(self, batches: dict[str, Batch] | dict[str, Shard]) -> dict[str, float]:
        """ASR Pathways, summed aggregation: ``Σ_l m_l ⊙ g_l`` over one batch per language."""
        pruner = self.pruner
        assert pruner is not None
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        outs = []
        for lang, batch in batches.items():
            shard = as_shard(batch)
            outs.append((self._forward_backward(shard, lang), shard))
            pruner.accumulate_grads(lang)
        pruner.before_optimizer_step(self.step + 1, None)
        # DDP: one all-reduce of Σ_l m_l ⊙ (n_r/N_l) g_{l,r}, now back in .grad: the sum over ranks
        # is Σ_l m_l ⊙ mean_l (identical masks). Reducing per language before accumulate_grads
        # would give the same result with one collective per language.
        per_language = self._reduce(outs)
        losses: dict[str, list[float]] = {k: [d[k] for d in per_language if k in d] for k in ("loss", "rnnt", "ctc")}
        if not self._loss_ok({"loss": sum(losses["loss"])}, [s for _, s in outs]):
            return {"loss": sum(losses["loss"]), "skipped": 1.0}
        norm = self._optimizer_step()
        pruner.after_optimizer_step(self.step)
        pruner.update_mask(self.step, None)
        stats = {k: sum(v) / len(v) for k, v in losses.items() if v}
        stats["grad_norm"] = float(norm)
        return stats

    def _batches(self):
        """Endless batches, epoch after epoch, from the sampler's current position (pathways
        "sum": dicts with one batch per language, each language cycling through its own epochs)."""
        if self.language_samplers is not None:
            streams = {lang: self._language_stream(idx, s) for lang, (idx, s) in self.language_samplers.items()}
            while True:
                yield {lang: next(stream) for lang, stream in streams.items()}
        while True:
            self.dataset.set_epoch(self.sampler.epoch)
            whole, made = self.sampler.state_dict()["consumed"] == 0, 0  # a resumed pass may start at the end
            for idx in self.sampler:
                batch = self._collate(idx)
                if batch is not None:
                    made += 1
                    yield batch
            if whole:
                self._require_batches(made, self.sampler.epoch)
            self.sampler.set_epoch(self.sampler.epoch + 1)

    def _language_stream(self, idx: list[int], sampler: BucketBatchSampler):
        while True:
            whole, made = sampler.state_dict()["consumed"] == 0, 0
            for sub in sampler:
                self.dataset.set_epoch(sampler.epoch)  # SpecAugment draws depend on the epoch
                batch = self._collate([idx[i] for i in sub])
                if batch is not None:
                    made += 1
                    yield batch
            if whole:
                self._require_batches(made, sampler.epoch)
            sampler.set_epoch(sampler.epoch + 1)

    def _require_batches(self, made: int, epoch: int) -> None:
        """A whole epoch (not the rest of one a resumed run started at) without a batch: every
        item's audio became unreadable after the data check (a dropped mount, say); the sampler
        would go on yielding nothing forever."""
        if made == 0:
            gone = sorted(self.dataset.unreadable)
            if not gone:
                raise UserError(f"epoch {epoch} gave no training batch (the batch sampler drew none)")
            raise UserError(f"epoch {epoch} gave no training batch: the audio of every utterance it drew became "
                            f"unreadable after the data check ({len(gone)} so far, e.g. {', '.join(gone[:3])}: "
                            f"{self.dataset.unreadable[gone[0]]})")

    def _check_late_skips(self) -> None:
        """Count the training audio that became unreadable after the data check (all ranks), write
        it to ``data_report.json`` and stop the run, on every rank, once the bad share (with the
        screened items) passes ``data.max_bad_fraction``."""
        local = sorted(self.dataset.unreadable)
        merged = sorted({k for keys in self.dist.gather(local) for k in keys}) if self.dist is not None else local
        if merged == self.report.late_skipped:
            return
        self._say(f"data: {len(merged)} training utterance(s) became unreadable during training, skipped "
                  f"(e.g. {', '.join(merged[:3])})", logging.WARNING)
        self.report.late_skipped = merged
        if self.is_main:
            atomic_write_json(self.out / "data_report.json", self.report.to_dict())
        screened = sum(len(v) for v in self.report.skipped.values())
        err = bad_share_error({**self.report.skipped, "unreadable during training": merged},
                              sum(self.report.kept.values()) + screened, self.cfg.data.max_bad_fraction)
        if err is not None:
            raise err

    def _collate(self, idx: list[int]) -> Batch | Shard | None:
        """The batch of dataset indices ``idx``; under DDP ``idx`` is the global batch (the same on
        every rank) and this rank collates only its part of it."""
        if self.dist is None:
            items = self.dataset.load_items(idx)  # drops items whose audio turned out unreadable
            return collate(items) if items else None
        part = split_batch(idx, self.dist.rank, self.dist.world_size)
        items = self.dataset.load_items(part)
        size = len(idx)
        if self.features is None:
            # Audio is read per batch and may fail on any rank: weigh by what all ranks loaded, and
            # skip a batch nobody could load, as one process does (the feature cache cannot fail).
            size = int(self.dist.sum_values([len(items)])[0])
            if size == 0:
                return None
        return Shard(
            batch=collate(items) if items else None,
            global_size=size,
            languages=tuple(sorted({self._utterance_languages[i] for i in idx})),
        )

    @property
    def epoch(self) -> int:
        if self.language_samplers is not None:
            return min(s.epoch for _, s in self.language_samplers.values())
        return self.sampler.epoch

    def _log_mask_events(self, metrics: Any, *, snapshot: bool) -> None:
        """The mask updates (level steps, re-ranks) not logged yet: one ``metrics`` row at the
        current step with their sparsity and churn, and (``snapshot``) the level's masks saved.
        The events follow the schedule, so every rank checks its masks at the same step."""
        if self.pruner is None or len(self.pruner.history) <= self._history_logged:
            return
        if self.dist is not None:
            self.dist.check_masks(self.pruner, self.step)
        if snapshot:
            self._snapshot_levels(self.step)
        events = self.pruner.history[self._history_logged:]
        self._history_logged = len(self.pruner.history)
        if self.is_main:
            metrics.write(json.dumps({"step": self.step, "sparsity": self.sparsity(), "pruning": events}) + "\n")
            metrics.flush()

    def _snapshot_levels(self, step: int) -> None:
        """Save the masks right after a sparsity step taken at ``step`` (``masks/level-*.safetensors``)."""
        pruner = self.pruner
        if pruner is None or not self.is_main:
            return
        if any(h["event"] == "level" and h["step"] == step for h in reversed(pruner.history)):
            masks = pruner.language_masks() if pruner.multilingual else pruner.masks()
            save_level_snapshot(self.out, pruner.level, masks)

    def write_analytics(self) -> Path | None:
        """``<run>/analytics/``: ``masks.json`` (sparsity per layer and language, pathway IoU,
        union sparsity), ``history.json`` (every mask update, with its churn)
        and the plots ``overlap.png`` (per-language methods) and ``sparsity_churn.png``."""
        pruner = self.pruner
        if pruner is None:
            return None
        out = self.out / "analytics"
        out.mkdir(parents=True, exist_ok=True)
        masks = pruner.language_masks() if pruner.multilingual else pruner.masks()
        report = mask_report(masks)
        report.update(step=self.step, method=pruner.config.method, level=pruner.level)
        write_report(out / "masks.json", report)
        write_report(out / "history.json", {"history": pruner.history, **churn_series(pruner.history)})
        if pruner.multilingual:
            plot_overlap(report, out / "overlap.png")
        if pruner.history:
            plot_sparsity_and_churn(pruner.history, out / "sparsity_churn.png")
        return out

    def sparsity(self) -> float:
        """Achieved sparsity of the pruning mask (per-language pruners: mean over languages)."""
        if self.pruner is None:
            return 0.0
        if self.pruner.multilingual:
            values = [self.pruner.masks(lang).sparsity() for lang in self.pruner.languages]
            return sum(values) / len(values)
        return self.pruner.masks().sparsity()

    def _decode(self, utts: list[Utterance]) -> EvalResult:
        return evaluate(
            self.model, utts, self.tokenizer, self.cmvn, self.cfg.features,
            features=self.features, device=self.device, progress=self.progress,
        )

    def evaluate_dev(self) -> EvalResult | None:
        """Greedy dev WER; a pruned model decodes with its masks (per language for pathways)."""
        if not self.dev_utts:
            return None
        pruner = self.pruner
        if pruner is None:
            return self._decode(self.dev_utts)
        if not pruner.multilingual:
            with pruner.masked_forward(None):  # soft methods keep dense theta: decode theta * m
                return self._decode(self.dev_utts)
        parts = []
        for lang in self.languages:
            utts = [u for u in self.dev_utts if u.language == lang]
            if utts:
                with pruner.masked_forward(lang):
                    parts.append(self._decode(utts))
        return merge_results(parts)

    def save(self) -> Path:
        files = {TOKENIZER_FILE: self.out / TOKENIZER_FILE, CMVN_FILE: self.out / CMVN_FILE}
        extra: dict[str, Any] = {
            "scheduler": {"last_epoch": self.scheduler.last_epoch, "_step_count": self.scheduler._step_count},
            "sampler": self.sampler.state_dict(), "languages": self.languages,
            **({"language_samplers": {lang: smp.state_dict() for lang, (_, smp) in self.language_samplers.items()}}
               if self.language_samplers is not None else {}),
            "num_symbols": self.tokenizer.num_symbols, "loss_guard": self.guard.state_dict(),
            "world_size": self.dist.world_size if self.dist is not None else 1,
            "train_items": self._train_items,
        }
        extra_tensors: dict[str, torch.Tensor] = {}
        if self.pruner is not None:
            state = self.pruner.state_dict()
            extra["pruner"] = state["meta"]
            extra_tensors = {PRUNER_PREFIX + k: v for k, v in state["tensors"].items()}
            if self.init is not None:
                extra["init_checkpoint"] = str(self.init.path)
        return save_checkpoint(
            self.out, self.step, self.model, config=to_dict(self.cfg), optimizer=self.optimizer,
            extra=extra, extra_tensors=extra_tensors, files=files, keep=self.cfg.train.keep_checkpoints,
        )

    def _on_main(self, fn: Callable[[], _T], what: str) -> _T | None:
        """``fn()`` on rank 0 only (DDP: the other ranks wait and get None)."""
        return fn() if self.dist is None else self.dist.on_main(fn, what)

    def _save_all(self) -> None:
        self.save()
        self.write_analytics()

    def _frames(self, batch: Batch | Shard | dict[str, Batch] | dict[str, Shard]) -> float:
        """Feature frames trained on in this step (DDP: summed over the ranks)."""
        parts = [as_shard(b).batch for b in (batch.values() if isinstance(batch, dict) else (batch,))]
        frames = float(sum(b.feature_lengths.sum() for b in parts if b is not None))
        return frames if self.dist is None else self.dist.sum_values([frames])[0]

    def run(self) -> dict[str, Any]:
        """Train to ``train.max_steps``; returns the final dev result (if any) and timings.
        Under torchrun every rank calls it; it leaves the process group it joined at the end."""
        # train.tf32 rules float32 matmuls for the run only: torch's flag, which cuBLAS and the
        # masked layers (model/masked.py) both follow, is put back afterwards.
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.cfg.train.tf32
        try:
            self._check_schedule_fits()  # before any work
            return self._run()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            if self.dist is not None:
                self.dist.close()

    def _check_schedule_fits(self) -> None:
        """Refuse a pruning schedule whose last sparsity step comes after ``train.max_steps`` (the
        run would end below the target); warn when it is the final step (never fine-tuned)."""
        p = self.cfg.pruning
        if p is None or p.method == "pathways":  # pathways keeps its stage-1 masks: no schedule
            return
        steps = p.build_schedule().prune_steps()
        last, max_steps = (steps[-1] if steps else 0), self.cfg.train.max_steps
        if last > max_steps:
            raise UserError(
                f"the pruning schedule takes its last sparsity step (to {p.target_sparsity:g}) at step {last}, "
                f"after the run's last step (train.max_steps / --steps {max_steps}): the target would never be "
                f"reached; pass --steps above {last}, or a smaller --interval ({p.interval}) or fewer --levels "
                f"({','.join(f'{x:g}' for x in p.levels)})"
            )
        if last == max_steps and last > 0 and self.is_main:
            log.warning(
                "the pruning schedule's last sparsity step (to %g) is the run's final step %d: the model "
                "is never trained at the target sparsity (pass --steps above %d to fine-tune it)",
                p.target_sparsity, last, last,
            )

    def _run(self) -> dict[str, Any]:
        created = not self.out.exists()
        before = set() if created or not self.out.is_dir() else {p.name for p in self.out.iterdir()}
        try:
            self.setup()
        except (UserError, KeyboardInterrupt):
            # Bad input found during set-up: leave nothing behind (a started run stays resumable).
            if self.is_main and created:
                shutil.rmtree(self.out, ignore_errors=True)
            elif self.is_main and not self.resume:
                # A folder that existed (empty, or a run stopped before its first checkpoint):
                # remove the entries this attempt added, nothing that was there before.
                for name in sorted(RUN_ENTRIES - before):
                    entry = self.out / name
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
            raise
        t = self.cfg.train
        # DDP: only rank 0 writes metrics and TensorBoard logs.
        metrics_path = self.out / "metrics.jsonl" if self.is_main else Path(os.devnull)
        if self.resume and self.is_main:
            _rewind_metrics(metrics_path, self.step)
        # Resumed: TensorBoard drops the events the crashed run logged after the checkpoint.
        writer = _tensorboard(self.out, purge_step=self.step + 1 if self.resume else None) if self.is_main else None
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step", disable=not self.progress)
        start = time.perf_counter()
        window: list[dict[str, float]] = []
        last_dev: EvalResult | None = None
        batches = self._batches()
        # Not resumed: a new run, also in place of one stopped before its first checkpoint, whose
        # rows must not stay in front of this run's.
        with metrics_path.open("a" if self.resume else "w", encoding="utf-8") as metrics:
            # prepare()'s step-0 event (a one-shot or first level, LAP masks) gets its own row, not
            # the first optimizer step's; its level snapshot was saved in set-up.
            self._log_mask_events(metrics, snapshot=False)
            while self.step < t.max_steps:
                batch = next(batches)
                if self.dist is not None:  # dropout: per (seed, step, rank), so resumes are exact
                    self.dist.seed_step(t.seed, self.step)
                t0 = time.perf_counter()
                stats = self.train_step(batch)
                if "skipped" in stats:  # non-finite loss: no optimizer step was taken
                    continue
                stats["sec"] = time.perf_counter() - t0
                stats["frames"] = self._frames(batch)
                window.append(stats)
                bar.update(1)
                self._log_mask_events(metrics, snapshot=True)
                if t.log_every and (self.step % t.log_every == 0 or self.step == t.max_steps):
                    row = {k: sum(w[k] for w in window if k in w) / len(window) for k in window[-1]}
                    if self.pruner is not None and self.is_main:  # a pass over every mask: only when logging
                        row["sparsity"] = self.sparsity()
                    row.update(step=self.step, epoch=self.epoch, lr=self._last_lr,
                               frames_per_sec=row["frames"] / max(row["sec"], 1e-9))
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    bar.set_postfix(loss=f"{row['loss']:.2f}", lr=f"{row['lr']:.2e}")
                    if writer is not None:
                        for k in ("loss", "rnnt", "ctc", "lr", "grad_norm"):
                            if k in row:
                                writer.add_scalar(f"train/{k}", row[k], self.step)
                    window = []
                done = self.step == t.max_steps
                if (t.eval_every and self.step % t.eval_every == 0) or done:
                    last_dev = self._on_main(self.evaluate_dev, "evaluate on dev")
                    if last_dev is not None:
                        row = {"step": self.step, "dev_average_wer": last_dev.average_wer,
                               "dev_wer": {k: v.wer for k, v in last_dev.per_language.items()}}
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                        self._say(f"step {self.step}: dev WER " + ", ".join(
                            f"{k} {100 * v.wer:.1f}%" for k, v in sorted(last_dev.per_language.items()))
                            + f", avg {100 * last_dev.average_wer:.1f}%")
                        if writer is not None:
                            writer.add_scalar("dev/average_wer", last_dev.average_wer, self.step)
                if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or done:
                    self._check_late_skips()  # the same on every rank: each sees the merged list
                    self._on_main(self._save_all, "save a checkpoint")  # the others wait
        bar.close()
        if self.pruner is not None:
            self.pruner.close()  # undo the triton backend's layer swap
        if writer is not None:
            writer.close()
        result = {"steps": self.step, "train_seconds": time.perf_counter() - start,
                  "checkpoint": str(list_checkpoints(self.out)[-1])}
        if last_dev is not None:
            result["dev"] = {k: v for k, v in last_dev.to_dict().items() if k != "hypotheses"}
        return result


def _rewind_metrics(path: Path, step: int) -> None:
    """Drop the rows a crashed run logged after the checkpoint it resumes from (steps > ``step``):
    they are logged again, so the file reads as one uninterrupted run."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            late = int(row.get("step", 0)) > step
        except (ValueError, TypeError, AttributeError):
            late = True  # a line cut by the crash
        if late:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        atomic_write_text(path, "".join(kept))


def _tensorboard(out: Path, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)

