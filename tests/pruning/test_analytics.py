"""Mask reports checked against values computed by hand on tiny masks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparse_rnnt.errors import UserError
from sparse_rnnt.pruning.analytics import (
    churn_series,
    mask_report,
    plot_overlap,
    plot_sparsity_and_churn,
    write_report,
)
from sparse_rnnt.pruning.masks import LanguageMasks, MaskSet


def ms(a: list[list[int]], b: list[int]) -> MaskSet:
    return MaskSet({"a": torch.tensor(a, dtype=torch.bool), "b": torch.tensor(b, dtype=torch.bool)})


# en keeps 3 of 8 (a: 2 of 4, b: 1 of 4); fr keeps 4 of 8 (a: 2, b: 2).
EN = ms([[1, 1], [0, 0]], [1, 0, 0, 0])
FR = ms([[1, 0], [1, 0]], [1, 1, 0, 0])
# Previous en differs in b[0] and b[1] (2 flips of 8); previous fr is identical.
EN_PREV = ms([[1, 1], [0, 0]], [0, 1, 0, 0])


def test_single_report() -> None:
    r = mask_report(EN, previous=EN_PREV)
    assert r["kind"] == "single"
    assert (r["numel"], r["kept"]) == (8, 3)
    assert r["sparsity"] == pytest.approx(5 / 8)
    assert r["per_layer"] == {"a": pytest.approx(0.5), "b": pytest.approx(0.75)}
    assert r["churn"] == {"flips": 2, "fraction": pytest.approx(0.25)}
    assert "churn" not in mask_report(EN)


def test_multilingual_report() -> None:
    masks = LanguageMasks({"en": EN, "fr": FR})
    prev = LanguageMasks({"en": EN_PREV, "fr": FR.clone()})
    r = mask_report(masks, previous=prev)
    assert r["kind"] == "multilingual" and r["languages"] == ["en", "fr"]
    assert r["per_language"]["en"]["sparsity"] == pytest.approx(5 / 8)
    assert r["per_language"]["fr"]["sparsity"] == pytest.approx(4 / 8)
    assert r["per_language"]["fr"]["per_layer"] == {"a": pytest.approx(0.5), "b": pytest.approx(0.5)}
    assert r["sparsity"] == pytest.approx((5 / 8 + 4 / 8) / 2)
    # union a = [[1,1],[1,0]] (3 kept), b = [1,1,0,0] (2 kept): 5 of 8 kept
    assert r["union"]["kept"] == 5
    assert r["union"]["sparsity"] == pytest.approx(3 / 8)
    assert r["union"]["per_layer"] == {"a": pytest.approx(0.25), "b": pytest.approx(0.5)}
    # intersection a = [[1,0],[0,0]], b = [1,0,0,0]: 2 kept
    assert r["intersection"]["kept"] == 2
    # IoU = 2 / 5
    assert r["iou"] == {"en": {"en": 1.0, "fr": pytest.approx(0.4)}, "fr": {"fr": 1.0, "en": pytest.approx(0.4)}}
    assert r["churn"]["en"] == {"flips": 2, "fraction": pytest.approx(0.25)}
    assert r["churn"]["fr"] == {"flips": 0, "fraction": 0.0}
    # previous union a = [[1,1],[1,0]], b = [1,1,0,0]: identical to the current union
    assert r["union_churn"]["flips"] == 0
    json.dumps(r)  # JSON-able


def test_three_language_iou() -> None:
    de = ms([[0, 0], [1, 1]], [0, 0, 1, 1])  # disjoint from en; shares a[1][0] with fr
    r = mask_report(LanguageMasks({"en": EN, "fr": FR, "de": de}))
    assert r["iou"]["en"]["de"] == 0.0
    assert r["iou"]["de"]["fr"] == pytest.approx(1 / 7)  # |fr ∩ de| = 1, |fr ∪ de| = 4 + 4 - 1
    assert r["iou"]["en"]["fr"] == pytest.approx(0.4)
    # union covers every weight; no weight is kept by all three
    assert (r["union"]["kept"], r["union"]["sparsity"]) == (8, 0.0)
    assert (r["intersection"]["kept"], r["intersection"]["sparsity"]) == (0, 1.0)
    assert r["sparsity"] == pytest.approx((5 / 8 + 4 / 8 + 4 / 8) / 3)


def test_report_errors() -> None:
    masks = LanguageMasks({"en": EN, "fr": FR})
    with pytest.raises(UserError, match="per-language"):
        mask_report(masks, previous=EN)
    with pytest.raises(UserError, match="languages"):
        mask_report(masks, previous=LanguageMasks({"en": EN, "de": FR}))
    with pytest.raises(UserError, match="do not match"):
        mask_report(EN, previous=MaskSet({"a": torch.ones(2, 2, dtype=torch.bool)}))


HISTORY = [
    {"step": 0, "event": "level", "level": 0.5, "sparsity": 0.5, "churn": 0.5, "language": "en"},
    {"step": 0, "event": "level", "level": 0.5, "sparsity": 0.5, "churn": 0.5, "language": "fr"},
    {"step": 10, "event": "rerank", "level": 0.5, "sparsity": 0.5, "churn": 0.125, "language": "en"},
    {"step": 20, "event": "level", "level": 0.7, "sparsity": 0.75, "churn": 0.25, "language": "en"},
]


def test_churn_series() -> None:
    s = churn_series(HISTORY)
    assert s["events"] == 4
    assert s["series"]["en"]["step"] == [0, 10, 20]
    assert s["series"]["en"]["churn"] == [0.5, 0.125, 0.25]
    assert s["series"]["fr"]["sparsity"] == [0.5]
    assert s["total_churn"] == {"en": pytest.approx(0.875), "fr": pytest.approx(0.5)}
    mono = churn_series([{k: v for k, v in HISTORY[0].items() if k != "language"}])
    assert list(mono["series"]) == ["all"]
    with pytest.raises(UserError, match="entry 1 lacks churn"):
        churn_series([HISTORY[0], {"step": 1, "event": "rerank", "level": 0.5, "sparsity": 0.5}])


def test_write_report_and_plots(tmp_path: Path) -> None:
    masks = LanguageMasks({"en": EN, "fr": FR})
    report = mask_report(masks)
    write_report(tmp_path / "report.json", report)
    loaded = json.loads((tmp_path / "report.json").read_text())
    assert loaded["union"]["kept"] == 5 and loaded["iou"]["en"]["fr"] == pytest.approx(0.4)
    with pytest.raises(TypeError):
        write_report(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()  # no partial file

    out = plot_overlap(report, tmp_path / "overlap.png")
    if out.suffix == ".png":  # matplotlib installed
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # data fallback
        data = json.loads(out.read_text())
        assert out == tmp_path / "overlap.json"
        assert data["languages"] == ["en", "fr"]
        assert data["iou"] == [[1.0, pytest.approx(0.4)], [pytest.approx(0.4), 1.0]]
    out = plot_sparsity_and_churn(HISTORY, tmp_path / "churn.png")
    if out.suffix == ".png":
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        data = json.loads(out.read_text())
        assert data["series"]["en"]["churn"] == [0.5, 0.125, 0.25]
    with pytest.raises(UserError, match="multilingual"):
        plot_overlap(mask_report(EN), tmp_path / "x.png")
