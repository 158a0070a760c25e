"""Manifests: one JSON object per utterance per line, one file per split (``<split>.jsonl``)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write_text

SPLITS: tuple[str, ...] = ("train", "dev", "test")


@dataclass(frozen=True)
class Utterance:
    """One utterance. ``id`` is unique only within a language: use :attr:`key` across languages."""

    id: str
    language: str  # ISO code: en, fr, it, nl, ...
    split: str
    audio: str  # absolute path to the audio file
    duration: float  # seconds
    text: str  # normalized lowercase transcript
    speaker: str
    book: str

    @property
    def key(self) -> str:
        return f"{self.language}/{self.id}"


_FIELDS = tuple(f.name for f in fields(Utterance))


def write_manifest(path: str | os.PathLike[str], utterances: Iterable[Utterance]) -> int:
    """Write utterances as JSONL atomically; return the number written."""
    lines = [json.dumps(asdict(u), ensure_ascii=False) for u in utterances]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_manifest(path: str | os.PathLike[str]) -> list[Utterance]:
    """Read a JSONL manifest; a malformed line raises :class:`UserError` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    out: list[Utterance] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict) or set(obj) != set(_FIELDS):
                    raise ValueError(f"expected fields {', '.join(_FIELDS)}")
                out.append(
                    Utterance(
                        id=str(obj["id"]),
                        language=str(obj["language"]),
                        split=str(obj["split"]),
                        audio=str(obj["audio"]),
                        duration=float(obj["duration"]),
                        text=str(obj["text"]),
                        speaker=str(obj["speaker"]),
                        book=str(obj["book"]),
                    )
                )
            except (ValueError, TypeError) as e:
                raise UserError(f"{path}:{lineno}: malformed manifest line ({e})") from None
    return out


def manifest_path(manifest_dir: str | os.PathLike[str], split: str) -> Path:
    return Path(manifest_dir) / f"{split}.jsonl"


def load_split(
    manifest_dir: str | os.PathLike[str], split: str, languages: Iterable[str] | None = None
) -> list[Utterance]:
    """Utterances of one split, optionally restricted to ``languages``."""
    utts = read_manifest(manifest_path(manifest_dir, split))
    if languages is not None:
        keep = set(languages)
        utts = [u for u in utts if u.language in keep]
    return utts


def cap_per_language(utterances: Iterable[Utterance], cap: int) -> list[Utterance]:
    """The first ``cap`` utterances of each language, in order (``cap <= 0``: all of them)."""
    utts = list(utterances)
    if cap <= 0:
        return utts
    seen: dict[str, int] = {}
    out = []
    for u in utts:
        if seen.get(u.language, 0) < cap:
            out.append(u)
            seen[u.language] = seen.get(u.language, 0) + 1
    return out
