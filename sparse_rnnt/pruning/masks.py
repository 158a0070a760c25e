"""Mask sets: one bool mask per in-scope parameter (``True`` = kept), optionally one set per language.

On disk a mask set is one safetensors file, no pickle. Each mask is bit-packed to
``ceil(numel / 8)`` uint8 bytes, **little-endian bit order**: element ``i`` of the row-major
flattened mask is bit ``i % 8`` (value ``1 << (i % 8)``) of byte ``i // 8``, as
``numpy.packbits(..., bitorder="little")``; padding bits of the last byte are 0. The header
metadata holds ``format`` (``sparse_rnnt.maskset`` or ``sparse_rnnt.language_masks``),
``version``, ``sha256`` (of the packed tensors, checked at load), ``names`` (JSON list, the mask order) and ``shapes`` (JSON object name -> shape);
language files also hold ``languages`` and use tensor keys ``"<lang>/<param>"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor

from ..errors import UserError
from ..io import atomic_write_bytes

FORMAT_VERSION = "1"
_MASKSET = "sparse_rnnt.maskset"
_LANGUAGE_MASKS = "sparse_rnnt.language_masks"
_BIT_WEIGHTS = [1 << i for i in range(8)]


def pack_bits(mask: Tensor) -> Tensor:
    """Bool mask of any shape -> uint8 ``[ceil(numel / 8)]`` (little-endian bit order)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    # Each byte's bits are disjoint, so the sum is exact in uint8.
    return (flat.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: tuple[int, ...] | list[int] | torch.Size) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[ceil(numel / 8)]`` -> bool mask of ``shape``.

    Raises ``ValueError`` if the byte count is wrong or a padding bit is set.
    """
    shape = tuple(int(d) for d in shape)
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-numel // 8):
        raise ValueError(
            f"packed mask for shape {list(shape)} must be {-(-numel // 8)} uint8 bytes, got "
            f"{packed.dtype} {list(packed.shape)}"
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = ((packed[:, None] >> shifts) & 1).reshape(-1).to(torch.bool)
    if bool(bits[numel:].any()):
        raise ValueError(f"packed mask for shape {list(shape)} has padding bits set")
    return bits[:numel].reshape(shape)


def _counts(tensors: list[Tensor]) -> list[int]:
    """``[int(t.sum()) for t in tensors]`` with one host sync per device, not one per tensor: a
    re-rank's statistics cover every masked layer of a model."""
    out = [0] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        sums = torch.stack([tensors[i].sum(dtype=torch.int64) for i in idx]).tolist()
        for i, v in zip(idx, sums, strict=True):
            out[i] = int(v)
    return out


def _same_layout(a: MaskSet, b: MaskSet) -> None:
    if set(a.names) != set(b.names):
        raise ValueError(f"mask sets cover different tensors: {sorted(set(a.names) ^ set(b.names))}")
    for name in a.names:
        if a[name].shape != b[name].shape:
            raise ValueError(f"{name}: mask shapes differ {list(a[name].shape)} vs {list(b[name].shape)}")


class MaskSet:
    """One bool mask per in-scope parameter name (``True`` = kept), in a fixed name order.

    Masks are stored as given (not copied); use :meth:`clone` for an independent copy.
    """

    def __init__(self, masks: Mapping[str, Tensor]) -> None:
        for name, mask in masks.items():
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"mask {name!r} must be a bool tensor, got {got}")
        self._masks: dict[str, Tensor] = dict(masks)

    # ---- mapping-like access
    @property
    def names(self) -> list[str]:
        return list(self._masks)

    @property
    def shapes(self) -> dict[str, list[int]]:
        return {n: list(m.shape) for n, m in self._masks.items()}

    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def items(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self._masks.items())

    def as_dict(self) -> dict[str, Tensor]:
        """A new dict of the (shared, not copied) masks, e.g. for ``magnitude_masks(candidates=...)``."""
        return dict(self._masks)

    def __repr__(self) -> str:
        return f"MaskSet({len(self)} tensors, {self.numel():,} weights, sparsity {self.sparsity():.4f})"

    @classmethod
    def ones_like(cls, params: Mapping[str, Tensor]) -> MaskSet:
        """All-kept masks shaped like ``params``, on their devices."""
        return cls({n: torch.ones(p.shape, dtype=torch.bool, device=p.device) for n, p in params.items()})

    # ---- statistics
    def numel(self) -> int:
        """Number of weights covered."""
        return sum(m.numel() for m in self._masks.values())

    def kept(self) -> int:
        """Number of kept weights."""
        return sum(_counts(list(self._masks.values())))

    def sparsity(self) -> float:
        """Fraction of pruned weights over all tensors (0.0 for an empty set)."""
        total = self.numel()
        return 0.0 if total == 0 else 1.0 - self.kept() / total

    def sparsity_per_tensor(self) -> dict[str, float]:
        kept = _counts(list(self._masks.values()))
        return {n: (1.0 - k / m.numel()) if m.numel() else 0.0
                for (n, m), k in zip(self._masks.items(), kept, strict=True)}

    # ---- applying to a model
    def _params_for(self, params: Mapping[str, Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
        for name, mask in self._masks.items():
            if name not in params:
                raise KeyError(f"no parameter {name!r} to mask")
            p = params[name]
            if p.shape != mask.shape:
                raise ValueError(f"{name}: mask {list(mask.shape)} does not fit parameter {list(p.shape)}")
            yield p, mask

    def apply_(self, params: Mapping[str, Tensor]) -> None:
        """Zero the pruned weights of ``params`` in place (extra params are ignored)."""
        with torch.no_grad():
            for p, mask in self._params_for(params):
                # masked_fill, not multiply: NaN/inf * 0 would stay NaN.
                p.masked_fill_(~mask.to(p.device), 0)

    @contextmanager
    def substituted(self, params: Mapping[str, Tensor]) -> Iterator[None]:
        """Inside, each masked parameter's ``.data`` is ``theta ⊙ m``; the dense ``theta`` is put
        back on exit (also on error). Autograd sees the masked values, so a backward pass run
        inside gives the gradient at ``theta ⊙ m`` for every entry (straight-through)."""
        saved: list[tuple[Tensor, Tensor]] = []
        try:
            for p, mask in self._params_for(params):
                saved.append((p, p.data))
                p.data = p.data.masked_fill(~mask.to(p.device), 0)
            yield
        finally:
            for p, dense in saved:
                p.data = dense

    def mask_grads_(self, params: Mapping[str, Tensor]) -> None:
        """Zero the gradients of the pruned weights in place (params without ``.grad`` are skipped)."""
        with torch.no_grad():
            for p, mask in self._params_for(params):
                if p.grad is not None:
                    p.grad.masked_fill_(~mask.to(p.grad.device), 0)

    # ---- set algebra and analytics
    def _combine(self, others: Iterable[MaskSet], op: str) -> MaskSet:
        out = {n: m.clone() for n, m in self._masks.items()}
        for other in others:
            _same_layout(self, other)
            for n in out:
                o = other[n].to(out[n].device)
                if op == "or":
                    out[n] |= o
                else:
                    out[n] &= o
        return MaskSet(out)

    def union(self, *others: MaskSet) -> MaskSet:
        """Kept in this set or in any of ``others``."""
        return self._combine(others, "or")

    def intersection(self, *others: MaskSet) -> MaskSet:
        """Kept in this set and in all of ``others``."""
        return self._combine(others, "and")

    def complement(self) -> MaskSet:
        """Kept where this set prunes."""
        return MaskSet({n: ~m for n, m in self._masks.items()})

    def iou(self, other: MaskSet) -> float:
        """|kept in both| / |kept in either| over all tensors; 1.0 when neither keeps anything."""
        _same_layout(self, other)
        pairs = [(m, other[n].to(m.device)) for n, m in self._masks.items()]
        counts = _counts([m & o for m, o in pairs] + [m | o for m, o in pairs])  # one transfer
        inter, union = sum(counts[:len(pairs)]), sum(counts[len(pairs):])
        return 1.0 if union == 0 else inter / union

    def flips(self, other: MaskSet) -> int:
        """Number of weights whose kept/pruned state differs (churn = flips / numel)."""
        _same_layout(self, other)
        return sum(_counts([m ^ other[n].to(m.device) for n, m in self._masks.items()]))

    def churn(self, other: MaskSet) -> float:
        """``flips(other) / numel()``."""
        total = self.numel()
        return 0.0 if total == 0 else self.flips(other) / total

    def equal(self, other: MaskSet) -> bool:
        """Same names, shapes and values."""
        try:
            _same_layout(self, other)
        except ValueError:
            return False
        return all(torch.equal(m, other[n].to(m.device)) for n, m in self._masks.items())

    # ---- copies and devices
    def to(self, device: torch.device | str) -> MaskSet:
        return MaskSet({n: m.to(device) for n, m in self._masks.items()})

    def clone(self) -> MaskSet:
        return MaskSet({n: m.clone() for n, m in self._masks.items()})

    # ---- bit packing and files
    def pack(self) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
        """``({name: uint8 [ceil(numel/8)]}, {name: shape})``, bit order as in the module docstring."""
        return {n: pack_bits(m) for n, m in self._masks.items()}, self.shapes

    @classmethod
    def unpack(cls, packed: Mapping[str, Tensor], shapes: Mapping[str, list[int] | tuple[int, ...]]) -> MaskSet:
        """Exact inverse of :meth:`pack` (names in ``shapes`` order)."""
        missing = [n for n in shapes if n not in packed]
        if missing:
            raise ValueError(f"packed masks missing {missing}")
        return cls({n: unpack_bits(packed[n], shape) for n, shape in shapes.items()})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write one safetensors file atomically (see the module docstring for the layout)."""
        packed, shapes = self.pack()
        _write(path, _MASKSET, {n: t.cpu() for n, t in packed.items()}, {"names": self.names, "shapes": shapes})

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu") -> MaskSet:
        """Read a file written by :meth:`save`; :class:`UserError` naming the file if it is bad."""
        tensors, meta = _read(path, _MASKSET)
        try:
            names, shapes = meta["names"], meta["shapes"]
            if list(tensors) != sorted(names) or set(shapes) != set(names):
                raise ValueError("tensor names do not match the header")
            masks = cls.unpack(tensors, {n: shapes[n] for n in names})
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"{path}: corrupt mask file ({exc})") from None
        return masks.to(device)


class LanguageMasks:
    """``{language: MaskSet}``: one pathway per language, all over the same names and shapes."""

    def __init__(self, masks: Mapping[str, MaskSet]) -> None:
        if not masks:
            raise ValueError("LanguageMasks needs at least one language")
        items = list(masks.items())
        for lang, ms in items:
            if not isinstance(lang, str) or not lang or "/" in lang:
                raise ValueError(f"bad language key {lang!r} (non-empty, no '/')")
            _same_layout(items[0][1], ms)
        self._masks: dict[str, MaskSet] = dict(masks)

    @property
    def languages(self) -> list[str]:
        return list(self._masks)

    @property
    def names(self) -> list[str]:
        return next(iter(self._masks.values())).names

    def __getitem__(self, language: str) -> MaskSet:
        if language not in self._masks:
            raise KeyError(f"no mask for language {language!r} (have {', '.join(self._masks)})")
        return self._masks[language]

    def __contains__(self, language: object) -> bool:
        return language in self._masks

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def items(self) -> Iterator[tuple[str, MaskSet]]:
        return iter(self._masks.items())

    def __repr__(self) -> str:
        per = ", ".join(f"{lang}: {ms.sparsity():.4f}" for lang, ms in self._masks.items())
        return f"LanguageMasks({per})"

    def union(self) -> MaskSet:
        """Weights used by at least one language."""
        first, *rest = self._masks.values()
        return first.union(*rest)

    def free_zone(self, language: str) -> MaskSet:
        """``1 - union of the OTHER languages' masks``: weights no other language uses.

        With a single language every weight is free.
        """
        own = self[language]
        others = [ms for lang, ms in self._masks.items() if lang != language]
        if not others:
            return MaskSet({n: torch.ones_like(m) for n, m in own.items()})
        first, *rest = others
        return first.union(*rest).complement()

    def selectable_zone(self, language: str) -> MaskSet:
        """``free_zone(language) ∪ mask(language)``: where ``language`` may keep weights when it re-ranks."""
        return self.free_zone(language).union(self[language])

    def overlap_matrix(self) -> dict[str, dict[str, float]]:
        """Pairwise IoU of the languages' masks (1.0 on the diagonal)."""
        langs = self.languages
        out: dict[str, dict[str, float]] = {a: {} for a in langs}
        for i, a in enumerate(langs):
            out[a][a] = 1.0
            for b in langs[i + 1 :]:
                out[a][b] = out[b][a] = self._masks[a].iou(self._masks[b])
        return out

    def to(self, device: torch.device | str) -> LanguageMasks:
        return LanguageMasks({lang: ms.to(device) for lang, ms in self._masks.items()})

    def clone(self) -> LanguageMasks:
        return LanguageMasks({lang: ms.clone() for lang, ms in self._masks.items()})

    def save(self, path: str | os.PathLike[str]) -> None:
        """One safetensors file, tensor keys ``"<lang>/<param>"``, written atomically."""
        tensors: dict[str, Tensor] = {}
        for lang, ms in self._masks.items():
            packed, _ = ms.pack()
            tensors.update({f"{lang}/{n}": t.cpu() for n, t in packed.items()})
        first = next(iter(self._masks.values()))
        meta = {"languages": self.languages, "names": first.names, "shapes": first.shapes}
        _write(path, _LANGUAGE_MASKS, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu") -> LanguageMasks:
        """Read a file written by :meth:`save`; :class:`UserError` naming the file if it is bad."""
        tensors, meta = _read(path, _LANGUAGE_MASKS)
        try:
            langs, names, shapes = meta["languages"], meta["names"], meta["shapes"]
            expected = sorted(f"{lang}/{n}" for lang in langs for n in names)
            if list(tensors) != expected or set(shapes) != set(names):
                raise ValueError("tensor names do not match the header")
            out = cls({
                lang: MaskSet.unpack(
                    {n: tensors[f"{lang}/{n}"] for n in names}, {n: shapes[n] for n in names}
                )
                for lang in langs
            })
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"{path}: corrupt language mask file ({exc})") from None
        return out.to(device)


def _digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over the (key, bytes) of the packed tensors in key order: catches flipped bits."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode("utf-8") + b"\0")
        h.update(tensors[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def _write(path: str | os.PathLike[str], fmt: str, tensors: dict[str, Tensor], meta: dict[str, object]) -> None:
    metadata = {"format": fmt, "version": FORMAT_VERSION, "sha256": _digest(tensors)}
    metadata.update({k: json.dumps(v) for k, v in meta.items()})
    atomic_write_bytes(path, safetensors_save({k: t.contiguous() for k, t in tensors.items()}, metadata=metadata))


def _read(path: str | os.PathLike[str], fmt: str) -> tuple[dict[str, Tensor], dict[str, object]]:
    """Tensors (sorted by key) and decoded JSON metadata of a mask file of format ``fmt``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"mask file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in sorted(f.keys())}
    except Exception as exc:  # safetensors raises its own error types on a damaged file
        raise UserError(f"{path}: not a readable safetensors mask file ({exc})") from None
    if header.get("format") != fmt:
        raise UserError(f"{path}: not a {fmt} file (format={header.get('format')!r})")
    if header.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: unsupported mask file version {header.get('version')!r}")
    if header.get("sha256") != _digest(tensors):
        raise UserError(f"{path}: corrupt mask file (checksum mismatch)")
    try:
        meta = {k: json.loads(v) for k, v in header.items() if k not in ("format", "version", "sha256")}
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: corrupt mask file header ({exc})") from None
    return tensors, meta
