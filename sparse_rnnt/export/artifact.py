"""Deployable artifacts: one language's pathway (or all of them) as compressed weights + JSON.

Layout of an artifact directory (every file named in ``manifest.json`` with its SHA-256)::

    manifest.json       format, version, weight format, languages, files, sizes per format,
                        the self-verification result, and per-layer details (runtime, 2:4 loss)
    config.json         model config, number of symbols, feature config
    weights.safetensors dense tensors "dense/<param>" and compressed layers "sparse/<param>/<part>"
    masks.safetensors   multilingual artifacts only: every language's mask, bit-packed
    tokenizer.model     sentencepiece model
    cmvn.safetensors    feature normalization stats

A single-pathway artifact stores ``θ ⊙ m_L`` in the chosen format. A multilingual artifact
stores ``θ`` restricted to the union of the pathways once (``dense`` or ``bitmap`` storage) and
every language's mask as bits; :meth:`Artifact.set_language` switches pathway without
reloading (the fused masked linear applies the language's bits inside the matmul).

Export verifies itself: the written artifact is loaded back and its joiner logits on a fixed
probe batch are compared with the masked dense model's; if the largest difference relative to
the largest logit exceeds the tolerance, export refuses (nothing is left behind) and reports the
measured error. Loading checks the manifest (no path may leave the directory), every file's hash
and every tensor's shape, and never unpickles.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..config import from_dict
from ..data.features import FeatureConfig, GlobalCMVN
from ..data.tokenizer import Tokenizer
from ..errors import UserError
from ..io import atomic_path, atomic_write_json, sha256_file
from ..model.configs import ModelConfig
from ..model.rnnt import EmformerRNNT
from ..pruning.masks import LanguageMasks, MaskSet
from .formats import FORMATS, check_semi_structured, decode, encode

ARTIFACT_FORMAT = "sparse_rnnt.artifact"
ARTIFACT_VERSION = 1
MANIFEST, CONFIG, WEIGHTS, MASKS = "manifest.json", "config.json", "weights.safetensors", "masks.safetensors"
TOKENIZER, CMVN = "tokenizer.model", "cmvn.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


def _linear_names(model: nn.Module) -> set[str]:
    return {f"{name}.weight" for name, m in model.named_modules() if type(m) is nn.Linear}


# ---------------------------------------------------------------------------- probe


def probe_logits(model: EmformerRNNT, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """Joiner logits ``[B, T', U + 1, V]`` of a fixed random batch (seeded; CMVN-normalized scale)."""
    g = torch.Generator().manual_seed(1234)
    frames = (160, 124)
    x = torch.randn(len(frames), max(frames), model.config.input_dim, generator=g)
    lengths = torch.tensor(frames, dtype=torch.int32)
    targets = torch.randint(0, model.blank, (len(frames), 6), generator=g, dtype=torch.int32)
    tlen = torch.tensor([6, 4], dtype=torch.int32)
    x, lengths, targets, tlen = (t.to(device) for t in (x, lengths, targets, tlen))
    with torch.inference_mode():
        enc, enc_len = model.encode(x.to(dtype), lengths)
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

    def validate(self) -> None:
        if self.fmt not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {self.fmt!r}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.multilingual and self.fmt not in ("dense", "bitmap"):
            raise UserError("a multilingual artifact stores theta as dense or bitmap (--format dense|bitmap)")
        if self.multilingual and self.language is not None:
            raise UserError("--language and --all-languages exclude each other")
        if len(self.block) != 2 or min(self.block) < 1:
            raise UserError(f"--block must be two positive sizes, got {self.block}")


def export_checkpoint(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], opts: ExportOptions) -> dict[str, Any]:
    """Export a (pruned) checkpoint to the artifact directory ``out`` (must not exist); returns the manifest."""
    from ..training.inference import load_recognizer

    opts.validate()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose a new --out")
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
    for name, p in params.items():
        if name in masks:
            parts, info = encode(opts.fmt, p.detach().float().to(dtype), masks[name], block=opts.block)
            tensors.update({f"sparse/{name}/{k}": v.contiguous() for k, v in parts.items()})
            layers[name] = {"shape": list(p.shape), **info}
        else:
            tensors[f"dense/{name}"] = p.detach().to(dtype if p.is_floating_point() else p.dtype).contiguous()
    sizes = _format_sizes(params, masks, opts)

    manifest: dict[str, Any] = {
        "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "weight_format": opts.fmt, "dtype": opts.dtype,
        "languages": export_langs, "multilingual": opts.multilingual, "checkpoint": str(rec.checkpoint),
        "step": rec.step, "layers": layers, "sizes": sizes,
    }
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS))
        if opts.multilingual:
            assert rec.language_masks is not None
            LanguageMasks({lang: MaskSet({n: rec.language_masks[lang][n] for n in masks})
                           for lang in export_langs}).save(tmp / MASKS)
        atomic_write_json(tmp / CONFIG, {
            "model": asdict(model.config), "num_symbols": model.num_symbols,
            "features": asdict(rec.config.features),
        })
        shutil.copyfile(rec.checkpoint / TOKENIZER, tmp / TOKENIZER)
        shutil.copyfile(rec.checkpoint / CMVN, tmp / CMVN)
        files = [WEIGHTS, CONFIG, TOKENIZER, CMVN] + ([MASKS] if opts.multilingual else [])
        manifest["files"] = {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files}
        atomic_write_json(tmp / MANIFEST, manifest)
        art = load_artifact(tmp, device=opts.device)
        manifest["verification"] = _verify(art, rec, export_langs, opts)
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


def _verify(art: Artifact, rec: Any, languages: list[str], opts: ExportOptions) -> dict[str, Any]:
    """Artifact logits vs the masked dense model's, per language; refuse above the tolerance."""
    device = torch.device(opts.device)
    tol = opts.tolerance if opts.tolerance is not None else DEFAULT_TOLERANCE[opts.dtype]
    rec.model.to(device)
    errors = {}
    for lang in languages:
        with rec.masked(lang):
            ref = probe_logits(rec.model, device)
        if art.multilingual:
            art.set_language(lang)
        errors[lang] = relative_error(probe_logits(art.model, device, DTYPES[opts.dtype]), ref)
    worst = max(errors.values())
    if not worst <= tol:
        hint = ""
        if opts.fmt == "2:4":  # the usual cause: an unstructured mask projected to 2:4
            hint = ("; a mask not trained as 2:4 loses weights in the projection: prune with "
                    "--granularity 2:4 for a lossless export, or raise --tolerance to accept the loss")
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
        if language is not None:
            self.set_language(language)
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
) -> dict[str, str]:
    """In place: every ``nn.Linear`` whose weight is named in ``masks`` computes with ``W ⊙ M`` in
    format ``fmt`` (as an artifact would load it), other tensors cast to ``dtype`` on ``device``;
    ``semi_structured`` as in :func:`load_artifact`. Returns the runtime of each converted layer.
    For benchmarks and tests without files."""
    check_semi_structured(semi_structured)
    dev = torch.device(device)
    mods = {f"{n}.weight": (n, m) for n, m in model.named_modules() if type(m) is nn.Linear}
    model.to(device=dev, dtype=dtype)
    runtimes = {}
    for name, mask in masks.items():
        mod_name, mod = mods[name]
        parts, info = encode(fmt, mod.weight.detach(), mask.to(dev), block=block)
        bias = None if mod.bias is None else mod.bias.detach()
        layer = decode(fmt, parts, tuple(mod.weight.shape), info, bias, dev, dtype, semi_structured)
        parent_name, _, attr = mod_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
        runtimes[name] = layer.runtime
    return runtimes


def _safe_member(root: Path, name: object) -> Path:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") \
            or Path(name).is_absolute():
        raise UserError(f"{root}: manifest names a file outside the artifact directory: {name!r}")
    return root / name


def load_artifact(path: str | os.PathLike[str], device: str = "cpu", *, semi_structured: str = "auto") -> Artifact:
    """Load and check an artifact directory; ``UserError`` naming the problem if it is not sound.

    ``semi_structured``: torch's backend for 2:4 layers on CUDA, ``"auto"`` (torch's choice),
    ``"cutlass"`` or ``"cusparselt"`` (``ValueError`` otherwise); other formats ignore it."""
    check_semi_structured(semi_structured)
    from ..model.masked import swap_linears

    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{root}: not an artifact directory (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise UserError(f"{mpath}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise UserError(f"{mpath}: not a sparse_rnnt artifact manifest")
    if manifest.get("version") != ARTIFACT_VERSION:
        raise UserError(f"{mpath}: unsupported artifact version {manifest.get('version')!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not {WEIGHTS, CONFIG, TOKENIZER, CMVN} <= set(files):
        raise UserError(f"{mpath}: the manifest does not list the artifact's files")
    for name, meta in files.items():
        fpath = _safe_member(root, name)
        if not fpath.is_file():
            raise UserError(f"{root}: missing file {name}")
        if not isinstance(meta, dict) or sha256_file(fpath) != meta.get("sha256"):
            raise UserError(f"{fpath}: corrupt or modified (SHA-256 differs from the manifest)")
    try:
        cfg = json.loads((root / CONFIG).read_text(encoding="utf-8"))
        model_cfg = from_dict(ModelConfig, cfg["model"])
        feat_cfg = from_dict(FeatureConfig, cfg["features"])
        num_symbols = int(cfg["num_symbols"])
        fmt, dtype_name = manifest["weight_format"], manifest["dtype"]
        dtype = DTYPES[dtype_name]
        languages = [str(x) for x in manifest["languages"]]
        multilingual = bool(manifest["multilingual"])
        layers: dict[str, Any] = manifest["layers"]
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise UserError(f"{root}: bad artifact config ({e})") from None

    dev = torch.device(device)
    try:
        model = EmformerRNNT(model_cfg, num_symbols)
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise UserError(f"{root}: bad artifact config ({e})") from None
    try:
        tensors = load_file(str(root / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types on malformed files
        raise UserError(f"{root / WEIGHTS}: unreadable weights ({e})") from None
    params = dict(model.named_parameters())
    weights: dict[str, tuple[str, nn.Module]] = {}
    try:
        dense = {k[len("dense/"):]: v for k, v in tensors.items() if k.startswith("dense/")}
        expected_dense = set(params) - set(layers)
        if set(dense) != expected_dense:
            raise ValueError(f"dense tensors differ from the model: missing {sorted(expected_dense - set(dense))[:3]}, "
                             f"extra {sorted(set(dense) - expected_dense)[:3]}")
        state = {k: v.float() if v.is_floating_point() else v for k, v in dense.items()}
        for name, p in params.items():
            if name in state and list(state[name].shape) != list(p.shape):
                raise ValueError(f"{name} has shape {list(state[name].shape)}, the model needs {list(p.shape)}")
        model.load_state_dict(state, strict=False)
        model.to(dev)
        linear_mods = {f"{n}.weight": (n, m) for n, m in model.named_modules() if type(m) is nn.Linear}
        for name, info in layers.items():
            if name not in linear_mods:
                raise ValueError(f"layer {name} is not a linear layer of the model")
            mod_name, mod = linear_mods[name]
            shape = tuple(int(x) for x in info["shape"])
            if list(shape) != list(mod.weight.shape):
                raise ValueError(f"layer {name} has shape {list(shape)}, the model needs {list(mod.weight.shape)}")
            prefix = f"sparse/{name}/"
            parts = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            bias = None if mod.bias is None else mod.bias.detach()
            layer = decode(fmt, parts, shape, info, bias, dev, dtype, semi_structured)
            if multilingual:  # theta of the union, computed densely with each language's bits
                weights[name] = (mod_name, layer)
                continue
            parent_name, _, attr = mod_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{root}: corrupt artifact weights ({str(e).splitlines()[0]})") from None

    art_masks: dict[str, dict[str, Tensor]] = {}
    swapped: dict[str, nn.Module] = {}
    if multilingual:
        from ..kernels.masked_linear import pack_rows

        with torch.no_grad():
            for name, (_, layer) in weights.items():
                params[name].data = _dense_weight(layer).to(dev, torch.float32)
        swap = swap_linears(model, list(weights), backend="triton" if dev.type == "cuda" else "torch")
        swapped = dict(swap.layers)
        lm = LanguageMasks.load(root / MASKS)
        if sorted(lm.languages) != sorted(languages) or set(lm.names) != set(weights):
            raise UserError(f"{root / MASKS}: masks do not match the manifest's languages and layers")
        art_masks = {lang: {n: pack_rows(lm[lang][n].to(dev)) for n in weights} for lang in languages}
    model.to(dev).eval()
    art = Artifact(root, manifest, model, Tokenizer.load(root / TOKENIZER), GlobalCMVN.load(root / CMVN), feat_cfg,
                   languages, multilingual, None, art_masks, swapped)
    if len(languages) >= 1:
        art.set_language(languages[0])
    return art


def _dense_weight(layer: nn.Module) -> Tensor:
    """The stored ``θ`` of a decoded layer as a dense matrix."""
    if hasattr(layer, "packed"):
        return layer.packed.to_dense().float()
    return layer.weight.detach().float()
