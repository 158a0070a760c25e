"""Offline synthetic multilingual corpus in the exact on-disk layout of Multilingual LibriSpeech.

``synthesize_corpus(out, config)`` writes, for every language, ::

    out/mls_<language>/<split>/transcripts.txt          <id>\\t<text>
    out/mls_<language>/<split>/segments.txt             <id>\\tsynth://espeak-ng/<voice>\\t0.00\\t<end>
    out/mls_<language>/<split>/audio/<spk>/<book>/<spk>_<book>_<utt>.flac

(``mls_<language>_opus/.../*.opus`` for ``fmt="opus"``, as MLS ships its Opus edition)

with ``split`` in train/dev/test, numeric speaker and book ids and 6-digit utterance numbers, so
the MLS reader serves real and synthetic data alike. Text comes from :mod:`sparse_rnnt.data.text`,
speech from eSpeak NG (:mod:`sparse_rnnt.data.espeak`) at 22.05 kHz, resampled to 16 kHz.

A speaker is an eSpeak voice variant with a speaking rate, a base pitch and a pitch range. The
variant pool of a language is split between train, dev and test, so dev and test speakers use
voice variants never heard in training (and no (variant, rate, pitch) triple is shared).

Determinism: every random choice derives from (seed, language, split, utterance index), and
utterances are synthesized in fixed batches (:data:`CHUNK_SIZE`), each batch in a fresh worker
process forked from a clean fork server. eSpeak NG keeps history-dependent state in C statics, so
this is what makes the audio bit-identical for any worker count.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import multiprocessing as mp
import os
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio
from tqdm import tqdm

from ..errors import UserError
from ..io import atomic_write_json, atomic_write_text
from ..languages import MLS_NAMES, SYNTH_LANGUAGES
from .audio import SAMPLE_RATE, save_audio
from .espeak import Espeak, Voice, list_variants
from .manifest import SPLITS
from .text import LANGUAGES as TEXT_LANGUAGES
from .text import make_sentences

# eSpeak voice for each ISO code (American English, like most of MLS English).
ESPEAK_LANGUAGE: dict[str, str] = {"en": "en-us", "fr": "fr", "it": "it", "nl": "nl"}
# Variants that sound like a (synthetic) human reader; whispering, robotic, heavy-echo and
# novelty variants are left out. Intersected with what the installed data directory holds.
SPEAKER_VARIANTS: tuple[str, ...] = (
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "Denis", "Diogo", "Gene", "Gene2", "Henrique",
    "Hugo", "Lee", "Marco", "Mario", "Michael", "Mike", "Nguyen", "adam", "anika", "antonio",
    "aunty", "belinda", "benjamin", "boris", "david", "ed", "edward", "edward2", "f1", "f2", "f3",
    "f4", "f5", "gustave", "ian", "iven", "iven2", "iven3", "iven4", "john", "klatt", "klatt2",
    "klatt3", "linda", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "marcelo", "max", "michel",
    "miguel", "mike2", "norbert", "pablo", "paul", "pedro", "quincy", "rob", "robert", "sandro",
    "shelby", "steph", "steph2", "steph3", "travis", "victor",
)  # fmt: skip
RATE_RANGE = (130, 210)  # words per minute
PITCH_RANGE = (25, 75)  # eSpeak base pitch 0-100
INTONATION_RANGE = (30, 70)  # eSpeak pitch range 0-100
BOOKS_PER_SPEAKER = (1, 3)
PAD_SECONDS = (0.08, 0.15)  # silence kept before and after speech
PEAK_RANGE = (0.3, 0.95)  # random peak level after normalization
TRIM_DB = -40.0  # below the utterance peak counts as silence when trimming
CHUNK_SIZE = 32  # utterances per fresh worker process (fixed: part of the determinism contract)
PILOT_UTTERANCES = 128  # per language, to fit duration against text length
MAX_SPEAKERS = 5000  # per language: speaker ids are 3-4 digit numbers
_SPLIT_CODE = {"train": 1, "dev": 2, "test": 3, "pilot": 4}


@dataclass(frozen=True)
class SynthConfig:
    """What to synthesize; ``hours`` is the total per language over train, dev and test."""

    languages: tuple[str, ...] = ("en", "fr", "it", "nl")
    hours: float = 0.5
    seed: int = 0
    fmt: str = "flac"  # "flac" | "opus"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/dev/test utterances
    min_words: int = 3
    max_words: int = 8
    lexicon_size: int | None = None
    train_speakers: int = 24  # per language
    dev_speakers: int = 4
    test_speakers: int = 4
    noise_snr_db: tuple[float, float] | None = (20.0, 40.0)  # white/pink noise; None = clean
    workers: int = 0  # 0 = os.cpu_count()

    def speakers(self, split: str) -> int:
        return {"train": self.train_speakers, "dev": self.dev_speakers, "test": self.test_speakers}[split]

    def fraction(self, split: str) -> float:
        return float(self.split_fractions[SPLITS.index(split)])

    def validate(self) -> None:
        """Raise :class:`UserError` naming the first bad field."""
        langs = tuple(self.languages)
        if not langs:
            raise UserError("synth config: languages is empty")
        usable = tuple(c for c in SYNTH_LANGUAGES if c in TEXT_LANGUAGES and c in ESPEAK_LANGUAGE)
        for lang in langs:
            if lang not in usable:
                raise UserError(f"synth config: language {lang!r} cannot be synthesized; choose from {', '.join(usable)}")
        if len(set(langs)) != len(langs):
            raise UserError(f"synth config: duplicate language in {', '.join(langs)}")
        if not _is_number(self.hours) or not math.isfinite(self.hours) or self.hours <= 0:
            raise UserError(f"synth config: hours must be a positive number, got {self.hours!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise UserError(f"synth config: seed must be a non-negative integer, got {self.seed!r}")
        if self.fmt not in ("flac", "opus"):
            raise UserError(f"synth config: fmt must be 'flac' or 'opus', got {self.fmt!r}")
        fr = tuple(self.split_fractions)
        if len(fr) != 3 or not all(_is_number(f) and math.isfinite(f) and f >= 0 for f in fr):
            raise UserError(
                f"synth config: split_fractions must be three non-negative numbers (train, dev, test), got {self.split_fractions!r}"
            )
        if abs(sum(fr) - 1.0) > 1e-6:
            raise UserError(f"synth config: split_fractions {self.split_fractions!r} sum to {sum(fr):g}, not 1")
        if fr[0] <= 0:
            raise UserError(f"synth config: the train fraction must be positive, got {fr[0]!r}")
        for name in ("min_words", "max_words"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"synth config: {name} must be a positive integer, got {v!r}")
        if self.max_words < self.min_words:
            raise UserError(f"synth config: max_words ({self.max_words}) < min_words ({self.min_words})")
        if self.lexicon_size is not None and (
            not isinstance(self.lexicon_size, int) or isinstance(self.lexicon_size, bool) or self.lexicon_size < 1
        ):
            raise UserError(f"synth config: lexicon_size must be a positive integer or None, got {self.lexicon_size!r}")
        for split in SPLITS:
            n = self.speakers(split)
            low = 1 if self.fraction(split) > 0 else 0
            if not isinstance(n, int) or isinstance(n, bool) or n < low:
                raise UserError(f"synth config: {split}_speakers must be an integer >= {low}, got {n!r}")
        total = self.train_speakers + self.dev_speakers + self.test_speakers
        if total > MAX_SPEAKERS:
            raise UserError(f"synth config: {total} speakers per language, at most {MAX_SPEAKERS}")
        if self.noise_snr_db is not None:
            snr = tuple(self.noise_snr_db)
            if len(snr) != 2 or not all(_is_number(v) and math.isfinite(v) for v in snr) or snr[0] > snr[1]:
                raise UserError(
                    f"synth config: noise_snr_db must be (low, high) in dB with low <= high, or None; got {self.noise_snr_db!r}"
                )
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 0:
            raise UserError(f"synth config: workers must be an integer >= 0, got {self.workers!r}")
        for lang in langs:  # the grammar must reach the word range (raises text.TextError, a UserError)
            make_sentences(lang, 1, 0, min_words=self.min_words, max_words=self.max_words, lexicon_size=self.lexicon_size)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------
# Deterministic randomness


def _key(part: str | int) -> int:
    """Stable non-negative integer for a seed-sequence entry (``hash()`` is salted per process)."""
    return part if isinstance(part, int) else zlib.crc32(part.encode("utf-8"))


def _rng(seed: int, *parts: str | int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *(_key(p) for p in parts)]))


def _seed31(seed: int, *parts: str | int) -> int:
    """A seed in [0, 2**31) derived from (seed, parts)."""
    return int(np.random.SeedSequence([seed, *(_key(p) for p in parts)]).generate_state(1)[0] >> 1)


# ---------------------------------------------------------------------------------------------
# Speakers


@dataclass(frozen=True)
class Speaker:
    """One synthetic reader of one language and split, with the MLS-style ids of its books."""

    id: str
    split: str
    voice: Voice
    books: tuple[str, ...]


def speaker_variants() -> list[str]:
    """The variants used for speakers that the installed eSpeak NG data provides, sorted."""
    have = set(list_variants())
    return sorted(v for v in SPEAKER_VARIANTS if v in have)


def _partition_variants(variants: Sequence[str], counts: dict[str, int]) -> dict[str, list[str]]:
    """Split a shuffled variant list between the splits: disjoint, dev/test first.

    With enough variants every speaker gets its own; otherwise dev and test get a share
    proportional to their speaker counts (at least one each) and train the rest.
    """
    active = [s for s in SPLITS if counts[s] > 0]
    if len(variants) < len(active):
        raise UserError(f"eSpeak NG provides {len(variants)} usable voice variants, need at least {len(active)}")
    total = sum(counts[s] for s in active)
    want: dict[str, int] = {}
    if len(variants) >= total:
        want = {s: counts[s] for s in active}
    else:
        for s in ("test", "dev"):
            if counts[s] > 0:
                want[s] = max(1, math.floor(len(variants) * counts[s] / total))
        want["train"] = len(variants) - sum(want.values())
        while want["train"] < 1:  # tiny pools: give train at least one variant
            s = max((s for s in ("test", "dev") if want.get(s, 0) > 1), key=lambda s: want[s])
            want[s] -= 1
            want["train"] += 1
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    pos = 0
    for s in ("test", "dev", "train"):
        n = want.get(s, 0)
        out[s] = list(variants[pos : pos + n])
        pos += n
    return out


def plan_speakers(config: SynthConfig, language: str) -> dict[str, list[Speaker]]:
    """Deterministic speakers of ``language`` per split; splits share no voice variant."""
    rng = _rng(config.seed, language, "speakers")
    variants = speaker_variants()
    variants = [variants[i] for i in rng.permutation(len(variants))]
    counts = {s: config.speakers(s) for s in SPLITS}
    pools = _partition_variants(variants, counts)
    total = sum(counts.values())
    speaker_ids = rng.choice(np.arange(100, 10000), size=total, replace=False)
    n_books = rng.integers(BOOKS_PER_SPEAKER[0], BOOKS_PER_SPEAKER[1] + 1, size=total)
    book_ids = rng.choice(np.arange(100, 100000), size=int(n_books.sum()), replace=False)
    seen: set[tuple[str, int, int]] = set()
    out: dict[str, list[Speaker]] = {}
    k = b = 0
    for split in SPLITS:
        speakers: list[Speaker] = []
        for j in range(counts[split]):
            variant = pools[split][j % len(pools[split])]
            while True:  # a (variant, rate, pitch) triple identifies one speaker only
                rate = int(rng.integers(RATE_RANGE[0], RATE_RANGE[1] + 1))
                pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
                if (variant, rate, pitch) not in seen:
                    break
            seen.add((variant, rate, pitch))
            intonation = int(rng.integers(INTONATION_RANGE[0], INTONATION_RANGE[1] + 1))
            voice = Voice(ESPEAK_LANGUAGE[language], variant, rate, pitch, intonation)
            books = tuple(str(int(x)) for x in book_ids[b : b + int(n_books[k])])
            speakers.append(Speaker(str(int(speaker_ids[k])), split, voice, books))
            b += int(n_books[k])
            k += 1
        out[split] = speakers
    return out


# ---------------------------------------------------------------------------------------------
# Per-utterance rendering (runs in worker processes)


@dataclass(frozen=True)
class _Job:
    utt_id: str
    text: str
    voice: Voice
    seed: int
    path: str | None  # None: pilot, measure only


@dataclass(frozen=True)
class _Chunk:
    language: str
    split: str
    jobs: tuple[_Job, ...]
    noise_snr_db: tuple[float, float] | None


def _pink(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-RMS 1/f noise ``[n]`` by shaping white noise in the frequency domain."""
    m = 1 << max(n - 1, 1).bit_length()  # power-of-two FFT: arbitrary lengths can be very slow
    spec = np.fft.rfft(rng.standard_normal(m))
    f = np.arange(spec.shape[0], dtype=np.float64)
    f[0] = 1.0
    spec /= np.sqrt(f)
    spec[0] = 0.0
    x = np.fft.irfft(spec, m)[:n]
    return x / max(float(np.sqrt(np.mean(x**2))), 1e-12)


@functools.lru_cache(maxsize=4)
def _resampler(orig: int, new: int) -> torch.nn.Module:
    """torchaudio's sinc resampler with its kernel built once (same output as functional.resample)."""
    return torchaudio.transforms.Resample(orig, new)


def _write_audio_atomic(path: Path, wave: np.ndarray) -> None:
    """Encode to a hidden temporary file beside ``path``, then rename: never a half-written file.

    (No fsync per file: this guards against interruption, and a corpus is cheap to regenerate.)
    """
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # save_audio reads the suffix
    try:
        save_audio(tmp, wave, SAMPLE_RATE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _speak_trimmed(espeak: Espeak, text: str, voice: Voice, rng: np.random.Generator) -> np.ndarray:
    """eSpeak output at its own rate with leading/trailing silence cut to a short random pad, ``[T]``."""
    wave = espeak.synthesize(text, voice, seed=int(rng.integers(1, 2**31 - 1)))
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    if peak <= 0.0:
        raise RuntimeError(f"eSpeak NG produced silence for {text!r} with voice {voice.name()}")
    active = np.flatnonzero(np.abs(wave) > peak * 10.0 ** (TRIM_DB / 20.0))
    first, last = int(active[0]), int(active[-1])
    pad_l, pad_r = (round(rng.uniform(*PAD_SECONDS) * espeak.sample_rate) for _ in range(2))
    # Keep the real signal inside the padding; add digital silence only where eSpeak gave less.
    out = np.zeros(pad_l + (last - first + 1) + pad_r, dtype=np.float32)
    lo, hi = max(0, first - pad_l), min(wave.shape[0], last + 1 + pad_r)
    out[lo - (first - pad_l) : hi - (first - pad_l)] = wave[lo:hi]
    return out


def render(espeak: Espeak, text: str, voice: Voice, seed: int, noise_snr_db: tuple[float, float] | None) -> np.ndarray:
    """One utterance as 16 kHz float32 mono ``[T]``: speak, trim, resample, add noise, set the level.

    All randomness comes from ``seed``; eSpeak's own history dependence is handled by the caller
    (fresh process per fixed batch).
    """
    rng = np.random.default_rng(seed)
    trimmed = _speak_trimmed(espeak, text, voice, rng)
    with torch.inference_mode():
        x = _resampler(espeak.sample_rate, SAMPLE_RATE)(torch.from_numpy(trimmed))
    x = x.numpy().astype(np.float64)
    if noise_snr_db is not None:
        snr = rng.uniform(noise_snr_db[0], noise_snr_db[1])
        noise = rng.standard_normal(x.shape[0]) if rng.random() < 0.5 else _pink(rng, x.shape[0])
        # SNR relative to the speech, not to speech plus padding.
        speech = x[np.abs(x) > np.max(np.abs(x)) * 10.0 ** (TRIM_DB / 20.0)]
        x = x + noise * (float(np.sqrt(np.mean(speech**2))) / 10.0 ** (snr / 20.0))
    x *= rng.uniform(*PEAK_RANGE) / max(float(np.max(np.abs(x))), 1e-9)
    return x.astype(np.float32)


_WORKER_ESPEAK: Espeak | None = None


def _init_worker() -> None:
    """Pool initializer: one eSpeak per (fresh) worker process, single-threaded torch."""
    global _WORKER_ESPEAK
    torch.set_num_threads(1)
    _WORKER_ESPEAK = Espeak.shared()


def _run_chunk(chunk: _Chunk) -> tuple[str, str, list[tuple[str, int]]]:
    """Render and write (unless pilot) every job of a chunk; return (language, split, [(id, samples)])."""
    espeak = _WORKER_ESPEAK if _WORKER_ESPEAK is not None else Espeak.shared()
    out: list[tuple[str, int]] = []
    for job in chunk.jobs:
        if job.path is None:  # pilot: only the duration matters, skip resampling and encoding
            trimmed = _speak_trimmed(espeak, job.text, job.voice, np.random.default_rng(job.seed))
            out.append((job.utt_id, round(trimmed.shape[0] * SAMPLE_RATE / espeak.sample_rate)))
            continue
        wave = render(espeak, job.text, job.voice, job.seed, chunk.noise_snr_db)
        _write_audio_atomic(Path(job.path), wave)
        out.append((job.utt_id, int(wave.shape[0])))
    return chunk.language, chunk.split, out


def _make_pool(workers: int) -> Pool:
    """A pool whose workers are fresh processes (one chunk each) forked from a clean server."""
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        ctx.set_forkserver_preload([__name__])  # import torch & co once, in the server
    return ctx.Pool(processes=workers, initializer=_init_worker, maxtasksperchild=1)


# ---------------------------------------------------------------------------------------------
# Corpus


def _sentences(language: str, count: int, seed: int, config: SynthConfig) -> list[str]:
    if count == 0:
        return []
    out = make_sentences(
        language, count, seed, min_words=config.min_words, max_words=config.max_words, lexicon_size=config.lexicon_size
    )
    if len(out) != count or not all(isinstance(s, str) and s.strip() and "\t" not in s and "\n" not in s for s in out):
        raise RuntimeError(f"text.make_sentences({language!r}, {count}) returned unusable sentences")
    return list(out)


def _chunks(language: str, split: str, jobs: list[_Job], noise: tuple[float, float] | None) -> Iterator[_Chunk]:
    for i in range(0, len(jobs), CHUNK_SIZE):
        yield _Chunk(language, split, tuple(jobs[i : i + CHUNK_SIZE]), noise)


def _split_counts(total: int, config: SynthConfig) -> dict[str, int]:
    """Utterances per split: ``total`` shared by ``split_fractions``, at least one per used split."""
    total = max(total, sum(1 for s in SPLITS if config.fraction(s) > 0))
    counts = {"train": 0}
    for split in ("dev", "test"):
        f = config.fraction(split)
        counts[split] = max(1, round(total * f)) if f > 0 else 0
    counts["train"] = max(1, total - counts["dev"] - counts["test"])
    return counts


def _plan_split(
    config: SynthConfig, language: str, split: str, texts: list[str], speakers: list[Speaker], root: Path
) -> tuple[list[_Job], dict[str, Speaker]]:
    """Jobs of one split: speakers, books and ids for ``texts`` (all decided here, deterministically)."""
    count = len(texts)
    if count == 0:
        return [], {}
    rng = _rng(config.seed, language, split, "assign")
    # Balanced speaker counts in a random order; a random book of the speaker per utterance.
    owner = rng.permutation(np.arange(count) % len(speakers))
    next_utt: Counter[tuple[str, str]] = Counter()
    jobs: list[_Job] = []
    by_id: dict[str, Speaker] = {}
    for i in range(count):
        spk = speakers[int(owner[i])]
        book = spk.books[int(rng.integers(len(spk.books)))]
        n = next_utt[(spk.id, book)]
        next_utt[(spk.id, book)] += 1
        utt_id = f"{spk.id}_{book}_{n:06d}"
        path = root / "audio" / spk.id / book / f"{utt_id}.{config.fmt}"
        seed = _seed31(config.seed, language, _SPLIT_CODE[split], i)
        jobs.append(_Job(utt_id, texts[i], spk.voice, seed, str(path)))
        by_id[utt_id] = spk
    return jobs, by_id


def _pilot_jobs(config: SynthConfig, language: str, speakers: dict[str, list[Speaker]]) -> list[_Job]:
    """Throw-away utterances over all speakers of ``language`` whose durations size the corpus."""
    pool = [s for split in SPLITS for s in speakers[split]]
    texts = _sentences(language, PILOT_UTTERANCES, _seed31(config.seed, language, "pilot", "text"), config)
    rng = _rng(config.seed, language, "pilot", "assign")
    return [
        _Job(f"pilot{i}", t, pool[int(rng.integers(len(pool)))].voice, _seed31(config.seed, language, _SPLIT_CODE["pilot"], i), None)
        for i, t in enumerate(texts)
    ]


def _fit_duration(texts: Sequence[str], seconds: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``seconds ~ a + b * characters`` over the pilot; (mean, 0) if degenerate."""
    chars = np.array([len(t) for t in texts], dtype=np.float64)
    sec = np.asarray(seconds, dtype=np.float64)
    if chars.size >= 2 and np.ptp(chars) > 0:
        b, a = np.polyfit(chars, sec, 1)
        if b > 0 and a + b * chars.min() > 0:
            return float(a), float(b)
    return float(sec.mean()), 0.0


def _choose_texts(
    config: SynthConfig, language: str, fit: tuple[float, float], pilot_mean: float
) -> dict[str, list[str]]:
    """Texts per split whose predicted total duration is ``hours``: fixed-point on the count.

    The count starts at budget / pilot mean and is rescaled by budget / predicted duration of
    the actual sentences a few times, so the text-length draw barely affects the hours reached.
    """
    a, b = fit
    budget = config.hours * 3600.0
    cache: dict[tuple[str, int], list[str]] = {}

    def texts_for(total: int) -> dict[str, list[str]]:
        counts = _split_counts(total, config)
        out = {}
        for split in SPLITS:
            key = (split, counts[split])
            if key not in cache:
                cache[key] = _sentences(language, counts[split], _seed31(config.seed, language, split, "text"), config)
            out[split] = cache[key]
        return out

    total = max(1, round(budget / pilot_mean))
    for _ in range(4):
        texts = texts_for(total)
        mean_chars = float(np.mean([len(t) for v in texts.values() for t in v]))
        predicted = sum(len(v) for v in texts.values()) * (a + b * mean_chars)
        new_total = max(1, round(total * budget / predicted))
        if new_total == total:
            break
        total = new_total
    return texts_for(total)


def language_dir(language: str, fmt: str) -> str:
    """MLS directory name: ``mls_english`` (flac) or ``mls_english_opus`` (opus), as distributed."""
    return f"mls_{MLS_NAMES[language]}" + ("_opus" if fmt == "opus" else "")


SUMMARY_FILE = "synth_summary.json"
# Summary fields that describe one synthesis run (the others describe the corpus).
_RUN_FIELDS = ("config", "seconds", "x_real_time", "workers", "cpu_count", "format")


def _check_output(out: Path, languages: Sequence[str], fmt: str) -> dict[str, Any] | None:
    """Refuse an ``out`` where the corpus cannot go; returns the summary of the corpus already
    in ``out`` (None if there is none), which the new languages are added to.

    Only the requested languages' directories must be absent or empty: languages can be added
    to an existing corpus, one run at a time. Nothing is written here.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory")
    if out.is_dir() and not (out / SUMMARY_FILE).exists():
        # Not a corpus (a corpus in progress has only language folders): its files are not ours.
        foreign = sorted(p.name for p in out.iterdir() if not (p.is_dir() and p.name.startswith("mls_")))
        if foreign:
            raise UserError(f"output directory {out} holds {', '.join(foreign[:5])} and is not a synthesized corpus "
                            f"(no {SUMMARY_FILE}): choose an empty or new directory")
    for lang in languages:
        d = out / language_dir(lang, fmt)
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise UserError(f"{d} already exists and is not empty: remove it or choose another output directory")
    path = out / SUMMARY_FILE
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        langs = old["languages"]
        if not isinstance(langs, dict) or not all(
            isinstance(v, dict) and isinstance(v["directory"], str) and isinstance(v["utterances"], int)
            and isinstance(v["hours"], int | float) for v in langs.values()
        ):
            raise TypeError("unexpected 'languages' entries")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a readable synth summary ({e}), so the new languages cannot be added to it: "
                        "remove it or choose another output directory") from None
    for lang in languages:
        if lang in langs:
            d = out / langs[lang]["directory"]
            if d.is_dir() and any(d.iterdir()):  # the language in the other format
                raise UserError(f"{path} already describes {lang} ({d}): remove it or choose another output directory")
    return old


def _merge_summary(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The summary of a corpus that already held ``old`` and received ``new``'s languages:
    per-language entries of both (a language synthesized again is replaced), totals over all,
    the run fields (``config``, ``seconds``, ``x_real_time``...) of the new run and the earlier
    runs' in ``previous_runs``."""
    langs = dict(sorted({**old["languages"], **new["languages"]}.items()))  # as the JSON file holds them
    earlier = [r for r in old.get("previous_runs", []) if isinstance(r, dict)]
    earlier.append({k: old[k] for k in _RUN_FIELDS if k in old})
    return {
        **new,
        "languages": langs,
        "utterances": sum(v["utterances"] for v in langs.values()),
        "hours": round(sum(v["hours"] for v in langs.values()), 6),
        "previous_runs": earlier,
    }


def synthesize_corpus(out: str | os.PathLike[str], config: SynthConfig, progress: bool = True) -> dict[str, Any]:
    """Synthesize the corpus under ``out`` in MLS layout; return and write ``out/synth_summary.json``.

    Per language, a pilot of :data:`PILOT_UTTERANCES` throw-away utterances fits duration
    against text length; the number of utterances is then chosen so that the predicted total is
    ``hours`` (about ``round(hours * 3600 / mean duration)``) and split by ``split_fractions``.
    Raises :class:`UserError` for a bad config or when ``out/mls_<language>`` (``_opus``) exists
    and is not empty. The summary holds utterances, hours, speakers and books per language and split, the
    wall time in ``seconds`` and the throughput ``x_real_time`` (audio seconds written per wall
    second, pilot included in the time).

    Languages can be added to an existing corpus: ``out`` may hold other languages (and their
    summary). The summary then covers every language (``utterances`` and ``hours`` are totals
    over all of them), its run fields (``config``, ``seconds``, ``x_real_time``, ``workers``,
    ``cpu_count``, ``format``) describe this run, and ``previous_runs`` lists the earlier runs'
    run fields. Every check (including that the existing summary is readable) happens before
    anything is written. Workers are started through multiprocessing's
    forkserver (spawn where unavailable): call this under ``if __name__ == "__main__":`` in scripts.
    """
    config.validate()
    out = Path(out)
    languages = list(config.languages)
    previous = _check_output(out, languages, config.fmt)
    workers = config.workers or os.cpu_count() or 1
    start = time.perf_counter()
    speakers = {lang: plan_speakers(config, lang) for lang in languages}
    pilots = {lang: _pilot_jobs(config, lang, speakers[lang]) for lang in languages}

    with _make_pool(workers) as pool:
        pilot_chunks = [c for lang in languages for c in _chunks(lang, "pilot", pilots[lang], None)]
        pilot_samples: dict[str, dict[str, int]] = defaultdict(dict)
        for lang, _, res in pool.imap(_run_chunk, pilot_chunks):
            pilot_samples[lang].update(res)
        pilot_sec = {lang: [pilot_samples[lang][j.utt_id] / SAMPLE_RATE for j in pilots[lang]] for lang in languages}
        fits = {lang: _fit_duration([j.text for j in pilots[lang]], pilot_sec[lang]) for lang in languages}

        jobs: dict[tuple[str, str], list[_Job]] = {}
        owners: dict[tuple[str, str], dict[str, Speaker]] = {}
        for lang in languages:
            texts = _choose_texts(config, lang, fits[lang], float(np.mean(pilot_sec[lang])))
            for split in SPLITS:
                root = out / language_dir(lang, config.fmt) / split
                key = (lang, split)
                jobs[key], owners[key] = _plan_split(config, lang, split, texts[split], speakers[lang][split], root)
                # Create every directory up front so that workers never race on mkdir.
                root.mkdir(parents=True, exist_ok=True)
                for d in sorted({Path(j.path).parent for j in jobs[key] if j.path}):
                    d.mkdir(parents=True, exist_ok=True)
        # Interleave languages and splits so that every worker has work until the end.
        per_key = {k: list(_chunks(k[0], k[1], v, config.noise_snr_db)) for k, v in jobs.items()}
        order: list[_Chunk] = []
        for i in range(max((len(v) for v in per_key.values()), default=0)):
            order.extend(v[i] for v in per_key.values() if i < len(v))
        remaining = {k: len(v) for k, v in jobs.items()}
        samples: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
        for key, left in remaining.items():
            if left == 0:  # a split with a zero fraction: empty but present, like MLS
                _write_split(out / language_dir(key[0], config.fmt) / key[1], [], {})
        with tqdm(total=sum(remaining.values()), desc="synthesizing", unit="utt", disable=not progress) as bar:
            for lang, split, res in pool.imap_unordered(_run_chunk, order):
                samples[(lang, split)].update(res)
                remaining[(lang, split)] -= len(res)
                bar.update(len(res))
                if remaining[(lang, split)] == 0:
                    root = out / language_dir(lang, config.fmt) / split
                    _write_split(root, jobs[(lang, split)], samples[(lang, split)])

    seconds = time.perf_counter() - start
    summary = _summary(config, languages, jobs, owners, samples, fits, seconds, workers)
    if previous is not None:
        summary = _merge_summary(previous, summary)
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def _write_split(root: Path, jobs: list[_Job], samples: dict[str, int]) -> None:
    """transcripts.txt and segments.txt of one finished split, sorted by id, written atomically."""
    ordered = sorted(jobs, key=lambda j: j.utt_id)
    transcripts = "".join(f"{j.utt_id}\t{j.text}\n" for j in ordered)
    segments = "".join(
        f"{j.utt_id}\tsynth://espeak-ng/{j.voice.name()}\t0.00\t{samples[j.utt_id] / SAMPLE_RATE:.2f}\n" for j in ordered
    )
    atomic_write_text(root / "segments.txt", segments)
    atomic_write_text(root / "transcripts.txt", transcripts)


def _summary(
    config: SynthConfig,
    languages: list[str],
    jobs: dict[tuple[str, str], list[_Job]],
    owners: dict[tuple[str, str], dict[str, Speaker]],
    samples: dict[tuple[str, str], dict[str, int]],
    fits: dict[str, tuple[float, float]],
    seconds: float,
    workers: int,
) -> dict[str, Any]:
    langs: dict[str, Any] = {}
    total_sec = 0.0
    total_utts = 0
    for lang in languages:
        splits: dict[str, Any] = {}
        for split in SPLITS:
            sec = sum(samples[(lang, split)].values()) / SAMPLE_RATE
            spk = owners[(lang, split)].values()
            splits[split] = {
                "utterances": len(jobs[(lang, split)]),
                "hours": round(sec / 3600.0, 6),
                "speakers": len({s.id for s in spk}),
                "books": len({(j.utt_id.split("_")[0], j.utt_id.split("_")[1]) for j in jobs[(lang, split)]}),
                "voice_variants": sorted({s.voice.variant for s in spk}),
            }
            total_sec += sec
            total_utts += len(jobs[(lang, split)])
        langs[lang] = {
            "directory": language_dir(lang, config.fmt),
            "espeak_voice": ESPEAK_LANGUAGE[lang],
            "pilot_fit_seconds": {"intercept": round(fits[lang][0], 4), "per_char": round(fits[lang][1], 5)},
            "utterances": sum(s["utterances"] for s in splits.values()),
            "hours": round(sum(s["hours"] for s in splits.values()), 6),
            "splits": splits,
        }
    config_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    return {
        "config": config_dict,
        "languages": langs,
        "utterances": total_utts,
        "hours": round(total_sec / 3600.0, 6),
        "seconds": round(seconds, 3),
        "x_real_time": round(total_sec / seconds, 2) if seconds > 0 else None,
        "workers": workers,
        "cpu_count": os.cpu_count(),
        "sample_rate": SAMPLE_RATE,
        "format": config.fmt,
    }
