"""Deployable artifacts: one language's pathway (or all of them) as compressed weights + JSON.

Layout of an artifact directory (every file named in ``manifest.json`` with its SHA-256)::

    manifest.json       format, version, weight format, languages, files, sizes per format,
                        the self-verification result, and per-layer details (2:4 loss, and
                        the runtime each layer had in that verification, on its device)
    config.json         model config, number of symbols, feature config
    weights.safetensors dense tensors "dense/<param>" and compressed layers "sparse/<param>/<part>"
    masks.safetensors   multilingual artifacts only: every language's mask, bit-packed
    tokenizer.model     sentencepiece model
    cmvn.safetensors    feature normalization stats

A single-pathway artifact stores ``θ ⊙ m_L`` in the chosen format. A multilingual artifact
stores ``θ`` restricted to the union of the pathways once (``dense`` or ``bitmap`` storage) and
every language's mask as bits; :meth:`Artifact.set_language` switches pathway without
reloading (the fused masked linear applies the language's bits inside the matmul). It loads with
no pathway selected: its model refuses to run (``ValueError``) until a language is set.

Export verifies itself: the written artifact is loaded back and its joiner logits on a fixed
probe batch are compared with the masked dense model's; if the largest difference relative to
the largest logit exceeds the tolerance, export refuses (nothing is left behind) and reports the
measured error. Loading checks the manifest (its JSON types; exactly the files of the artifact's
kind, regular files inside the directory, never symbolic links), every file's hash, that the
tokenizer, CMVN, feature config and model sizes agree, and every tensor's name, dtype, shape and
finiteness (masks included); it never unpickles.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..checks import is_int
from ..config import from_dict
from ..data.features import FeatureConfig, GlobalCMVN
from ..data.tokenizer import Tokenizer
from ..errors import UserError
from ..io import atomic_path, atomic_write_json, sha256_file
from ..model.configs import ModelConfig
from ..model.rnnt import EmformerRNNT
from ..pruning.masks import LanguageMasks, MaskSet
from .formats import (
    CPU_SPARSE,
    FORMATS,
    PARTS,
    check_cpu_sparse,
    check_semi_structured,
    decode,
    encode,
    resolve_cpu_sparse,
)

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "sparse_rnnt.artifact"
ARTIFACT_VERSION = 2  # 2: tensors outside the exported layers are stored in float32
MANIFEST, CONFIG, WEIGHTS, MASKS = "manifest.json", "config.json", "weights.safetensors", "masks.safetensors"
TOKENIZER, CMVN = "tokenizer.model", "cmvn.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
MASKED_BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


def _linear_names(model: nn.Module) -> set[str]:
    return {f"{name}.weight" for name, m in model.named_modules() if type(m) is nn.Linear}


# ---------------------------------------------------------------------------- probe


def probe_logits(model: EmformerRNNT, device: torch.device) -> Tensor:
    """Joiner logits ``[B, T', U + 1, V]`` (float32) of a fixed random batch (seeded;
    CMVN-normalized scale), fed in the model's ``activation_dtype``."""
    g = torch.Generator().manual_seed(1234)
    frames = (160, 124)
    x = torch.randn(len(frames), max(frames), model.config.input_dim, generator=g)
    lengths = torch.tensor(frames, dtype=torch.int32)
    targets = torch.randint(0, model.blank, (len(frames), 6), generator=g, dtype=torch.int32)
    tlen = torch.tensor([6, 4], dtype=torch.int32)
    x, lengths, targets, tlen = (t.to(device) for t in (x, lengths, targets, tlen))
    with torch.inference_mode():
        enc, enc_len = model.encode(x.to(model.activation_dtype), lengths)
        pred_in, pred_len = model.prepend_blank(targets, tlen)
        pred, _, _ = model.rnnt.predict(pred_in, pred_len, None)
        joint, _, _ = model.rnnt.join(enc, enc_len, pred, pred_len)
    return joint.float()


def relative_error(out: Tensor, ref: Tensor) -> float:
    """``max |out - ref| / max |ref|``."""
    scale = float(ref.abs().max()) or 1.0
    return float((out - ref).abs().max()) / scale


# ---------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportOptions:
    """``fmt``: one of FORMATS; ``language``: the pathway (None with ``multilingual``)."""

    fmt: str = "dense"
    language: str | None = None
    multilingual: bool = False
    block: tuple[int, int] = (16, 16)
    dtype: str = "float32"
    tolerance: float | None = None  # default: DEFAULT_TOLERANCE[dtype]
    device: str = "cpu"  # where verification runs
    cpu_sparse: str = "auto"  # how a CPU verification runs bsr/bitmap layers (see load_artifact)

    def validate(self) -> None:
        if self.fmt not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {self.fmt!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.multilingual and self.fmt not in ("dense", "bitmap"):
            raise UserError("a multilingual artifact stores theta as dense or bitmap (--format dense|bitmap)")
        if self.multilingual and self.language is not None:
            raise UserError("--language and --all-languages exclude each other")
        if self.cpu_sparse not in CPU_SPARSE:
            raise UserError(f"--cpu-sparse must be one of {', '.join(CPU_SPARSE)}, got {self.cpu_sparse!r}")
        if len(self.block) != 2 or not all(is_int(b) and 1 <= b <= 256 for b in self.block):
            # Every export sizes the BSR encoding for the manifest's table, whatever its format.
            raise UserError(f"--block must be two integers in [1, 256], got {self.block}")


def export_checkpoint(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], opts: ExportOptions) -> dict[str, Any]:
    """Export a (pruned) checkpoint to the artifact directory ``out`` (must not exist, or be an
    empty directory; not a symbolic link); returns the manifest. On failure nothing is left:
    neither the artifact nor the parent directories the export created. ``opts.device`` may be
    ``auto`` (CUDA when available); a device this machine lacks is refused before any work."""
    from ..training.trainer import resolve_device

    opts.validate()
    opts = replace(opts, device=str(resolve_device(opts.device, what="device")))
    out = Path(out)
    created = _check_out(out)
    try:
        return _export(checkpoint, out, opts)
    except BaseException:
        # Refused or interrupted: remove the parent directories this export made (deepest
        # first; rmdir leaves any that something else has written into since).
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _check_out(out: Path) -> list[Path]:
    """Refuse an ``--out`` that cannot become the artifact directory; returns the missing parent
    directories, outermost first (the export creates them)."""
    if out.name in ("", ".", ".."):
        raise UserError(f"--out {out}: name the new artifact directory itself, not '.' or '..'")
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link: name a new directory instead")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory: choose a new --out")
        if any(out.iterdir()):
            raise UserError(f"{out} exists and is not empty: choose a new --out")
    missing: list[Path] = []
    for parent in out.parents:
        if parent.is_symlink() and not parent.exists():
            raise UserError(f"--out {out}: {parent} is a broken symbolic link")
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out}: {parent} is not a directory")
            break
        missing.append(parent)
    return missing[::-1]


def _export(checkpoint: str | os.PathLike[str], out: Path, opts: ExportOptions) -> dict[str, Any]:
    from ..training.inference import load_recognizer

    rec = load_recognizer(checkpoint, device="cpu")
    languages = list(rec.languages)
    per_language = rec.language_masks is not None
    if opts.multilingual:
        if not per_language:
            raise UserError("--all-languages needs a per-language model (dynamic-pathways or pathways)")
        export_langs = languages
    elif opts.language is None:
        if per_language:
            raise UserError(f"this model has one pathway per language: pass --language ({', '.join(languages)}) "
                            "or --all-languages")
        export_langs = languages
    else:
        if languages and opts.language not in languages:
            raise UserError(f"the model was not trained on {opts.language!r} (it knows {', '.join(languages)})")
        export_langs = [opts.language]

    model = rec.model
    params = dict(model.named_parameters())
    linear = _linear_names(model)
    # The pathway (or union of pathways) to store, as a mask over every linear weight.
    if per_language:
        assert rec.language_masks is not None
        lm = rec.language_masks
        stored = lm.union() if opts.multilingual else lm[export_langs[0]]
    else:
        stored = rec.masks  # None for a dense checkpoint
    masks = {n: (stored[n] if stored is not None and n in stored else torch.ones_like(params[n], dtype=torch.bool))
             for n in sorted(linear)}
    dtype = DTYPES[opts.dtype]

    tensors: dict[str, Tensor] = {}
    layers: dict[str, Any] = {}
    masked_l1: dict[str, float] = {}  # Σ|θ ⊙ m| per layer, to weigh the layers' 2:4 losses
    for name, p in params.items():
        if name in masks:
            w = p.detach().float().to(dtype)
            parts, info = encode(opts.fmt, w, masks[name], block=opts.block)
            tensors.update({f"sparse/{name}/{k}": v.contiguous() for k, v in parts.items()})
            layers[name] = {"shape": list(p.shape), **info}
            masked_l1[name] = float((w.double().abs() * masks[name]).sum())
        else:
            # Norms, embeddings and the linear layers' biases stay float32: they compute in float32.
            tensors[f"dense/{name}"] = p.detach().to(torch.float32 if p.is_floating_point() else p.dtype).contiguous()
    sizes = _format_sizes(params, masks, opts)

    manifest: dict[str, Any] = {
        "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "weight_format": opts.fmt, "dtype": opts.dtype,
        "languages": export_langs, "multilingual": opts.multilingual, "checkpoint": str(rec.checkpoint),
        "step": rec.step, "layers": layers, "sizes": sizes,
    }
    if opts.fmt == "2:4":
        manifest["projection"] = _projection_loss(layers, masked_l1)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS))
        if opts.multilingual:
            assert rec.language_masks is not None
            # Linear layers outside the pruning scope (the CTC head) are kept whole in every pathway.
            LanguageMasks({lang: MaskSet({n: rec.language_masks[lang][n] if n in rec.language_masks[lang]
                                          else masks[n] for n in masks})
                           for lang in export_langs}).save(tmp / MASKS)
        atomic_write_json(tmp / CONFIG, {
            "model": asdict(model.config), "num_symbols": model.num_symbols,
            "features": asdict(rec.config.features),
        })
        shutil.copyfile(rec.checkpoint / TOKENIZER, tmp / TOKENIZER)
        shutil.copyfile(rec.checkpoint / CMVN, tmp / CMVN)
        files = sorted(expected_files(opts.multilingual))
        manifest["files"] = {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files}
        atomic_write_json(tmp / MANIFEST, manifest)
        art = load_artifact(tmp, device=opts.device, cpu_sparse=opts.cpu_sparse)
        manifest["verification"] = _verify(art, rec, export_langs, opts, manifest.get("projection"))
        for name, layer in art.runtimes().items():
            layers[name]["runtime"] = layer
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def _format_sizes(params: dict[str, Tensor], masks: dict[str, Tensor], opts: ExportOptions) -> dict[str, Any]:
    """Bytes of the in-scope weights in every format (what each choice would store)."""
    el = DTYPES[opts.dtype].itemsize
    dense_bytes = sum(params[n].numel() for n in masks) * el
    out: dict[str, Any] = {"dense_bytes": dense_bytes, "kept": sum(int(m.sum()) for m in masks.values()),
                           "weights": sum(params[n].numel() for n in masks)}
    for fmt in FORMATS:
        try:
            total = 0
            for n, m in masks.items():
                parts, _ = encode(fmt, params[n].detach().float().to(DTYPES[opts.dtype]), m, block=opts.block)
                total += sum(t.numel() * t.element_size() for t in parts.values())
            out[f"{fmt}_bytes"] = total
        except UserError as e:  # e.g. 2:4 on an input dim not divisible by 4
            out[f"{fmt}_bytes"] = None
            out[f"{fmt}_note"] = str(e)
    return out


def _projection_loss(layers: dict[str, Any], masked_l1: dict[str, float]) -> dict[str, Any]:
    """What projecting to 2:4 dropped, over all layers: ``lost_l1`` = Σ|dropped| / Σ|θ ⊙ m| (each
    layer's ``lost_l1`` weighed by its masked L1), and the worst layer with its own ``lost_l1``."""
    total = sum(masked_l1.values())
    lost = sum(layers[n]["lost_l1"] * masked_l1[n] for n in masked_l1)
    worst = max(sorted(masked_l1), key=lambda n: layers[n]["lost_l1"], default=None)
    if worst is not None and layers[worst]["lost_l1"] == 0:
        worst = None  # lossless: no layer to name
    return {"lost_l1": lost / total if total > 0 else 0.0, "worst_layer": worst,
            "worst_lost_l1": layers[worst]["lost_l1"] if worst is not None else 0.0}


def _verify(art: Artifact, rec: Any, languages: list[str], opts: ExportOptions,
            projection: dict[str, Any] | None = None) -> dict[str, Any]:
    """Artifact logits vs the masked dense model's, per language; refuse above the tolerance.
    ``projection``: the 2:4 loss (:func:`_projection_loss`), named in the refusal."""
    device = torch.device(opts.device)
    tol = opts.tolerance if opts.tolerance is not None else DEFAULT_TOLERANCE[opts.dtype]
    rec.model.to(device)
    errors = {}
    for lang in languages:
        with rec.masked(lang):
            ref = probe_logits(rec.model, device)
        if art.multilingual:
            art.set_language(lang)
        errors[lang] = relative_error(probe_logits(art.model, device), ref)
    worst = max(errors.values())
    if not worst <= tol:
        hint = ""
        if opts.fmt == "2:4" and projection is not None and projection["lost_l1"] > 0:
            # The usual cause: an unstructured mask projected to 2:4.
            hint = (f"; the 2:4 projection dropped {projection['lost_l1']:.2%} of the masked weights' L1 "
                    f"magnitude (worst layer {projection['worst_layer']}: {projection['worst_lost_l1']:.2%}); "
                    "a mask not trained as 2:4 loses weights in the projection: prune with "
                    "--granularity 2:4 for a lossless export, or raise --tolerance to accept the loss")
        elif opts.dtype != "float32":
            hint = (f"; nothing was dropped, so the difference is {opts.dtype} rounding: export in float32 or "
                    "raise --tolerance")
        raise UserError(
            f"export refused: the artifact's outputs differ from the masked model's by {worst:.3g} "
            f"(max |diff| / max |logit|; tolerance {tol:g}, format {opts.fmt}, dtype {opts.dtype}){hint}"
        )
    return {"max_relative_error": errors, "tolerance": tol, "device": str(device),
            "probe": "joiner logits of a seeded [2, 160, 80] batch"}


# ---------------------------------------------------------------------------- load


@dataclass
class Artifact:
    """A loaded artifact: a ready model (eval mode) with its tokenizer, CMVN and feature config."""

    path: Path
    manifest: dict[str, Any]
    model: EmformerRNNT
    tokenizer: Tokenizer
    cmvn: GlobalCMVN
    features: FeatureConfig
    languages: list[str]
    multilingual: bool
    language: str | None = None
    _masks: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)
    _layers: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    masked_backend: str | None = None  # multilingual: the masked-linear kernels' backend

    def set_language(self, language: str) -> None:
        """Switch the pathway (multilingual artifacts); single-pathway ones check the language."""
        if language not in self.languages:
            raise UserError(f"the artifact has no pathway for {language!r} (it has {', '.join(self.languages)})")
        if self.multilingual:
            for name, layer in self._layers.items():
                layer.set_mask(self._masks[language][name])  # type: ignore[operator]
        self.language = language

    @contextmanager
    def pathway(self, language: str | None) -> Iterator[None]:
        """Select ``language``'s pathway for the block (it stays selected afterwards). ``None``
        keeps a single-pathway artifact as it is; a multilingual artifact has no default pathway,
        so ``None`` raises ``ValueError`` instead of running whichever language was set last."""
        if language is not None:
            self.set_language(language)
        elif self.multilingual:
            raise ValueError(f"this multilingual artifact needs a language ({', '.join(self.languages)}); "
                             "got None")
        yield

    def runtimes(self) -> dict[str, str]:
        """Which path each exported layer computes on (cublas, semi-structured, triton, cuda, torch...)."""
        out = {}
        for name, m in self.model.named_modules():
            key = f"{name}.weight"
            if hasattr(m, "runtime"):
                out[key] = m.runtime
            elif key in self._layers:
                out[key] = "masked-linear-" + getattr(m, "backend", "torch")
        return out


def convert_linears(
    model: EmformerRNNT, masks: dict[str, Tensor], fmt: str, *, block: tuple[int, int] = (16, 16),
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", semi_structured: str = "auto",
    cpu_sparse: str = "auto",
) -> dict[str, str]:
    """In place: every ``nn.Linear`` whose weight is named in ``masks`` computes with ``W ⊙ M`` in
    format ``fmt`` (as an artifact would load it), other tensors cast to ``dtype`` on ``device``;
    ``semi_structured`` and ``cpu_sparse`` as in :func:`load_artifact`. Returns the runtime of each
    converted layer. For benchmarks and tests without files."""
    check_semi_structured(semi_structured)
    dev = torch.device(device)
    # Only bsr/bitmap layers on the CPU use the CPU kernel: nothing else builds or needs it.
    check_cpu_sparse(cpu_sparse)
    cpu_run = resolve_cpu_sparse(cpu_sparse) if dev.type != "cuda" and fmt in ("bsr", "bitmap") else "dense"
    mods = {f"{n}.weight": (n, m) for n, m in model.named_modules() if type(m) is nn.Linear}
    model.to(device=dev, dtype=dtype)
    runtimes = {}
    for name, mask in masks.items():
        mod_name, mod = mods[name]
        parts, info = encode(fmt, mod.weight.detach(), mask.to(dev), block=block)
        bias = None if mod.bias is None else mod.bias.detach()
        layer = decode(fmt, parts, tuple(mod.weight.shape), info, bias, dev, dtype, semi_structured, cpu_run)
        parent_name, _, attr = mod_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
        runtimes[name] = layer.runtime
    return runtimes


def _safe_member(root: Path, name: object) -> Path:
    """``root / name`` for a manifest member name that stays in ``root`` (``UserError`` otherwise)."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") \
            or Path(name).is_absolute():
        raise UserError(f"{root}: manifest names a file outside the artifact directory: {name!r}")
    return root / name


def _check_regular_member(root: Path, fpath: Path) -> None:
    """A member must be a regular file inside ``root``: a symbolic link could point anywhere
    (``is_file`` follows links), so links are refused outright."""
    if fpath.is_symlink():
        raise UserError(f"{fpath}: is a symbolic link; an artifact's files must be regular files inside it")
    if not fpath.is_file():
        raise UserError(f"{root}: missing file {fpath.name}")
    if fpath.resolve().parent != root.resolve():
        raise UserError(f"{fpath}: resolves outside the artifact directory {root}")


def expected_files(multilingual: bool) -> set[str]:
    """The exact set of file names a manifest lists (``manifest.json`` itself excluded)."""
    return {WEIGHTS, CONFIG, TOKENIZER, CMVN} | ({MASKS} if multilingual else set())


@dataclass(frozen=True)
class _Manifest:
    """The manifest fields loading relies on, type-checked."""

    fmt: str
    dtype_name: str
    languages: list[str]
    multilingual: bool
    layers: dict[str, dict[str, Any]]
    files: dict[str, dict[str, Any]]


def _parse_manifest(mpath: Path, manifest: object) -> _Manifest:
    """Check every field's JSON type and value; ``UserError`` naming the manifest and the field."""
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise UserError(f"{mpath}: not a sparse_rnnt artifact manifest")
    if manifest.get("version") != ARTIFACT_VERSION:
        raise UserError(f"{mpath}: unsupported artifact version {manifest.get('version')!r}")

    def bad(what: str) -> UserError:
        return UserError(f"{mpath}: bad manifest: {what}")

    fmt, dtype_name = manifest.get("weight_format"), manifest.get("dtype")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise bad(f"weight_format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise bad(f"dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}")
    multilingual = manifest.get("multilingual")
    if not isinstance(multilingual, bool):
        raise bad(f"multilingual must be true or false, got {multilingual!r}")
    languages = manifest.get("languages")
    if not isinstance(languages, list) or not all(isinstance(x, str) and x for x in languages) \
            or len(set(languages)) != len(languages):
        raise bad(f"languages must be a list of distinct language names, got {languages!r}")
    if multilingual and not languages:
        raise bad("a multilingual artifact needs at least one language")
    if multilingual and fmt not in ("dense", "bitmap"):
        raise bad(f"a multilingual artifact stores dense or bitmap weights, not {fmt}")
    layers = manifest.get("layers")
    if not isinstance(layers, dict):
        raise bad(f"layers must be an object (layer name -> details), got {type(layers).__name__}")
    for name, info in layers.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or len(shape) != 2 or not all(is_int(x) and x > 0 for x in shape):
            raise bad(f"layer {name!r} needs a \"shape\" of two positive integers, got {info!r}"[:300])
        if fmt == "bsr":
            block = info.get("block")
            if not isinstance(block, list) or len(block) != 2 or not all(is_int(x) and x > 0 for x in block):
                raise bad(f"bsr layer {name!r} needs a \"block\" of two positive integers, got {block!r}"[:300])
        if fmt == "bitmap" and not (is_int(info.get("tile")) and info["tile"] > 0):
            raise bad(f"bitmap layer {name!r} needs a positive integer \"tile\", got {info.get('tile')!r}"[:300])
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(m, dict) and isinstance(m.get("sha256"), str)
                                              for m in files.values()):
        raise bad("files must be an object (file name -> {\"sha256\": ...})")
    return _Manifest(fmt, dtype_name, list(languages), multilingual, layers, files)


def _read_config(cpath: Path) -> tuple[ModelConfig, FeatureConfig, int]:
    """``config.json`` -> (model config, feature config, number of symbols), type-checked."""
    try:
        cfg = json.loads(cpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise UserError(f"{cpath}: unreadable artifact config ({e})") from None
    if not isinstance(cfg, dict) or set(cfg) != {"model", "features", "num_symbols"}:
        raise UserError(f"{cpath}: bad artifact config (an object with exactly \"model\", \"features\" "
                        "and \"num_symbols\")")
    for key in ("model", "features"):
        if not isinstance(cfg[key], dict):
            raise UserError(f"{cpath}: bad artifact config ({key!r} must be an object, "
                            f"got {type(cfg[key]).__name__})")
    num_symbols = cfg["num_symbols"]
    if not is_int(num_symbols) or num_symbols < 2:
        raise UserError(f"{cpath}: bad artifact config (num_symbols must be an integer >= 2, got {num_symbols!r})")
    try:
        model_cfg = from_dict(ModelConfig, cfg["model"], "model.")
        model_cfg.validate()
        feat_cfg = from_dict(FeatureConfig, cfg["features"], "features.")
        feat_cfg.validate()
    except (TypeError, ValueError, UserError) as e:
        raise UserError(f"{cpath}: bad artifact config ({e})") from None
    return model_cfg, feat_cfg, num_symbols


def _stored_shapes(wpath: Path) -> dict[str, list[int]]:
    """The weights file's tensor names and shapes, from its header only (no tensor is read)."""
    try:
        with safe_open(str(wpath), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:  # safetensors raises its own error types on malformed files
        raise UserError(f"{wpath}: unreadable weights ({e})") from None


def _check_sizes_before_building(cpath: Path, wpath: Path, model_cfg: ModelConfig, num_symbols: int,
                                 layers: dict[str, Any]) -> None:
    """Refuse a config whose model the weights file cannot hold, before any memory is allocated.

    A hash-consistent but hostile ``config.json`` (``transformer_ffn_dim: 10**9``, a million layers)
    would otherwise have the real model built first: minutes of allocation or an exhausted machine.
    The layer counts are bounded by the number of stored tensors (each layer stores some), then the
    model is built on the meta device and every parameter's shape compared with the file's header
    (dense tensors) or the manifest (exported layers)."""
    stored = _stored_shapes(wpath)
    n_layers = model_cfg.transformer_num_layers + model_cfg.num_lstm_layers
    if n_layers > len(stored):
        raise UserError(f"{cpath}: bad artifact config ({model_cfg.transformer_num_layers} transformer and "
                        f"{model_cfg.num_lstm_layers} LSTM layers, but {wpath.name} holds only {len(stored)} tensors)")
    try:
        with torch.device("meta"):
            meta = EmformerRNNT(model_cfg, num_symbols)
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise UserError(f"{cpath}: bad artifact config ({e})") from None
    for name, p in meta.named_parameters():
        if name in layers:
            have, where = layers[name].get("shape"), "manifest"
        else:
            have, where = stored.get(f"dense/{name}"), "stored"
            if have is None:
                raise UserError(f"{wpath}: missing tensor {'dense/' + name!r} (the model of {cpath.name} needs it)")
        if have != list(p.shape):
            raise UserError(f"{wpath}: corrupt artifact weights ({name} has shape {have} ({where}), the model "
                            f"of {cpath.name} needs {list(p.shape)})")


def _check_weight_tensors(wpath: Path, tensors: dict[str, Tensor], params: dict[str, nn.Parameter],
                          layers: dict[str, Any], fmt: str, dtype: torch.dtype) -> None:
    """Exactly the expected tensor names, each in its expected dtype, all finite (``UserError``
    naming the tensor): what export writes, and nothing else is loaded."""
    expected: dict[str, torch.dtype] = {}
    for name, p in params.items():
        if name not in layers:
            expected[f"dense/{name}"] = torch.float32 if p.is_floating_point() else p.dtype
    for name in layers:
        for part, part_dtype in PARTS[fmt].items():
            expected[f"sparse/{name}/{part}"] = dtype if part_dtype is None else part_dtype
    for key in sorted(tensors):
        if key not in expected:
            raise UserError(f"{wpath}: unexpected tensor {key!r} (not part of a {fmt} artifact of this model)")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{wpath}: missing tensor {missing[0]!r}{more}")
    for key in sorted(tensors):
        t = tensors[key]
        if t.dtype != expected[key]:
            raise UserError(f"{wpath}: tensor {key!r} is {t.dtype}, expected {expected[key]}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{wpath}: tensor {key!r} holds NaN or infinite values")


def _require_pathway(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook of a multilingual artifact's masked layers: no pathway, no forward (the
    stored weights are the union of all pathways, which no language uses)."""
    if getattr(module, "mask", None) is None:
        raise ValueError("this multilingual artifact has no pathway selected: call "
                         "Artifact.set_language(language) first")


def _masked_backend(backend: str, device: torch.device) -> str:
    if backend not in MASKED_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(MASKED_BACKENDS)}, got {backend!r}")
    if backend == "auto":  # the fused kernels need a GPU (on CPU only the interpreter runs them)
        return "triton" if device.type == "cuda" else "torch"
    return backend


def load_artifact(path: str | os.PathLike[str], device: str = "cpu", *, semi_structured: str = "auto",
                  backend: str = "auto", cpu_sparse: str = "auto") -> Artifact:
    """Load and check an artifact directory; ``UserError`` naming the file at fault if it is not sound.

    Checks: the manifest's JSON types; its files, exactly those of the artifact's kind, regular
    files inside the directory (no symbolic links) with the listed SHA-256; config.json; that the
    tokenizer's symbols, the CMVN bins, ``features.n_mels`` and the model's ``input_dim`` agree;
    every tensor's name, dtype, shape and finiteness; the masks' languages, layers and shapes.

    ``semi_structured``: torch's backend for 2:4 layers on CUDA, ``"auto"`` (torch's choice),
    ``"cutlass"`` or ``"cusparselt"`` (``ValueError`` otherwise); other formats ignore it.
    ``backend``: the masked-linear kernels of a multilingual artifact's layers, ``"triton"``,
    ``"torch"`` (the reference) or ``"auto"`` (triton on CUDA, else torch); logged at INFO;
    single-pathway artifacts have no masked layers and ignore it (``ValueError`` if unknown).
    ``cpu_sparse``: how bsr/bitmap layers run on the CPU, ``"auto"`` (the C++ kernel of
    ``csrc/cpu_spmm.cpp``, built on first use, else decompressed; logged), ``"kernel"`` (that
    kernel, ``UserError`` if it cannot be built) or ``"dense"`` (decompressed at load); CUDA and
    multilingual artifacts (whose layers are masked kernels) ignore it.
    A multilingual artifact loads with no pathway selected: call :meth:`Artifact.set_language`
    before running its model (its layers raise ``ValueError`` otherwise)."""
    check_semi_structured(semi_structured)
    check_cpu_sparse(cpu_sparse)
    from ..training.trainer import resolve_device

    # A device this machine lacks is said as such, not later as "corrupt artifact weights".
    dev = resolve_device(str(device), what="device")
    masked_backend = _masked_backend(backend, dev)
    from ..model.masked import swap_linears

    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{root}: not an artifact directory (no {MANIFEST})")
    _check_regular_member(root, mpath)
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise UserError(f"{mpath}: unreadable manifest ({e})") from None
    man = _parse_manifest(mpath, raw)
    members = {name: _safe_member(root, name) for name in man.files}
    expected = expected_files(man.multilingual)
    if set(members) != expected:
        kind = "multilingual" if man.multilingual else "single-pathway"
        raise UserError(f"{mpath}: the manifest lists files {sorted(members)}; a {kind} artifact has exactly "
                        f"{sorted(expected)}")
    for name, fpath in members.items():
        _check_regular_member(root, fpath)
        if sha256_file(fpath) != man.files[name]["sha256"]:
            raise UserError(f"{fpath}: corrupt or modified (SHA-256 differs from the manifest)")

    model_cfg, feat_cfg, num_symbols = _read_config(root / CONFIG)
    try:
        tokenizer = Tokenizer.load(root / TOKENIZER)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{root / TOKENIZER}: not a tokenizer model ({e})") from None
    try:
        cmvn = GlobalCMVN.load(root / CMVN)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{root / CMVN}: bad CMVN statistics ({e})") from None
    # Sizes that must agree, checked here rather than failing later inside streaming.
    if feat_cfg.n_mels != model_cfg.input_dim:
        raise UserError(f"{root / CONFIG}: features.n_mels is {feat_cfg.n_mels} but the model's input_dim "
                        f"is {model_cfg.input_dim}")
    if cmvn.dim != feat_cfg.n_mels:
        raise UserError(f"{root / CMVN}: {cmvn.dim} bins, but config.json has features.n_mels {feat_cfg.n_mels}")
    if tokenizer.num_symbols != num_symbols:
        raise UserError(f"{root / TOKENIZER}: {tokenizer.num_symbols} symbols (with blank), but the model "
                        f"has {num_symbols} (config.json num_symbols)")

    fmt, dtype, layers, languages, multilingual = (man.fmt, DTYPES[man.dtype_name], man.layers, man.languages,
                                                   man.multilingual)
    wpath = root / WEIGHTS
    _check_sizes_before_building(root / CONFIG, wpath, model_cfg, num_symbols, layers)
    try:
        model = EmformerRNNT(model_cfg, num_symbols)
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise UserError(f"{root / CONFIG}: bad artifact config ({e})") from None
    params = dict(model.named_parameters())
    linear_mods = {f"{n}.weight": (n, m) for n, m in model.named_modules() if type(m) is nn.Linear}
    for name in layers:
        if name not in linear_mods:
            raise UserError(f"{mpath}: layer {name!r} is not a linear layer of the model")
    try:
        tensors = load_file(str(wpath))
    except Exception as e:  # safetensors raises its own error types on malformed files
        raise UserError(f"{wpath}: unreadable weights ({e})") from None
    _check_weight_tensors(wpath, tensors, params, layers, fmt, dtype)
    # Only a single pathway's bsr/bitmap layers on the CPU need the CPU kernel (built once here).
    cpu_run = "dense"
    if dev.type != "cuda" and fmt in ("bsr", "bitmap") and not multilingual:
        cpu_run = resolve_cpu_sparse(cpu_sparse)
        log.info("%s: %s layers on the CPU run %s (cpu_sparse=%r)", root, fmt,
                 "the C++ sparse kernel" if cpu_run == "kernel" else "dense, decompressed at load", cpu_sparse)
    weights: dict[str, tuple[str, nn.Module]] = {}
    try:
        # Tensors outside the exported layers (norms, embeddings, biases) are float32, as stored.
        state = {k[len("dense/"):]: v for k, v in tensors.items() if k.startswith("dense/")}
        for name, p in params.items():
            if name in state and list(state[name].shape) != list(p.shape):
                raise ValueError(f"{name} has shape {list(state[name].shape)}, the model needs {list(p.shape)}")
        model.load_state_dict(state, strict=False)
        model.to(dev)
        for name, info in layers.items():
            mod_name, mod = linear_mods[name]
            shape = (int(info["shape"][0]), int(info["shape"][1]))
            if list(shape) != list(mod.weight.shape):
                raise ValueError(f"layer {name} has shape {list(shape)}, the model needs {list(mod.weight.shape)}")
            prefix = f"sparse/{name}/"
            parts = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            bias = None if mod.bias is None else mod.bias.detach()
            layer = decode(fmt, parts, shape, info, bias, dev, dtype, semi_structured, cpu_run)
            if multilingual:  # theta of the union, computed with each language's bits
                weights[name] = (mod_name, layer)
                continue
            parent_name, _, attr = mod_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
    except torch.OutOfMemoryError:
        raise  # the device's limit, not the file's fault
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{wpath}: corrupt artifact weights ({str(e).splitlines()[0]})") from None

    art_masks: dict[str, dict[str, Tensor]] = {}
    swapped: dict[str, nn.Module] = {}
    if multilingual:
        from ..kernels.masked_linear import pack_rows

        lm = LanguageMasks.load(root / MASKS)
        if sorted(lm.languages) != sorted(languages) or set(lm.names) != set(weights):
            raise UserError(f"{root / MASKS}: masks do not match the manifest's languages and layers")
        shapes = lm[languages[0]].shapes  # every language has the same (LanguageMasks checks it)
        for name in sorted(weights):
            if list(shapes[name]) != list(params[name].shape):
                raise UserError(f"{root / MASKS}: mask {name!r} has shape {list(shapes[name])}, its layer's "
                                f"weight {list(params[name].shape)}")
        with torch.no_grad():
            for name, (mod_name, layer) in weights.items():
                params[name].data = _dense_weight(layer).to(dev, dtype)
                bias = model.get_submodule(mod_name).bias
                if bias is not None:  # the masked kernels take weight and bias in one dtype
                    bias.data = bias.data.to(dtype)
        log.info("%s: multilingual pathways run the masked linear layers on backend %r (requested %r, %s)",
                 root, masked_backend, backend, dev)
        swap = swap_linears(model, list(weights), backend=masked_backend)
        swapped = dict(swap.layers)
        for layer in swapped.values():
            layer.register_forward_pre_hook(_require_pathway)
        art_masks = {lang: {n: pack_rows(lm[lang][n].to(dev)) for n in weights} for lang in languages}
    model.to(dev).eval()
    art = Artifact(root, raw, model, tokenizer, cmvn, feat_cfg, languages, multilingual, None, art_masks, swapped,
                   masked_backend=masked_backend if multilingual else None)
    if languages and not multilingual:
        art.set_language(languages[0])
    return art


def _dense_weight(layer: nn.Module) -> Tensor:
    """The stored ``θ`` of a decoded layer as a dense matrix."""
    if hasattr(layer, "packed"):
        return layer.packed.to_dense()
    return layer.weight.detach()
