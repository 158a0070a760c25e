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
