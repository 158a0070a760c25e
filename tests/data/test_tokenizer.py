"""The shared SentencePiece tokenizer and the blank convention."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from sparse_rnnt.data.tokenizer import Tokenizer, TokenizerConfig
from sparse_rnnt.errors import UserError

SENTENCES = {
    "en": [
        "the quick brown fox jumps over the lazy dog",
        "it's a long way to the river's end",
        "she didn't know what the old man wanted",
    ],
    "fr": [
        "l'été dernier nous sommes allés à la mer",
        "où est la bibliothèque demanda-t-il",
        "ça ne coûte que douze euros à noël",
        "le garçon français mange une crème brûlée",
    ],
    "it": [
        "perché non vieni con noi all'università",
        "la città è più bella d'inverno",
        "però lui ha già mangiato",
    ],
    "nl": [
        "het is één uur en de zon schijnt",
        "zij zeggen dat 't niet kan",
        "de ruïne ligt aan de oever van de rivier",
    ],
}
ALL = [s for sents in SENTENCES.values() for s in sents]


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.train(ALL, TokenizerConfig(), tmp_path_factory.mktemp("tok") / "char.model")


def test_char_vocab_is_every_character(char_tok: Tokenizer) -> None:
    chars = {c for s in ALL for c in s if c != " "}
    pieces = {char_tok.id_to_piece(i) for i in range(char_tok.vocab_size)}
    assert pieces == chars | {"<unk>", "▁"}
    assert char_tok.vocab_size == len(chars) + 2
    assert {"é", "è", "ç", "à", "ù", "ï", "û", "'"} <= pieces


def test_blank_is_last_symbol(char_tok: Tokenizer) -> None:
    assert char_tok.blank == char_tok.vocab_size
    assert char_tok.num_symbols == char_tok.vocab_size + 1
    assert char_tok.blank == char_tok.num_symbols - 1


@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_char_roundtrip(char_tok: Tokenizer, lang: str) -> None:
    for text in SENTENCES[lang]:
        ids = char_tok.encode(text)
        assert all(0 <= i < char_tok.vocab_size for i in ids)
        assert char_tok.unk not in ids
        assert char_tok.decode(ids) == text
        # A char model spells every non-space character with its own piece.
        spelled = [char_tok.id_to_piece(i) for i in ids if char_tok.id_to_piece(i) != "▁"]
        assert spelled == [c for c in text if c != " "]
        assert sum(char_tok.id_to_piece(i) == "▁" for i in ids) == len(text.split())


def test_unseen_sentence_of_seen_characters_roundtrips(char_tok: Tokenizer) -> None:
    text = "la rivière d'été où noël"
    assert char_tok.encodable(text)
    assert char_tok.decode(char_tok.encode(text)) == text


def test_decode_ignores_blank(char_tok: Tokenizer) -> None:
    text = "perché non"
    ids = char_tok.encode(text)
    with_blanks = [char_tok.blank]
    for i in ids:
        with_blanks += [i, char_tok.blank]
    assert char_tok.decode(with_blanks) == text
    with pytest.raises(ValueError):
        char_tok.decode([char_tok.vocab_size + 1])


def test_encodable_flags_unknown_characters(char_tok: Tokenizer) -> None:
    assert all(char_tok.encodable(s) for s in ALL)
    for text, unknown in (("straße", ["ß"]), ("smørrebrød 42", ["4", "2", "ø"]), ("ñ ñ", ["ñ"])):
        missing = sorted({c for c in text if c != " " and c not in "".join(ALL)})
        assert sorted(unknown) == missing  # the test's own premise
        assert not char_tok.encodable(text)
        assert char_tok.unknown_characters(text) == missing
        assert char_tok.unk in char_tok.encode(text)


def test_text_that_is_not_valid_unicode_is_left_out_and_not_encodable(char_tok: Tokenizer, tmp_path: Path) -> None:
    # A lone surrogate is valid JSON ("\udc80") but not UTF-8: sentencepiece raised on it, in
    # training (failing the run) and in encodable (a traceback from screening).
    bad = "the \udc80 fox"
    assert not char_tok.encodable(bad)
    with_bad = Tokenizer.train([*ALL, bad], TokenizerConfig(), tmp_path / "a.model")
    without = Tokenizer.train(ALL, TokenizerConfig(), tmp_path / "b.model")
    assert with_bad.to_bytes() == without.to_bytes()


def test_nfd_input_is_normalized(char_tok: Tokenizer) -> None:
    composed = "l'été"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    assert char_tok.encode(decomposed) == char_tok.encode(composed)


def test_training_is_deterministic(tmp_path: Path) -> None:
    for cfg in (TokenizerConfig(), TokenizerConfig(model_type="unigram", vocab_size=40)):
        a = Tokenizer.train(ALL * 3, cfg, tmp_path / "a.model")
        b = Tokenizer.train(ALL * 3, cfg, tmp_path / "b.model")
        assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
        assert a.to_bytes() == (tmp_path / "a.model").read_bytes() == b.to_bytes()
        for text in ALL:
            assert a.decode(a.encode(text)) == text


def test_subword_models_roundtrip(tmp_path: Path) -> None:
    for model_type in ("bpe", "unigram"):
        tok = Tokenizer.train(
            ALL * 3, TokenizerConfig(model_type, vocab_size=45), tmp_path / "t.model"
        )
        assert tok.vocab_size == 45 and tok.blank == 45
        for text in ALL:
            ids = tok.encode(text)
            assert all(0 <= i < 45 for i in ids)
            assert tok.decode(ids) == text
        # Subword merges make encodings shorter than spelling every character.
        assert sum(len(tok.encode(t)) for t in ALL) < sum(len(t) for t in ALL)


def test_load_and_bytes_roundtrip(char_tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "m" / "tok.model"
    path.parent.mkdir()
    path.write_bytes(char_tok.to_bytes())
    for tok in (Tokenizer.load(path), Tokenizer.from_bytes(char_tok.to_bytes())):
        assert tok.vocab_size == char_tok.vocab_size
        for text in ALL:
            assert tok.encode(text) == char_tok.encode(text)


def test_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no"):
        Tokenizer.train([], TokenizerConfig(), tmp_path / "e.model")
    with pytest.raises(UserError):
        Tokenizer.train(["  ", ""], TokenizerConfig(), tmp_path / "e.model")
    with pytest.raises(UserError, match="model_type"):
        Tokenizer.train(ALL, TokenizerConfig(model_type="word"), tmp_path / "e.model")
    with pytest.raises(UserError, match="vocab_size"):
        Tokenizer.train(ALL, TokenizerConfig(model_type="bpe"), tmp_path / "e.model")
    # A failed training run leaves no file behind.
    with pytest.raises(UserError, match=r"e\.model"):
        Tokenizer.train(ALL, TokenizerConfig("unigram", vocab_size=5000), tmp_path / "e.model")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="not found"):
        Tokenizer.load(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(UserError, match=r"bad\.model"):
        Tokenizer.load(bad)


def test_char_vocab_size_below_the_characters_is_refused(tmp_path: Path) -> None:
    # A capped char model dropped characters: it could not encode its own training transcripts.
    needed = len({c for s in ALL for c in s if c != " "}) + 2  # + <unk> and the word boundary "▁"
    for small in (5, needed - 1):
        with pytest.raises(UserError, match=rf"needs vocab_size >= {needed} .*got {small}"):
            Tokenizer.train(ALL, TokenizerConfig(vocab_size=small), tmp_path / "c.model")
    assert list(tmp_path.iterdir()) == []  # refused before writing
    for size in (needed, needed + 10):  # enough: every character, every transcript encodable
        tok = Tokenizer.train(ALL, TokenizerConfig(vocab_size=size), tmp_path / "c.model")
        assert tok.vocab_size == needed and all(tok.encodable(s) for s in ALL)


def test_char_vocab_size_needed_follows_the_character_coverage(tmp_path: Path) -> None:
    # Below full coverage SentencePiece drops the rarest characters: the number it keeps is the
    # smallest vocab_size accepted (one rare "q" among many common characters).
    texts = ["ab ab ab ab ab ab ab ab ab ab ab ab"] * 99 + ["ab q"]
    full = Tokenizer.train(texts, TokenizerConfig(), tmp_path / "full.model")
    part = Tokenizer.train(texts, TokenizerConfig(character_coverage=0.999), tmp_path / "part.model")
    assert part.vocab_size == full.vocab_size - 1 and not part.encodable("q")
    Tokenizer.train(texts, TokenizerConfig(vocab_size=part.vocab_size, character_coverage=0.999), tmp_path / "p.model")
    with pytest.raises(UserError, match=f"needs vocab_size >= {part.vocab_size}"):
        Tokenizer.train(texts, TokenizerConfig(vocab_size=part.vocab_size - 1, character_coverage=0.999),
                        tmp_path / "p.model")


def test_whitespace_is_read_as_in_training(tmp_path: Path) -> None:
    # Training reads any run of whitespace as one space; encoding must too: a transcript with a
    # no-break space or a tab, trained on, was later screened out as unencodable with no
    # character named.
    tok = Tokenizer.train(["le\u00a0chat blanc", "un\tchien"], TokenizerConfig(vocab_size=0, model_type="char"),
                          tmp_path / "ws.model")
    for text in ("le\u00a0chat blanc", "un\tchien", "un \n chien"):
        assert tok.encodable(text) and tok.unknown_characters(text) == []
        assert tok.encode(text) == tok.encode(" ".join(text.split()))
        assert tok.decode(tok.encode(text)) == " ".join(text.split())
