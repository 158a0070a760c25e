"""``sparse-rnnt <command>``: parse arguments and dispatch. No logic of its own lives here."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import select
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .checks import MAX_THREADS
from .errors import UserError

if TYPE_CHECKING:
    from .config import ExperimentConfig


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite positive number: {text}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


def _positive_int(text: str) -> int:
    value = _nonneg_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be >= 1: 0")
    return value


MAX_SYMBOLS = 1_000_000  # output symbols: far above any tokenizer's vocabulary


def _symbols(text: str) -> int:
    value = _nonneg_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (blank + at least one token): {text}")
    if value > MAX_SYMBOLS:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_SYMBOLS:,}: {text}")
    return value


def _threads(text: str) -> int:
    value = _nonneg_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_THREADS} ({os.cpu_count()} CPUs here): {text}")
    return value


def _device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (availability is checked when the command runs)."""
    from .checks import is_device_spec

    t = text.strip().lower()
    if is_device_spec(t):
        return t
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def _require_device(device: str) -> str:
    """The device ``device`` names (``auto`` resolved to ``cuda`` or ``cpu``). A CUDA device that
    this machine lacks is the user's error, said before any work starts."""
    from .training.trainer import resolve_device

    return str(resolve_device(device, what="--device"))


def _manifest_files(manifest_dir: str) -> list[Path]:
    """The manifests of a manifest directory (``<split>.jsonl``): what a command reads there."""
    d = Path(manifest_dir)
    return sorted(d.glob("*.jsonl")) if d.is_dir() else []


def _checkpoint_files(checkpoint: str) -> Path:
    """Where a checkpoint's files are: the checkpoint directory, or a run's ``checkpoints/`` (a
    damaged latest checkpoint falls back to an older one)."""
    p = Path(checkpoint)
    if (p / "checkpoints").is_dir() and not (p / "checkpoint.json").is_file():
        return p / "checkpoints"
    return p


def _output_file(path: str, what: str, inputs: Sequence[str | Path] = ()) -> Path:
    """Check an output file before the work that produces it: not a directory, its folder exists
    and is writable, and it does not overwrite one of the command's inputs (an input file, or a
    file under an input directory). ``inputs`` are what the command reads, not the folders
    around them: an earlier output beside the inputs may be rewritten."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{what} {path}: is a directory, expected a file path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{what} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"{what} {path}: not writable")
    if out.exists():
        target = out.resolve()
        for inp in inputs:
            src = Path(inp).resolve()
            if target == src or (src.is_dir() and src in target.parents):
                raise UserError(f"{what} {path}: would overwrite an input ({inp}); choose another path")
    return out


# -- commands -------------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import SynthConfig, synthesize_corpus
    from .languages import SYNTH_LANGUAGES, parse_languages

    config = SynthConfig(
        languages=tuple(parse_languages(args.languages, SYNTH_LANGUAGES)),
        hours=args.hours,
        seed=args.seed,
        fmt=args.format,
        workers=args.workers,
        lexicon_size=args.lexicon_size,
        max_words=args.max_words,
        train_speakers=args.train_speakers,
        dev_speakers=args.dev_speakers,
        test_speakers=args.test_speakers,
    )
    config.validate()
    summary = synthesize_corpus(Path(args.out), config, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_data_mls(args: argparse.Namespace) -> int:
    from .data.mls import check_manifest_output, read_mls, write_manifests
    from .languages import parse_languages

    languages = parse_languages(args.languages) if args.languages else None
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    check_manifest_output(args.out, splits)  # before the reading, which can take long
    utts, report = read_mls(
        Path(args.root), languages, splits, subset=args.subset, fmt=args.format,
        workers=args.workers, progress=not args.quiet,
    )
    if not any(utts.values()):
        print(report.format(), file=sys.stderr)
        raise UserError(f"no usable utterances under {args.root} (the report above says why); nothing written")
    write_manifests(Path(args.out), utts, report)
    print(report.format())
    print(f"manifests written to {args.out}")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from .data.manifest import load_split
    from .data.tokenizer import Tokenizer, TokenizerConfig
    from .languages import parse_languages

    languages = parse_languages(args.languages) if args.languages else None
    _output_file(args.out, "--out", _manifest_files(args.manifest_dir))
    utts = load_split(args.manifest_dir, "train", languages)
    if not utts:
        raise UserError(f"no training transcripts in {args.manifest_dir}")
    config = TokenizerConfig(model_type=args.model_type, vocab_size=args.vocab_size)
    config.validate()
    tok = Tokenizer.train([u.text for u in utts], config, Path(args.out))
    print(f"tokenizer: {tok.vocab_size} units ({args.model_type}) + blank, from {len(utts)} transcripts -> {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config import dump_config, load_config
    from .training.trainer import Trainer

    if args.out is None and not args.print_config:
        raise UserError("--out RUN is required (the run directory)")
    out = Path(args.out) if args.out is not None else None
    config_path = args.config
    if args.resume and out is not None and config_path is None and (out / "config.yaml").is_file():
        config_path = out / "config.yaml"
    cfg = load_config(config_path, args.set)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    assert out is not None
    result = Trainer(cfg, out, resume=args.resume).run()
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(json.dumps(result, indent=2))
    return 0


def _parse_granularity(text: str) -> dict[str, object]:
    """``unstructured`` | ``N:M`` | ``block:HxW`` -> the pruning.granularity config mapping."""
    if text == "unstructured":
        return {"kind": "unstructured"}
    if text.startswith("block:"):
        dims = text[len("block:"):].lower().split("x")
        if len(dims) == 2 and all(d.isdigit() for d in dims):
            return {"kind": "block", "block": [int(dims[0]), int(dims[1])]}
    else:
        parts = text.split(":")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            return {"kind": "nm", "n": int(parts[0]), "m": int(parts[1])}
    raise UserError(f"--granularity: expected unstructured, N:M or block:HxW, got {text!r}")


# prune's options and the config keys they set: a --set of the same key contradicts them.
_PRUNE_OPTION_KEYS: dict[str, tuple[str, str]] = {
    "method": ("--method", "pruning.method"), "steps": ("--steps", "train.max_steps"),
    "languages": ("--languages", "data.languages"), "target_sparsity": ("--target-sparsity", "pruning.target_sparsity"),
    "schedule": ("--schedule", "pruning.schedule"), "levels": ("--levels", "pruning.levels"),
    "interval": ("--interval", "pruning.interval"), "adapt_every": ("--adapt-every", "pruning.adapt_every"),
    "variant": ("--variant", "pruning.variant"), "granularity": ("--granularity", "pruning.granularity"),
    "ranking": ("--ranking", "pruning.ranking"), "aggregation": ("--aggregation", "pruning.aggregation"),
    "init_masks": ("--init-masks", "pruning.init_masks"), "init_level": ("--init-level", "pruning.init_level"),
}


def _check_prune_overrides(args: argparse.Namespace) -> None:
    """A ``--set`` of a key that an explicit option also sets is refused: the --set used to win
    silently over ``--steps 5``."""
    from .config import parse_overrides

    def leaves(tree: object, prefix: str) -> list[str]:
        if isinstance(tree, dict):  # an empty section sets nothing
            return [k for key, value in tree.items() for k in leaves(value, f"{prefix}.{key}" if prefix else str(key))]
        return [prefix]

    for item in args.set:
        for leaf in leaves(parse_overrides([item]), ""):
            for dest, (option, key) in _PRUNE_OPTION_KEYS.items():
                value = getattr(args, dest)
                if value is not None and (leaf == key or leaf.startswith(key + ".") or key.startswith(leaf + ".")):
                    raise UserError(f"--set {item} conflicts with {option} {value}: give only one of them")


def prune_config(args: argparse.Namespace, dense_config: dict[str, object]) -> ExperimentConfig:
    """The pruning run's config: the dense checkpoint's, with pruning, languages and steps overridden."""
    from .config import config_from_tree
    from .languages import parse_languages

    _check_prune_overrides(args)
    tree = {k: v for k, v in dense_config.items() if k != "pruning"}
    pruning: dict[str, object] = {"method": args.method}
    if args.schedule is not None:
        pruning["schedule"] = args.schedule
    if args.target_sparsity is not None:
        pruning["target_sparsity"] = args.target_sparsity
    if args.levels is not None:
        try:
            levels = [float(x) for x in args.levels.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--levels: expected comma-separated numbers, got {args.levels!r}") from None
        pruning["levels"] = levels
        if args.target_sparsity is None and levels:
            pruning["target_sparsity"] = levels[-1]
    elif args.target_sparsity is not None:
        # Default staircase levels below the target, ending at it.
        pruning["levels"] = [x for x in (0.2, 0.5, 0.7) if x < args.target_sparsity] + [args.target_sparsity]
    for key in ("interval", "adapt_every", "variant", "ranking", "aggregation", "init_masks", "init_level"):
        if getattr(args, key) is not None:
            pruning[key] = getattr(args, key)
    if args.granularity is not None:
        pruning["granularity"] = _parse_granularity(args.granularity)
    tree["pruning"] = pruning
    sections = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    if args.languages:
        sections.setdefault("data", {})["languages"] = parse_languages(args.languages)
    if args.steps is not None:
        sections.setdefault("train", {})["max_steps"] = args.steps
    if args.method in ("dynamic-pathways", "pathways"):
        sections.setdefault("batch", {})["mode"] = "monolingual"  # each language on its own batches
    return config_from_tree(sections, args.set)


def cmd_prune(args: argparse.Namespace) -> int:
    from .config import dump_config
    from .training.checkpoint import load_checkpoint
    from .training.trainer import Trainer

    if args.out is None and not args.print_config:
        raise UserError("--out RUN is required (the pruning run directory)")
    dense = load_checkpoint(args.init)
    if "pruner" in dense.meta.get("extra", {}):
        raise UserError(f"--init {args.init}: expected a dense checkpoint, this one is already pruned")
    cfg = prune_config(args, dense.config)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    assert args.out is not None
    result = Trainer(cfg, Path(args.out), resume=args.resume, init_checkpoint=dense.path).run()
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(json.dumps(result, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .io import atomic_write_json
    from .languages import parse_languages
    from .training.inference import evaluate_checkpoint

    languages = parse_languages(args.languages) if args.languages else None
    _require_device(args.device)
    if args.out:  # checked now, not after decoding the whole split
        _output_file(args.out, "--out", [_checkpoint_files(args.checkpoint), *_manifest_files(args.manifest_dir)])
    result, info = evaluate_checkpoint(
        args.checkpoint, args.manifest_dir, split=args.split, languages=languages, method=args.method,
        beam_width=args.beam_width, device=args.device, progress=not args.quiet, limit=args.limit,
    )
    print(result.format_table(f"{info['checkpoint']} on {args.split} ({args.method}): WER (%)"))
    if args.out:
        atomic_write_json(args.out, {**info, **result.to_dict()})
        print(f"results written to {args.out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import torch

    from .model import MODEL_SIZES, build_model

    print(f"parameter counts with {args.num_symbols} output symbols (incl. blank)")
    for name, cfg in MODEL_SIZES.items():
        with torch.device("meta"):  # shapes only: counting allocates no weights
            model = build_model(cfg, args.num_symbols, verbose=False)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:<11} {n / 1e6:8.2f}M  width {cfg.width}, {cfg.transformer_num_layers} layers, "
              f"ffn {cfg.transformer_ffn_dim}, {cfg.num_lstm_layers} LSTM, joiner {cfg.encoding_dim}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo

    run_demo(DemoOptions(out=Path(args.out), hours=args.hours, steps=args.steps, seed=args.seed,
                         force=args.force, progress=not args.quiet))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import ExportOptions, export_checkpoint

    try:
        block = tuple(int(x) for x in args.block.lower().split("x")) if args.block else (16, 16)
    except ValueError:
        raise UserError(f"--block: expected HxW, e.g. 16x16, got {args.block!r}") from None
    if len(block) != 2 or not all(1 <= b <= 256 for b in block):
        raise UserError(f"--block: expected HxW with H and W in 1..256, got {args.block!r}")
    device = _require_device(args.device)  # export and its verification take a torch device, not auto
    opts = ExportOptions(fmt=args.format, language=args.language, multilingual=args.all_languages,
                         block=block, dtype=args.dtype, tolerance=args.tolerance, device=device,
                         cpu_sparse=args.cpu_sparse)
    manifest = export_checkpoint(args.checkpoint, args.out, opts)
    sizes = manifest["sizes"]
    print(f"exported {', '.join(manifest['languages'])} as {args.format} ({args.dtype}) to {args.out}")
    print(f"in-scope weights: {sizes['kept']:,} kept of {sizes['weights']:,}; bytes per format: " + ", ".join(
        f"{f} {sizes[f + '_bytes']:,}" for f in ("dense", "2:4", "bsr", "bitmap") if sizes.get(f + "_bytes")))
    proj = manifest.get("projection")
    if proj is not None:  # what an unstructured mask lost to the 2:4 pattern (0 for a 2:4-trained one)
        print(f"2:4 projection: dropped {proj['lost_l1']:.2%} of the masked weights' L1 magnitude"
              + (f" (worst layer {proj['worst_layer']}: {proj['worst_lost_l1']:.2%})" if proj["worst_layer"] else ""))
    errs = manifest["verification"]["max_relative_error"]
    print("verified: max relative error " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
          + f" (tolerance {manifest['verification']['tolerance']:g})")
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    from .streaming.files import stream_files

    device = _require_device(args.device)  # the stream takes a torch device, not auto
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    last: dict[str, str] = {}

    def show(path: str, part) -> None:
        if not args.quiet and part.text is not None and part.text != last.get(path, ""):  # nothing yet: no line
            last[path] = part.text
            print(f"{path} [{part.audio_end_s:6.2f}s] {part.text}", flush=True)

    results, stats = stream_files(args.artifact, args.audio, language=args.language, piece_ms=args.chunk_ms,
                                  device=device, on_partial=show, decoding=args.decoding,
                                  beam_width=args.beam_width, cuda_graphs=args.cuda_graphs,
                                  semi_structured=args.semi_structured, layer_runtime=args.layer_runtime,
                                  cpu_sparse=args.cpu_sparse)
    if args.layer_runtime == "auto":
        print(f"layer runtimes (auto): {int(stats['layers_sparse'])} sparse layers kept their kernel, "
              f"{int(stats['layers_dense_auto'])} run their dense weight "
              f"(+{stats['auto_extra_bytes'] / 1e6:.1f} MB of {'device ' if str(device).startswith('cuda') else ''}memory)")
    def rtf(value: float) -> str:
        return f"{value:.3f}" if math.isfinite(value) else "n/a (no audio)"

    for r in results:
        print(f"{r.stream_id}: {r.text}  (audio {r.audio_s:.2f} s, RTF {rtf(r.rtf)})")
    latency = (f"latency p50 {1e3 * stats['p50_s']:.1f} ms, p99 {1e3 * stats['p99_s']:.1f} ms"
               if stats["steps"] else "no latency (no chunk step ran)")
    print(f"chunk steps: {int(stats['steps'])}, {latency}; overall RTF {rtf(stats['rtf'])}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .languages import parse_languages
    from .reproduce import ReproduceOptions, format_table, run_reproduce

    def numbers(text: str, what: str, kind: type) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise UserError(f"{what}: expected comma-separated numbers, got {text!r}") from None

    _require_device(args.device)  # before the demo that a run without --dense starts with
    opts = ReproduceOptions(
        scenario=args.scenario, out=Path(args.out),
        dense=Path(args.dense) if args.dense else None, data=Path(args.data) if args.data else None,
        budget=args.budget, levels=numbers(args.levels, "--levels", float), adapt_every=args.adapt_every,
        seeds=numbers(args.seeds, "--seeds", int), lr=args.lr,
        languages=tuple(parse_languages(args.languages)) if args.languages else None,
        device=args.device, threads=args.threads, eval_limit=args.eval_limit, progress=not args.quiet,
    )
    table = run_reproduce(opts)
    print(format_table(table), end="")
    print(f"results written to {Path(args.out) / f'scenario-{args.scenario}.json'}")
    return 0


# -- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-rnnt",
        description="Prune, train, export and stream sparse multilingual Emformer RNN-T recognizers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log the toolkit's debug messages (before or after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("synth", help="synthesize a multilingual corpus in the MLS layout (eSpeak NG)",
                       description="Synthesize an offline multilingual speech corpus with eSpeak NG, in "
                       "exactly the Multilingual LibriSpeech layout (mls_<language>/<split>/...).")
    p.add_argument("--out", required=True,
                   help="output directory: absent, empty, or a synthesized corpus to add other languages to "
                   "(each requested language's mls_<language> directory must be absent or empty)")
    p.add_argument("--languages", default="en,fr,it,nl", help="comma-separated: en, fr, it, nl (default: all four)")
    p.add_argument("--hours", type=_positive_float, default=0.5, help="hours of audio per language, all splits (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same corpus (default 0)")
    p.add_argument("--format", choices=("flac", "opus"), default="flac", help="audio format (default flac)")
    p.add_argument("--workers", type=_threads, default=0, help="worker processes (default 0 = all cores)")
    p.add_argument("--lexicon-size", type=int, default=None,
                   help="cap each word class of the grammar to its first K words (smaller = easier corpus)")
    p.add_argument("--max-words", type=int, default=8, help="longest sentence in words (default 8)")
    p.add_argument("--train-speakers", type=int, default=24, help="training speakers per language (default 24)")
    p.add_argument("--dev-speakers", type=int, default=4, help="dev speakers per language, unseen voices (default 4)")
    p.add_argument("--test-speakers", type=int, default=4, help="test speakers per language, unseen voices (default 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("data", help="read corpora into JSONL manifests")
    dsub = p.add_subparsers(dest="data_command", metavar="SOURCE", required=True)
    q = dsub.add_parser("mls", help="read a Multilingual LibriSpeech tree (real or synthesized)",
                        description="Read an MLS tree (mls_<language>/<split>/transcripts.txt, audio/...) into "
                        "MANIFEST_DIR/<split>.jsonl. Bad lines and unusable audio are skipped, counted and "
                        "reported with file and line in MANIFEST_DIR/read_report.json.")
    q.add_argument("root", help="directory holding mls_<language>[_opus]/ folders")
    q.add_argument("--out", required=True, help="manifest directory to write")
    q.add_argument("--languages", default=None, help="comma-separated ISO codes or MLS names (default: all found)")
    q.add_argument("--splits", default="train,dev,test", help="comma-separated splits (default train,dev,test)")
    q.add_argument("--subset", choices=("9hr", "1hr"), default=None,
                   help="restrict train to a limited_supervision subset (handles.txt)")
    q.add_argument("--format", choices=("flac", "opus"), default=None,
                   help="which variant to read when both exist (default flac)")
    q.add_argument("--workers", type=_threads, default=0, help="threads reading audio headers (default: auto)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_data_mls)

    p = sub.add_parser("tokenizer", help="train one sentencepiece model over all languages",
                       description="Train one sentencepiece model over the training transcripts of all languages.")
    p.add_argument("--manifest-dir", required=True, help="directory with train.jsonl")
    p.add_argument("--out", required=True, help="path of the .model file to write")
    p.add_argument("--model-type", choices=("char", "unigram", "bpe"), default="char", help="unit type (default char)")
    p.add_argument("--vocab-size", type=_nonneg_int, default=0,
                   help="vocabulary size (default 0: every character, for char models)")
    p.add_argument("--languages", default=None, help="comma-separated languages (default: all)")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("train", help="train a dense Emformer RNN-T",
                       description="Train a dense multilingual Emformer RNN-T. The run directory receives "
                       "config.yaml, tokenizer.model, cmvn.safetensors, metrics.jsonl and checkpoints/.")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 --set data.languages=en,fr (repeatable)")
    p.add_argument("--out", default=None, help="run directory (required, except with --print-config)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (reuses its config.yaml)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prune", help="prune a dense checkpoint while fine-tuning it (IMP, LTH, LAP, adaptive, pathways)",
                       description="Start from a dense checkpoint (its config, weights, tokenizer and CMVN stats) "
                       "and train with a pruning method. The run directory is laid out as for 'train'; its "
                       "checkpoints also hold the masks, theta0 and the pruning history; masks/ holds the mask "
                       "after each sparsity step and analytics/ the mask report (JSON) and plots (PNG).")
    p.add_argument("--method", required=True, choices=("imp", "lth", "lap", "adaptive", "dynamic-pathways", "pathways"),
                   help="imp/lth/lap: hard masks; adaptive: one soft mask; dynamic-pathways: one soft mask per "
                   "language; pathways: ASR Pathways stage 2, fixed per-language masks from stage-1 runs given "
                   "by --init-masks (the last two force batch.mode=monolingual)")
    p.add_argument("--init", required=True, help="dense checkpoint or run directory to start from")
    p.add_argument("--out", default=None, help="run directory for the pruning run (required, except with --print-config)")
    p.add_argument("--target-sparsity", type=float, default=None,
                   help="final fraction of pruned weights in scope (default 0.7, or the last of --levels)")
    p.add_argument("--schedule", choices=("staircase", "cubic", "oneshot"), default=None,
                   help="how sparsity grows: staircase of --levels every --interval steps, cubic ramp, or "
                   "oneshot at step 0 (default staircase)")
    p.add_argument("--levels", default=None,
                   help="comma-separated sparsity levels, e.g. 0.2,0.5,0.7 (the last must equal the target)")
    p.add_argument("--interval", type=int, default=None, help="steps between sparsity steps T (default 1000)")
    p.add_argument("--adapt-every", dest="adapt_every", type=int, default=None,
                   help="soft methods: re-rank the mask every n steps (default 100; must be < --interval)")
    p.add_argument("--variant", choices=("imp", "lth"), default=None,
                   help="soft methods: lth rewinds weights to the dense ones after each sparsity step (default imp)")
    p.add_argument("--granularity", default=None,
                   help="unstructured, N:M (e.g. 2:4) or block:HxW (e.g. block:4x4) (default unstructured)")
    p.add_argument("--ranking", choices=("global", "per_tensor"), default=None,
                   help="rank magnitudes over all in-scope weights or tensor by tensor (default global)")
    p.add_argument("--init-masks", dest="init_masks", default=None, metavar="SPEC",
                   help="starting masks: PATH (a pruning run or checkpoint directory, or a masks file; one mask "
                   "is copied to every language) or LANG=PATH,LANG=PATH,... (one source per language, e.g. the "
                   "stage-1 runs of pathways). Required by pathways; dynamic-pathways starts from LAP or LTH "
                   "masks this way")
    p.add_argument("--init-level", dest="init_level", type=float, default=None, metavar="S",
                   help="with run directories in --init-masks: take each run's mask saved when it reached "
                   "sparsity S (masks/level-S.safetensors), e.g. 0.5, instead of its latest checkpoint")
    p.add_argument("--aggregation", choices=("alternate", "sum"), default=None,
                   help="pathways: alternate one language per optimizer step, or sum the masked gradients "
                   "of one batch per language into each step (default alternate)")
    p.add_argument("--languages", default=None, help="comma-separated languages (default: the dense run's)")
    p.add_argument("--steps", type=int, default=None, help="training steps of the pruning run (train.max_steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any other config value, e.g. --set optim.lr=5e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the pruning run in --out from its latest checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="decode a split and report WER per language",
                       description="Decode a manifest split with a checkpoint; print WER per language and average.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory (uses its latest)")
    p.add_argument("--manifest-dir", required=True, help="directory with <split>.jsonl")
    p.add_argument("--split", default="test", help="split to decode (default test)")
    p.add_argument("--languages", default=None, help="comma-separated languages (default: the checkpoint's)")
    p.add_argument("--method", choices=("greedy", "beam"), default="greedy", help="decoding (default greedy)")
    p.add_argument("--beam-width", type=_positive_int, default=4, help="beam width for --method beam (default 4)")
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--limit", type=_nonneg_int, default=0, help="decode at most N utterances per language (0 = all)")
    p.add_argument("--out", default=None, help="write results (WER, counts, hypotheses) to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("models", help="list the named model sizes with their parameter counts")
    p.add_argument("--num-symbols", type=_symbols, default=4097, help="vocabulary size incl. blank (default 4097, at most 1000000); counted from the shapes, no weights are allocated")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="synthesize, train a tiny model, evaluate: the whole pipeline on a CPU",
                       description="Synthesize a small 4-language corpus, train a tokenizer and a tiny dense "
                       "multilingual model, evaluate on unseen test voices and print the WER table.")
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--hours", type=_positive_float, default=None, help="hours of audio per language (default: tuned)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: tuned)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out, but only a directory a demo wrote (it holds .sparse-rnnt-demo or "
                   "demo_summary.json); any other directory is refused")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="export a language's pathway as a compact, self-verified artifact",
                       description="Write the pathway theta ⊙ m_L of a (pruned) checkpoint as an artifact directory: "
                       "compressed weights (safetensors), config.json, tokenizer, feature stats and a manifest with "
                       "the size of every format. The artifact is loaded back and its outputs compared with the "
                       "masked model's on a probe batch; export refuses above the tolerance.")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory (dense or pruned)")
    p.add_argument("--out", required=True, help="artifact directory to create (must not exist or be empty)")
    p.add_argument("--format", choices=("dense", "2:4", "bsr", "bitmap"), default="dense",
                   help="dense; 2:4 semi-structured (an unstructured mask is projected, the lost magnitude "
                   "is reported); bsr block-sparse; bitmap (kept values + 1 bit per weight) (default dense)")
    p.add_argument("--language", default=None,
                   help="the pathway to export (required for per-language models unless --all-languages)")
    p.add_argument("--all-languages", dest="all_languages", action="store_true",
                   help="per-language models: store theta once and every language's mask as bits "
                   "(format dense or bitmap); the pathway is chosen at load time")
    p.add_argument("--block", default=None, help="bsr block size HxW (default 16x16)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weight dtype of the artifact (default float32)")
    p.add_argument("--tolerance", type=_positive_float, default=None,
                   help="largest accepted max|diff|/max|logit| against the masked model "
                   "(default 1e-4 float32, 3e-2 bfloat16, 1e-2 float16)")
    p.add_argument("--device", type=_device, default="cpu", help="device of the verification run: cpu, cuda or "
                   "cuda:N (default cpu)")
    p.add_argument("--cpu-sparse", dest="cpu_sparse", choices=("auto", "kernel", "dense"), default="auto",
                   help="how a CPU verification runs bsr and bitmap layers: auto (the C++ sparse kernel, built "
                   "on first use with the machine's C++ compiler, else dense), kernel (that kernel, an error if it "
                   "cannot be built) or dense (decompressed at load); default auto")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("stream", help="decode audio files chunk by chunk through an exported artifact",
                       description="Feed each audio file (FLAC, WAV or Opus; resampled to the artifact's feature sample rate, 16 kHz by default) in chunks as if it "
                       "arrived live, through the Emformer with its state (segment + right-context look-ahead), "
                       "greedy or beam RNN-T decoding continued chunk by chunk; prints partial hypotheses as they "
                       "change (a beam's best hypothesis may revise earlier words), the final text, the "
                       "real-time factor and per-chunk latency.")
    p.add_argument("audio", nargs="+", help="audio files")
    p.add_argument("--artifact", required=True, help="artifact directory written by 'sparse-rnnt export'")
    p.add_argument("--language", default=None, help="pathway to use (required for multilingual artifacts)")
    p.add_argument("--chunk-ms", dest="chunk_ms", type=_positive_float, default=160.0,
                   help="audio arriving per tick, in ms (default 160 = one Emformer segment; at most 3600000, an hour)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=_threads, default=0, help="CPU threads (default 0 = torch's default)")
    p.add_argument("--decoding", choices=("greedy", "beam"), default="greedy",
                   help="greedy (default) or torchaudio's RNN-T beam search; both give exactly what "
                   "'sparse-rnnt eval --method' gives on the whole file")
    p.add_argument("--beam-width", dest="beam_width", type=_positive_int, default=4,
                   help="hypotheses kept by --decoding beam (default 4)")
    p.add_argument("--cuda-graphs", dest="cuda_graphs", action="store_true",
                   help="replay the encoder step as CUDA graphs, one per batch bucket (needs --device cuda "
                   "and a single-language artifact; a step that cannot be captured runs eagerly)")
    p.add_argument("--semi-structured", dest="semi_structured", choices=("auto", "cutlass", "cusparselt"),
                   default="auto",
                   help="torch's backend for 2:4 layers on CUDA: auto (torch's choice, cuSPARSELt when torch has "
                   "it), cutlass or cusparselt (default auto; other formats and CPU ignore it)")
    p.add_argument("--layer-runtime", dest="layer_runtime", choices=("kernels", "auto"), default="kernels",
                   help="how sparse layers run on the device: kernels (default: each format's own kernel) or "
                   "auto (each layer timed at one stream's shapes against its dense weight, the faster kept; "
                   "the dense copies cost device memory, printed; single-language artifacts; on CPU it "
                   "chooses between the C++ sparse kernel and dense, and changes nothing with --cpu-sparse dense)")
    p.add_argument("--cpu-sparse", dest="cpu_sparse", choices=("auto", "kernel", "dense"), default="auto",
                   help="how bsr and bitmap layers run on the CPU: auto (the C++ sparse kernel, built on first "
                   "use with the machine's C++ compiler, else dense), kernel (that kernel, an error if it cannot "
                   "be built) or dense (decompressed at load, as fast as a dense artifact); default auto")
    p.add_argument("--quiet", action="store_true", help="print only the final results")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("reproduce", help="run the paper's pruning comparisons and print its tables with our numbers",
                       description="Scenario 1: dense, LAP, IMP, LTH, ASR Pathways (IMP, LTH) and adaptive masking "
                       "(IMP, LTH), test WER per language and average, stages and optimizer steps per method. "
                       "Scenario 2: Dynamic ASR Pathways on FR+NL from LTH masks at each level and from LAP, "
                       "against LAP, LTH and ASR Pathways. Every run starts from one dense checkpoint; several "
                       "seeds give mean and spread. Interrupted calls resume; finished runs are reused.")
    p.add_argument("--scenario", type=int, choices=(1, 2), required=True, help="which table: 1 or 2")
    p.add_argument("--out", required=True, help="directory for the runs, results JSON and the Markdown table")
    p.add_argument("--dense", default=None,
                   help="dense checkpoint or run directory to prune (default: run the demo in OUT/demo and use it)")
    p.add_argument("--data", default=None,
                   help="manifest directory (train/dev/test.jsonl; default: the dense run's data.manifest_dir)")
    p.add_argument("--budget", type=int, default=240, help="optimizer steps of every pruning run (default 240)")
    p.add_argument("--levels", default="0.2,0.5,0.7",
                   help="staircase sparsity levels, the last is the target (default 0.2,0.5,0.7); one step "
                   "every budget/len(levels) steps")
    p.add_argument("--adapt-every", dest="adapt_every", type=int, default=None,
                   help="re-rank soft masks every n steps (default: a quarter of the interval)")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds (default 0,1)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate of the pruning runs (default 1e-3, constant after warmup)")
    p.add_argument("--languages", default=None,
                   help="comma-separated languages (default: scenario 1 all of the dense model's, scenario 2 fr,nl)")
    p.add_argument("--eval-limit", dest="eval_limit", type=_nonneg_int, default=0,
                   help="test utterances per language (default 0 = all)")
    p.add_argument("--device", type=_device, default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--threads", type=_threads, default=0, help="CPU threads per run (default 0 = all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce)
    return parser


_VERBOSE = ("-v", "--verbose")


def _stdout_is_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (``| head``): POLLERR on its write end."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll, or no real stdout
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # -v anywhere (before the command, among its options, between a command's files): taken out
    # before parsing, so that it never splits a list of positional arguments.
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in _VERBOSE for a in argv)
    args = parser.parse_args([a for a in argv if a not in _VERBOSE])
    args.verbose = verbose
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Debug messages of the toolkit only: the libraries' (matplotlib's font search...) drown them.
    logging.getLogger("sparse_rnnt").setLevel(logging.DEBUG if args.verbose else logging.NOTSET)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        if not _stdout_is_closed():  # some other pipe (a worker's): a bug or the system, keep the traceback
            raise
        # `sparse-rnnt models | head -1`: the reader has what it wanted. Stdout goes to devnull so
        # that the flush at exit is quiet too; 141 is what a shell reports for a SIGPIPE death.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UserError as e:
        print(f"sparse-rnnt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug or the system, keep the traceback
            raise
        # A path the user gave that cannot be written or read as asked (exists as a file, under a
        # file, no permission, ...): their error, said in one line.
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
        print(f"sparse-rnnt {args.command}: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
