"""Mask sets: bit packing (against numpy.packbits), files, application to parameters, set algebra."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sparse_rnnt.errors import UserError
from sparse_rnnt.pruning.masks import LanguageMasks, MaskSet, _digest, pack_bits, unpack_bits

ODD_SHAPES = [(7, 13), (1, 1), (3, 1000), (8,), (2, 3, 5), (16, 4)]


def _random_set(seed: int, shapes: list[tuple[int, ...]] = ODD_SHAPES, p: float = 0.5) -> MaskSet:
    g = torch.Generator().manual_seed(seed)
    return MaskSet({f"layer{i}.weight": torch.rand(s, generator=g) < p for i, s in enumerate(shapes)})


def _m(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# ---------------------------------------------------------------- packing
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_pack_matches_numpy_packbits_little(shape: tuple[int, ...]) -> None:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(7)) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(mask.numel() / 8)
    expected = np.packbits(mask.numpy().reshape(-1), bitorder="little")
    assert packed.numpy().tolist() == expected.tolist()
    assert torch.equal(unpack_bits(packed, shape), mask)


def test_pack_hand_example() -> None:
    # Element i is bit i % 8 of byte i // 8.
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [1 + 128, 2 + 4]
    assert pack_bits(torch.ones(8, dtype=torch.bool)).tolist() == [255]


def test_unpack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), (4, 4))
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(torch.tensor([0b1000_0000], dtype=torch.uint8), (3,))


def test_maskset_pack_unpack_round_trip() -> None:
    ms = _random_set(1)
    packed, shapes = ms.pack()
    assert list(shapes) == ms.names
    for name, t in packed.items():
        assert t.numel() == math.ceil(ms[name].numel() / 8)
    back = MaskSet.unpack(packed, shapes)
    assert back.names == ms.names
    for name in ms.names:
        assert torch.equal(back[name], ms[name])


# ---------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path: Path) -> None:
    ms = _random_set(2)
    path = tmp_path / "sub" / "masks.safetensors"
    ms.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["masks.safetensors"]  # no temp files left
    back = MaskSet.load(path)
    assert back.names == ms.names and back.equal(ms)
    # The file stores ~1 bit per weight (plus a small header).
    assert path.stat().st_size < sum(math.ceil(m.numel() / 8) for _, m in ms.items()) + 2048


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    ms = _random_set(3)
    good = tmp_path / "good.safetensors"
    ms.save(good)
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(UserError, match=r"missing\.safetensors"):
        MaskSet.load(missing)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"truncated\.safetensors"):
        MaskSet.load(truncated)
    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(good.read_bytes())
    data[-1] ^= 0x01  # one bit of the packed data
    flipped.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"flipped\.safetensors.*checksum"):
        MaskSet.load(flipped)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07not a safetensors file at all")
    with pytest.raises(UserError, match=r"garbage\.safetensors"):
        MaskSet.load(garbage)
    # A valid safetensors file whose header disagrees with its tensors.
    packed, shapes = ms.pack()
    shapes[ms.names[0]] = [99, 99]
    bad_meta = tmp_path / "bad_meta.safetensors"
    save_file(packed, str(bad_meta), metadata={
        "format": "sparse_rnnt.maskset", "version": "1", "sha256": _digest(packed),
        "names": json.dumps(ms.names), "shapes": json.dumps(shapes),
    })
    with pytest.raises(UserError, match=r"bad_meta\.safetensors"):
        MaskSet.load(bad_meta)
    # A language-mask file is not a mask set.
    lang = tmp_path / "lang.safetensors"
    LanguageMasks({"en": ms, "fr": ms.complement()}).save(lang)
    with pytest.raises(UserError, match=r"lang\.safetensors"):
        MaskSet.load(lang)


# ---------------------------------------------------------------- applying
def test_apply_zeroes_exactly_the_pruned_weights() -> None:
    torch.manual_seed(0)
    params = {"a": torch.nn.Parameter(torch.randn(5, 6)), "b": torch.nn.Parameter(torch.randn(3, 7)),
              "extra": torch.nn.Parameter(torch.randn(4))}
    params["a"].data[0, 0] = float("nan")
    ms = MaskSet({"a": torch.rand(5, 6) < 0.5, "b": torch.rand(3, 7) < 0.5})
    ms["a"][0, 0] = False
    before = {n: p.detach().clone() for n, p in params.items()}
    ms.apply_(params)
    for name in ("a", "b"):
        m = ms[name]
        assert (params[name][~m] == 0).all()
        assert torch.equal(params[name][m], before[name][m])
    assert torch.equal(params["extra"], before["extra"])
    assert params["a"].requires_grad


def test_mask_grads() -> None:
    torch.manual_seed(1)
    params = {"a": torch.nn.Parameter(torch.randn(4, 4)), "b": torch.nn.Parameter(torch.randn(2, 3))}
    x = torch.randn(4)
    (params["a"] @ x).pow(2).sum().backward()  # b gets no grad
    ms = MaskSet({"a": torch.rand(4, 4) < 0.5, "b": torch.zeros(2, 3, dtype=torch.bool)})
    g = params["a"].grad.clone()
    ms.mask_grads_(params)
    assert torch.equal(params["a"].grad, torch.where(ms["a"], g, torch.zeros_like(g)))
    assert params["b"].grad is None
    with pytest.raises(KeyError):
        ms.mask_grads_({"a": params["a"]})


# ---------------------------------------------------------------- algebra and statistics
def test_set_algebra_hand_example() -> None:
    a = MaskSet({"x": _m([[1, 1, 0, 0]]), "y": _m([[1], [1]])})
    b = MaskSet({"x": _m([[1, 0, 1, 0]]), "y": _m([[0], [1]])})
    assert a.union(b)["x"].tolist() == [[True, True, True, False]]
    assert a.union(b)["y"].tolist() == [[True], [True]]
    assert a.intersection(b)["x"].tolist() == [[True, False, False, False]]
    assert a.intersection(b)["y"].tolist() == [[False], [True]]
    # Kept in both: x 1 + y 1 = 2; in either: x 3 + y 2 = 5.
    assert a.iou(b) == pytest.approx(2 / 5)
    assert a.flips(b) == 3
    assert a.churn(b) == pytest.approx(3 / 6)
    assert a.sparsity() == pytest.approx(2 / 6)
    assert a.sparsity_per_tensor() == {"x": pytest.approx(0.5), "y": pytest.approx(0.0)}
    assert b.complement()["x"].tolist() == [[False, True, False, True]]
    empty = MaskSet({"x": _m([[0, 0]])})
    assert empty.iou(empty) == 1.0
    c = MaskSet({"x": _m([[0, 0, 0, 1]]), "y": _m([[0], [0]])})
    assert a.union(b, c)["x"].tolist() == [[True, True, True, True]]
    assert a.intersection(b, c)["x"].tolist() == [[False, False, False, False]]
    with pytest.raises(ValueError):
        a.iou(MaskSet({"x": _m([[1, 1, 0, 0]])}))


def test_ones_like_clone_to() -> None:
    params = {"w": torch.zeros(3, 4), "v": torch.zeros(2)}
    ms = MaskSet.ones_like(params)
    assert ms.names == ["w", "v"] and ms.sparsity() == 0.0 and ms.numel() == 14
    copy = ms.clone()
    copy["w"][0, 0] = False
    assert bool(ms["w"][0, 0])
    moved = ms.to("cpu")
    assert moved.equal(ms)
    with pytest.raises(ValueError, match="bool"):
        MaskSet({"w": torch.ones(3)})


# ---------------------------------------------------------------- languages
def test_free_zone_against_brute_force() -> None:
    langs = ["en", "fr", "it"]
    sets = {lang: _random_set(10 + i, shapes=[(5, 7), (3,)], p=0.35) for i, lang in enumerate(langs)}
    lm = LanguageMasks(sets)
    for z in langs:
        free = lm.free_zone(z)
        zone = lm.selectable_zone(z)
        for name in sets[z].names:
            shape = sets[z][name].shape
            for idx in itertools.product(*(range(d) for d in shape)):
                used_by_others = any(bool(sets[lang][name][idx]) for lang in langs if lang != z)
                assert bool(free[name][idx]) == (not used_by_others)
                assert bool(zone[name][idx]) == ((not used_by_others) or bool(sets[z][name][idx]))
    union = lm.union()
    for name in sets["en"].names:
        assert torch.equal(union[name], sets["en"][name] | sets["fr"][name] | sets["it"][name])
    matrix = lm.overlap_matrix()
    for a, b in itertools.product(langs, langs):
        inter = sum(int((sets[a][n] & sets[b][n]).sum()) for n in sets[a].names)
        either = sum(int((sets[a][n] | sets[b][n]).sum()) for n in sets[a].names)
        assert matrix[a][b] == pytest.approx(inter / either)
    single = LanguageMasks({"nl": sets["en"]})
    assert single.free_zone("nl").sparsity() == 0.0


def test_language_masks_save_load(tmp_path: Path) -> None:
    lm = LanguageMasks({"en": _random_set(20), "fr": _random_set(21), "nl": _random_set(22)})
    path = tmp_path / "pathways.safetensors"
    lm.save(path)
    back = LanguageMasks.load(path)
    assert back.languages == ["en", "fr", "nl"]
    for lang in lm.languages:
        assert back[lang].names == lm[lang].names and back[lang].equal(lm[lang])
    with safe_open(str(path), framework="pt") as f:
        assert "fr/layer0.weight" in set(f.keys())
    single = tmp_path / "single.safetensors"
    lm["en"].save(single)
    with pytest.raises(UserError, match=r"single\.safetensors"):
        LanguageMasks.load(single)
    with pytest.raises(ValueError):
        LanguageMasks({"en": _random_set(1), "fr": _random_set(2, shapes=[(2, 2)])})
    with pytest.raises(KeyError):
        lm.free_zone("de")


def test_substituted_masks_inside_and_restores_dense_weights_even_on_error():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    params = {"weight": lin.weight}
    mask = MaskSet({"weight": torch.rand(3, 5) > 0.5})
    dense = lin.weight.detach().clone()
    x = torch.randn(4, 5)
    with mask.substituted(params):
        assert torch.equal(lin.weight.detach(), dense * mask["weight"])
        lin(x).sum().backward()
    assert torch.equal(lin.weight.detach(), dense)
    # straight-through: pruned entries get the gradient computed at the masked point
    assert torch.allclose(lin.weight.grad, torch.ones(4, 3).T @ x)
    with pytest.raises(RuntimeError), mask.substituted(params):
        raise RuntimeError("boom")
    assert torch.equal(lin.weight.detach(), dense)


def test_counts_in_one_transfer_equal_per_tensor_sums():
    # MaskSet's statistics sum every layer on the device and read the sums once; the values must
    # be the per-tensor sums, empty tensors and empty lists included.
    from sparse_rnnt.pruning.masks import MaskSet, _counts

    g = torch.Generator().manual_seed(3)
    ts = [torch.rand(s, generator=g) < 0.3 for s in [(5, 7), (0, 4), (1,), (13, 2, 3)]]
    assert _counts(ts) == [int(t.sum()) for t in ts]
    assert _counts([]) == []
    a = MaskSet({f"t{i}": t for i, t in enumerate(ts)})
    b = MaskSet({f"t{i}": torch.rand(t.shape, generator=g) < 0.5 for i, t in enumerate(ts)})
    assert a.kept() == sum(int(t.sum()) for t in ts)
    assert a.flips(b) == sum(int((x ^ y).sum()) for x, y in zip(a.as_dict().values(), b.as_dict().values(), strict=True))
    inter = sum(int((x & y).sum()) for x, y in zip(a.as_dict().values(), b.as_dict().values(), strict=True))
    union = sum(int((x | y).sum()) for x, y in zip(a.as_dict().values(), b.as_dict().values(), strict=True))
    assert a.iou(b) == inter / union
    assert a.sparsity_per_tensor() == {f"t{i}": (1 - int(t.sum()) / t.numel()) if t.numel() else 0.0
                                       for i, t in enumerate(ts)}
