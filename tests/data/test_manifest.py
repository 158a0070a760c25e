import pytest

from sparse_rnnt.data.manifest import Utterance, cap_per_language, read_manifest, write_manifest
from sparse_rnnt.errors import UserError


def _u(i, lang):
    return Utterance(id=f"1_2_{i:06d}", language=lang, split="dev", audio=f"/a/{i}.flac", duration=1.0 + i,
                     text="é l'a", speaker="1", book="2")


def test_round_trip_and_key(tmp_path):
    utts = [_u(0, "en"), _u(0, "fr"), _u(1, "en")]
    assert write_manifest(tmp_path / "dev.jsonl", utts) == 3
    assert read_manifest(tmp_path / "dev.jsonl") == utts
    assert [u.key for u in utts] == ["en/1_2_000000", "fr/1_2_000000", "en/1_2_000001"]


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "m.jsonl"
    write_manifest(p, [_u(0, "en")])
    p.write_text(p.read_text() + '{"id": "x"}\n')
    with pytest.raises(UserError, match=r"m\.jsonl:2: malformed"):
        read_manifest(p)
    with pytest.raises(UserError, match="not found"):
        read_manifest(tmp_path / "none.jsonl")


def test_cap_per_language_keeps_order():
    utts = [_u(0, "en"), _u(1, "fr"), _u(2, "en"), _u(3, "en"), _u(4, "fr")]
    assert [u.id[-1] for u in cap_per_language(utts, 2)] == ["0", "1", "2", "4"]
    assert cap_per_language(utts, 0) == utts


def _line(**changes):
    import json

    obj = {"id": "u1", "language": "en", "split": "train", "audio": "/a/1.flac", "duration": 1.5,
           "text": "the cat", "speaker": "1", "book": "2", **changes}
    return json.dumps(obj, ensure_ascii=False)


@pytest.mark.parametrize(
    "line,message",
    [
        (_line(text=None), r"text must be a string, got None"),  # was read as the transcript 'None'
        (_line(text=3), r"text must be a string, got 3"),
        (_line(audio=["a"]), r"audio must be a string"),
        (_line(language=1), r"language must be a string"),
        ('{"id": "u1", "language": "en", "split": "train", "audio": "/a", "duration": NaN, '
         '"text": "a", "speaker": "1", "book": "2"}', r"duration must be a finite number >= 0, got nan"),
        (_line(duration=-5), r"duration must be a finite number >= 0, got -5"),
        (_line(duration="1.5"), r"duration must be a finite number >= 0, got '1.5'"),
        (_line(duration=True), r"duration must be a finite number >= 0, got True"),
    ],
)
def test_field_types_are_checked_naming_the_line(tmp_path, line, message):
    p = tmp_path / "m.jsonl"
    p.write_text(_line(id="u0") + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"m\.jsonl:2: malformed manifest line \({message}"):
        read_manifest(p)


def test_numeric_ids_bom_crlf_and_non_utf8(tmp_path):
    p = tmp_path / "m.jsonl"
    # Integer ids, speakers and books are read as their strings; a BOM and CRLF line ends are fine.
    p.write_bytes(b"\xef\xbb\xbf" + (_line(id=7, speaker=12, book=0) + "\r\n" + _line(id="u2") + "\r\n").encode())
    got = read_manifest(p)
    assert [(u.id, u.speaker, u.book) for u in got] == [("7", "12", "0"), ("u2", "1", "2")]
    assert got[0].duration == 1.5 and got[1].text == "the cat"
    # Latin-1 bytes on line 2: one line naming it (was a UnicodeDecodeError traceback).
    p.write_bytes((_line(id="u0") + "\n").encode() + _line(text="caf\xe9").encode("latin-1") + b"\n")
    with pytest.raises(UserError, match=r"m\.jsonl:2: not valid UTF-8 \(byte \d+\)"):
        read_manifest(p)


def test_a_repeated_utterance_key_is_refused_naming_both_lines(tmp_path):
    # Under torchrun a repeated key, one copy bad, made the ranks train on different item lists.
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join([_line(id="u1"), _line(id="u1", language="fr"), "", _line(id="u1", audio="/b")]) + "\n")
    with pytest.raises(UserError, match=r"m\.jsonl:4: utterance en/u1 is already on line 1"):
        read_manifest(p)


def test_transcripts_are_read_as_nfc(tmp_path):
    # An NFD transcript (as macOS tools write it) equals the NFC text the tokenizer decodes to, so a
    # perfect hypothesis scores 0 WER instead of an error on every accented word.
    import unicodedata

    from sparse_rnnt.training.metrics import wer

    nfc = "le café était là"
    u = _u(0, "fr")
    write_manifest(tmp_path / "dev.jsonl", [Utterance(**{**u.__dict__, "text": unicodedata.normalize("NFD", nfc)})])
    (got,) = read_manifest(tmp_path / "dev.jsonl")
    assert got.text == nfc and got.text != unicodedata.normalize("NFD", nfc)
    assert wer([got.text], [nfc]) == 0.0
