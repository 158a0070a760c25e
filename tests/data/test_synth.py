"""Synthetic corpus: exact MLS layout, audio format, speaker splits, determinism, errors."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sparse_rnnt.data.audio import load_audio
from sparse_rnnt.data.espeak import Espeak, Voice
from sparse_rnnt.data.mls import read_mls
from sparse_rnnt.data.synth import SynthConfig, plan_speakers, render, synthesize_corpus
from sparse_rnnt.data.text import normalize
from sparse_rnnt.errors import UserError

TINY = SynthConfig(
    languages=("en", "nl"),
    hours=0.01,
    seed=7,
    train_speakers=3,
    dev_speakers=2,
    test_speakers=2,
    workers=2,
)
MLS_DIRS = {"en": "mls_english", "nl": "mls_dutch"}
ID = re.compile(r"^(\d+)_(\d+)_(\d{6})$")
URL = re.compile(r"^synth://espeak-ng/(\S+)\+(\S+)-r(\d+)-p(\d+)-g(\d+)$")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    summary = synthesize_corpus(out, TINY, progress=False)
    return out, summary


def _read_tsv(path: Path, fields: int) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [line.split("\t") for line in lines]
    assert all(len(r) == fields for r in rows), f"{path}: expected {fields} tab-separated fields"
    return rows


def _walk(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*"))


def test_exact_mls_layout(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    assert sorted(p.name for p in out.iterdir()) == ["mls_dutch", "mls_english", "synth_summary.json"]
    for lang, name in MLS_DIRS.items():
        root = out / name
        assert sorted(p.name for p in root.iterdir()) == ["dev", "test", "train"]
        for split in ("train", "dev", "test"):
            sdir = root / split
            assert sorted(p.name for p in sdir.iterdir()) == ["audio", "segments.txt", "transcripts.txt"]
            transcripts = _read_tsv(sdir / "transcripts.txt", 2)
            segments = _read_tsv(sdir / "segments.txt", 4)
            assert transcripts, f"{sdir}: no utterances"
            ids = [r[0] for r in transcripts]
            assert len(set(ids)) == len(ids)
            assert [r[0] for r in segments] == ids
            # Every path under audio/ is <spk>/ , <spk>/<book>/ or <spk>/<book>/<spk>_<book>_<utt>.flac
            files = set()
            for p in _walk(sdir / "audio"):
                parts = p.relative_to(sdir / "audio").parts
                assert all(part.isdigit() for part in parts[:2]), p
                if p.is_file():
                    assert len(parts) == 3 and parts[2].endswith(".flac"), p
                    m = ID.match(parts[2][: -len(".flac")])
                    assert m and m.group(1) == parts[0] and m.group(2) == parts[1], p
                    files.add(parts[2][: -len(".flac")])
                else:
                    assert p.is_dir() and len(parts) <= 2, p
            assert files == set(ids)
            for (utt_id, text), (_, url, start, end) in zip(transcripts, segments, strict=True):
                assert ID.match(utt_id)
                assert text == text.lower() == normalize(text, lang) and text.strip() == text and text
                m = URL.match(url)
                assert m, url
                assert m.group(1) == {"en": "en-us", "nl": "nl"}[lang]
                spk, book, _ = utt_id.split("_")
                info = sf.info(str(sdir / "audio" / spk / book / f"{utt_id}.flac"))
                assert start == "0.00"
                assert abs(float(end) - info.frames / info.samplerate) <= 0.006
                assert re.fullmatch(r"\d+\.\d\d", end)


def test_audio_is_16k_mono_pcm16_flac_with_speech(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    files = sorted(out.rglob("*.flac"))
    assert len(files) >= 6
    for path in files:
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
        data, rate = sf.read(str(path), dtype="float32")
        assert rate == 16000 and data.ndim == 1
        assert 0.5 < data.shape[0] / rate < 15.0
        peak = float(np.max(np.abs(data)))
        assert 0.1 < peak <= 1.0
        rms = float(np.sqrt(np.mean(data.astype(np.float64) ** 2)))
        assert rms > 0.01  # speech, not silence
    # No temporary or hidden leftovers anywhere.
    assert not [p for p in out.rglob(".*")]


def test_hours_and_summary_match_the_files(corpus: tuple[Path, dict]) -> None:
    out, summary = corpus
    assert json.loads((out / "synth_summary.json").read_text()) == summary
    total = 0.0
    for lang, name in MLS_DIRS.items():
        lang_sec = 0.0
        for split in ("train", "dev", "test"):
            sdir = out / name / split
            rows = _read_tsv(sdir / "transcripts.txt", 2)
            sec = sum(sf.info(str(p)).duration for p in (sdir / "audio").rglob("*.flac"))
            entry = summary["languages"][lang]["splits"][split]
            assert entry["utterances"] == len(rows)
            assert entry["hours"] == pytest.approx(sec / 3600, abs=1e-5)
            assert entry["speakers"] == len({r[0].split("_")[0] for r in rows})
            lang_sec += sec
        # The pilot-based count aims at the budget; under 20 utterances still land within 25 %.
        assert lang_sec / 3600 == pytest.approx(TINY.hours, rel=0.25)
        # Utterance shares follow split_fractions (0.8/0.1/0.1) up to rounding.
        n = {s: summary["languages"][lang]["splits"][s]["utterances"] for s in ("train", "dev", "test")}
        for split, frac in zip(("train", "dev", "test"), TINY.split_fractions, strict=True):
            assert abs(n[split] - frac * sum(n.values())) <= 1
        total += lang_sec
    assert summary["utterances"] == sum(summary["languages"][lang]["utterances"] for lang in MLS_DIRS)
    assert summary["hours"] == pytest.approx(total / 3600, abs=1e-5)
    assert summary["x_real_time"] == pytest.approx(total / summary["seconds"], rel=0.01)


def test_the_mls_reader_reads_it_without_problems(corpus: tuple[Path, dict]) -> None:
    out, summary = corpus
    data, report = read_mls(out, progress=False)
    assert report.num_problems == 0, report.format()
    for split in ("train", "dev", "test"):
        utts = data[split]
        assert len(utts) == sum(summary["languages"][lang]["splits"][split]["utterances"] for lang in MLS_DIRS)
        for u in utts:
            spk, book, _ = u.id.split("_")
            assert (u.speaker, u.book) == (spk, book)
            assert Path(u.audio) == out / MLS_DIRS[u.language] / split / "audio" / spk / book / f"{u.id}.flac"
            assert u.duration == pytest.approx(sf.info(u.audio).duration, abs=1e-3)


def test_train_dev_test_speakers_are_disjoint(corpus: tuple[Path, dict]) -> None:
    out, _ = corpus
    for name in MLS_DIRS.values():
        ids: dict[str, set[str]] = {}
        triples: dict[str, set[tuple[str, str, str]]] = {}
        variants: dict[str, set[str]] = {}
        for split in ("train", "dev", "test"):
            rows = _read_tsv(out / name / split / "segments.txt", 4)
            ids[split] = {r[0].split("_")[0] for r in rows}
            parsed = [URL.match(r[1]).groups() for r in rows]  # type: ignore[union-attr]
            triples[split] = {(g[1], g[2], g[3]) for g in parsed}
            variants[split] = {g[1] for g in parsed}
            # One voice per speaker id.
            by_spk: dict[str, set[str]] = {}
            for r in rows:
                by_spk.setdefault(r[0].split("_")[0], set()).add(r[1])
            assert all(len(v) == 1 for v in by_spk.values())
        for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
            assert not ids[a] & ids[b]
            assert not triples[a] & triples[b]
            assert not variants[a] & variants[b]  # dev/test voices are unseen in training


def test_speaker_plan_is_seeded_and_honours_counts() -> None:
    cfg = dataclasses.replace(TINY, train_speakers=30, dev_speakers=5, test_speakers=6)
    plan = plan_speakers(cfg, "fr")
    assert plan == plan_speakers(cfg, "fr")
    assert plan != plan_speakers(dataclasses.replace(cfg, seed=8), "fr")
    assert [len(plan[s]) for s in ("train", "dev", "test")] == [30, 5, 6]
    everyone = [sp for s in plan.values() for sp in s]
    assert len({sp.id for sp in everyone}) == 41
    assert len({b for sp in everyone for b in sp.books}) == sum(len(sp.books) for sp in everyone)
    for sp in everyone:
        assert 1 <= len(sp.books) <= 3
        assert 130 <= sp.voice.rate <= 210 and 25 <= sp.voice.pitch <= 75
        assert sp.id.isdigit() and all(b.isdigit() for b in sp.books)
    triples = {(sp.voice.variant, sp.voice.rate, sp.voice.pitch) for sp in everyone}
    assert len(triples) == 41


def test_deterministic_for_any_worker_count(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    out2, _ = corpus
    out1 = tmp_path / "one_worker"
    synthesize_corpus(out1, dataclasses.replace(TINY, workers=1), progress=False)
    for name in MLS_DIRS.values():
        for split in ("train", "dev", "test"):
            for fname in ("transcripts.txt", "segments.txt"):
                assert (out1 / name / split / fname).read_bytes() == (out2 / name / split / fname).read_bytes()
    files1 = sorted(p.relative_to(out1) for p in out1.rglob("*.flac"))
    files2 = sorted(p.relative_to(out2) for p in out2.rglob("*.flac"))
    assert files1 == files2
    for rel in files1:
        a, _ = sf.read(str(out1 / rel), dtype="int16")
        b, _ = sf.read(str(out2 / rel), dtype="int16")
        np.testing.assert_array_equal(a, b)


def test_opus_format_and_an_empty_split(tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        TINY, languages=("it",), fmt="opus", hours=0.004, noise_snr_db=None,
        split_fractions=(0.5, 0.5, 0.0), test_speakers=0,
    )  # fmt: skip
    out = tmp_path / "opus"
    synthesize_corpus(out, cfg, progress=False)
    # MLS ships its Opus edition as mls_<language>_opus.
    assert sorted(p.name for p in out.iterdir()) == ["mls_italian_opus", "synth_summary.json"]
    empty = out / "mls_italian_opus" / "test"
    assert sorted(p.name for p in empty.iterdir()) == ["segments.txt", "transcripts.txt"]
    assert (empty / "transcripts.txt").read_text() == (empty / "segments.txt").read_text() == ""
    for split in ("train", "dev"):
        sdir = out / "mls_italian_opus" / split
        ids = [r[0] for r in _read_tsv(sdir / "transcripts.txt", 2)]
        assert ids
        files = sorted(p for p in (sdir / "audio").rglob("*") if p.is_file())
        assert sorted(p.name for p in files) == sorted(f"{i}.opus" for i in ids)
        for p in files:
            info = sf.info(str(p))
            assert (info.format, info.subtype, info.samplerate, info.channels) == ("OGG", "OPUS", 16000, 1)
            wave = load_audio(p)
            assert float(wave.abs().max()) > 0.1


def test_refuses_non_empty_output(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = corpus
    before = sorted(str(p) for p in out.rglob("*"))
    with pytest.raises(UserError, match=re.escape(str(out / "mls_english"))):
        synthesize_corpus(out, TINY, progress=False)
    assert sorted(str(p) for p in out.rglob("*")) == before
    # Only the requested languages count: a corpus for another language is no conflict, but a
    # leftover file in the language's directory is.
    other = tmp_path / "other"
    (other / "mls_dutch").mkdir(parents=True)
    (other / "mls_dutch" / "stray.txt").write_text("x")
    with pytest.raises(UserError, match="mls_dutch"):
        synthesize_corpus(other, dataclasses.replace(TINY, languages=("nl",)), progress=False)
    # A folder of other files, without a corpus summary, is not a corpus to add languages to.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"notes holds notes\.txt and is not a synthesized corpus"):
        synthesize_corpus(notes, TINY, progress=False)
    assert [p.name for p in notes.iterdir()] == ["notes.txt"]
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        synthesize_corpus(not_a_dir, TINY, progress=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"split_fractions": (0.8, 0.1, 0.2)}, "sum to 1.1"),
        ({"split_fractions": (0.8, 0.2)}, "three"),
        ({"split_fractions": (0.0, 0.5, 0.5)}, "train fraction"),
        ({"split_fractions": (1.1, -0.05, -0.05)}, "non-negative"),
        ({"hours": 0.0}, "hours"),
        ({"hours": -1.0}, "hours"),
        ({"hours": float("nan")}, "hours"),
        ({"languages": ("en", "xx")}, "'xx'"),
        ({"languages": ("de",)}, "'de'"),
        ({"languages": ()}, "empty"),
        ({"languages": ("en", "en")}, "duplicate"),
        ({"fmt": "mp3"}, "fmt"),
        ({"min_words": 0}, "min_words"),
        ({"min_words": 5, "max_words": 4}, "max_words"),
        ({"lexicon_size": 0}, "lexicon_size"),
        ({"train_speakers": 0}, "train_speakers"),
        ({"noise_snr_db": (40.0, 20.0)}, "noise_snr_db"),
        ({"workers": -1}, "workers"),
        ({"seed": -3}, "seed"),
    ],
)
def test_validate_rejects_bad_configs(change: dict, message: str, tmp_path: Path) -> None:
    cfg = dataclasses.replace(SynthConfig(), **change)
    with pytest.raises(UserError, match=re.escape(message)):
        cfg.validate()
    with pytest.raises(UserError):  # synthesize_corpus validates before touching the disk
        synthesize_corpus(tmp_path / "never", cfg, progress=False)
    assert not (tmp_path / "never").exists()


def test_default_and_zero_fraction_configs_are_valid() -> None:
    SynthConfig().validate()
    SynthConfig(split_fractions=(1.0, 0.0, 0.0), dev_speakers=0, test_speakers=0, noise_snr_db=None).validate()


def test_render_trims_to_short_padding_and_sets_snr() -> None:
    espeak = Espeak.shared()
    text, voice = "the weather is nice today", Voice("en-us", "m2", 170, 50)
    clean = render(espeak, text, voice, seed=3, noise_snr_db=None)
    assert clean.dtype == np.float32 and clean.ndim == 1
    peak = float(np.max(np.abs(clean)))
    assert 0.3 - 1e-6 <= peak <= 0.95 + 1e-6
    active = np.flatnonzero(np.abs(clean) > peak * 0.01)
    lead, trail = active[0] / 16000, (clean.shape[0] - 1 - active[-1]) / 16000
    assert 0.05 <= lead <= 0.2 and 0.05 <= trail <= 0.2  # ~100 ms kept
    # The same speech at 22.05 kHz straight from eSpeak, trimmed by hand, has the same length.
    raw = espeak.synthesize(text, voice)
    on = np.flatnonzero(np.abs(raw) > np.max(np.abs(raw)) * 0.01)
    speech_sec = (on[-1] - on[0]) / espeak.sample_rate
    assert (active[-1] - active[0]) / 16000 == pytest.approx(speech_sec, abs=0.02)
    # Noise at a fixed 30 dB SNR: the padding holds noise ~30 dB below the speech level.
    noisy = render(espeak, text, voice, seed=3, noise_snr_db=(30.0, 30.0)).astype(np.float64)
    edge = int(0.04 * 16000)
    noise_rms = np.sqrt(np.mean(noisy[:edge] ** 2))
    speech = noisy[active[0] : active[-1]]
    speech = speech[np.abs(speech) > np.max(np.abs(speech)) * 0.01]
    snr = 20 * np.log10(np.sqrt(np.mean(speech**2)) / noise_rms)
    assert snr == pytest.approx(30.0, abs=4.0)



def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in _walk(root)}


ADD_IT = dataclasses.replace(
    TINY, languages=("it",), hours=0.004, seed=3, train_speakers=2, dev_speakers=1, test_speakers=1,
)  # fmt: skip


def test_adding_a_language_merges_the_summary(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    """Only the requested languages' directories must be empty (see test_refuses_non_empty_output),
    so a language can be added to a corpus; the summary must then describe all of them."""
    src, first = corpus
    out = tmp_path / "corpus"
    shutil.copytree(src, out)
    merged = synthesize_corpus(out, ADD_IT, progress=False)
    assert json.loads((out / "synth_summary.json").read_text()) == merged
    assert sorted(p.name for p in out.iterdir()) == ["mls_dutch", "mls_english", "mls_italian", "synth_summary.json"]
    assert list(merged["languages"]) == ["en", "it", "nl"]
    for lang in ("en", "nl"):  # untouched
        assert merged["languages"][lang] == first["languages"][lang]
    langs = merged["languages"].values()
    assert merged["utterances"] == sum(v["utterances"] for v in langs) > first["utterances"]
    assert merged["hours"] == pytest.approx(sum(v["hours"] for v in langs), abs=1e-6)
    # Run fields: this run; the first run's are kept in previous_runs.
    assert merged["config"]["languages"] == ["it"] and merged["config"]["seed"] == 3
    it_hours = merged["languages"]["it"]["hours"]
    assert merged["x_real_time"] == pytest.approx(it_hours * 3600 / merged["seconds"], rel=0.01)
    run_fields = ("config", "seconds", "x_real_time", "workers", "cpu_count", "format")
    assert merged["previous_runs"] == [{k: first[k] for k in run_fields}]
    # The MLS reader finds exactly what the summary describes.
    data, report = read_mls(out, progress=False)
    assert report.num_problems == 0, report.format()
    for lang, entry in merged["languages"].items():
        for split in ("train", "dev", "test"):
            n = sum(u.language == lang for u in data[split])
            assert n == entry["splits"][split]["utterances"], (lang, split)
    # A third run keeps both earlier runs.
    third = synthesize_corpus(out, dataclasses.replace(ADD_IT, languages=("fr",)), progress=False)
    assert list(third["languages"]) == ["en", "fr", "it", "nl"]
    assert third["previous_runs"] == [*merged["previous_runs"], {k: merged[k] for k in run_fields}]


def test_adding_a_language_checks_the_summary_before_writing(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = corpus
    out = tmp_path / "corpus"
    shutil.copytree(src, out)
    summary = out / "synth_summary.json"
    # English already synthesized as FLAC: the Opus edition would be a second "en" in one summary.
    before = _snapshot(out)
    with pytest.raises(UserError, match=rf"already describes en \({re.escape(str(out / 'mls_english'))}\)"):
        synthesize_corpus(out, dataclasses.replace(ADD_IT, languages=("en",), fmt="opus"), progress=False)
    assert _snapshot(out) == before
    for text in ("{not json", '{"languages": []}', '{"languages": {"en": {"directory": "mls_english"}}}'):
        summary.write_text(text)
        before = _snapshot(out)
        with pytest.raises(UserError, match=rf"{re.escape(str(summary))}: not a readable synth summary"):
            synthesize_corpus(out, ADD_IT, progress=False)
        assert _snapshot(out) == before  # nothing written: no mls_italian
