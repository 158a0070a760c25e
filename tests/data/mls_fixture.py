"""Build a tiny corpus in the real MLS on-disk layout, for tests of anything that reads MLS.

Written with soundfile directly (not the toolkit's audio helpers) so that reader tests compare
against an independent description of what is on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

MLS_DIR_NAMES: dict[str, str] = {
    "en": "english",
    "fr": "french",
    "it": "italian",
    "nl": "dutch",
    "de": "german",
    "es": "spanish",
    "pt": "portuguese",
    "pl": "polish",
}
_WORDS: dict[str, list[str]] = {
    "en": ["the", "cat", "sat", "on", "a", "warm", "mat", "today"],
    "fr": ["le", "chat", "était", "là", "près", "de", "la", "fenêtre"],
    "it": ["il", "gatto", "è", "sulla", "sedia", "città", "però", "qui"],
    "nl": ["de", "kat", "zat", "op", "een", "warme", "mat", "vandaag"],
    "de": ["die", "katze", "saß", "auf", "der", "warmen", "matte", "heute"],
    "es": ["el", "gato", "está", "en", "la", "mesa", "mañana", "aquí"],
    "pt": ["o", "gato", "está", "na", "mesa", "então", "amanhã", "aqui"],
    "pl": ["kot", "siedzi", "na", "ciepłej", "macie", "dziś", "rano", "tutaj"],
}
_SPLITS = ("train", "dev", "test")


def _frames(split_index: int, i: int, sample_rate: int) -> int:
    # 0.20 s .. 0.50 s, plus 0-2 samples so durations are not round numbers.
    seconds = 0.20 + 0.02 * ((7 * split_index + 3 * i) % 16)
    return round(seconds * sample_rate) + (i % 3)


def _wave(frames: int, sample_rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / sample_rate
    tone = 0.3 * np.sin(2 * np.pi * (200.0 + 40.0 * (seed % 7)) * t)
    return (tone + 0.02 * rng.standard_normal(frames)).astype(np.float32)


def write_audio(path: Path, wave: np.ndarray, sample_rate: int, fmt: str) -> None:
    """Write mono ``wave`` ``[T]`` as FLAC (16 bit) or Ogg Opus."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "opus":
        sf.write(str(path), wave, sample_rate, format="OGG", subtype="OPUS")
    elif fmt == "flac":
        sf.write(str(path), wave, sample_rate, format="FLAC", subtype="PCM_16")
    else:
        raise ValueError(f"unknown fmt {fmt!r}")


def build_mls_fixture(
    root: Path,
    languages: tuple[str, ...] = ("en", "fr"),
    splits: tuple[str, ...] = _SPLITS,
    per_split: int = 3,
    fmt: str = "flac",
    sample_rate: int = 16000,
) -> dict[str, Any]:
    """Write ``per_split`` utterances per language and split under ``root`` in the MLS layout.

    Ids are the same in every language (``<spk>_<book>_<utt>``, collisions on purpose); texts
    differ. Transcript lines are written in reverse id order. segments.txt durations are
    deliberately 0.5 s longer than the audio. Train gets a ``limited_supervision`` tree:
    9hr = all but the last train id, 1hr = all but the last two (at least one), spread over
    folds 0..5 round-robin (the other folds get empty handles files).

    Returns:
        ``{"root", "fmt", "sample_rate", "dirs": {lang: Path}, "transcripts": {lang: {split:
        Path}}, "utterances": {lang: {split: [utt, ...]}}, "subsets": {lang: {"9hr": [ids],
        "1hr": [ids]}}}`` where each ``utt`` is a dict with ``id, speaker, book, text, frames,
        duration, segment_duration, audio`` (absolute path str) and ``line`` (1-based line in
        transcripts.txt).
    """
    root = Path(root).absolute()
    suffix = "_opus" if fmt == "opus" else ""
    out: dict[str, Any] = {
        "root": root,
        "fmt": fmt,
        "sample_rate": sample_rate,
        "dirs": {},
        "transcripts": {},
        "utterances": {},
        "subsets": {},
    }
    for li, lang in enumerate(languages):
        lang_dir = root / f"mls_{MLS_DIR_NAMES[lang]}{suffix}"
        out["dirs"][lang] = lang_dir
        out["transcripts"][lang] = {}
        out["utterances"][lang] = {}
        for split in splits:
            si = _SPLITS.index(split)
            split_dir = lang_dir / split
            utts: list[dict[str, Any]] = []
            for i in range(per_split):
                speaker = str(1000 + 10 * si + i % 2)
                book = str(50 + i // 2)
                utt_id = f"{speaker}_{book}_{i:06d}"
                words = _WORDS[lang]
                text = " ".join(words[(i + k + si) % len(words)] for k in range(2 + i % 4))
                frames = _frames(si, i, sample_rate)
                audio = split_dir / "audio" / speaker / book / f"{utt_id}.{fmt}"
                write_audio(audio, _wave(frames, sample_rate, 100 * li + 10 * si + i), sample_rate, fmt)
                utts.append(
                    {
                        "id": utt_id,
                        "speaker": speaker,
                        "book": book,
                        "text": text,
                        "frames": frames,
                        "duration": frames / sample_rate,
                        "segment_duration": frames / sample_rate + 0.5,
                        "audio": str(audio),
                    }
                )
            written = list(reversed(utts))
            for lineno, u in enumerate(written, 1):
                u["line"] = lineno
            transcripts = split_dir / "transcripts.txt"
            transcripts.parent.mkdir(parents=True, exist_ok=True)
            transcripts.write_text("".join(f"{u['id']}\t{u['text']}\n" for u in written), encoding="utf-8")
            segments = []
            for u in written:
                start = 1.25 + 0.1 * u["line"]
                url = f"http://www.archive.org/download/fixture_{u['book']}/fixture_{u['book']}.mp3"
                segments.append(f"{u['id']}\t{url}\t{start:.2f}\t{start + u['segment_duration']:.6f}\n")
            (split_dir / "segments.txt").write_text("".join(segments), encoding="utf-8")
            out["transcripts"][lang][split] = transcripts
            out["utterances"][lang][split] = utts
            if split == "train":
                ids = [u["id"] for u in utts]
                nine = ids[: max(1, len(ids) - 1)]
                one = ids[: max(1, len(ids) - 2)]
                ls = split_dir / "limited_supervision"
                (ls / "9hr").mkdir(parents=True, exist_ok=True)
                (ls / "9hr" / "handles.txt").write_text("".join(f"{x}\n" for x in nine))
                for fold in range(6):
                    (ls / "1hr" / str(fold)).mkdir(parents=True, exist_ok=True)
                    fold_ids = one[fold::6]
                    (ls / "1hr" / str(fold) / "handles.txt").write_text("".join(f"{x}\n" for x in fold_ids))
                out["subsets"][lang] = {"9hr": nine, "1hr": one}
    return out
