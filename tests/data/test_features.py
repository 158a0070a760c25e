"""Log-mel front end, global CMVN, SpecAugment and the parallel feature cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from safetensors import safe_open

from sparse_rnnt.data.audio import load_audio
from sparse_rnnt.data.features import (
    CMVNAccumulator,
    FeatureConfig,
    GlobalCMVN,
    LogMel,
    SpecAugmentConfig,
    compute_features,
    spec_augment,
    spec_augment_masks,
)
from sparse_rnnt.data.manifest import Utterance
from sparse_rnnt.errors import UserError


def numpy_logmel(wave: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Independent reference: numpy STFT (reflect-centred, periodic Hann), HTK mel, log."""
    n_fft = cfg.n_fft
    win = int(cfg.sample_rate * cfg.win_ms / 1000)
    hop = int(cfg.sample_rate * cfg.hop_ms / 1000)
    x = np.pad(wave.astype(np.float64), (n_fft // 2, n_fft // 2), mode="reflect")
    n = np.arange(win)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / win)  # periodic Hann
    window = np.zeros(n_fft)
    left = (n_fft - win) // 2
    window[left : left + win] = hann
    frames = 1 + (len(x) - n_fft) // hop
    stft = np.stack([np.fft.rfft(x[t * hop : t * hop + n_fft] * window) for t in range(frames)])
    power = np.abs(stft) ** 2  # [frames, n_fft // 2 + 1]
    fb = torchaudio.functional.melscale_fbanks(
        n_freqs=n_fft // 2 + 1,
        f_min=cfg.f_min,
        f_max=cfg.f_max if cfg.f_max is not None else cfg.sample_rate / 2,
        n_mels=cfg.n_mels,
        sample_rate=cfg.sample_rate,
        norm=None,
        mel_scale="htk",
    ).double()
    return np.log(power @ fb.numpy() + cfg.log_floor)


def _wave(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize(
    "cfg",
    [FeatureConfig(), FeatureConfig(n_mels=40, f_min=20.0, f_max=7600.0, win_ms=20.0, hop_ms=12.5)],
)
def test_logmel_matches_numpy_reference(cfg: FeatureConfig) -> None:
    wave = _wave(16000 + 37)
    ours = LogMel(cfg)(torch.from_numpy(wave))
    ref = numpy_logmel(wave, cfg)
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=2e-3)


def test_logmel_batch_equals_rows() -> None:
    waves = torch.from_numpy(np.stack([_wave(4000, s) for s in range(3)]))
    m = LogMel()
    batch = m(waves)
    assert batch.shape == (3, 1 + 4000 // 160, 80)
    for b in range(3):
        torch.testing.assert_close(batch[b], m(waves[b]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("samples", [257, 400, 1599, 1600, 16000, 16159, 16160, 23456])
def test_frame_count(samples: int) -> None:
    m = LogMel()
    expected = 1 + samples // 160  # centred STFT, hop 10 ms at 16 kHz
    assert m.num_frames(samples) == expected
    assert m(torch.zeros(samples)).shape == (expected, 80)


def test_frame_count_hand_values() -> None:
    m = LogMel()
    assert m.num_frames(16000) == 101  # 1 s -> 100 hops + the frame at t = 0
    assert m.num_frames(159) == 1


def test_logmel_rejects_too_short_and_bad_config() -> None:
    with pytest.raises(ValueError, match="shorter"):
        LogMel()(torch.zeros(100))
    with pytest.raises(UserError, match="n_fft"):
        LogMel(FeatureConfig(n_fft=256))  # 25 ms = 400 samples > 256


def test_silence_hits_log_floor() -> None:
    out = LogMel()(torch.zeros(1600))
    torch.testing.assert_close(out, torch.full_like(out, math.log(1e-6)))


# --- CMVN ----------------------------------------------------------------------------------


def _pieces(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Large offset and small spread: a naive float32 sum-of-squares would lose the variance.
    return [
        1000.0 + 0.01 * torch.randn(n, 80, generator=g) * torch.linspace(1, 3, 80)
        for n in (1, 57, 300, 0, 1200, 7)
    ]


def test_cmvn_fit_equals_float64_reference() -> None:
    pieces = _pieces()
    cat = torch.cat(pieces).double()
    cmvn = GlobalCMVN.fit(pieces)
    assert cmvn.count == cat.shape[0]
    assert cmvn.mean.dtype == torch.float32 and cmvn.std.dtype == torch.float32
    torch.testing.assert_close(cmvn.mean.double(), cat.mean(0), rtol=1e-7, atol=0)
    torch.testing.assert_close(cmvn.std.double(), cat.std(0, unbiased=False), rtol=1e-5, atol=0)


def test_cmvn_streaming_equals_one_shot() -> None:
    pieces = _pieces(1)
    one = GlobalCMVN.fit([torch.cat(pieces)])
    acc = CMVNAccumulator()
    for p in pieces:
        acc.update(p)
    streamed = acc.finalize()
    assert streamed.count == one.count
    torch.testing.assert_close(streamed.mean, one.mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(streamed.std, one.std, rtol=1e-5, atol=0)


def test_cmvn_normalize_and_floor() -> None:
    g = torch.Generator().manual_seed(2)
    x = 5.0 + 2.0 * torch.randn(500, 4, generator=g)
    x[:, 3] = 7.0  # constant bin: std floored
    cmvn = GlobalCMVN.fit([x])
    assert cmvn.std[3].item() == pytest.approx(1e-5)
    y = cmvn.normalize(x)
    expected = (x.double() - x.double().mean(0)) / x.double().std(0, unbiased=False).clamp_min(1e-5)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y[:, :3].mean(0), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(y[:, :3].std(0, unbiased=False), torch.ones(3), rtol=0, atol=1e-5)
    # Batched input [B, T, F] broadcasts over the last dim.
    torch.testing.assert_close(cmvn.normalize(x.view(5, 100, 4)), y.view(5, 100, 4))


@pytest.mark.parametrize(("mean", "std"), [(float("nan"), 1.0), (0.0, float("inf")), (float("-inf"), 1.0),
                                           (0.0, -2.0), (0.0, float("nan"))])
def test_cmvn_refuses_statistics_that_are_not_finite_or_negative(mean: float, std: float) -> None:
    m, s = torch.zeros(3), torch.ones(3)
    m[1], s[1] = mean, std
    with pytest.raises(ValueError, match="must be finite, and std not negative"):
        GlobalCMVN(mean=m, std=s)
    GlobalCMVN(mean=torch.zeros(3), std=torch.zeros(3))  # a zero std is floored, as fit() does


def test_cmvn_empty_raises() -> None:
    with pytest.raises(UserError, match="no feature frames"):
        GlobalCMVN.fit([])
    with pytest.raises(UserError):
        GlobalCMVN.fit([torch.zeros(0, 80)])


def test_cmvn_save_load_roundtrip(tmp_path: Path) -> None:
    cmvn = GlobalCMVN.fit(_pieces(3))
    path = tmp_path / "sub" / "cmvn.safetensors"
    cmvn.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["cmvn.safetensors"]  # no temp left
    # Plain safetensors (no pickle): readable by safetensors itself with the count in metadata.
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"mean", "std"}
        assert f.metadata()["count"] == str(cmvn.count)
        assert torch.equal(f.get_tensor("mean"), cmvn.mean)
    loaded = GlobalCMVN.load(path)
    assert loaded.count == cmvn.count
    assert torch.equal(loaded.mean, cmvn.mean) and torch.equal(loaded.std, cmvn.std)
    from_bytes = GlobalCMVN.from_bytes(cmvn.to_bytes())
    assert from_bytes.count == cmvn.count and torch.equal(from_bytes.std, cmvn.std)
    state = GlobalCMVN.from_state_dict(cmvn.state_dict())
    assert state.count == cmvn.count and torch.equal(state.mean, cmvn.mean)


def test_cmvn_load_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        GlobalCMVN.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3 + b"not a safetensors file")
    with pytest.raises(UserError, match=str(bad)):
        GlobalCMVN.load(bad)
    with pytest.raises(UserError):
        GlobalCMVN.from_bytes(b"garbage")


# --- SpecAugment ---------------------------------------------------------------------------


def _zero_runs(mask: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a 1-d boolean array."""
    runs, n = [], 0
    for v in [*mask.tolist(), False]:
        if v:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_spec_augment_masks_counts_and_widths() -> None:
    cfg = SpecAugmentConfig(freq_masks=3, freq_width=10, time_masks=4, time_width_ratio=0.05)
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        freq, time = spec_augment_masks(400, 80, cfg, g)
        assert len(freq) == 3 and len(time) == 4
        for start, width in freq:
            assert 0 <= width <= 10 and start >= 0 and start + width <= 80
        for start, width in time:
            assert 0 <= width <= 20 and start >= 0 and start + width <= 400  # 0.05 * 400


def test_spec_augment_applies_masks_with_zero() -> None:
    cfg = SpecAugmentConfig(freq_masks=2, freq_width=15, time_masks=2, time_width_ratio=0.1)
    x = 3.0 + torch.rand(300, 80)  # no zeros before masking
    for seed in range(30):
        freq, time = spec_augment_masks(300, 80, cfg, torch.Generator().manual_seed(seed))
        out = spec_augment(x, cfg, torch.Generator().manual_seed(seed))
        expected = np.zeros((300, 80), dtype=bool)
        for s, w in freq:
            expected[:, s : s + w] = True
        for s, w in time:
            expected[s : s + w, :] = True
        zero = out.numpy() == 0.0
        np.testing.assert_array_equal(zero, expected)
        np.testing.assert_array_equal(out.numpy()[~zero], x.numpy()[~zero])
        # The masked bands: at most 2 runs of whole zero columns, each at most 2 * 15 wide.
        col_runs = _zero_runs(zero.all(axis=0))
        assert len(col_runs) <= 2 and sum(col_runs) <= 30
    assert (x >= 3.0).all()  # input untouched


def test_spec_augment_deterministic_per_generator() -> None:
    cfg = SpecAugmentConfig()
    x = torch.randn(200, 80) + 10
    a = spec_augment(x, cfg, torch.Generator().manual_seed(7))
    b = spec_augment(x, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    others = [spec_augment(x, cfg, torch.Generator().manual_seed(s)) for s in range(8, 14)]
    assert any(not torch.equal(a, o) for o in others)


def test_spec_augment_never_masks_everything() -> None:
    cfg = SpecAugmentConfig(freq_masks=5, freq_width=80, time_masks=5, time_width_ratio=1.0)
    for seed in range(100):
        for t, f in ((1, 80), (3, 4), (50, 2), (7, 80)):
            out = spec_augment(torch.ones(t, f), cfg, torch.Generator().manual_seed(seed))
            assert (out != 0).any(dim=0).any(), "every bin masked"
            assert (out != 0).any(dim=1).any(), "every frame masked"


def test_spec_augment_probability_and_disabled() -> None:
    x = torch.ones(200, 80)
    off = SpecAugmentConfig(enabled=False)
    assert torch.equal(spec_augment(x, off, torch.Generator().manual_seed(0)), x)
    never = SpecAugmentConfig(p=0.0)
    assert torch.equal(spec_augment(x, never, torch.Generator().manual_seed(0)), x)
    half = SpecAugmentConfig(p=0.5, freq_width=20)
    g = torch.Generator().manual_seed(0)
    augmented = 0
    for _ in range(400):
        freq, time = spec_augment_masks(200, 80, half, g)
        augmented += bool(freq or time)
    assert 150 <= augmented <= 250  # Binomial(400, 0.5): mean 200, sd 10


# --- compute_features ----------------------------------------------------------------------


def _write_utts(tmp_path: Path, lengths: list[int]) -> list[Utterance]:
    utts = []
    for i, n in enumerate(lengths):
        path = tmp_path / f"u{i}.wav"
        sf.write(str(path), _wave(n, seed=i), 16000, subtype="FLOAT")
        lang = ("en", "fr")[i % 2]
        utts.append(Utterance(str(i), lang, "train", str(path), n / 16000, "x", "s", "b"))
    return utts


@pytest.mark.parametrize("workers", [0, 2])
def test_compute_features_matches_logmel(tmp_path: Path, workers: int) -> None:
    utts = _write_utts(tmp_path, [8000, 16000, 3200, 12345])
    feats = compute_features(utts, FeatureConfig(), workers=workers, progress=False)
    assert list(feats) == [u.key for u in utts]
    for u in utts:
        wave = sf.read(u.audio, dtype="float32")[0]
        ref = numpy_logmel(wave, FeatureConfig())
        assert feats[u.key].dtype == torch.float32
        assert feats[u.key].shape == (1 + len(wave) // 160, 80)
        np.testing.assert_allclose(feats[u.key].numpy(), ref, rtol=0, atol=2e-3)
        torch.testing.assert_close(feats[u.key], LogMel()(load_audio(u.audio)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_compute_features_unreadable_names_file(tmp_path: Path, workers: int) -> None:
    utts = _write_utts(tmp_path, [8000, 8000])
    bad = tmp_path / "broken.flac"
    bad.write_bytes(b"definitely not audio")
    utts.append(Utterance("9", "nl", "train", str(bad), 1.0, "x", "s", "b"))
    with pytest.raises(UserError, match=r"nl/9.*broken\.flac"):
        compute_features(utts, workers=workers, progress=False)


def test_compute_features_duplicate_keys(tmp_path: Path) -> None:
    utts = _write_utts(tmp_path, [8000])
    with pytest.raises(UserError, match="duplicate"):
        compute_features(utts + utts, progress=False)
