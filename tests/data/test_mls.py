"""MLS reader: layout, formats, subsets, non-fatal problems, fatal errors, manifests, fuzzing.

Expected values come from :func:`build_mls_fixture`, which describes what it wrote to disk
independently of the reader (frames it generated, texts it chose, paths it built).
"""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_rnnt.data import mls
from sparse_rnnt.data.manifest import Utterance, read_manifest
from sparse_rnnt.data.mls import ReadReport, find_languages, read_mls, write_manifests
from sparse_rnnt.errors import UserError
from tests.data.mls_fixture import build_mls_fixture, write_audio

SPLITS = ("train", "dev", "test")


def read(root: Path, **kw: Any) -> tuple[dict[str, list[Utterance]], ReadReport]:
    kw.setdefault("progress", False)
    return read_mls(root, **kw)


def expected_rows(fx: dict[str, Any], split: str, drop: set[tuple[str, str]] = frozenset()) -> list[tuple]:
    """(language, id, text, speaker, book, audio) sorted by (language, id), minus ``drop``."""
    rows = [
        (lang, u["id"], u["text"], u["speaker"], u["book"], u["audio"])
        for lang, by_split in fx["utterances"].items()
        for u in by_split.get(split, [])
        if (lang, u["id"]) not in drop
    ]
    return sorted(rows)


def rows(utts: list[Utterance]) -> list[tuple]:
    return [(u.language, u.id, u.text, u.speaker, u.book, u.audio) for u in utts]


def fixture_utt(fx: dict[str, Any], lang: str, split: str, id_: str) -> dict[str, Any]:
    return next(u for u in fx["utterances"][lang][split] if u["id"] == id_)


def assert_matches_fixture(out: dict[str, list[Utterance]], fx: dict[str, Any], drop=frozenset()) -> None:
    rate = fx["sample_rate"]
    for split in SPLITS:
        assert rows(out[split]) == expected_rows(fx, split, drop)
        for u in out[split]:
            ref = fixture_utt(fx, u.language, split, u.id)
            assert u.split == split
            assert abs(u.duration - ref["frames"] / rate) < 1e-6
            assert Path(u.audio).is_absolute()


# ---------------------------------------------------------------------------------------------
# Happy path


def test_reads_fixture_exactly(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus", per_split=4)
    out, report = read(fx["root"])
    assert set(out) == set(SPLITS)
    assert_matches_fixture(out, fx)
    # Transcripts are written in reverse id order: output must still be sorted (language, id).
    for split in SPLITS:
        keys = [(u.language, u.id) for u in out[split]]
        assert keys == sorted(keys) and len(keys) == 8
    # Durations come from the audio header, not segments.txt (which the fixture makes 0.5 s longer).
    u = out["dev"][0]
    assert abs(u.duration - fixture_utt(fx, u.language, "dev", u.id)["segment_duration"]) > 0.4
    assert report.num_ok == 24 and report.num_problems == 0
    assert report.messages == [] and report.num_messages == 0
    for lang in ("en", "fr"):
        for split in SPLITS:
            c = report.counts[lang][split]
            assert (c.ok, c.excluded, c.problems) == (4, 0, {})


def test_colliding_ids_across_languages_are_kept_apart(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus", languages=("fr", "en"))
    out, _ = read(fx["root"])
    train = out["train"]
    en = {u.id: u for u in train if u.language == "en"}
    fr = {u.id: u for u in train if u.language == "fr"}
    assert set(en) == set(fr) == {u["id"] for u in fx["utterances"]["en"]["train"]}
    for id_ in en:
        assert en[id_].key == f"en/{id_}" and fr[id_].key == f"fr/{id_}"
        assert en[id_].audio != fr[id_].audio
        assert "/mls_english/" in en[id_].audio and "/mls_french/" in fr[id_].audio
        assert en[id_].text == fixture_utt(fx, "en", "train", id_)["text"]
        assert fr[id_].text == fixture_utt(fx, "fr", "train", id_)["text"]
    assert len({u.key for u in train}) == len(train) == 6


def test_opus_variant(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus", fmt="opus")
    assert all(d.name.endswith("_opus") for d in fx["dirs"].values())
    out, report = read(fx["root"])
    assert_matches_fixture(out, fx)
    assert all(u.audio.endswith(".opus") for s in SPLITS for u in out[s])
    assert report.num_problems == 0


def test_flac_and_opus_dirs_for_one_language(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    flac = build_mls_fixture(root, languages=("en",), fmt="flac")
    opus = build_mls_fixture(root, languages=("en",), fmt="opus")
    assert find_languages(root) == {"en": flac["dirs"]["en"]}
    assert find_languages(root, fmt="opus") == {"en": opus["dirs"]["en"]}
    for fmt, fx in ((None, flac), ("flac", flac), ("opus", opus)):
        out, _ = read(root, fmt=fmt)
        assert_matches_fixture(out, fx)


def test_mixed_formats_and_opus_files_in_plain_dir(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    en = build_mls_fixture(root, languages=("en",), fmt="flac")
    fr = build_mls_fixture(root, languages=("fr",), fmt="opus")
    out, _ = read(root)
    assert {Path(u.audio).suffix for u in out["dev"] if u.language == "fr"} == {".opus"}
    assert {Path(u.audio).suffix for u in out["dev"] if u.language == "en"} == {".flac"}
    assert rows(out["dev"]) == sorted(expected_rows(en, "dev") + expected_rows(fr, "dev"))
    # .opus files inside a plain mls_<name> folder (no _opus suffix) are found as well.
    (fr["dirs"]["fr"]).rename(root / "mls_french")
    out, report = read(root, languages=["fr"])
    assert report.num_problems == 0 and len(out["dev"]) == 3
    assert all("/mls_french/" in u.audio and u.audio.endswith(".opus") for u in out["dev"])


def test_find_languages_ignores_other_entries(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus", languages=("nl", "it"), splits=("dev",))
    root = fx["root"]
    (root / "mls_klingon").mkdir()
    (root / "notes").mkdir()
    (root / "mls_german").write_text("a file, not a language folder")
    assert find_languages(root) == {"it": root / "mls_italian", "nl": root / "mls_dutch"}
    assert list(find_languages(root)) == ["it", "nl"]


def test_language_selection_accepts_names_and_codes(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus", languages=("en", "fr", "nl"), splits=("dev",))
    out, report = read(fx["root"], languages=["dutch", "en"], splits=("dev",))
    assert {u.language for u in out["dev"]} == {"en", "nl"}
    assert set(report.counts) == {"en", "nl"}
    assert list(out) == ["dev"]


@pytest.mark.parametrize("subset", ["9hr", "1hr"])
def test_limited_supervision_subsets(tmp_path: Path, subset: str) -> None:
    fx = build_mls_fixture(tmp_path / "corpus", per_split=4)
    out, report = read(fx["root"], subset=subset)
    for lang in ("en", "fr"):
        want = sorted(fx["subsets"][lang][subset])
        assert [u.id for u in out["train"] if u.language == lang] == want
        assert report.counts[lang]["train"].excluded == 4 - len(want)
    assert len(fx["subsets"]["en"]["9hr"]) == 3 and len(fx["subsets"]["en"]["1hr"]) == 2
    # dev and test are untouched by the train subset.
    assert rows(out["dev"]) == expected_rows(fx, "dev")
    assert rows(out["test"]) == expected_rows(fx, "test")
    assert report.num_problems == 0


def test_subset_handle_missing_from_transcripts_is_counted(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus", languages=("en",), per_split=4)
    handles = fx["dirs"]["en"] / "train" / "limited_supervision" / "9hr" / "handles.txt"
    with handles.open("a") as f:
        f.write("9999_1_000001\n")
    out, report = read(fx["root"], subset="9hr")
    assert [u.id for u in out["train"]] == sorted(fx["subsets"]["en"]["9hr"])
    assert report.counts["en"]["train"].problems == {"unknown_handle": 1}
    assert report.messages[0].startswith(f"{handles}:4: ")
    assert "9999_1_000001" in report.messages[0]


def test_check_audio_false_uses_segments_and_still_finds_missing_files(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus", languages=("en",))
    dev = fx["utterances"]["en"]["dev"]
    Path(dev[0]["audio"]).write_bytes(b"garbage, not audio")  # not detected without header reads
    Path(dev[1]["audio"]).unlink()
    out, report = read(fx["root"], check_audio=False)
    got = {u.id: u.duration for u in out["dev"]}
    assert set(got) == {dev[0]["id"], dev[2]["id"]}
    for u in (dev[0], dev[2]):
        assert got[u["id"]] == pytest.approx(u["segment_duration"], abs=2e-6)
    assert report.counts["en"]["dev"].problems == {"missing_audio": 1}


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fx = build_mls_fixture(tmp_path / "corpus", languages=("en",), splits=("dev",))
    read_mls(fx["root"], splits=("dev",), progress=True)
    captured = capsys.readouterr()
    assert "MLS audio" in captured.err and "3/3" in captured.err
    read_mls(fx["root"], splits=("dev",), progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# Non-fatal problems: each skips exactly one utterance (or one extra line), counted, with file:line


def _audio_of(fx: dict[str, Any], split: str = "train", index: int = 1) -> tuple[str, dict[str, Any]]:
    u = fx["utterances"]["fr"][split][index]
    return u["audio"], u


def _replace_with(path: str, wave: np.ndarray, rate: int, file_format: str) -> None:
    sf.write(path, wave, rate, format=file_format, subtype="PCM_16")


def _mutate_audio(kind: str, fx: dict[str, Any]) -> dict[str, Any]:
    audio, u = _audio_of(fx)
    if kind == "missing":
        Path(audio).unlink()
    elif kind == "garbage":
        Path(audio).write_bytes(bytes(range(256)) * 8)
    elif kind == "empty_file":
        Path(audio).write_bytes(b"")
    elif kind == "truncated":
        data = Path(audio).read_bytes()
        Path(audio).write_bytes(data[:20])
    elif kind == "8khz":
        write_audio(Path(audio), np.zeros(2000, dtype=np.float32) + 0.1, 8000, "flac")
    elif kind == "zero_frames":
        # A valid WAV header with no samples (FLAC cannot store zero frames); libsndfile reads
        # the content, not the suffix.
        _replace_with(audio, np.zeros(0, dtype=np.float32), 16000, "WAV")
    return u


@pytest.mark.parametrize(
    ("mutation", "kind"),
    [
        ("missing", "missing_audio"),
        ("garbage", "unreadable"),
        ("empty_file", "unreadable"),
        ("truncated", "unreadable"),
        ("8khz", "wrong_rate"),
        ("zero_frames", "zero_length"),
    ],
)
def test_audio_problem_skips_one_utterance(tmp_path: Path, mutation: str, kind: str) -> None:
    fx = build_mls_fixture(tmp_path / "corpus")
    u = _mutate_audio(mutation, fx)
    out, report = read(fx["root"])
    assert_matches_fixture(out, fx, drop={("fr", u["id"])})
    assert report.counts["fr"]["train"].problems == {kind: 1}
    assert report.counts["fr"]["train"].ok == 2
    assert report.num_problems == 1 and report.num_messages == 1
    transcripts = fx["transcripts"]["fr"]["train"]
    msg = report.messages[0]
    assert msg.startswith(f"{transcripts}:{u['line']}: ")
    assert u["audio"] in msg
    if kind == "wrong_rate":
        assert "8000" in msg


def _append(path: Path, data: bytes) -> int:
    """Append ``data`` (one line, with newline); return its 1-based line number."""
    before = path.read_bytes()
    path.write_bytes(before + data)
    return before.count(b"\n") + 1


@pytest.mark.parametrize(
    ("line", "kind", "what"),
    [
        (b"1000_50_000007 no tab on this line\n", "malformed_line", "no tab separator"),
        (b"\tan empty id\n", "malformed_line", "empty id"),
        (b"chapter-one\tid without speaker and book\n", "malformed_line", "chapter-one"),
        (b"1000_50\ttoo few parts\n", "malformed_line", "1000_50"),
        (b"../1000_50_000001\tpath tricks\n", "malformed_line", "../1000_50_000001"),
        (b"1000_50_000077\t   \n", "empty_text", "1000_50_000077"),
        (b"\xff\xfe\x00garbage\tbytes\n", "malformed_line", "UTF-8"),
    ],
)
def test_malformed_line_is_skipped(tmp_path: Path, line: bytes, kind: str, what: str) -> None:
    fx = build_mls_fixture(tmp_path / "corpus")
    transcripts = fx["transcripts"]["fr"]["dev"]
    lineno = _append(transcripts, line)
    assert lineno == 4
    out, report = read(fx["root"])
    assert_matches_fixture(out, fx)  # every real utterance survives
    assert report.counts["fr"]["dev"].problems == {kind: 1}
    assert report.num_problems == 1
    assert len(report.messages) == 1 and report.messages[0].startswith(f"{transcripts}:4: ")
    assert what in report.messages[0]


def test_duplicate_id_keeps_first(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus")
    transcripts = fx["transcripts"]["en"]["test"]
    first = fx["utterances"]["en"]["test"][0]
    lineno = _append(transcripts, f"{first['id']}\tsome other words\n".encode())
    out, report = read(fx["root"])
    assert_matches_fixture(out, fx)
    kept = next(u for u in out["test"] if u.key == f"en/{first['id']}")
    assert kept.text == first["text"]
    assert report.counts["en"]["test"].problems == {"duplicate_id": 1}
    assert report.messages[0].startswith(f"{transcripts}:{lineno}: duplicate id {first['id']}")
    assert f"line {first['line']}" in report.messages[0]
    # The same id in another language (fr) is not a duplicate.
    assert f"fr/{first['id']}" in {u.key for u in out["test"]}


def test_blank_lines_crlf_and_bom_are_fine(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus", languages=("en",))
    transcripts = fx["transcripts"]["en"]["dev"]
    text = transcripts.read_text(encoding="utf-8")
    transcripts.write_bytes(("\ufeff" + text.replace("\n", "\r\n") + "\n  \n\n").encode())
    out, report = read(fx["root"])
    assert_matches_fixture(out, fx)
    assert report.num_problems == 0


def test_empty_transcripts_file(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus")
    transcripts = fx["transcripts"]["fr"]["dev"]
    transcripts.write_bytes(b"")
    out, report = read(fx["root"])
    dropped = {("fr", u["id"]) for u in fx["utterances"]["fr"]["dev"]}
    assert rows(out["dev"]) == expected_rows(fx, "dev", dropped)
    assert rows(out["train"]) == expected_rows(fx, "train")
    assert report.counts["fr"]["dev"].problems == {"empty_transcripts": 1}
    assert report.messages == [f"{transcripts}: no utterances"]


def test_split_missing_for_one_language(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus")
    shutil.rmtree(fx["dirs"]["fr"] / "test")
    out, report = read(fx["root"])
    assert rows(out["test"]) == expected_rows(fx, "test", {("fr", u["id"]) for u in fx["utterances"]["fr"]["test"]})
    assert rows(out["train"]) == expected_rows(fx, "train")
    assert report.counts["fr"]["test"].problems == {"missing_split": 1}
    assert str(fx["dirs"]["fr"] / "test" / "transcripts.txt") in report.messages[0]


def test_segments_file_is_optional(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus")
    for lang in ("en", "fr"):
        (fx["dirs"][lang] / "dev" / "segments.txt").unlink()
    (fx["dirs"]["en"] / "train" / "segments.txt").write_text("junk without tabs\n")
    out, report = read(fx["root"])
    assert_matches_fixture(out, fx)
    assert report.num_problems == 0


def test_many_problems_messages_capped_but_counted(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus", languages=("en",), splits=("dev",))
    transcripts = fx["transcripts"]["en"]["dev"]
    with transcripts.open("a") as f:
        f.writelines(f"bad line {i}\n" for i in range(1500))
    out, report = read(fx["root"], splits=("dev",))
    assert len(out["dev"]) == 3
    assert report.counts["en"]["dev"].problems == {"malformed_line": 1500}
    assert report.num_messages == 1500 and len(report.messages) == report.max_messages == 1000
    assert report.messages[0].startswith(f"{transcripts}:4: ")
    assert report.messages[-1].startswith(f"{transcripts}:1003: ")


def test_report_format_and_dict(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus")
    Path(fx["utterances"]["fr"]["train"][0]["audio"]).unlink()
    _append(fx["transcripts"]["en"]["dev"], b"no tab here\n")
    _, report = read(fx["root"])
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["totals"] == {"ok": 17, "problems": {"malformed_line": 1, "missing_audio": 1}}
    assert d["counts"]["fr"]["train"] == {"ok": 2, "excluded": 0, "problems": {"missing_audio": 1}}
    assert d["num_messages"] == 2 and len(d["messages"]) == 2
    table = report.format()
    lines = table.splitlines()
    header = lines[1].split()
    assert header == ["language", "split", "ok", "excluded", "malformed_line", "missing_audio"]
    body = {tuple(line.split()[:2]): line.split()[2:] for line in lines[2:8]}
    assert body[("fr", "train")] == ["2", "0", "0", "1"]
    assert body[("en", "dev")] == ["3", "0", "1", "0"]
    assert body[("en", "test")] == ["3", "0", "0", "0"]
    assert lines[8].split() == ["total", "17", "0", "1", "1"]
    assert all(m in table for m in report.messages)


# ---------------------------------------------------------------------------------------------
# Fatal errors


def test_fatal_root_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"MLS root not found: .*nowhere"):
        read(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        read(tmp_path / "file")
    empty = tmp_path / "empty"
    (empty / "mls_klingon" / "train").mkdir(parents=True)
    (empty / "english").mkdir()
    with pytest.raises(UserError, match=r"no MLS language directories .*empty"):
        read(empty)
    with pytest.raises(UserError, match="no MLS language directories"):
        find_languages(empty)


def test_fatal_request_errors(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus")
    root = fx["root"]
    with pytest.raises(UserError, match=r"language\(s\) it, nl not found .*\(present: en, fr\)"):
        read(root, languages=["nl", "en", "it"])
    with pytest.raises(UserError, match="unknown language 'xx'"):
        read(root, languages=["en", "xx"])
    with pytest.raises(UserError, match="unknown split 'valid'"):
        read(root, splits=("train", "valid"))
    with pytest.raises(UserError, match="unknown subset '10hr'"):
        read(root, subset="10hr")
    with pytest.raises(UserError, match="unknown audio format 'mp3'"):
        read(root, fmt="mp3")
    with pytest.raises(UserError, match="workers"):
        read(root, workers=-1)


def test_fatal_split_missing_everywhere(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus")
    for lang in ("en", "fr"):
        shutil.rmtree(fx["dirs"][lang] / "dev")
    with pytest.raises(UserError, match=r"split 'dev' not found for any language .*mls_english/dev/transcripts.txt"):
        read(fx["root"])
    out, _ = read(fx["root"], splits=("train", "test"))  # the other splits still read
    assert set(out) == {"train", "test"}


@pytest.mark.parametrize(("subset", "fold"), [("9hr", None), ("1hr", "3")])
def test_fatal_missing_handles(tmp_path: Path, subset: str, fold: str | None) -> None:
    fx = build_mls_fixture(tmp_path / "corpus")
    base = fx["dirs"]["fr"] / "train" / "limited_supervision" / subset
    handles = base / fold / "handles.txt" if fold else base / "handles.txt"
    handles.unlink()
    with pytest.raises(UserError, match=f"subset {subset!r}: handles file not found: ") as e:
        read(fx["root"], subset=subset)
    assert str(handles) in str(e.value)


# ---------------------------------------------------------------------------------------------
# Manifests and determinism


def test_write_manifests_round_trip(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus")
    Path(fx["utterances"]["en"]["dev"][2]["audio"]).unlink()
    out, report = read(fx["root"])
    parent = tmp_path / "out"
    dest = parent / "manifests"
    write_manifests(dest, out, report)
    assert sorted(p.name for p in parent.iterdir()) == ["manifests"]  # no temp dirs left
    assert sorted(p.name for p in dest.iterdir()) == ["dev.jsonl", "read_report.json", "test.jsonl", "train.jsonl"]
    for split in SPLITS:
        assert read_manifest(dest / f"{split}.jsonl") == out[split]
    assert json.loads((dest / "read_report.json").read_text()) == report.to_dict()
    assert json.loads((dest / "read_report.json").read_text())["totals"]["problems"] == {"missing_audio": 1}

    # Rewriting replaces the whole set, so a split written before and not now would be lost
    # (a run's train.jsonl, say): refused, naming the files, and nothing changes.
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(UserError, match=r"holds test\.jsonl, train\.jsonl, which this read \(splits dev\) "
                                        r"would remove"):
        write_manifests(dest, {"dev": out["dev"]}, report)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    # The same splits again (here with fewer utterances) replace them.
    write_manifests(dest, {s: out[s][:1] for s in SPLITS}, report)
    assert all(len(read_manifest(dest / f"{s}.jsonl")) == 1 for s in SPLITS)
    assert sorted(p.name for p in parent.iterdir()) == ["manifests"]


def test_write_manifests_failure_leaves_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fx = build_mls_fixture(tmp_path / "corpus", languages=("en",))
    out, report = read(fx["root"])
    parent = tmp_path / "out"
    dest = parent / "manifests"

    calls: list[Path] = []
    real = mls.write_manifest

    def failing(path: Path, utts: list[Utterance]) -> int:
        calls.append(Path(path))
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, utts)

    monkeypatch.setattr(mls, "write_manifest", failing)
    with pytest.raises(OSError, match="disk full"):
        write_manifests(dest, out, report)
    assert len(calls) == 2
    assert not parent.exists() or list(parent.iterdir()) == []  # nothing half-written

    monkeypatch.setattr(mls, "write_manifest", real)
    write_manifests(dest, out, report)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    monkeypatch.setattr(mls, "write_manifest", failing)
    calls.clear()
    with pytest.raises(OSError):
        write_manifests(dest, {"train": out["train"][:1], "dev": [], "test": []}, report)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before  # old set untouched
    assert sorted(p.name for p in parent.iterdir()) == ["manifests"]


def test_write_manifests_refuses_foreign_files(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus", languages=("en",), splits=("dev",))
    out, report = read(fx["root"], splits=("dev",))
    dest = tmp_path / "work"
    dest.mkdir()
    (dest / "tokenizer.model").write_text("precious")
    with pytest.raises(UserError, match=r"holds other files \(tokenizer.model\)"):
        write_manifests(dest, out, report)
    assert [p.name for p in dest.iterdir()] == ["tokenizer.model"]
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        write_manifests(tmp_path / "m", {"valid": []}, report)
    assert not (tmp_path / "m").exists()


def test_deterministic_across_runs_and_workers(tmp_path: Path) -> None:
    fx = build_mls_fixture(tmp_path / "corpus", languages=("fr", "en", "nl"), per_split=5)
    Path(fx["utterances"]["nl"]["train"][3]["audio"]).unlink()
    Path(fx["utterances"]["en"]["dev"][0]["audio"]).write_bytes(b"\x00" * 100)
    _append(fx["transcripts"]["en"]["train"], b"oops\n")
    _append(fx["transcripts"]["fr"]["test"], f"{fx['utterances']['fr']['test'][0]['id']}\tdup\n".encode())
    results = [read(fx["root"], workers=w) for w in (1, 4, 4, 2)]
    first_out, first_report = results[0]
    for out, report in results[1:]:
        assert out == first_out
        assert report.to_dict() == first_report.to_dict()
    # Messages follow (language, split, file, line) order.
    langs = [m.split("/mls_")[1].split("/")[0] for m in first_report.messages]
    assert langs == ["english", "english", "french", "dutch"]
    assert "/train/" in first_report.messages[0] and "/dev/" in first_report.messages[1]


# ---------------------------------------------------------------------------------------------
# Fuzzing: garbage in transcripts.txt is counted, never raised


@pytest.fixture(scope="module")
def fuzz_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_mls_fixture(tmp_path_factory.mktemp("fuzz") / "corpus", languages=("en",), splits=("dev",))


def _nonblank_lines(data: bytes) -> int:
    n = 0
    for i, raw in enumerate(data.split(b"\n")):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            n += 1
            continue
        if i == 0:
            text = text.removeprefix("\ufeff")
        n += bool(text.strip())
    return n


def _check_counts(report: ReadReport, data: bytes) -> None:
    c = report.counts["en"]["dev"]
    nonblank = _nonblank_lines(data)
    if nonblank == 0:
        assert c.problems == {"empty_transcripts": 1} and c.ok == 0
    else:
        assert c.ok + sum(c.problems.values()) == nonblank
    assert report.num_messages == sum(c.problems.values())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(fuzz_corpus: dict[str, Any], data: bytes) -> None:
    fuzz_corpus["transcripts"]["en"]["dev"].write_bytes(data)
    out, report = read(fuzz_corpus["root"], splits=("dev",))
    known = {u["id"] for u in fuzz_corpus["utterances"]["en"]["dev"]}
    assert {u.id for u in out["dev"]} <= known
    _check_counts(report, data)


_TEXT = st.text(st.characters(exclude_characters="\n", exclude_categories=("Cs",)), max_size=15)
_LINE = st.one_of(
    st.tuples(st.just("known"), st.sampled_from(["1010_50_000000", "1011_50_000001", "1010_51_000002"]), _TEXT),
    st.tuples(st.just("unknown"), st.from_regex(r"[0-9a-z-]{1,4}_[0-9]{1,3}_[0-9A-Z]{1,3}", fullmatch=True), _TEXT),
    st.tuples(st.just("raw"), st.just(""), st.text(st.characters(exclude_characters="\n\t", exclude_categories=("Cs",)), max_size=20)),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=12))
def test_fuzz_random_lines(fuzz_corpus: dict[str, Any], lines: list[tuple[str, str, str]]) -> None:
    known = {u["id"] for u in fuzz_corpus["utterances"]["en"]["dev"]}
    assert known == {"1010_50_000000", "1011_50_000001", "1010_51_000002"}
    text = "".join(f"{id_}\t{t}\n" if kind != "raw" else f"{t}\n" for kind, id_, t in lines)
    data = text.encode("utf-8")
    fuzz_corpus["transcripts"]["en"]["dev"].write_bytes(data)
    out, report = read(fuzz_corpus["root"], splits=("dev",))
    # Reference: the first known id with non-blank text wins; nothing else can have audio.
    want: dict[str, str] = {}
    for kind, id_, t in lines:
        normal = " ".join(unicodedata.normalize("NFC", t).split())  # NFC, one space between words
        if kind == "known" and normal and id_ not in want:
            want[id_] = normal
    assert {u.id: u.text for u in out["dev"]} == want
    _check_counts(report, data)


def test_cli_refuses_to_drop_a_split_before_reading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sparse_rnnt.cli import main

    dest = tmp_path / "manifests"
    dest.mkdir()
    (dest / "train.jsonl").write_text("")
    # The root does not exist: the output is checked first, so that is not what is reported.
    assert main(["data", "mls", str(tmp_path / "no-corpus"), "--out", str(dest), "--splits", "test", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds train.jsonl, which this read (splits test) would remove" in err
    assert [p.name for p in dest.iterdir()] == ["train.jsonl"]


def test_transcripts_are_nfc_with_single_spaces(tmp_path: Path) -> None:
    # NFD text and inner tabs or no-break spaces: the manifest holds what the tokenizer reads and
    # WER compares (NFC, words separated by one space).
    import unicodedata

    fx = build_mls_fixture(tmp_path / "corpus", per_split=2)
    path = fx["transcripts"]["fr"]["dev"]
    lines = path.read_text(encoding="utf-8").splitlines()
    utt_id = lines[0].split("\t")[0]
    lines[0] = f"{utt_id}\t" + unicodedata.normalize("NFD", "été\tlà\u00a0bas  ici")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out, report = read(fx["root"])
    got = next(u for u in out["dev"] if u.language == "fr" and u.id == utt_id)
    assert got.text == "été là bas ici" and report.num_problems == 0
