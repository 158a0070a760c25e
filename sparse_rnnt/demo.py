"""``sparse-rnnt demo``: the whole pipeline on a 2-core CPU in under 15 minutes.

Synthesize a small 4-language corpus in the MLS layout, read it into manifests, train a character
tokenizer and a ``tiny`` dense multilingual Emformer RNN-T, evaluate on the test split (unseen
voices) and print the WER table and where everything was written.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import MAX_SEED, is_finite_number, is_int
from .config import load_config
from .errors import UserError
from .io import atomic_write_json

# Tuned on the 2-core CPU machine (see README: measured time and WER). Lexicon 5 keeps 5 words
# per word class: 136-161 words per language, like the vocabulary sizes the spec's CPU trial used.
DEMO_LANGUAGES = ("en", "fr", "it", "nl")
DEMO_HOURS = 0.7
DEMO_STEPS = 2800
DEMO_LEXICON = 5
# Many training voices generalize better to the unseen test voices; 8 test speakers per language
# make the test WER less dependent on a few voices.
DEMO_SPEAKERS = {"train_speakers": 48, "dev_speakers": 6, "test_speakers": 8}
DEMO_TRAIN_OVERRIDES = [
    "model.name=tiny",
    "model.encoding_dim=128",
    "model.ctc_weight=0.3",
    "batch.max_frames=4000",
    "batch.max_batch=32",
    "optim.lr=3e-3",
    "optim.warmup_steps=150",
    "train.eval_every=700",
    "train.checkpoint_every=700",
    "data.dev_max_utterances=40",
]


# Written into ``--out`` before anything else: only a directory holding it (or a finished demo's
# ``demo_summary.json``) is one that ``--force`` may replace.
DEMO_MARKER = ".sparse-rnnt-demo"


@dataclass
class DemoOptions:
    out: Path = Path("demo_out")
    hours: float | None = None
    steps: int | None = None
    seed: int = 0
    force: bool = False
    progress: bool = True



def is_demo_output(path: Path) -> bool:
    """Whether ``path`` is a directory a demo wrote (its marker or its finished summary)."""
    return (path / DEMO_MARKER).is_file() or (path / "demo_summary.json").is_file()


def validate_options(opts: DemoOptions) -> tuple[float, int]:
    """Check every option, touching nothing; return the (hours, steps) to use.

    Raises :class:`UserError` for a bad value, and for an ``--out`` that is not a directory, or
    that is a non-empty directory which ``--force`` may not replace (not empty and not written by
    a demo: refusing keeps a typo from deleting a user's data).
    """
    hours = opts.hours if opts.hours is not None else DEMO_HOURS
    steps = opts.steps if opts.steps is not None else DEMO_STEPS
    if not is_finite_number(hours) or hours <= 0:
        raise UserError(f"--hours must be a finite positive number, got {opts.hours!r}")
    if not is_int(steps) or steps <= 0:
        raise UserError(f"--steps must be a positive integer, got {opts.steps!r}")
    if not is_int(opts.seed) or not 0 <= opts.seed <= MAX_SEED:
        raise UserError(f"--seed must be an integer in [0, {MAX_SEED}], got {opts.seed!r}")
    out = Path(opts.out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()):
            if not opts.force:
                raise UserError(f"{out} is not empty: pass --force to replace it or choose another --out")
            if out.is_symlink() or not is_demo_output(out):
                raise UserError(
                    f"--force: {out} is not empty and is not a demo output (no {DEMO_MARKER} or "
                    "demo_summary.json in it); refusing to delete it, choose another --out"
                )
    return float(hours), steps


def _stage(name: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] {name}", flush=True)


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Validate everything, then (re)create ``opts.out`` and run the pipeline in it.

    On a :class:`UserError` during the run, the partial output is removed (an ``--out`` that was
    an empty directory before is left as an empty directory).
    """
    from .data.synth import SynthConfig

    hours, steps = validate_options(opts)
    out = Path(opts.out)
    synth_config = SynthConfig(languages=DEMO_LANGUAGES, hours=hours, seed=opts.seed, lexicon_size=DEMO_LEXICON,
                               **DEMO_SPEAKERS)
    synth_config.validate()
    cfg = load_config(None, [
        f"data.manifest_dir={out / 'manifests'}",
        f"data.tokenizer={out / 'tokenizer.model'}",
        f"train.max_steps={steps}",
        f"train.seed={opts.seed}",
        f"train.progress={str(opts.progress).lower()}",
        *DEMO_TRAIN_OVERRIDES,
    ])
    was_empty_dir = out.is_dir() and not any(out.iterdir())
    if out.exists() and not was_empty_dir:
        shutil.rmtree(out)  # validate_options: a demo output, and --force
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by sparse-rnnt demo; --force may replace this directory\n")
    try:
        return _pipeline(opts, out, hours, steps, synth_config, cfg)
    except UserError:
        shutil.rmtree(out, ignore_errors=True)
        if was_empty_dir:
            out.mkdir(parents=True, exist_ok=True)
        raise


def _pipeline(opts: DemoOptions, out: Path, hours: float, steps: int, synth_config, cfg) -> dict[str, Any]:
    from .data.mls import read_mls, write_manifests
    from .data.synth import synthesize_corpus
    from .data.tokenizer import Tokenizer, TokenizerConfig
    from .training.inference import evaluate_checkpoint
    from .training.trainer import Trainer

    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    _stage(f"1/5 synthesizing {hours} h per language ({', '.join(DEMO_LANGUAGES)}) with eSpeak NG", t0)
    corpus = out / "corpus"
    synth = synthesize_corpus(corpus, synth_config, progress=opts.progress)
    timings["synth"] = time.perf_counter() - t0

    _stage("2/5 reading the corpus into manifests", t0)
    manifests = out / "manifests"
    utts, report = read_mls(corpus, progress=opts.progress)
    write_manifests(manifests, utts, report)
    timings["manifests"] = time.perf_counter() - t0 - sum(timings.values())

    _stage("3/5 training the character tokenizer on all languages", t0)
    tok_path = out / "tokenizer.model"
    tok = Tokenizer.train([u.text for u in utts["train"]], TokenizerConfig(model_type="char"), tok_path)
    print(f"      {tok.vocab_size} characters + blank")
    timings["tokenizer"] = time.perf_counter() - t0 - sum(timings.values())

    _stage(f"4/5 training a tiny dense multilingual model for {steps} steps", t0)
    run_dir = out / "run"
    train = Trainer(cfg, run_dir).run()
    timings["train"] = time.perf_counter() - t0 - sum(timings.values())

    _stage("5/5 evaluating on the test split (unseen voices), greedy decoding", t0)
    result, info = evaluate_checkpoint(run_dir, manifests, split="test", progress=opts.progress)
    atomic_write_json(out / "test_wer.json", {**info, **result.to_dict()})
    timings["eval"] = time.perf_counter() - t0 - sum(timings.values())
    total = time.perf_counter() - t0

    print()
    print(result.format_table("Test WER (%) per language, tiny dense model, greedy"))
    summary = {
        "total_seconds": total,
        "timings": timings,
        "test_average_wer": result.average_wer,
        "test_wer": {k: v.wer for k, v in result.per_language.items()},
        "synth": {k: synth[k] for k in ("x_real_time",) if k in synth},
        "train": train,
        "paths": {
            "corpus": str(corpus),
            "manifests": str(manifests),
            "tokenizer": str(tok_path),
            "run": str(run_dir),
            "checkpoint": info["checkpoint"],
            "metrics": str(run_dir / "metrics.jsonl"),
            "test_results": str(out / "test_wer.json"),
        },
    }
    atomic_write_json(out / "demo_summary.json", summary)
    print()
    print(f"finished in {total / 60:.1f} min: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    for name, path in summary["paths"].items():
        print(f"  {name:<13} {path}")
    print(json.dumps({"test_average_wer": round(100 * result.average_wer, 2)}))
    return summary
