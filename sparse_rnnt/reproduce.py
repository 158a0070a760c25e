"""The paper's comparisons (Xie et al. 2024, Tables 1 and 2) as runs of our own pruning methods.

Scenario 1 (language-specific pruning, every language of the dense model), one row per method:

==========================  =======================================================  ======
row                         runs                                                     stages
==========================  =======================================================  ======
dense                       the dense multilingual model, not trained further        0
LAP                         one ``lap`` run on mixed batches of all languages        1
IMP / LTH                   one monolingual ``imp`` / ``lth`` run per language        1
ASR Pathways (IMP / LTH)    the IMP / LTH runs as stage 1, then one ``pathways`` run  2
Adaptive (IMP / LTH)        one monolingual ``adaptive`` run per language (variant)   1
==========================  =======================================================  ======

Scenario 2 (FR + NL by default): dense, LAP, LTH, ASR Pathways from the LTH masks at the target,
and Dynamic ASR Pathways initialised from the LTH masks at each schedule level (e.g. 20/50/70%)
and from the LAP mask, each stepping up to the target.

Every pruning run starts from the same dense checkpoint, trains ``budget`` optimizer steps with
the staircase ``levels`` (one step every ``budget // len(levels)`` steps; runs that start at a
higher level have fewer steps in their staircase but the same budget) and is evaluated on the
test split, greedy. A monolingual model is scored on its own language; a multilingual one on
each language (with that language's pathway). The table gives the mean and the spread (sample
standard deviation) over ``seeds`` (the training seed: batch order and SpecAugment), the number
of training stages and the total optimizer steps a method needs for all its languages.

Everything lands in ``out``: ``seed-<s>/<run>/`` (ordinary run directories, resumed if a
previous call was interrupted, skipped if complete; a run trained with other settings or from
another dense checkpoint than this call's is refused up front), ``scores/`` (test WERs, each keyed by the
exact checkpoint, test manifest, utterance cap, language and decoding, so a changed input is
scored again; nothing is written into ``--dense``, and ``out`` may not lie in ``--dense`` or the
manifests), ``scenario-<n>.json`` and ``scenario-<n>.md``.
Every option and input is checked before ``out`` is created.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import MAX_SEED, is_device_spec, is_finite_number, is_int
from .config import config_from_tree
from .errors import UserError
from .io import atomic_write_json, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

SCENARIO2_LANGUAGES = ("fr", "nl")
DECODING = "greedy"  # how every model is scored on the test split


@dataclass(frozen=True)
class ReproduceOptions:
    """What to run; see the module docstring. ``budget``: optimizer steps per pruning run."""

    scenario: int
    out: Path
    dense: Path | None = None
    data: Path | None = None
    budget: int = 240
    levels: tuple[float, ...] = (0.2, 0.5, 0.7)
    adapt_every: int | None = None  # default: a quarter of the interval
    seeds: tuple[int, ...] = (0, 1)
    lr: float = 1e-3
    warmup_steps: int = 20
    languages: tuple[str, ...] | None = None
    device: str = "auto"
    threads: int = 0
    eval_limit: int = 0  # test utterances per language (0 = all)
    progress: bool = True

    def validate(self) -> None:
        if self.scenario not in (1, 2):
            raise UserError(f"--scenario must be 1 or 2, got {self.scenario}")
        if not self.levels or any(not 0 < x < 1 for x in self.levels) or list(self.levels) != sorted(set(self.levels)):
            raise UserError(f"--levels must be increasing sparsities in (0, 1), got {list(self.levels)}")
        interval = self.budget // len(self.levels)
        if interval < 2:
            raise UserError(f"--budget {self.budget} is too small for {len(self.levels)} levels (>= 2 steps each)")
        if self.adapt_every is not None and not 0 < self.adapt_every < interval:
            raise UserError(f"--adapt-every must be in [1, {interval - 1}] (below the interval), got {self.adapt_every}")
        if not self.seeds:
            raise UserError("--seeds: give at least one seed")
        bad = [s for s in self.seeds if not is_int(s) or not 0 <= s <= MAX_SEED]
        if bad:
            raise UserError(f"--seeds must be integers in [0, {MAX_SEED}], got {bad[0]!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"--seeds: each seed once, got {list(self.seeds)}")
        if not is_finite_number(self.lr) or self.lr <= 0:
            raise UserError(f"--lr must be a finite positive number, got {self.lr!r}")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise UserError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if not is_int(self.eval_limit) or self.eval_limit < 0:
            raise UserError(f"--eval-limit must be a non-negative integer, got {self.eval_limit!r}")
        if not is_int(self.threads) or self.threads < 0:
            raise UserError(f"--threads must be a non-negative integer, got {self.threads!r}")
        if not is_device_spec(self.device):
            raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.languages is not None:
            if not self.languages:
                raise UserError("--languages: give at least one language")
            if len(set(self.languages)) != len(self.languages):
                raise UserError(f"--languages: each language once, got {', '.join(self.languages)}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserError(f"--out {self.out} exists and is not a directory")



@dataclass
class Run:
    """One pruning run: ``method`` over ``languages`` with extra config overrides."""

    name: str
    method: str
    languages: tuple[str, ...]
    levels: tuple[float, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # runs whose masks this one starts from


@dataclass
class Row:
    """One line of the table: which runs score which language, and what the method costs."""

    label: str
    models: dict[str, str]  # language -> run name ("dense" = the dense checkpoint)
    runs: tuple[str, ...]  # every run the method needs (for stages / steps)
    stages: int


def plan(opts: ReproduceOptions, languages: list[str]) -> tuple[list[Run], list[Row]]:
    """The runs and table rows of ``opts.scenario`` over ``languages``."""
    levels, target = tuple(opts.levels), opts.levels[-1]
    langs = tuple(languages)
    runs: list[Run] = []
    rows: list[Row] = [Row("dense", dict.fromkeys(langs, "dense"), (), 0)]

    def mono(method: str, variant: str | None = None) -> list[str]:
        names = []
        for lang in langs:
            name = f"{method}{'-' + variant if variant else ''}-{lang}"
            over = {"pruning.variant": variant} if variant else {}
            runs.append(Run(name, method, (lang,), levels, over))
            names.append(name)
        return names

    runs.append(Run("lap", "lap", langs, levels))
    rows.append(Row("LAP", dict.fromkeys(langs, "lap"), ("lap",), 1))
    if opts.scenario == 1:
        for method in ("imp", "lth"):
            names = mono(method)
            rows.append(Row(method.upper(), dict(zip(langs, names, strict=True)), tuple(names), 1))
        for method in ("imp", "lth"):
            stage1 = tuple(f"{method}-{lang}" for lang in langs)
            name = f"pathways-{method}"
            spec = ",".join(f"{lang}={{{run}}}" for lang, run in zip(langs, stage1, strict=True))
            runs.append(Run(name, "pathways", langs, levels, {"pruning.init_masks": spec}, stage1))
            rows.append(Row(f"ASR Pathways ({method.upper()})", dict.fromkeys(langs, name), (*stage1, name), 2))
        for variant in ("imp", "lth"):
            names = mono("adaptive", variant)
            rows.append(Row(f"Adaptive ({variant.upper()})", dict(zip(langs, names, strict=True)), tuple(names), 1))
        return runs, rows

    names = mono("lth")
    rows.append(Row("LTH", dict(zip(langs, names, strict=True)), tuple(names), 1))
    spec = ",".join(f"{lang}={{{run}}}" for lang, run in zip(langs, names, strict=True))
    runs.append(Run("pathways-lth", "pathways", langs, levels,
                    {"pruning.init_masks": spec, "pruning.init_level": target}, tuple(names)))
    rows.append(Row(f"ASR Pathways (LTH {target:.0%})", dict.fromkeys(langs, "pathways-lth"),
                    (*names, "pathways-lth"), 2))
    for level in levels:
        name = f"dynamic-lth{round(100 * level)}"
        own = tuple(x for x in levels if x >= level)
        runs.append(Run(name, "dynamic-pathways", langs, own,
                        {"pruning.init_masks": spec, "pruning.init_level": level}, tuple(names)))
        rows.append(Row(f"Dynamic ASR Pathways (LTH {level:.0%})", dict.fromkeys(langs, name), (*names, name), 2))
    runs.append(Run("dynamic-lap", "dynamic-pathways", langs, (target,), {"pruning.init_masks": "{lap}"}, ("lap",)))
    rows.append(Row(f"Dynamic ASR Pathways (LAP {target:.0%})", dict.fromkeys(langs, "dynamic-lap"),
                    ("lap", "dynamic-lap"), 2))
    return runs, rows


def _run_config(opts: ReproduceOptions, dense_cfg: dict[str, Any], run: Run, seed: int, dirs: dict[str, Path],
                manifests: Path) -> Any:
    interval = max(2, opts.budget // len(run.levels))
    adapt = opts.adapt_every or max(1, interval // 4)
    over: dict[str, Any] = {
        "pruning.method": run.method,
        "pruning.schedule": "staircase",
        "pruning.levels": json.dumps(list(run.levels)),
        "pruning.target_sparsity": run.levels[-1],
        "pruning.interval": interval,
        "pruning.adapt_every": min(adapt, interval - 1),
        "data.languages": json.dumps(list(run.languages)),
        "data.manifest_dir": str(manifests),
        "train.max_steps": opts.budget,
        "train.seed": seed,
        "train.eval_every": 0,
        "train.checkpoint_every": max(1, opts.budget // 4),
        "train.keep_checkpoints": 2,
        "train.progress": str(opts.progress).lower(),
        "train.threads": opts.threads,
        "train.device": opts.device,
        "data.dev_max_utterances": 20,
        "optim.lr": opts.lr,
        "optim.warmup_steps": opts.warmup_steps,
        "optim.schedule": "constant",
    }
    if run.method in ("dynamic-pathways", "pathways"):
        over["batch.mode"] = "monolingual"
    for key, value in run.overrides.items():
        if key == "pruning.init_masks":
            value = value.format(**{k: str(v) for k, v in dirs.items()})
        over[key] = value
    base = {k: v for k, v in dense_cfg.items() if k != "pruning"}
    return config_from_tree(base, [f"{k}={v}" for k, v in over.items()])


# Settings that change how a run executes, not what it learns: never a reason to refuse a run; a
# resumed run keeps the values it started with (the Trainer resumes only its exact config).
RUNTIME_KEYS = ("progress", "threads", "device")
INIT_RECORD = ".reproduce-init.json"  # hidden: the Trainer ignores dot-names in a run directory


def _dense_identity(dense: Any) -> dict[str, Any]:
    """The dense checkpoint a run starts from: resolved path and the SHA-256 of its files."""
    return {"path": str(Path(dense.path).resolve()), "sha256": dict(sorted(dense.meta.get("sha256", {}).items()))}


def _resolved_masks(spec: str) -> str:
    """``pruning.init_masks`` (``PATH`` or ``lang=PATH,...``) with resolved paths."""
    items = []
    for item in spec.split(","):
        lang, sep, path = item.partition("=")
        items.append(f"{lang}={Path(path).resolve()}" if sep else str(Path(item).resolve()) if item else item)
    return ",".join(items)


def _comparable(tree: dict[str, Any]) -> dict[str, Any]:
    """A run's config tree without the runtime keys and with its paths resolved, so another
    spelling of the same --out or --data is the same run."""
    tree = copy.deepcopy(tree)
    for key in RUNTIME_KEYS:
        tree.get("train", {}).pop(key, None)
    data, pruning = tree.get("data") or {}, tree.get("pruning") or {}
    if data.get("manifest_dir"):
        data["manifest_dir"] = str(Path(data["manifest_dir"]).resolve())
    if isinstance(pruning.get("init_masks"), str) and pruning["init_masks"].strip():
        pruning["init_masks"] = _resolved_masks(pruning["init_masks"])
    return tree


def run_mismatch(run_dir: Path, cfg: Any, dense: Any) -> list[tuple[str, Any, Any]]:
    """``(what, this run's, this call's)`` wherever the run in ``run_dir`` (its newest sound
    checkpoint) was trained otherwise than this call would train it: config (runtime keys
    aside) and the dense checkpoint it started from. Empty for a run without checkpoints."""
    from .config import to_dict
    from .training.checkpoint import list_checkpoints, load_checkpoint
    from .training.trainer import checkpoint_config, config_diff

    if not list_checkpoints(run_dir):
        return []
    ckpt = load_checkpoint(run_dir)
    diff: list[tuple[str, Any, Any]] = []
    want = _dense_identity(dense)
    record_path = run_dir / INIT_RECORD
    record: Any = None  # written by this module when the run started; older runs lack it
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            record = "unreadable"
    if record is None:
        saved = ckpt.meta.get("extra", {}).get("init_checkpoint")  # the path the Trainer records
        if saved is None or str(Path(saved).resolve()) != want["path"]:
            diff.append(("dense checkpoint", saved, want["path"]))
    elif record != want:  # a damaged record cannot vouch for the run's starting point either
        shown = record.get("path") if isinstance(record, dict) else record
        if shown == want["path"]:
            shown = f"{shown} with other file hashes"
        diff.append(("dense checkpoint", shown, want["path"]))
    diff += config_diff(_comparable(checkpoint_config(ckpt)), _comparable(to_dict(cfg)))
    return diff


def _check_runs(opts: ReproduceOptions, dense: Any, manifests: Path, languages: list[str]) -> None:
    """Refuse, before anything is trained, when a run already under ``opts.out`` was trained
    with other settings or from another dense checkpoint than this call's (reusing it would put
    its numbers under this call's labels; resuming it would mix two settings in one run)."""
    runs, _ = plan(opts, languages)
    for seed in opts.seeds:
        dirs = {r.name: opts.out / f"seed-{seed}" / r.name for r in runs}
        for run in runs:
            run_dir = dirs[run.name]
            diff = run_mismatch(run_dir, _run_config(opts, dense.config, run, seed, dirs, manifests), dense)
            if not diff:
                continue
            shown = ", ".join(f"{k} (run {a!r}, now {b!r})" for k, a, b in diff[:3])
            more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
            hint = " (a run cannot be extended to a larger --budget: its staircase depends on it)" \
                if any(k == "train.max_steps" for k, _, _ in diff) else ""
            raise UserError(
                f"{run_dir} was trained with other settings than this call's: {shown}{more}{hint}; "
                f"choose another --out (or delete {run_dir})"
            )


def _complete(run_dir: Path, steps: int) -> bool:
    from .training.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    return bool(ckpts) and int(ckpts[-1].name.split("-")[1]) >= steps


def _train(cfg: Any, run_dir: Path, dense: Any, steps: int) -> None:
    """Train the run in ``run_dir`` (``_check_runs`` vouched that an existing one matches ``cfg``):
    skip it when complete, resume it with the config it was saved with, or start it afresh."""
    from .config import config_from_tree
    from .training.checkpoint import list_checkpoints, load_checkpoint
    from .training.trainer import Trainer, checkpoint_config

    if _complete(run_dir, steps):
        return
    resume = bool(list_checkpoints(run_dir))
    if resume:
        # Equal up to runtime keys and path spelling: continue with exactly the saved config.
        cfg = config_from_tree(checkpoint_config(load_checkpoint(run_dir)))
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # set-up died before the first checkpoint: start over
        run_dir.mkdir(parents=True)
        atomic_write_json(run_dir / INIT_RECORD, _dense_identity(dense))
    Trainer(cfg, run_dir, resume=resume, init_checkpoint=dense.path).run()


def score_key(ckpt, manifests: Path, language: str, opts: ReproduceOptions) -> dict[str, Any]:
    """Everything that determines a test WER: the exact checkpoint (resolved directory, step and
    the SHA-256 of its files, which ``load_checkpoint`` verified), the test manifest (resolved
    directory and the SHA-256 of ``test.jsonl``), the utterance cap, the language and decoding."""
    return {
        "checkpoint": str(Path(ckpt.path).resolve()),
        "step": int(ckpt.step),
        "checkpoint_sha256": dict(sorted(ckpt.meta.get("sha256", {}).items())),
        "manifests": str(Path(manifests).resolve()),
        "test_sha256": sha256_file(Path(manifests) / "test.jsonl"),
        "split": "test",
        "eval_limit": opts.eval_limit,
        "language": language,
        "decoding": DECODING,
    }


def score_cache_path(out: Path, key: dict[str, Any]) -> Path:
    """``<out>/scores/<lang>-<hash of key>.json``: under the reproduce output, never the model's."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(out) / "scores" / f"{key['language']}-{digest}.json"


def _score(ckpt, manifests: Path, language: str, opts: ReproduceOptions) -> float:
    """Test WER of checkpoint ``ckpt`` on ``language``, cached under ``<out>/scores/`` by
    :func:`score_key` (a cached score is used only when every part of its key matches)."""
    from .training.inference import evaluate_checkpoint

    key = score_key(ckpt, manifests, language, opts)
    cache = score_cache_path(opts.out, key)
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text(encoding="utf-8"))
            if saved.get("key") == key:
                return float(saved["wer"])
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
            pass  # unreadable: score again and overwrite
    result, info = evaluate_checkpoint(ckpt.path, manifests, split="test", languages=[language], method=DECODING,
                                       device=opts.device, progress=False, limit=opts.eval_limit)
    wer = result.per_language[language].wer
    atomic_write_json(cache, {"key": key, "wer": wer, "checkpoint": info["checkpoint"],
                              "counts": result.to_dict()["per_language"]})
    return wer


@dataclass
class Inputs:
    """The checked inputs of a call: the dense checkpoint (None: the demo will make it in
    ``<out>/demo``), the manifest directory (None likewise) and the languages to compare."""

    dense: Any
    manifests: Path | None
    languages: list[str]


def check_inputs(opts: ReproduceOptions) -> Inputs:
    """Validate the options and every input, creating and writing nothing.

    Raises :class:`UserError` for a bad option, a missing or pruned ``--dense``, a missing or
    incomplete manifest directory, ``--data`` without ``--dense``, or a language the dense model
    (or the manifests) lacks, e.g. scenario 2's default fr,nl on a model without nl.
    """
    from .training.checkpoint import load_checkpoint

    opts.validate()
    if opts.dense is not None:
        dense = load_checkpoint(opts.dense)
        if "pruner" in dense.meta.get("extra", {}):
            raise UserError(f"--dense {opts.dense}: expected a dense checkpoint, this one is pruned")
        if opts.data is not None:
            manifests = opts.data
        else:
            configured = str(dense.config.get("data", {}).get("manifest_dir", "") or "")
            if not configured:
                raise UserError(f"--dense {opts.dense}: its config names no data.manifest_dir; pass --data")
            manifests = Path(configured)
        manifests = _manifest_dir(manifests)
        known = list(dense.meta.get("extra", {}).get("languages", []))
    else:
        if opts.data is not None:
            raise UserError("--data without --dense: train a dense model first (sparse-rnnt train) and pass --dense")
        from .demo import DEMO_LANGUAGES, DemoOptions, validate_options

        demo = opts.out / "demo"
        dense, manifests = None, None
        if (demo / "demo_summary.json").is_file():
            dense = load_checkpoint(demo / "run")
            manifests = _manifest_dir(demo / "manifests")
            known = list(dense.meta.get("extra", {}).get("languages", []))
        else:
            validate_options(DemoOptions(out=demo, force=True, progress=opts.progress))
            known = list(DEMO_LANGUAGES)
    wanted = list(opts.languages or (SCENARIO2_LANGUAGES if opts.scenario == 2 else known))
    unknown = [x for x in wanted if x not in known]
    if unknown:
        hint = " (scenario 2 compares fr,nl by default: choose others with --languages)" \
            if opts.scenario == 2 and not opts.languages else ""
        raise UserError(f"the dense model was not trained on {', '.join(unknown)} (it knows {', '.join(known)}){hint}")
    if manifests is not None:
        _check_languages(manifests, wanted)
    if opts.dense is not None:
        _check_out_outside(opts, dense, manifests)
    if dense is not None and manifests is not None and opts.out.is_dir():
        _check_runs(opts, dense, manifests, wanted)
    return Inputs(dense, manifests, wanted)


def _check_out_outside(opts: ReproduceOptions, dense: Any, manifests: Path) -> None:
    """``--out`` must not be, or lie inside, the dense run (as given, its run directory and its
    checkpoint) or the manifest directory: reproduce never writes into its inputs."""
    ckpt = Path(dense.path).resolve()
    inputs = {ckpt: "the --dense run", Path(opts.dense).resolve(): "the --dense run",
              manifests.resolve(): "the manifest directory"}
    if ckpt.parent.name == "checkpoints":  # a checkpoint of a run directory: the whole run
        inputs.setdefault(ckpt.parent.parent, "the --dense run")
    out = Path(opts.out).resolve()  # symlinks too: a link into --dense is --dense
    for path, option in inputs.items():
        if out == path or path in out.parents:
            raise UserError(f"--out {opts.out} is, or is inside, {option} {path}: "
                            "reproduce never writes into its inputs; choose an --out outside it")


def _check_languages(manifests: Path, languages: list[str]) -> None:
    """Every language needs training utterances (its runs) and test utterances (its score)."""
    from .data.manifest import load_split

    for split in ("train", "test"):
        have = {u.language for u in load_split(manifests, split, languages)}
        missing = [x for x in languages if x not in have]
        if missing:
            raise UserError(f"{manifests / (split + '.jsonl')} has no utterances for {', '.join(missing)}")


def _manifest_dir(path: Path) -> Path:
    if not (path / "train.jsonl").is_file() or not (path / "test.jsonl").is_file():
        raise UserError(f"{path} is not a manifest directory with train.jsonl and test.jsonl")
    return path


def run_reproduce(opts: ReproduceOptions) -> dict[str, Any]:
    """Run (or resume) every run of the scenario for every seed, score, write and return the table.

    Every option and input is checked before ``opts.out`` is created (:func:`check_inputs`).
    """
    inputs = check_inputs(opts)
    created = not opts.out.exists()
    opts.out.mkdir(parents=True, exist_ok=True)
    try:
        return _reproduce(opts, inputs)
    except UserError:
        if created and not any(opts.out.iterdir()):
            opts.out.rmdir()  # nothing of this call's worth keeping
        raise


def _reproduce(opts: ReproduceOptions, inputs: Inputs) -> dict[str, Any]:
    from .training.checkpoint import load_checkpoint

    dense, manifests, wanted = inputs.dense, inputs.manifests, inputs.languages
    if dense is None:
        from .demo import DemoOptions, run_demo

        demo = opts.out / "demo"
        log.info("no --dense given: running the demo (synthetic corpus + tiny dense model) in %s", demo)
        run_demo(DemoOptions(out=demo, force=True, progress=opts.progress))
        dense = load_checkpoint(demo / "run")
        manifests = _manifest_dir(demo / "manifests")
        known = list(dense.meta.get("extra", {}).get("languages", []))
        unknown = [x for x in wanted if x not in known]
        if unknown:
            raise UserError(f"the demo model was not trained on {', '.join(unknown)} (it knows {', '.join(known)})")
        assert manifests is not None
        _check_runs(opts, dense, manifests, wanted)  # the demo's model is known only now
    assert manifests is not None
    runs, rows = plan(opts, wanted)
    by_name = {r.name: r for r in runs}
    t0 = time.perf_counter()
    wer: dict[int, dict[str, dict[str, float]]] = {}
    for seed in opts.seeds:
        root = opts.out / f"seed-{seed}"
        dirs = {r.name: root / r.name for r in runs}
        for i, run in enumerate(runs, 1):
            cfg = _run_config(opts, dense.config, run, seed, dirs, manifests)
            log.info("seed %d, run %d/%d: %s", seed, i, len(runs), run.name)
            if opts.progress:
                print(f"[{time.perf_counter() - t0:7.0f}s] seed {seed}: {run.name} ({i}/{len(runs)})", flush=True)
            _train(cfg, dirs[run.name], dense, opts.budget)
        models = {"dense": dense}
        wer[seed] = {}
        for row in rows:
            scores = {}
            for lang, model in row.models.items():
                if model not in models:
                    models[model] = load_checkpoint(dirs[model])
                scores[lang] = _score(models[model], manifests, lang, opts)
            wer[seed][row.label] = scores
    table = summarize(rows, by_name, wer, wanted, opts)
    atomic_write_json(opts.out / f"scenario-{opts.scenario}.json", table)
    atomic_write_text(opts.out / f"scenario-{opts.scenario}.md", format_table(table))
    return table


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[Row], runs: dict[str, Run], wer: dict[int, dict[str, dict[str, float]]],
              languages: list[str], opts: ReproduceOptions) -> dict[str, Any]:
    """Mean and spread over seeds of each row's per-language and average WER (in %)."""
    from . import __version__

    out_rows = []
    for row in rows:
        per_lang = {}
        for lang in languages:
            mean, std = _mean_std([100 * wer[s][row.label][lang] for s in wer])
            per_lang[lang] = {"mean": mean, "std": std}
        avgs = [100 * statistics.fmean(wer[s][row.label][lang] for lang in languages) for s in wer]
        mean, std = _mean_std(avgs)
        out_rows.append({
            "method": row.label, "wer": per_lang, "average": {"mean": mean, "std": std, "per_seed": avgs},
            "stages": row.stages, "optimizer_steps": opts.budget * len(row.runs),
            "runs": list(row.runs), "seeds": list(wer),
        })
    return {
        "scenario": opts.scenario, "languages": languages, "levels": list(opts.levels),
        "target_sparsity": opts.levels[-1], "budget_steps_per_run": opts.budget,
        "interval": opts.budget // len(opts.levels),
        "adapt_every": opts.adapt_every or max(1, (opts.budget // len(opts.levels)) // 4),
        "lr": opts.lr, "seeds": list(opts.seeds), "rows": out_rows, "version": __version__,
        "environment": _provenance(opts),
        "runs": {name: {"method": r.method, "languages": list(r.languages), "levels": list(r.levels)}
                 for name, r in runs.items()},
    }


def _provenance(opts: ReproduceOptions) -> dict[str, Any]:
    """Machine, versions, commit (best effort) and date of the tables."""
    import datetime as dt
    import platform
    import subprocess

    import torch
    import torchaudio

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "commit": commit,
            "python": platform.python_version(), "torch": torch.__version__, "torchaudio": torchaudio.__version__,
            "machine": platform.processor() or platform.machine(), "gpu": gpu, "device": opts.device,
            "threads": opts.threads}


def format_table(table: dict[str, Any]) -> str:
    """Markdown table: WER % per language and average as mean ± std over seeds, stages, steps."""
    langs = table["languages"]
    n = len(table["seeds"])
    head = ["method", *langs, "avg", "stages", "steps"]
    lines = [
        f"Scenario {table['scenario']}: test WER (%) at {table['target_sparsity']:.0%} sparsity, "
        f"mean ± std over {n} seed{'s' if n > 1 else ''}; {table['budget_steps_per_run']} steps per run",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for row in table["rows"]:
        cells = [row["method"]]
        cells += [_pm(row["wer"][lang]) for lang in langs]
        cells += [_pm(row["average"]), str(row["stages"]), str(row["optimizer_steps"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pm(cell: dict[str, float]) -> str:
    if not math.isfinite(cell["mean"]):
        return "n/a"
    return f"{cell['mean']:.2f} ± {cell['std']:.2f}"
