"""Manifests: one JSON object per utterance per line, one file per split (``<split>.jsonl``)."""

from __future__ import annotations

import json
import math
import os
import unicodedata
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
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
    text: str  # normalized lowercase transcript, Unicode NFC (read_manifest makes it so)
    speaker: str
    book: str

    @property
    def key(self) -> str:
        return f"{self.language}/{self.id}"


_FIELDS = tuple(f.name for f in fields(Utterance))
_INT_OK = ("id", "speaker", "book")  # numeric in some corpora; read as their decimal strings


def write_manifest(path: str | os.PathLike[str], utterances: Iterable[Utterance]) -> int:
    """Write utterances as JSONL atomically; return the number written."""
    lines = [json.dumps(asdict(u), ensure_ascii=False) for u in utterances]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_manifest(path: str | os.PathLike[str]) -> list[Utterance]:
    """Read a JSONL manifest (UTF-8, a leading BOM allowed); a malformed line raises
    :class:`UserError` naming file and line: not UTF-8, not a JSON object with exactly the
    :class:`Utterance` fields, a text field that is not a string (``id``, ``speaker`` and ``book``
    may be integers), a duration that is not a finite number >= 0, or an utterance key
    (``language/id``) that an earlier line already has."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: unreadable manifest ({e})") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    out: list[Utterance] = []
    first_line: dict[str, int] = {}
    for lineno, data in enumerate(raw.split(b"\n"), 1):
        try:
            line = data.decode("utf-8")
            if not line.strip():
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict) or set(obj) != set(_FIELDS):
                raise ValueError(f"expected fields {', '.join(_FIELDS)}")
            for key in _FIELDS:
                value = obj[key]
                if key == "duration":
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                            or value < 0:
                        raise ValueError(f"duration must be a finite number >= 0, got {value!r}")
                elif key in _INT_OK and isinstance(value, int) and not isinstance(value, bool):
                    continue
                elif not isinstance(value, str):
                    raise ValueError(f"{key} must be a string, got {value!r}")
            u = Utterance(**{k: (float(obj[k]) if k == "duration" else str(obj[k])) for k in _FIELDS})
            # NFC, as the tokenizer decodes: an NFD transcript (macOS tools) would otherwise never
            # equal a perfect hypothesis in WER.
            u = replace(u, text=unicodedata.normalize("NFC", u.text))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start})") from None
        except (ValueError, TypeError) as e:
            raise UserError(f"{path}:{lineno}: malformed manifest line ({e})") from None
        if u.key in first_line:
            raise UserError(f"{path}:{lineno}: utterance {u.key} is already on line {first_line[u.key]} "
                            "(ids must be unique within a language)")
        first_line[u.key] = lineno
        out.append(u)
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
