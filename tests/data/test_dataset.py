"""SpeechDataset items and collate() batches on small synthetic audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sparse_rnnt.data.dataset import Batch, SpeechDataset, collate
from sparse_rnnt.data.features import (
    FeatureConfig,
    GlobalCMVN,
    LogMel,
    SpecAugmentConfig,
    compute_features,
)
from sparse_rnnt.data.manifest import Utterance
from sparse_rnnt.data.sampler import BatchConfig, BucketBatchSampler
from sparse_rnnt.data.tokenizer import Tokenizer, TokenizerConfig
from sparse_rnnt.errors import UserError

SPECS = [  # (language, samples, text)
    ("en", 16000, "the cat's hat"),
    ("fr", 8000, "l'été à noël"),
    ("nl", 12160, "één twee"),
    ("it", 4321, "perché sì"),
    ("en", 9999, "a"),
]
LANGUAGES = ["nl", "it", "fr", "en"]  # deliberately not sorted


@pytest.fixture
def setup(tmp_path: Path) -> tuple[list[Utterance], Tokenizer, GlobalCMVN]:
    rng = np.random.default_rng(0)
    utts = []
    for i, (lang, n, text) in enumerate(SPECS):
        wave = 0.2 * np.sin(2 * np.pi * (200 + 50 * i) * np.arange(n) / 16000)
        wave += 0.02 * rng.standard_normal(n)
        path = tmp_path / f"{lang}_{i}.wav"
        sf.write(str(path), wave.astype(np.float32), 16000, subtype="FLOAT")
        utts.append(
            Utterance(f"spk_book_{i}", lang, "train", str(path), n / 16000, text, "spk", "book")
        )
    tok = Tokenizer.train([u.text for u in utts], TokenizerConfig(), tmp_path / "tok.model")
    cmvn = GlobalCMVN.fit(
        LogMel()(torch.from_numpy(sf.read(u.audio, dtype="float32")[0])) for u in utts
    )
    return utts, tok, cmvn


def test_items_and_collate(setup: tuple[list[Utterance], Tokenizer, GlobalCMVN]) -> None:
    utts, tok, cmvn = setup
    ds = SpeechDataset(utts, tok, cmvn, languages=LANGUAGES)
    assert len(ds) == len(utts)
    batch = collate([ds[i] for i in range(len(ds))])
    n = len(SPECS)
    frames = [1 + samples // 160 for _, samples, _ in SPECS]  # 10 ms hop, centred frames
    units = [len(text.replace(" ", "")) + len(text.split()) for _, _, text in SPECS]  # chars + "▁"s
    assert batch.features.shape == (n, max(frames), 80)
    assert batch.features.dtype == torch.float32
    assert batch.feature_lengths.tolist() == frames and batch.feature_lengths.dtype == torch.int32
    assert batch.targets.shape == (n, max(units)) and batch.targets.dtype == torch.int32
    assert batch.target_lengths.tolist() == units and batch.target_lengths.dtype == torch.int32
    assert batch.languages == [lang for lang, _, _ in SPECS]
    assert batch.language_ids.tolist() == [LANGUAGES.index(lang) for lang, _, _ in SPECS]
    assert batch.language_ids.dtype == torch.int64
    assert batch.keys == [f"{lang}/spk_book_{i}" for i, (lang, _, _) in enumerate(SPECS)]
    for b, u in enumerate(utts):
        t, k = frames[b], units[b]
        wave = torch.from_numpy(sf.read(u.audio, dtype="float32")[0])
        expected = (LogMel()(wave) - cmvn.mean) / cmvn.std
        torch.testing.assert_close(batch.features[b, :t], expected, rtol=0, atol=1e-4)
        assert (batch.features[b, t:] == 0).all()
        assert batch.targets[b, :k].tolist() == tok.encode(u.text)
        assert (batch.targets[b, k:] == 0).all()
        assert tok.decode(batch.targets[b, :k].tolist()) == u.text
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and len(moved) == n
    assert torch.equal(moved.features, batch.features) and moved.keys == batch.keys


def test_cached_features_equal_on_the_fly(
    setup: tuple[list[Utterance], Tokenizer, GlobalCMVN],
) -> None:
    utts, tok, cmvn = setup
    cache = compute_features(utts, FeatureConfig(), progress=False)
    a = SpeechDataset(utts, tok, cmvn, features=cache, languages=LANGUAGES)
    b = SpeechDataset(utts, tok, cmvn, languages=LANGUAGES)
    for i in range(len(utts)):
        torch.testing.assert_close(a[i]["features"], b[i]["features"], rtol=0, atol=1e-5)


def test_spec_augment_is_reproducible(setup: tuple[list[Utterance], Tokenizer, GlobalCMVN]) -> None:
    utts, tok, cmvn = setup
    aug = SpecAugmentConfig(freq_masks=2, freq_width=20, time_masks=2, time_width_ratio=0.1)
    plain = SpeechDataset(utts, tok, cmvn, languages=LANGUAGES)
    a = SpeechDataset(utts, tok, cmvn, spec_augment=aug, languages=LANGUAGES, seed=3)
    b = SpeechDataset(utts, tok, cmvn, spec_augment=aug, languages=LANGUAGES, seed=3)
    other_seed = SpeechDataset(utts, tok, cmvn, spec_augment=aug, languages=LANGUAGES, seed=4)
    for ds in (a, b, other_seed):
        ds.set_epoch(2)
    order = [4, 0, 3, 1, 2]  # access order must not matter
    first = {i: a[i]["features"] for i in range(len(utts))}
    second = {i: b[i]["features"] for i in order}
    differs_seed = differs_epoch = False
    for i in range(len(utts)):
        assert torch.equal(first[i], second[i])
        base = plain[i]["features"]
        kept = first[i] != 0
        assert torch.equal(first[i][kept], base[kept])  # only zeroed, never altered
        differs_seed |= not torch.equal(first[i], other_seed[i]["features"])
    a.set_epoch(3)
    for i in range(len(utts)):
        differs_epoch |= not torch.equal(first[i], a[i]["features"])
    assert differs_seed and differs_epoch
    assert any((first[i] == 0).any() for i in range(len(utts)))


def test_dataloader_with_bucket_sampler(
    setup: tuple[list[Utterance], Tokenizer, GlobalCMVN],
) -> None:
    utts, tok, cmvn = setup
    ds = SpeechDataset(utts, tok, cmvn, languages=LANGUAGES)
    sampler = BucketBatchSampler(
        ds.durations, ds.utterance_languages, BatchConfig(max_frames=250, mode="monolingual")
    )
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    keys = []
    for batch in loader:
        assert len(set(batch.languages)) == 1
        assert batch.features.shape[0] * batch.features.shape[1] <= 250
        keys += batch.keys
    assert sorted(keys) == sorted(u.key for u in utts)


def test_dataset_errors(
    setup: tuple[list[Utterance], Tokenizer, GlobalCMVN], tmp_path: Path
) -> None:
    utts, tok, cmvn = setup
    with pytest.raises(UserError, match="language 'it'"):
        SpeechDataset(utts, tok, cmvn, languages=["en", "fr", "nl"])
    with pytest.raises(UserError, match="it/spk_book_3"):
        SpeechDataset(utts, tok, cmvn, features={u.key: torch.zeros(3, 80) for u in utts[:3]})
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"junk")
    broken = Utterance("x", "en", "train", str(bad), 1.0, "a", "s", "b")
    ds = SpeechDataset([broken], tok, cmvn)
    with pytest.raises(UserError, match=r"bad\.wav"):
        ds[0]
    unknown = Utterance("y", "en", "train", utts[0].audio, 1.0, "xyz", "s", "b")
    with pytest.warns(UserWarning, match="unknown to the tokenizer"):
        ds = SpeechDataset([unknown], tok, cmvn)
    assert ds.unencodable == ["en/y"]
