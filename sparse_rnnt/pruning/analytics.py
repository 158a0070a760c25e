"""Mask analytics: sparsity per layer and language, pathway overlap, churn; JSON reports and plots.

All reports are plain JSON-able dicts (str keys, floats/ints/lists), written atomically by
:func:`write_report`. Plots are PNGs drawn with matplotlib when it is installed; without it the
plot functions write the plot's data as JSON next to the requested path (``<path>.json`` in place
of ``<path>.png``) and return that path, so a pipeline never fails for want of a plotting library.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import atomic_path, atomic_write_json
from .masks import LanguageMasks, MaskSet

ALL = "all"  # series key for history entries without a language


def _set_stats(ms: MaskSet) -> dict[str, Any]:
    return {
        "numel": ms.numel(),
        "kept": ms.kept(),
        "sparsity": ms.sparsity(),
        "per_layer": ms.sparsity_per_tensor(),
    }


def _churn(new: MaskSet, old: MaskSet) -> dict[str, Any]:
    try:
        return {"flips": new.flips(old), "fraction": new.churn(old)}
    except ValueError as exc:  # different tensors or shapes
        raise UserError(f"previous masks do not match: {exc}") from None


def mask_report(
    masks: MaskSet | LanguageMasks, previous: MaskSet | LanguageMasks | None = None
) -> dict[str, Any]:
    """Statistics of one mask set or of per-language pathways, JSON-able.

    One :class:`MaskSet` (each mask ``[*param.shape]``): ``{"kind": "single", "numel", "kept",
    "sparsity", "per_layer": {name: sparsity}}`` plus ``"churn": {"flips", "fraction"}`` (fraction
    of all weights whose kept/pruned state differs) when ``previous`` is given.

    :class:`LanguageMasks`: ``{"kind": "multilingual", "languages", "numel", "per_language":
    {lang: {"numel", "kept", "sparsity", "per_layer"}}, "sparsity"`` (mean of the languages'
    sparsities), ``"union": {...}`` (weights used by at least one language, same fields),
    ``"intersection": {...}`` (weights used by every language), ``"iou": {a: {b: IoU}}`` (pairwise
    pathway IoU, 1.0 on the diagonal)``}`` plus ``"churn": {lang: {"flips", "fraction"}}`` and
    ``"union_churn"`` when ``previous`` (same languages) is given.
    """
    if isinstance(masks, MaskSet):
        if previous is not None and not isinstance(previous, MaskSet):
            raise UserError("previous masks must be one MaskSet, like the current ones")
        out: dict[str, Any] = {"kind": "single", **_set_stats(masks)}
        if previous is not None:
            out["churn"] = _churn(masks, previous)
        return out
    if not isinstance(masks, LanguageMasks):
        raise TypeError(f"mask_report takes a MaskSet or LanguageMasks, got {type(masks).__name__}")
    langs = masks.languages
    per_language = {lang: _set_stats(masks[lang]) for lang in langs}
    first, *rest = (masks[lang] for lang in langs)
    report: dict[str, Any] = {
        "kind": "multilingual",
        "languages": langs,
        "numel": first.numel(),
        "per_language": per_language,
        "sparsity": sum(s["sparsity"] for s in per_language.values()) / len(langs),
        "union": _set_stats(masks.union()),
        "intersection": _set_stats(first.intersection(*rest)),
        "iou": masks.overlap_matrix(),
    }
    if previous is not None:
        if not isinstance(previous, LanguageMasks):
            raise UserError("previous masks must be per-language masks, like the current ones")
        if sorted(previous.languages) != sorted(langs):
            raise UserError(f"previous masks cover languages {previous.languages}, current {langs}")
        report["churn"] = {lang: _churn(masks[lang], previous[lang]) for lang in langs}
        report["union_churn"] = _churn(masks.union(), previous.union())
    return report


_HISTORY_KEYS = ("step", "event", "level", "sparsity", "churn")


def churn_series(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Turn ``Pruner.history`` into per-language time series (key ``"all"`` for entries without a
    language): ``{"series": {key: {"step": [...], "event": [...], "level": [...], "sparsity":
    [...], "churn": [...]}}, "total_churn": {key: sum of churn}, "events": len(history)}``.
    Entries keep their order within each series."""
    series: dict[str, dict[str, list[Any]]] = {}
    for i, entry in enumerate(history):
        if not isinstance(entry, Mapping):
            raise UserError(f"pruning history entry {i} is not a dict: {entry!r}")
        missing = [k for k in _HISTORY_KEYS if k not in entry]
        if missing:
            raise UserError(f"pruning history entry {i} lacks {', '.join(missing)}: {dict(entry)}")
        key = str(entry.get("language", ALL))
        s = series.setdefault(key, {k: [] for k in _HISTORY_KEYS})
        for k in _HISTORY_KEYS:
            s[k].append(entry[k])
    return {
        "series": series,
        "total_churn": {key: float(sum(s["churn"])) for key, s in series.items()},
        "events": len(history),
    }


def write_report(path: str | os.PathLike[str], report: dict[str, Any]) -> None:
    """Write ``report`` as indented, key-sorted JSON, atomically (no partial file on error)."""
    atomic_write_json(path, report)


def _pyplot() -> Any | None:
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _data_fallback(path: Path, data: dict[str, Any]) -> Path:
    target = path.with_suffix(".json")
    atomic_write_json(target, {**data, "note": "matplotlib not installed: plot data only"})
    return target


def plot_overlap(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Heatmap of the pathway IoU matrix of a multilingual :func:`mask_report` (``[L, L]``).

    Returns the path written: ``path`` (PNG), or ``path`` with suffix ``.json`` holding
    ``{"plot": "overlap", "languages", "iou": [[...]]}`` when matplotlib is missing.
    """
    if report.get("kind") != "multilingual" or "iou" not in report:
        raise UserError("plot_overlap needs a multilingual mask report (per-language masks)")
    langs: list[str] = list(report["languages"])
    matrix = [[float(report["iou"][a][b]) for b in langs] for a in langs]
    path = Path(path)
    plt = _pyplot()
    if plt is None:
        return _data_fallback(path, {"plot": "overlap", "languages": langs, "iou": matrix})
    fig, ax = plt.subplots(figsize=(1.2 * len(langs) + 2, 1.2 * len(langs) + 1.5))
    try:
        im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(langs)), langs)
        ax.set_yticks(range(len(langs)), langs)
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
        ax.set_title("pathway IoU")
        fig.colorbar(im, ax=ax)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_sparsity_and_churn(history: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Two panels over training steps: achieved sparsity and churn per mask update, one line per
    language (from ``Pruner.history``). Returns the path written (PNG, or ``.json`` data holding
    ``{"plot": "sparsity_and_churn", **churn_series(history)}`` when matplotlib is missing)."""
    data = churn_series(history)
    path = Path(path)
    plt = _pyplot()
    if plt is None:
        return _data_fallback(path, {"plot": "sparsity_and_churn", **data})
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5))
    try:
        for key, s in data["series"].items():
            top.plot(s["step"], s["sparsity"], marker=".", label=key)
            bottom.plot(s["step"], s["churn"], marker=".", label=key)
        top.set_ylabel("sparsity")
        bottom.set_ylabel("churn")
        bottom.set_xlabel("step")
        top.legend()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
