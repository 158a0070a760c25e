"""Transcript text: normalization, spelled numbers and dates, grammar sentences.

Expected values are hand-written from each language's spelling rules; the number round trip
uses small word-to-number parsers written here, independently of the module's own code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_rnnt.data.text import (
    LANGUAGES,
    date_to_words,
    make_sentences,
    normalize,
    number_to_words,
    vocabulary,
)
from sparse_rnnt.errors import UserError


def _w(text: str) -> list[str]:
    return text.split()


# Hand-written reference alphabets (letters a-z plus each language's accented letters).
_AZ = "abcdefghijklmnopqrstuvwxyz"
ALPHABET = {
    "en": set(_AZ + "' -"),
    "fr": set(_AZ + "àâæçéèêëîïôœùûüÿ" + "' -"),
    "it": set(_AZ + "àèéìíîòóùú" + "' -"),
    "nl": set(_AZ + "áàâäéèêëíìîïóòôöúùûü" + "' -"),
}

# ----------------------------------------------------------------------------------------------
# number_to_words: hand-checked values
# ----------------------------------------------------------------------------------------------

NUMBERS = {
    "en": {
        0: "zero",
        7: "seven",
        13: "thirteen",
        19: "nineteen",
        20: "twenty",
        21: "twenty-one",
        40: "forty",
        99: "ninety-nine",
        100: "one hundred",
        101: "one hundred one",
        342: "three hundred forty-two",
        1000: "one thousand",
        1001: "one thousand one",
        12345: "twelve thousand three hundred forty-five",
        100000: "one hundred thousand",
        999999: "nine hundred ninety-nine thousand nine hundred ninety-nine",
    },
    "fr": {
        0: "zéro",
        1: "un",
        16: "seize",
        17: "dix-sept",
        21: "vingt et un",
        22: "vingt-deux",
        61: "soixante et un",
        70: "soixante-dix",
        71: "soixante et onze",
        72: "soixante-douze",
        77: "soixante-dix-sept",
        80: "quatre-vingts",
        81: "quatre-vingt-un",
        90: "quatre-vingt-dix",
        91: "quatre-vingt-onze",
        99: "quatre-vingt-dix-neuf",
        100: "cent",
        101: "cent un",
        200: "deux cents",
        201: "deux cent un",
        280: "deux cent quatre-vingts",
        1000: "mille",
        1001: "mille un",
        2000: "deux mille",
        21000: "vingt et un mille",
        80000: "quatre-vingt mille",
        200000: "deux cent mille",
        999999: "neuf cent quatre-vingt-dix-neuf mille neuf cent quatre-vingt-dix-neuf",
    },
    "it": {
        0: "zero",
        1: "uno",
        3: "tre",
        11: "undici",
        17: "diciassette",
        21: "ventuno",
        23: "ventitré",
        28: "ventotto",
        31: "trentuno",
        38: "trentotto",
        100: "cento",
        101: "centouno",
        108: "centotto",
        180: "centottanta",
        200: "duecento",
        1000: "mille",
        1003: "milletré",
        2000: "duemila",
        21000: "ventunmila",
        23000: "ventitremila",
        123456: "centoventitremilaquattrocentocinquantasei",
        999999: "novecentonovantanovemilanovecentonovantanove",
    },
    "nl": {
        0: "nul",
        1: "één",
        12: "twaalf",
        13: "dertien",
        18: "achttien",
        21: "eenentwintig",
        22: "tweeëntwintig",
        23: "drieëntwintig",
        24: "vierentwintig",
        33: "drieëndertig",
        80: "tachtig",
        99: "negenennegentig",
        100: "honderd",
        101: "honderdeen",
        123: "honderddrieëntwintig",
        200: "tweehonderd",
        1000: "duizend",
        1001: "duizend één",
        2500: "tweeduizend vijfhonderd",
        21000: "eenentwintigduizend",
        999999: "negenhonderdnegenennegentigduizend negenhonderdnegenennegentig",
    },
}


@pytest.mark.parametrize(
    ("language", "n", "expected"),
    [(lang, n, words) for lang, table in NUMBERS.items() for n, words in table.items()],
)
def test_number_to_words_hand_values(language: str, n: int, expected: str) -> None:
    assert number_to_words(n, language) == expected


@pytest.mark.parametrize("bad", [-1, 1_000_000, 2.0, True, "3"])
def test_number_to_words_rejects_out_of_range(bad: object) -> None:
    with pytest.raises(ValueError):
        number_to_words(bad, "en")  # type: ignore[arg-type]


def test_unknown_language_is_a_value_error_and_a_user_error() -> None:
    for call in (
        lambda: number_to_words(3, "de"),
        lambda: normalize("hallo", "de"),
        lambda: date_to_words(1, 1, "xx"),
        lambda: make_sentences("es", 3, 0),
        lambda: vocabulary("pl"),
    ):
        with pytest.raises(ValueError, match="unknown language"):
            call()
        with pytest.raises(UserError):
            call()


# ----------------------------------------------------------------------------------------------
# number_to_words: independent parsers for a round trip over the whole range
# ----------------------------------------------------------------------------------------------

def _values(ones: str, tens: str) -> dict[str, int]:
    """``ones`` spells 0, 1, 2...; ``tens`` spells 20, 30, 40..."""
    table = {w: i for i, w in enumerate(ones.split())}
    table |= {w: 10 * (i + 2) for i, w in enumerate(tens.split())}
    return table


_EN_VALUES = _values(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen",
    "twenty thirty forty fifty sixty seventy eighty ninety",
)


def _parse_en(text: str) -> int:
    total = current = 0
    for tok in text.replace("-", " ").split():
        if tok == "hundred":
            current *= 100
        elif tok == "thousand":
            total, current = total + current * 1000, 0
        else:
            current += _EN_VALUES[tok]
    return total + current


_FR_VALUES = _values(
    "zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze "
    "seize",
    "vingt trente quarante cinquante soixante",
) | {"vingts": 20}


def _parse_fr(text: str) -> int:
    total = current = 0
    previous = ""
    for tok in text.replace("-", " ").split():
        if tok == "et":
            continue
        if tok in ("cent", "cents"):
            current = (current or 1) * 100
        elif tok == "mille":
            total, current = total + (current or 1) * 1000, 0
        elif tok.startswith("vingt") and previous == "quatre":
            current += 80 - 4  # quatre-vingt = 4 * 20
        else:
            current += _FR_VALUES[tok]
        previous = tok
    return total + current


def _segment(word: str, morphemes: dict[str, int]) -> list[str]:
    """Split a compound number word into known morphemes (backtracking, longest first)."""
    if not word:
        return []
    for m in sorted(morphemes, key=len, reverse=True):
        if word.startswith(m):
            try:
                return [m, *_segment(word[len(m) :], morphemes)]
            except ValueError:
                continue
    raise ValueError(f"cannot segment {word!r}")


_IT_TENS = "venti trenta quaranta cinquanta sessanta settanta ottanta novanta"
_IT_MORPHEMES = _values(
    "zero uno due tre quattro cinque sei sette otto nove dieci undici dodici tredici "
    "quattordici quindici sedici diciassette diciotto diciannove",
    _IT_TENS,
)
# elided tens (ventuno, ventotto), accented tre, "un" before mila; negatives are multipliers
_IT_MORPHEMES |= {t[:-1]: 10 * (i + 2) for i, t in enumerate(_IT_TENS.split())}
_IT_MORPHEMES |= {"tré": 3, "un": 1, "cento": -100, "cent": -100, "mille": -1000, "mila": -1000}

_NL_MORPHEMES = _values(
    "nul een twee drie vier vijf zes zeven acht negen tien elf twaalf dertien veertien "
    "vijftien zestien zeventien achttien negentien",
    "twintig dertig veertig vijftig zestig zeventig tachtig negentig",
)
_NL_MORPHEMES |= {"één": 1, "en": 0, "ën": 0, "honderd": -100, "duizend": -1000}


def _parse_compound(text: str, morphemes: dict[str, int]) -> int:
    """Additive parse; negative morpheme values are multipliers (hundred, thousand)."""
    total = current = 0
    for word in text.split():
        for m in _segment(word, morphemes):
            value = morphemes[m]
            if value == -100:
                current = (current or 1) * 100
            elif value == -1000:
                total, current = total + (current or 1) * 1000, 0
            else:
                current += value
    return total + current


PARSERS = {
    "en": _parse_en,
    "fr": _parse_fr,
    "it": lambda t: _parse_compound(t, _IT_MORPHEMES),
    "nl": lambda t: _parse_compound(t, _NL_MORPHEMES),
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_parsers_agree_with_hand_values(language: str) -> None:
    # The reference parsers are only trusted for the round trip if they read the hand table.
    for n, words in NUMBERS[language].items():
        assert PARSERS[language](words) == n


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 999_999), language=st.sampled_from(LANGUAGES))
def test_number_to_words_round_trip_and_form(n: int, language: str) -> None:
    words = number_to_words(n, language)
    assert words
    assert normalize(words, language) == words
    assert set(words) <= ALPHABET[language]
    assert PARSERS[language](words) == n


@settings(max_examples=50, deadline=None)
@given(
    numbers=st.lists(st.integers(0, 999_999), min_size=2, max_size=60, unique=True),
    language=st.sampled_from(LANGUAGES),
)
def test_number_to_words_is_injective_on_samples(numbers: list[int], language: str) -> None:
    spelled = [number_to_words(n, language) for n in numbers]
    assert len(set(spelled)) == len(numbers)


@pytest.mark.parametrize("language", LANGUAGES)
def test_number_to_words_is_injective_on_a_sweep(language: str) -> None:
    sample = [*range(2000), *range(2000, 1_000_000, 997), 999_999]
    spelled = {number_to_words(n, language) for n in sample}
    assert len(spelled) == len(sample)


# ----------------------------------------------------------------------------------------------
# date_to_words
# ----------------------------------------------------------------------------------------------

DATES = [
    ("en", 3, 5, "the third of may"),
    ("en", 1, 1, "the first of january"),
    ("en", 12, 8, "the twelfth of august"),
    ("en", 22, 2, "the twenty-second of february"),
    ("en", 31, 12, "the thirty-first of december"),
    ("fr", 3, 5, "le trois mai"),
    ("fr", 1, 5, "le premier mai"),
    ("fr", 8, 8, "le huit août"),
    ("fr", 11, 11, "le onze novembre"),
    ("fr", 14, 7, "le quatorze juillet"),
    ("fr", 21, 6, "le vingt et un juin"),
    ("it", 3, 5, "il tre maggio"),
    ("it", 1, 5, "il primo maggio"),
    ("it", 8, 3, "l'otto marzo"),
    ("it", 11, 9, "l'undici settembre"),
    ("it", 23, 4, "il ventitré aprile"),
    ("it", 25, 12, "il venticinque dicembre"),
    ("nl", 3, 5, "drie mei"),
    ("nl", 1, 5, "één mei"),
    ("nl", 5, 12, "vijf december"),
    ("nl", 22, 2, "tweeëntwintig februari"),
    ("nl", 27, 4, "zevenentwintig april"),
]


@pytest.mark.parametrize(("language", "day", "month", "expected"), DATES)
def test_date_to_words_hand_values(language: str, day: int, month: int, expected: str) -> None:
    assert date_to_words(day, month, language) == expected


@pytest.mark.parametrize(("day", "month"), [(0, 1), (32, 1), (31, 4), (30, 2), (1, 0), (1, 13)])
def test_date_to_words_rejects_impossible_dates(day: int, month: int) -> None:
    with pytest.raises(ValueError):
        date_to_words(day, month, "en")


def test_date_to_words_accepts_february_29() -> None:
    assert date_to_words(29, 2, "en") == "the twenty-ninth of february"


# ----------------------------------------------------------------------------------------------
# normalize
# ----------------------------------------------------------------------------------------------

NORMALIZE = [
    ("en", "Hello, World!", "hello world"),
    ("en", "  multiple   spaces\tand\nnewlines ", "multiple spaces and newlines"),
    ("en", "It’s the boys’ toys", "it's the boys' toys"),
    ("en", "well-known -dash- word- -x", "well-known dash word x"),
    ("en", "foo - bar -- baz a--b", "foo bar baz a b"),
    ("en", "...!? — ;", ""),
    ("en", "hy\u00adphen", "hyphen"),  # soft hyphen is invisible, not a break
    ("fr", "L’homme est là.", "l'homme est là"),
    ("fr", "« ÉTÉ À PARIS », dit-il.", "été à paris dit-il"),
    ("fr", "QUATRE-VINGT-DIX ŒUFS", "quatre-vingt-dix œufs"),
    ("fr", "e\u0301te\u0301", "été"),  # decomposed accents are composed (NFC)
    ("it", "Dov’è? Un po’ di caffè!", "dov'è un po' di caffè"),
    ("it", "PERCHÉ NON VIENI ALL’UNIVERSITÀ", "perché non vieni all'università"),
    ("nl", "‘s Avonds TWEEËNTWINTIG ÉÉN", "'s avonds tweeëntwintig één"),
    ("nl", "Ü-bahn (Berlijn)", "ü-bahn berlijn"),
]


@pytest.mark.parametrize(("language", "raw", "expected"), NORMALIZE)
def test_normalize_hand_cases(language: str, raw: str, expected: str) -> None:
    assert normalize(raw, language) == expected


@pytest.mark.parametrize("raw", ["er zijn 3 appels", "page 12", "x²", "٣ arabic three"])
def test_normalize_rejects_digits(raw: str) -> None:
    with pytest.raises(ValueError, match="digit"):
        normalize(raw, "nl")


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_normalize_is_idempotent_and_clean(raw: str) -> None:
    if any(unicodedata.category(c).startswith("N") for c in raw):
        with pytest.raises(ValueError):
            normalize(raw, "en")
        return
    out = normalize(raw, "en")
    assert normalize(out, "en") == out
    assert out == out.strip() and "  " not in out
    assert not any(c.isspace() and c != " " for c in out)
    for i, c in enumerate(out):
        if c == "-":  # a kept hyphen sits between two letters
            assert out[i - 1].isalpha() and out[i + 1].isalpha()
        else:
            assert c in "' " or unicodedata.category(c)[0] in "LM"


# ----------------------------------------------------------------------------------------------
# make_sentences and vocabulary
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("language", LANGUAGES)
def test_make_sentences_is_deterministic(language: str) -> None:
    a = make_sentences(language, 40, seed=7)
    assert a == make_sentences(language, 40, seed=7)
    assert a != make_sentences(language, 40, seed=8)
    # sentence i does not depend on count: a longer list extends a shorter one
    assert make_sentences(language, 15, seed=7) == a[:15]
    assert len(set(a)) > 20  # varied, not one sentence repeated


def test_make_sentences_ignores_global_state() -> None:
    # Same output in fresh interpreters with different str-hash salts and global random state.
    code = (
        "import json, random; random.seed(123); "
        "from sparse_rnnt.data.text import make_sentences; "
        "print(json.dumps({l: make_sentences(l, 20, 5, lexicon_size=12) "
        "for l in ('en', 'fr', 'it', 'nl')}))"
    )
    expected = {lang: make_sentences(lang, 20, 5, lexicon_size=12) for lang in LANGUAGES}
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert json.loads(out.stdout) == expected


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize(("low", "high"), [(3, 8), (1, 1), (1, 2), (5, 5), (10, 20), (40, 41)])
def test_make_sentences_word_bounds_alphabet_and_normal_form(
    language: str, low: int, high: int
) -> None:
    sentences = make_sentences(language, 150, seed=1, min_words=low, max_words=high)
    assert len(sentences) == 150
    vocab = vocabulary(language)
    for s in sentences:
        words = s.split()
        assert low <= len(words) <= high, s
        assert normalize(s, language) == s
        assert set(s) <= ALPHABET[language], s
        assert set(words) <= vocab, s
    if high > low:  # lengths spread over the range, not stuck at one end
        assert len({len(s.split()) for s in sentences}) == high - low + 1


@pytest.mark.parametrize("language", LANGUAGES)
def test_vocabulary_is_exactly_what_sentences_produce(language: str) -> None:
    # With a small lexicon, a large sample reaches every word vocabulary() claims, and no other.
    sentences = make_sentences(language, 4000, seed=3, min_words=1, max_words=14, lexicon_size=2)
    produced = {w for s in sentences for w in s.split()}
    assert produced == vocabulary(language, lexicon_size=2)


@pytest.mark.parametrize("language", LANGUAGES)
def test_vocabulary_size_and_lexicon_size_knob(language: str) -> None:
    full = vocabulary(language)
    assert 100 <= len(full) <= 300
    assert all(set(w) <= ALPHABET[language] and normalize(w, language) == w for w in full)
    small, medium = vocabulary(language, lexicon_size=3), vocabulary(language, lexicon_size=10)
    assert small < medium < full


# Number words for 6..20 (hand-written; French "neuf" is left out, it also means "new").
NUMBER_WORDS_6_TO_20 = {
    "en": "six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty",
    "fr": "six sept huit dix onze douze treize quatorze quinze seize dix-sept dix-huit dix-neuf "
    "vingt",
    "it": "sei sette otto nove dieci undici dodici tredici quattordici quindici sedici "
    "diciassette diciotto diciannove venti",
    "nl": "zes zeven acht negen tien elf twaalf dertien veertien vijftien zestien zeventien "
    "achttien negentien twintig",
}
NUMBER_WORDS_2_TO_5 = {
    "en": "two three four five",
    "fr": "deux trois quatre cinq",
    "it": "due tre quattro cinque",
    "nl": "twee drie vier vijf",
}


@pytest.mark.parametrize("language", LANGUAGES)
def test_lexicon_size_limits_numbers(language: str) -> None:
    vocab = vocabulary(language, lexicon_size=5)
    assert not vocab & set(NUMBER_WORDS_6_TO_20[language].split())
    assert set(NUMBER_WORDS_2_TO_5[language].split()) <= vocab
    assert set(NUMBER_WORDS_6_TO_20[language].split()) <= vocabulary(language)


def _followers(sentences: list[str], word: str) -> list[str]:
    out = []
    for s in sentences:
        tokens = s.split()
        out += [tokens[i + 1] for i in range(len(tokens) - 1) if tokens[i] == word]
    return out


def test_english_indefinite_article() -> None:
    sentences = make_sentences("en", 3000, seed=11)
    after_a, after_an = _followers(sentences, "a"), _followers(sentences, "an")
    assert after_a and after_an
    # "a quarter" is the clock phrase; otherwise a/an follow the next word's first letter.
    assert all(w[0] not in "aeiou" for w in after_a)
    assert all(w[0] in "aeiou" for w in after_an)


def test_french_elision_and_gender() -> None:
    sentences = make_sentences("fr", 3000, seed=12)
    feminine = set(
        _w(
            "voiture pomme maison table chaise lettre fenêtre porte clé fleur chaussure lampe "
            "orange fille femme"
        )
    )
    feminine_pl = {w + "s" for w in feminine}
    masculine_pl = set(
        _w(
            "livres journaux gâteaux vélos verres poissons sacs bateaux manteaux stylos "
            "parapluies fromages chiens chats professeurs médecins enfants garçons hommes "
            "étudiants"
        )
    )
    for article in ("le", "la"):  # never before a vowel: l'orange, l'enfant, l'homme
        followers = set(_followers(sentences, article)) - {"huit", "onze"}  # le huit, le onze
        assert followers and all(w[0] not in "aeiouéèêh" for w in followers)
    seen = {"un": 0, "une": 0}
    for s in sentences:
        t = s.split()
        for i in range(len(t) - 1):
            if t[i] not in seen:
                continue
            seen[t[i]] += 1
            if i > 0 and t[i - 1] == "et":  # vingt et un(e) agrees with the counted noun
                if t[i + 1] in feminine_pl:
                    assert t[i] == "une", s
                elif t[i + 1] in masculine_pl:
                    assert t[i] == "un", s
            elif t[i] == "un":  # the article: un livre, une pomme, une heure
                assert t[i + 1] not in feminine, s
            else:
                assert t[i + 1] in feminine | {"heure"}, s
    assert seen["un"] and seen["une"]


def test_italian_articles() -> None:
    sentences = make_sentences("it", 3000, seed=13)
    after_il = _followers(sentences, "il")
    assert after_il
    for w in after_il:  # il never before a vowel, s + consonant or z
        assert w[0] not in "aeiouz" and not (w[0] == "s" and w[1] not in "aeiou")
    assert set(_followers(sentences, "lo")) <= {"studente", "specchio"}
    # "uno" is also the digit one (il codice è uno zero ...) and ends "conta fino a uno"
    digits_and_e = set(_w("zero uno due tre quattro cinque sei sette otto nove e ed"))
    assert set(_followers(sentences, "uno")) - digits_and_e <= {"studente", "specchio"}
    for s in sentences:  # euphonic ed: "ed è", never "e è"
        assert " e è " not in f" {s} " and " e elena" not in f" {s}"


def test_dutch_adjective_inflection() -> None:
    sentences = make_sentences("nl", 3000, seed=14)
    het_words = {"boek", "huis", "glas", "raam", "kind", "meisje"}
    uninflected = {"rood", "blauw", "groen", "zwart", "wit", "geel", "grijs", "nieuw", "duur",
                   "zwaar", "schoon", "vies", "leeg", "kapot", "oud"}  # fmt: skip
    seen_het = False
    for s in sentences:
        t = s.split()
        for i in range(len(t) - 2):
            if t[i] in ("de", "het") and t[i + 2] in het_words | {"auto", "fiets", "tas"}:
                assert t[i + 1] not in uninflected, s  # de rode auto, het rode boek
            if t[i] == "een" and t[i + 2] in het_words:
                seen_het = True
                assert t[i + 1] in uninflected, s  # een rood boek
    assert seen_het


@pytest.mark.parametrize(
    "kwargs",
    [
        {"count": -1},
        {"min_words": 0},
        {"min_words": 5, "max_words": 4},
        {"max_words": 100_000},
        {"lexicon_size": 0},
        {"count": 2.5},
    ],
)
def test_make_sentences_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"count": 3, "seed": 0, **kwargs}
    with pytest.raises(ValueError):
        make_sentences("en", **args)  # type: ignore[arg-type]


def test_make_sentences_zero_count_and_bad_vocabulary_argument() -> None:
    assert make_sentences("fr", 0, seed=0) == []
    with pytest.raises(ValueError):
        vocabulary("fr", lexicon_size=0)
