"""Bad-data screening: each kind of bad utterance is named, and the data set skips unreadable audio."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sparse_rnnt.data.audio import AudioError, load_audio
from sparse_rnnt.data.dataset import SpeechDataset, UnreadableAudioError, collate
from sparse_rnnt.data.features import FeatureConfig, GlobalCMVN, LogMel
from sparse_rnnt.data.manifest import Utterance
from sparse_rnnt.data.quality import (
    REASONS,
    BadDataError,
    QualityLimits,
    check_utterance,
    screen,
)
from sparse_rnnt.data.tokenizer import Tokenizer, TokenizerConfig
from sparse_rnnt.errors import UserError

RATE = 16000
FC = FeatureConfig()


def _tone(n: int, seed: int = 0, amp: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (amp * np.sin(2 * np.pi * 220 * np.arange(n) / RATE) + 0.01 * rng.standard_normal(n)).astype(np.float32)


def _utt(i: int, path: Path, text: str = "the cat", duration: float = 0.3) -> Utterance:
    return Utterance(f"s_b_{i:03d}", "en", "train", str(path), duration, text, "s", "b")


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("tok")
    return Tokenizer.train(["the cat sat on a mat", "a hat"], TokenizerConfig(), d / "tok.model")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Utterance, str | None]]:
    """name -> (utterance, the reason it is bad or None), built to be exactly that."""
    d = tmp_path_factory.mktemp("quality")
    out: dict[str, tuple[Utterance, str | None]] = {}

    def add(name: str, path: Path, reason: str | None, **kw) -> None:
        out[name] = (_utt(len(out), path, **kw), reason)

    good = d / "good.flac"
    sf.write(str(good), _tone(4800), RATE, format="FLAC", subtype="PCM_16")
    add("good", good, None)
    add("empty_text", good, "empty_text", text="   ")
    add("unencodable", good, "unencodable", text="the quiz")  # q, u, i, z were never seen
    add("surrogate", good, "unencodable", text="the \udc80 cat")  # valid JSON, not valid Unicode
    add("long_manifest", good, "too_long", duration=31.0)
    long_wav = d / "long.wav"
    sf.write(str(long_wav), _tone(RATE * 2), RATE)  # 2 s, but the manifest claims 0.3 s
    add("long_header", long_wav, "too_long")
    rate8k = d / "rate8k.wav"
    sf.write(str(rate8k), _tone(2400), 8000)
    add("wrong_rate", rate8k, "wrong_sample_rate")
    empty = d / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.float32), RATE)
    add("empty_audio", empty, "empty_audio")
    # 256 samples: fewer than the n_fft // 2 + 1 = 257 the centred STFT needs, LogMel cannot frame it.
    short = d / "short.wav"
    sf.write(str(short), _tone(256), RATE)
    add("too_short", short, "empty_audio")
    shortest = d / "shortest.wav"
    sf.write(str(shortest), _tone(257), RATE)
    add("shortest", shortest, None)
    # Float WAV can hold NaN/Inf; they would make every feature frame they touch NaN.
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        wave = _tone(4800)
        wave[1234] = value
        path = d / f"{name}.wav"
        sf.write(str(path), wave, RATE, subtype="FLOAT")
        add(name, path, "non_finite_audio")
    # One finite sample far beyond full scale: its square overflows the float32 log-mel.
    wave = _tone(4800)
    wave[1234] = 1e30
    spike = d / "spike.wav"
    sf.write(str(spike), wave, RATE, subtype="FLOAT")
    add("spike", spike, "non_finite_audio")
    wave[1234] = 50.0  # overshoot, not corruption: one sample at full scale, under the 1% limit
    overshoot = d / "overshoot.wav"
    sf.write(str(overshoot), wave, RATE, subtype="FLOAT")
    add("overshoot", overshoot, None)
    fifo = d / "fifo.flac"  # libsndfile would wait forever for a writer
    os.mkfifo(fifo)
    add("fifo", fifo, "unreadable_audio")
    junk = d / "junk.flac"
    junk.write_bytes(b"fLaC this is not audio" * 10)
    add("junk", junk, "unreadable_audio")
    add("missing", d / "nope.flac", "unreadable_audio")
    full = good.read_bytes()
    trunc = d / "truncated.flac"
    trunc.write_bytes(full[: int(len(full) * 0.6)])
    add("truncated", trunc, "unreadable_audio")
    # 4800 samples, 96 of them (2%) at exactly full scale: clipped at the default 1% limit.
    wave = _tone(4800, amp=0.2)
    wave[::100] = 1.0  # 48 samples
    wave[50::100] = -1.0  # 48 samples
    clipped = d / "clipped.wav"
    sf.write(str(clipped), wave, RATE, subtype="FLOAT")
    add("clipped", clipped, "clipped")
    # The same in 16-bit FLAC: +1.0 is stored as 32767/32768, still full scale.
    clipped16 = d / "clipped16.flac"
    sf.write(str(clipped16), wave, RATE, format="FLAC", subtype="PCM_16")
    add("clipped16", clipped16, "clipped")
    return out


def test_each_bad_utterance_gets_its_reason(corpus, tok):
    limits = QualityLimits(max_duration=1.0)
    for name, (u, reason) in corpus.items():
        if name == "long_manifest":
            continue  # 31 s in the manifest: checked with the default limit below
        assert check_utterance(u, tok, FC, limits) == reason, name
    u, reason = corpus["long_manifest"]
    assert check_utterance(u, tok, FC, QualityLimits()) == reason
    assert check_utterance(corpus["long_header"][0], tok, FC, QualityLimits()) is None  # 2 s < 30 s


def test_unreadable_means_the_trainer_could_not_load_it(corpus):
    """Independent reference: every file screened as unreadable also fails load_audio."""
    for name in ("junk", "missing", "truncated", "nan", "inf"):
        with pytest.raises(AudioError):
            load_audio(corpus[name][0].audio)
    load_audio(corpus["good"][0].audio)
    # Too short: loads, but the feature front end refuses it (what empty_audio spares training).
    with pytest.raises(ValueError, match="shorter than the 257 samples"):
        LogMel()(load_audio(corpus["too_short"][0].audio))
    assert LogMel()(load_audio(corpus["shortest"][0].audio)).shape == (2, 80)


def test_samples_beyond_the_bound_would_overflow_the_features(corpus):
    # Why the bound exists: LogMel of a 1e19 spike (computed by hand from the samples) is not
    # finite; load_audio refuses the 1e30 file and any FIFO by name, and keeps the overshoot.
    wave = torch.from_numpy(_tone(4800))
    wave[1234] = 1e19
    assert not bool(torch.isfinite(LogMel()(wave)).all())
    with pytest.raises(AudioError, match=r"spike\.wav: 1 non-finite or out-of-range sample"):
        load_audio(corpus["spike"][0].audio)
    with pytest.raises(AudioError, match=r"fifo\.flac: not a regular file"):
        load_audio(corpus["fifo"][0].audio)
    assert float(load_audio(corpus["overshoot"][0].audio).abs().max()) == 50.0


def test_non_finite_audio_is_only_found_by_decoding(corpus, tok):
    u = corpus["nan"][0]
    assert check_utterance(u, tok, FC, QualityLimits(decode=False)) is None  # headers only


def test_training_with_cached_features_survives_screened_bad_audio(corpus, tok):
    """What the trainer does: screen, then compute the feature cache of what was kept; the
    cache raises on any bad file, so the screen must have caught NaN and too-short audio."""
    from sparse_rnnt.data.features import compute_features

    names = ("good", "nan", "inf", "spike", "too_short", "shortest")
    kept, skipped = screen([corpus[n][0] for n in names], tok, FC, QualityLimits(max_bad_fraction=1.0),
                           workers=1, progress=False)
    assert kept == [corpus["good"][0], corpus["shortest"][0]]
    assert skipped["non_finite_audio"] == [corpus[n][0].key for n in ("nan", "inf", "spike")]
    assert skipped["empty_audio"] == [corpus["too_short"][0].key]
    assert set(compute_features(kept, FC, progress=False)) == {u.key for u in kept}
    with pytest.raises(UserError, match="non-finite"):
        compute_features([corpus["nan"][0]], FC, progress=False)


def test_clip_fraction_is_configurable(corpus, tok):
    u = corpus["clipped"][0]
    assert check_utterance(u, tok, FC, QualityLimits(clip_fraction=0.019)) == "clipped"  # 2% > 1.9%
    assert check_utterance(u, tok, FC, QualityLimits(clip_fraction=0.021)) is None  # 2% <= 2.1%
    assert check_utterance(u, tok, FC, QualityLimits(decode=False)) is None  # headers only
    # A loud but unclipped file is fine.
    assert check_utterance(corpus["good"][0], tok, FC, QualityLimits(clip_fraction=0.0)) is None


def test_screen_keeps_order_counts_reasons_and_matches_one_by_one(corpus, tok):
    items = [u for u, _ in corpus.values()]
    limits = QualityLimits(max_duration=1.0, max_bad_fraction=1.0)
    for workers in (1, 3):
        kept, skipped = screen(items, tok, FC, limits, workers=workers, progress=False)
        assert set(skipped) == set(REASONS)
        expected: dict[str, list[str]] = {r: [] for r in REASONS}
        for u, reason in corpus.values():
            if reason is not None and u.duration <= 1.0:
                expected[reason].append(u.key)
        expected["too_long"].insert(0, corpus["long_manifest"][0].key)
        expected["too_long"].sort()
        skipped["too_long"].sort()
        assert skipped == expected
        assert kept == [u for u, reason in corpus.values() if reason is None]


def test_bad_share_over_the_limit_raises_with_counts(corpus, tok):
    good = corpus["good"][0]
    goods = [_utt(100 + i, Path(good.audio)) for i in range(24)]
    one_bad = [*goods[:12], corpus["junk"][0], *goods[12:]]  # 1 of 25 = 4%
    kept, skipped = screen(one_bad, tok, FC, progress=False)
    assert len(kept) == 24 and skipped["unreadable_audio"] == [corpus["junk"][0].key]
    two_bad = [*one_bad, corpus["clipped"][0]]  # 2 of 26 = 7.7% > 5%
    with pytest.raises(BadDataError) as err:
        screen(two_bad, tok, FC, progress=False)
    msg = str(err.value)
    assert isinstance(err.value, UserError)
    assert "2 of 26" in msg and "unreadable_audio 1" in msg and "clipped 1" in msg
    assert corpus["junk"][0].key in msg
    assert err.value.skipped["clipped"] == [corpus["clipped"][0].key]
    screen(two_bad, tok, FC, QualityLimits(max_bad_fraction=0.08), progress=False)  # 7.7% allowed
    with pytest.raises(UserError, match="clip_fraction"):
        screen(goods, tok, FC, QualityLimits(clip_fraction=2.0), progress=False)


def test_dataset_skips_audio_that_became_unreadable(tmp_path, tok, caplog):
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.wav"
        sf.write(str(p), _tone(3200 + 160 * i, seed=i), RATE)
        paths.append(p)
    utts = [_utt(i, p, text="a cat") for i, p in enumerate(paths)]
    cmvn = GlobalCMVN.fit(LogMel()(load_audio(p)) for p in paths)
    ds = SpeechDataset(utts, tok, cmvn)
    paths[1].write_bytes(b"RIFF garbage")  # corrupted after the run started
    with pytest.raises(UnreadableAudioError) as err:
        ds[1]
    assert err.value.key == utts[1].key and "1.wav" in str(err.value)
    assert isinstance(err.value, UserError)
    with caplog.at_level(logging.WARNING, logger="sparse_rnnt.data.dataset"):
        items = ds.load_items([0, 1, 2])
    assert [it["key"] for it in items] == [utts[0].key, utts[2].key]
    assert list(ds.unreadable) == [utts[1].key] and utts[1].key in caplog.text
    # NaN samples written after the screen: skipped with the reason too, not trained on.
    wave = _tone(3200, seed=9)
    wave[7] = np.nan
    sf.write(str(paths[2]), wave, RATE, subtype="FLOAT")
    fresh = SpeechDataset(utts, tok, cmvn)
    assert [it["key"] for it in fresh.load_items([2, 0])] == [utts[0].key]
    assert "non-finite" in fresh.unreadable[utts[2].key]
    batch = collate(items)
    # Frames of the two good files by hand: 1 + samples // hop (centred frames).
    assert batch.feature_lengths.tolist() == [1 + 3200 // 160, 1 + 3520 // 160]
    assert torch.equal(items[0]["features"], ds[0]["features"])
    assert ds.load_items([1]) == []  # remembered: not re-read


def test_audio_without_an_encoder_frame_is_too_short(tmp_path, tok):
    from sparse_rnnt.data.features import min_eval_samples

    # hop 160, stride 4: 1 + n // 160 feature frames must reach 4, so n >= 3 * 160 (by hand)
    assert min_eval_samples(FC, 4) == 480
    limits = QualityLimits(min_samples=480)
    for n, reason in ((256, "empty_audio"), (257, "too_short"), (479, "too_short"), (480, None)):
        path = tmp_path / f"{n}.wav"
        sf.write(str(path), _tone(n), RATE)
        assert check_utterance(_utt(n, path), tok, FC, limits) == reason, n
        if n >= 257:  # independent check: the features of the kept ones fill one stride
            frames = LogMel()(load_audio(path)).shape[0]
            assert (frames >= 4) == (reason is None), n
        # without a minimum (direct use of the screen), only the STFT's limit applies
        assert check_utterance(_utt(n, path), tok, FC, QualityLimits()) == (reason if n < 257 else None)
