"""Multilingual LibriSpeech reader: the on-disk MLS layout -> :class:`Utterance` lists and manifests.

Layout (real MLS and our synthesizer alike)::

    ROOT/mls_<name>[_opus]/<split>/transcripts.txt          <id>\\t<lowercase text>
    ROOT/mls_<name>[_opus]/<split>/segments.txt             <id>\\t<url>\\t<start>\\t<end> (optional)
    ROOT/mls_<name>[_opus]/<split>/audio/<spk>/<book>/<spk>_<book>_<utt>.flac|.opus
    ROOT/mls_<name>[_opus]/train/limited_supervision/9hr/handles.txt
    ROOT/mls_<name>[_opus]/train/limited_supervision/1hr/{0..5}/handles.txt

Bad data is never fatal: a broken line or audio file skips that one utterance and is counted in
a :class:`ReadReport` with a ``file:line: what`` message. Only bad *requests* (missing root,
unknown language, missing split everywhere, bad subset...) raise :class:`UserError`.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from ..errors import UserError
from ..io import atomic_path, atomic_write_json
from ..languages import MLS_CODES, parse_languages
from .audio import SAMPLE_RATE, AudioError, audio_info
from .manifest import SPLITS, Utterance, write_manifest

AUDIO_FORMATS: tuple[str, ...] = ("flac", "opus")
SUBSETS: tuple[str, ...] = ("9hr", "1hr")
NUM_1HR_FOLDS = 6
REPORT_NAME = "read_report.json"

# Problem kinds (each skips one utterance unless noted).
MISSING_AUDIO = "missing_audio"
MALFORMED_LINE = "malformed_line"  # no tab, empty id, id not <spk>_<book>_<utt>, not UTF-8
EMPTY_TEXT = "empty_text"
DUPLICATE_ID = "duplicate_id"  # second and later occurrences within one language + split
WRONG_RATE = "wrong_rate"
UNREADABLE = "unreadable"  # corrupt, truncated or empty audio file
ZERO_LENGTH = "zero_length"  # a valid header with no samples
MISSING_SPLIT = "missing_split"  # transcripts.txt absent for this language (others have it)
UNREADABLE_TRANSCRIPTS = "unreadable_transcripts"
EMPTY_TRANSCRIPTS = "empty_transcripts"  # transcripts.txt without a single non-blank line
UNKNOWN_HANDLE = "unknown_handle"  # a subset handle absent from transcripts.txt (skips nothing)
MALFORMED_SEGMENT = "malformed_segment"  # only read when check_audio=False (skips nothing)

# Real MLS ids are digits; letters and '-' are allowed for synthesized corpora. No '/', '.', or
# whitespace can get through, so speaker and book are safe path components.
_ID_RE = re.compile(r"([0-9A-Za-z-]+)_([0-9A-Za-z-]+)_([0-9A-Za-z-]+)")
_DIR_RE = re.compile(r"mls_([a-z]+?)(_opus)?")
_CHUNK = 4096  # futures in flight per chunk: bounds memory on millions of files

_T = TypeVar("_T")
_R = TypeVar("_R")


# --------------------------------------------------------------------------------------------
# Report


@dataclass
class SplitCounts:
    """Outcome counts of one language + split."""

    ok: int = 0
    excluded: int = 0  # valid lines left out because they are not in the requested subset
    problems: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "excluded": self.excluded, "problems": dict(sorted(self.problems.items()))}


@dataclass
class ReadReport:
    """What :func:`read_mls` kept and skipped, per language and split.

    ``messages`` keeps the first ``max_messages`` problem messages (``file:line: what``);
    ``num_messages`` counts all of them.
    """

    root: str = ""
    subset: str | None = None
    counts: dict[str, dict[str, SplitCounts]] = field(default_factory=dict)  # language -> split
    messages: list[str] = field(default_factory=list)
    num_messages: int = 0
    max_messages: int = 1000

    def split_counts(self, language: str, split: str) -> SplitCounts:
        return self.counts.setdefault(language, {}).setdefault(split, SplitCounts())

    def add_problem(self, language: str, split: str, kind: str, message: str) -> None:
        problems = self.split_counts(language, split).problems
        problems[kind] = problems.get(kind, 0) + 1
        self.num_messages += 1
        if len(self.messages) < self.max_messages:
            self.messages.append(message)

    def problem_totals(self) -> dict[str, int]:
        """Problems by kind over all languages and splits."""
        out: dict[str, int] = {}
        for by_split in self.counts.values():
            for c in by_split.values():
                for kind, n in c.problems.items():
                    out[kind] = out.get(kind, 0) + n
        return dict(sorted(out.items()))

    @property
    def num_ok(self) -> int:
        return sum(c.ok for by_split in self.counts.values() for c in by_split.values())

    @property
    def num_problems(self) -> int:
        return sum(self.problem_totals().values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``read_report.json`` written beside the manifests)."""
        return {
            "root": self.root,
            "subset": self.subset,
            "counts": {
                lang: {split: c.to_dict() for split, c in by_split.items()}
                for lang, by_split in sorted(self.counts.items())
            },
            "totals": {"ok": self.num_ok, "problems": self.problem_totals()},
            "messages": list(self.messages),
            "num_messages": self.num_messages,
        }

    def format(self, max_messages: int = 20) -> str:
        """Human summary: one row per language and split, then the first problem messages."""
        kinds = list(self.problem_totals())
        header = ["language", "split", "ok", "excluded", *kinds]
        rows: list[list[str]] = []
        for lang, by_split in sorted(self.counts.items()):
            for split in sorted(by_split, key=_split_order):
                c = by_split[split]
                rows.append([lang, split, str(c.ok), str(c.excluded), *(str(c.problems.get(k, 0)) for k in kinds)])
        excluded = sum(c.excluded for by_split in self.counts.values() for c in by_split.values())
        totals = self.problem_totals()
        rows.append(["total", "", str(self.num_ok), str(excluded), *(str(totals[k]) for k in kinds)])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def fmt_row(r: list[str]) -> str:
            return "  ".join(s.ljust(w) if i < 2 else s.rjust(w) for i, (s, w) in enumerate(zip(r, widths, strict=True)))

        title = f"MLS read report: {self.root}" + (f" (train subset {self.subset})" if self.subset else "")
        lines = [title, fmt_row(header), *(fmt_row(r) for r in rows)]
        if self.num_messages:
            shown = self.messages[:max_messages]
            lines.append(f"{self.num_problems} problem(s); first {len(shown)} of {self.num_messages} message(s):")
            lines.extend(f"  {m}" for m in shown)
        else:
            lines.append("no problems")
        return "\n".join(lines)


def _split_order(split: str) -> int:
    return SPLITS.index(split) if split in SPLITS else len(SPLITS)


# --------------------------------------------------------------------------------------------
# Discovery


def _scan_language_dirs(root: Path) -> dict[str, dict[str, Path]]:
    """ISO code -> {"flac"|"opus": directory}; fatal if root is missing or holds no MLS language."""
    if not root.exists():
        raise UserError(f"MLS root not found: {root}")
    if not root.is_dir():
        raise UserError(f"MLS root is not a directory: {root}")
    found: dict[str, dict[str, Path]] = {}
    for entry in sorted(root.iterdir()):
        m = _DIR_RE.fullmatch(entry.name)
        if m is None or m.group(1) not in MLS_CODES or not entry.is_dir():
            continue
        found.setdefault(MLS_CODES[m.group(1)], {})["opus" if m.group(2) else "flac"] = entry
    if not found:
        raise UserError(
            f"no MLS language directories (mls_<language>[_opus], e.g. mls_english) under {root}"
        )
    return dict(sorted(found.items()))


def _check_fmt(fmt: str | None) -> None:
    if fmt is not None and fmt not in AUDIO_FORMATS:
        raise UserError(f"unknown audio format {fmt!r}: choose from {', '.join(AUDIO_FORMATS)}")


def find_languages(root: str | os.PathLike[str], fmt: str | None = None) -> dict[str, Path]:
    """ISO code -> language directory under ``root``, sorted by code.

    Both ``mls_<name>`` and ``mls_<name>_opus`` count. When a language has both, the flac one
    wins unless ``fmt="opus"``. Raises :class:`UserError` if ``root`` is missing or holds none.
    """
    _check_fmt(fmt)
    return _pick_dirs(_scan_language_dirs(_absolute(root)), fmt)


def _pick_dirs(found: dict[str, dict[str, Path]], fmt: str | None) -> dict[str, Path]:
    order = ("opus", "flac") if fmt == "opus" else ("flac", "opus")
    return {code: next(by_fmt[f] for f in order if f in by_fmt) for code, by_fmt in found.items()}


def _absolute(path: str | os.PathLike[str]) -> Path:
    # abspath, not resolve(): keep the user's symlinks, drop '..'.
    return Path(os.path.abspath(Path(path).expanduser()))


# --------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True, slots=True)
class _Problem:
    language: str
    split: str
    file: str
    line: int  # 0 for problems about a whole file
    kind: str
    message: str

    def sort_key(self) -> tuple[str, int, str, int]:
        return (self.language, _split_order(self.split), self.file, self.line)


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A well-formed transcript line whose audio is still to be found and checked."""

    language: str
    split: str
    id: str
    text: str
    speaker: str
    book: str
    file: str  # transcripts.txt
    line: int
    audio_dir: Path
    exts: tuple[str, ...]  # audio suffixes to try, preferred first

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class _Parsed:
    candidates: list[_Candidate] = field(default_factory=list)
    problems: list[_Problem] = field(default_factory=list)
    excluded: int = 0
    all_ids: set[str] = field(default_factory=set)  # every id field seen, valid or not


def _read_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) per physical line; text is None where the bytes are not UTF-8.

    Lines are split on b"\\n" only, so numbers match ``sed -n Np`` even with odd separators.
    """
    data = path.read_bytes()
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield lineno, None
            continue
        yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line


def _parse_transcripts(
    path: Path, language: str, split: str, keep: set[str] | None, exts: tuple[str, ...]
) -> _Parsed:
    out = _Parsed()

    def problem(lineno: int, kind: str, what: str) -> None:
        where = f"{path}:{lineno}" if lineno else str(path)
        out.problems.append(_Problem(language, split, str(path), lineno, kind, f"{where}: {what}"))

    try:
        lines = list(_read_lines(path))
    except OSError as e:
        problem(0, UNREADABLE_TRANSCRIPTS, f"cannot read ({e.strerror or e})")
        return out
    first_line: dict[str, int] = {}
    nonblank = 0
    audio_root = path.parent / "audio"
    for lineno, line in lines:
        if line is None:
            nonblank += 1
            problem(lineno, MALFORMED_LINE, "not valid UTF-8")
            continue
        if not line.strip():
            continue
        nonblank += 1
        raw_id, tab, raw_text = line.partition("\t")
        # NFC and single spaces: the transcript as the tokenizer reads it and WER compares it.
        utt_id, text = raw_id.strip(), " ".join(unicodedata.normalize("NFC", raw_text).split())
        if tab:
            out.all_ids.add(utt_id)
        m = _ID_RE.fullmatch(utt_id)
        if not tab:
            problem(lineno, MALFORMED_LINE, "no tab separator")
        elif not utt_id:
            problem(lineno, MALFORMED_LINE, "empty id")
        elif m is None:
            problem(lineno, MALFORMED_LINE, f"id {utt_id!r} is not <speaker>_<book>_<utterance>")
        elif not text:
            problem(lineno, EMPTY_TEXT, f"empty text for {utt_id}")
        elif utt_id in first_line:
            problem(lineno, DUPLICATE_ID, f"duplicate id {utt_id} (first on line {first_line[utt_id]})")
        else:
            first_line[utt_id] = lineno
            if keep is not None and utt_id not in keep:
                out.excluded += 1
                continue
            speaker, book = m.group(1), m.group(2)
            out.candidates.append(
                _Candidate(
                    language=language,
                    split=split,
                    id=utt_id,
                    text=text,
                    speaker=speaker,
                    book=book,
                    file=str(path),
                    line=lineno,
                    audio_dir=audio_root / speaker / book,
                    exts=exts,
                )
            )
    if nonblank == 0:
        problem(0, EMPTY_TRANSCRIPTS, "no utterances")
    return out


def _handles_files(split_dir: Path, subset: str) -> list[Path]:
    base = split_dir / "limited_supervision" / subset
    if subset == "9hr":
        return [base / "handles.txt"]
    return [base / str(k) / "handles.txt" for k in range(NUM_1HR_FOLDS)]


def _read_handles(split_dir: Path, subset: str) -> dict[str, tuple[Path, int]]:
    """Utterance id -> (handles file, line) of the subset; fatal if a handles file is missing."""
    handles: dict[str, tuple[Path, int]] = {}
    for path in _handles_files(split_dir, subset):
        if not path.is_file():
            raise UserError(f"subset {subset!r}: handles file not found: {path}")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"subset {subset!r}: cannot read {path} ({e.strerror or e})") from None
        for lineno, raw in enumerate(data.decode("utf-8", errors="replace").split("\n"), 1):
            utt_id = raw.strip().removeprefix("\ufeff")
            if utt_id:
                handles.setdefault(utt_id, (path, lineno))
    return handles


def _read_segment_durations(path: Path, language: str, split: str) -> tuple[dict[str, float], list[_Problem]]:
    """id -> end - start from segments.txt (optional file; bad lines are counted, not fatal)."""
    durations: dict[str, float] = {}
    problems: list[_Problem] = []
    if not path.is_file():
        return durations, problems
    try:
        lines = list(_read_lines(path))
    except OSError:
        return durations, problems
    for lineno, line in lines:
        if line is not None and not line.strip():
            continue
        parts = line.strip().split("\t") if line is not None else []
        try:
            if len(parts) != 4:
                raise ValueError
            start, end = float(parts[2]), float(parts[3])
            if not (0.0 <= start <= end < float("inf")):
                raise ValueError
        except ValueError:
            msg = f"{path}:{lineno}: expected <id>\\t<url>\\t<start>\\t<end> with 0 <= start <= end"
            problems.append(_Problem(language, split, str(path), lineno, MALFORMED_SEGMENT, msg))
            continue
        durations.setdefault(parts[0].strip(), end - start)
    return durations, problems


# --------------------------------------------------------------------------------------------
# Audio checks


@dataclass(frozen=True, slots=True)
class _Checked:
    audio: str | None  # None: skipped
    duration: float
    kind: str
    message: str


def _check_audio(c: _Candidate, read_header: bool) -> _Checked:
    """Find the audio file of ``c`` and (optionally) validate its header. Never raises."""
    try:
        path = next((p for p in (c.audio_dir / f"{c.id}.{e}" for e in c.exts) if p.is_file()), None)
    except OSError as e:  # e.g. permission denied on a directory
        return _Checked(None, 0.0, UNREADABLE, f"{c.where}: {c.audio_dir}: {e.strerror or e}")
    if path is None:
        alt = "".join(f" (or .{e})" for e in c.exts[1:])
        missing = c.audio_dir / f"{c.id}.{c.exts[0]}"
        return _Checked(None, 0.0, MISSING_AUDIO, f"{c.where}: audio file not found: {missing}{alt}")
    if not read_header:
        return _Checked(str(path), 0.0, "", "")
    try:
        info = audio_info(path)
    except AudioError as e:
        return _Checked(None, 0.0, UNREADABLE, f"{c.where}: {e}")
    if info.sample_rate != SAMPLE_RATE:
        what = f"sample rate {info.sample_rate} Hz, expected {SAMPLE_RATE} Hz"
        return _Checked(None, 0.0, WRONG_RATE, f"{c.where}: {path}: {what}")
    if info.frames <= 0:
        return _Checked(None, 0.0, ZERO_LENGTH, f"{c.where}: {path}: no audio samples")
    return _Checked(str(path), info.duration, "", "")


def _ordered_map(fn: Callable[[_T], _R], items: list[_T], workers: int) -> Iterator[_R]:
    """``map`` in input order on ``workers`` threads (header reads are I/O-bound)."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        it = iter(items)
        while chunk := list(islice(it, _CHUNK)):
            yield from pool.map(fn, chunk)


# --------------------------------------------------------------------------------------------
# Public entry points


def _check_splits(splits: Iterable[str]) -> list[str]:
    if isinstance(splits, str):
        splits = (splits,)
    out: list[str] = []
    for s in splits:
        if s not in SPLITS:
            raise UserError(f"unknown split {s!r}: choose from {', '.join(SPLITS)}")
        if s not in out:
            out.append(s)
    if not out:
        raise UserError("no split given")
    return out


def read_mls(
    root: str | os.PathLike[str],
    languages: list[str] | None = None,
    splits: tuple[str, ...] = ("train", "dev", "test"),
    *,
    subset: str | None = None,
    fmt: str | None = None,
    check_audio: bool = True,
    workers: int = 0,
    progress: bool = True,
) -> tuple[dict[str, list[Utterance]], ReadReport]:
    """Read an MLS-layout corpus.

    Args:
        root: folder holding ``mls_<name>`` / ``mls_<name>_opus`` language folders.
        languages: ISO codes or MLS names; ``None`` means every language found.
        splits: which of train/dev/test to read.
        subset: ``"9hr"`` or ``"1hr"`` (union of the six folds) restricts the *train* split to
            the ids in ``train/limited_supervision/.../handles.txt``.
        fmt: preferred audio format, ``"flac"`` (default) or ``"opus"``; picks the folder when a
            language has both and the suffix tried first (the other one is the fallback).
        check_audio: read each header (rate, length, duration). When False, files are only
            checked to exist and ``duration`` comes from segments.txt (0.0 where it has none).
        workers: threads for the file checks; 0 means ``min(8, cpu_count)``.
        progress: show a tqdm bar on stderr.

    Returns:
        ``(split -> utterances of all languages sorted by (language, id), report)``; every
        requested split is a key. Bad lines/files are skipped and counted in the report.

    Raises:
        UserError: missing root, no language folder, unknown or absent language, unknown
            split, a split absent for every language, bad subset or fmt, missing handles file.
    """
    _check_fmt(fmt)
    if subset is not None and subset not in SUBSETS:
        raise UserError(f"unknown subset {subset!r}: choose from {', '.join(SUBSETS)}")
    if workers < 0:
        raise UserError(f"workers must be >= 0, got {workers}")
    split_list = _check_splits(splits)
    root_path = _absolute(root)
    lang_dirs = _pick_dirs(_scan_language_dirs(root_path), fmt)
    if languages is None:
        langs = list(lang_dirs)
    else:
        langs = sorted(parse_languages(languages))
        absent = [code for code in langs if code not in lang_dirs]
        if absent:
            raise UserError(
                f"language(s) {', '.join(absent)} not found under {root_path} "
                f"(present: {', '.join(lang_dirs)})"
            )
    exts = ("opus", "flac") if fmt == "opus" else ("flac", "opus")

    for split in split_list:
        if not any((lang_dirs[code] / split / "transcripts.txt").is_file() for code in langs):
            looked = ", ".join(str(lang_dirs[code] / split / "transcripts.txt") for code in langs)
            raise UserError(f"split {split!r} not found for any language (looked for {looked})")

    report = ReadReport(root=str(root_path), subset=subset)
    problems: list[_Problem] = []
    candidates: list[_Candidate] = []
    seg_durations: dict[tuple[str, str, str], float] = {}
    for code in langs:
        for split in split_list:
            counts = report.split_counts(code, split)
            split_dir = lang_dirs[code] / split
            transcripts = split_dir / "transcripts.txt"
            if not transcripts.is_file():
                problems.append(
                    _Problem(code, split, str(transcripts), 0, MISSING_SPLIT, f"{transcripts}: not found")
                )
                continue
            handles = _read_handles(split_dir, subset) if subset and split == "train" else None
            parsed = _parse_transcripts(
                transcripts, code, split, set(handles) if handles is not None else None, exts
            )
            counts.excluded += parsed.excluded
            problems.extend(parsed.problems)
            candidates.extend(parsed.candidates)
            for utt_id, (hpath, hline) in (handles or {}).items():
                if utt_id not in parsed.all_ids:
                    msg = f"{hpath}:{hline}: id {utt_id!r} is not in {transcripts}"
                    problems.append(_Problem(code, split, str(hpath), hline, UNKNOWN_HANDLE, msg))
            if not check_audio:
                durs, seg_problems = _read_segment_durations(split_dir / "segments.txt", code, split)
                problems.extend(seg_problems)
                seg_durations.update({(code, split, k): v for k, v in durs.items()})

    n_workers = workers or min(8, os.cpu_count() or 1)
    results = _ordered_map(lambda c: _check_audio(c, check_audio), candidates, n_workers)
    out: dict[str, list[Utterance]] = {split: [] for split in split_list}
    bar = tqdm(results, total=len(candidates), desc="MLS audio", unit="file", disable=not progress)
    for c, r in zip(candidates, bar, strict=True):
        if r.audio is None:
            problems.append(_Problem(c.language, c.split, c.file, c.line, r.kind, r.message))
            continue
        duration = r.duration if check_audio else seg_durations.get((c.language, c.split, c.id), 0.0)
        out[c.split].append(
            Utterance(
                id=c.id,
                language=c.language,
                split=c.split,
                audio=r.audio,
                duration=duration,
                text=c.text,
                speaker=c.speaker,
                book=c.book,
            )
        )
        report.split_counts(c.language, c.split).ok += 1

    problems.sort(key=_Problem.sort_key)  # stable: messages in file and line order
    for p in problems:
        report.add_problem(p.language, p.split, p.kind, p.message)
    for utts in out.values():
        utts.sort(key=lambda u: (u.language, u.id))
    return out, report


def check_manifest_output(out_dir: str | os.PathLike[str], splits: Sequence[str]) -> None:
    """Refuse an ``out_dir`` that :func:`write_manifests` of ``splits`` may not replace: not a
    directory, holding files other than manifests and a report, or holding a split's manifest
    that this write would drop (``UserError``). Called before the reading work, and again by
    :func:`write_manifests`."""
    out = _absolute(out_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"manifest output {out} exists and is not a directory")
    owned = {f"{s}.jsonl" for s in SPLITS} | {REPORT_NAME}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in owned)
    if foreign:
        raise UserError(
            f"manifest output {out} holds other files ({', '.join(foreign[:5])}); "
            "choose an empty folder or one holding only manifests"
        )
    # The folder is replaced whole: a split read before and not now would be lost.
    dropped = sorted(s for s in SPLITS if (out / f"{s}.jsonl").exists() and s not in splits)
    if dropped:
        raise UserError(
            f"manifest output {out} holds {', '.join(f'{s}.jsonl' for s in dropped)}, which this read "
            f"(splits {', '.join(splits) or 'none'}) would remove; read those splits too "
            "(--splits) or choose another folder"
        )


def write_manifests(
    out_dir: str | os.PathLike[str], utterances: dict[str, list[Utterance]], report: ReadReport
) -> None:
    """Write ``out_dir/<split>.jsonl`` per split and ``out_dir/read_report.json``, atomically.

    Everything is built in a temporary folder beside ``out_dir`` and swapped in whole, so a
    failure leaves the previous ``out_dir`` (or nothing) in place. An existing ``out_dir`` is
    replaced only if it holds nothing but manifests and a report (so no unrelated file is lost).
    """
    out = _absolute(out_dir)
    for split, utts in utterances.items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
        wrong = next((u for u in utts if u.split != split), None)
        if wrong is not None:
            raise ValueError(f"utterance {wrong.key} has split {wrong.split!r} but is listed under {split!r}")
    check_manifest_output(out, list(utterances))
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for split, utts in utterances.items():
            write_manifest(tmp / f"{split}.jsonl", utts)
        atomic_write_json(tmp / REPORT_NAME, report.to_dict())
