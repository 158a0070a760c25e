"""Transcript text for the synthetic corpus: MLS-style normalization, numbers and dates spelled
out, and sentences from a small hand-written grammar per language (en, fr, it, nl).

Spelling conventions (one choice per language, kept everywhere):

- English: no "and" inside numbers, tens and units hyphenated (342 -> ``three hundred
  forty-two``); dates ``the third of may``.
- French: traditional spelling (before the 1990 reform): ``vingt et un``, ``soixante et onze``,
  ``quatre-vingts`` but ``quatre-vingt-un``, ``deux cents`` but ``deux cent un`` and
  ``deux cent mille``; dates ``le trois mai``, ``le premier mai``.
- Italian: a number is one word; the tens drop their vowel before ``uno``/``otto``
  (``ventuno``, ``ventotto``); ``cento`` stays whole (``centouno``) except before ``ott-``
  (``centotto``, ``centottanta``); a final ``tre`` is accented (``ventitré``); thousands ending in
  one use ``-un-`` (``ventunmila``); dates ``il tre maggio``, ``il primo maggio``,
  ``l'otto maggio``.
- Dutch: one word up to a thousand, ``ën`` after ``twee``/``drie`` (``tweeëntwintig``), a space
  after ``duizend`` (``tweeduizend vijfhonderd``); a stand-alone one is written ``één`` so eSpeak
  says the number, not the article; dates ``drie mei``.

Sentences are lists of whitespace-separated words; every word is lowercase, in the language's
alphabet (:data:`ALPHABETS`) and unchanged by :func:`normalize`.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import random
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from ..errors import UserError

LANGUAGES: tuple[str, ...] = ("en", "fr", "it", "nl")

def _w(text: str) -> tuple[str, ...]:
    """``"a b c"`` -> ``("a", "b", "c")``: keeps the word tables below compact."""
    return tuple(text.split())


_LATIN = "abcdefghijklmnopqrstuvwxyz"
# Every character a normalized transcript of the language may contain.
ALPHABETS: dict[str, frozenset[str]] = {
    "en": frozenset(_LATIN + "' -"),
    "fr": frozenset(_LATIN + "àâæçéèêëîïôœùûüÿ" + "' -"),
    "it": frozenset(_LATIN + "àèéìíîòóùú" + "' -"),
    "nl": frozenset(_LATIN + "áàâäéèêëíìîïóòôöúùûü" + "' -"),
}

MAX_NUMBER = 999_999
# Numbers inside generated sentences stay small (days of the month fit) so that a language's
# vocabulary stays a few hundred words; ``lexicon_size`` lowers this further.
SENTENCE_MAX_NUMBER = 31
# make_sentences refuses longer sentences (a bound for its length bookkeeping).
MAX_SENTENCE_WORDS = 1000


class TextError(UserError, ValueError):
    """A bad argument to the text functions: a UserError for the CLI, a ValueError for callers."""


def _check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise TextError(f"unknown language {language!r}: choose from {', '.join(LANGUAGES)}")


def _check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TextError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise TextError(f"{name} must be {bound}, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------

_APOSTROPHES = {"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'", "`": "'", "\u00b4": "'"}
_HYPHENS = {"\u2010": "-", "\u2011": "-"}


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith("L")


def normalize(text: str, language: str) -> str:
    """MLS-style text: lowercase NFC letters, apostrophes, in-word hyphens, single spaces.

    Curly and other apostrophe look-alikes become ``'`` and are kept (``l'homme``, ``'s avonds``,
    ``po'``); a hyphen survives only between two letters (``dit-il``); every other punctuation
    mark becomes a space; invisible format characters (soft hyphen, zero-width joiners) are
    dropped; a token without any letter is dropped. Digits are not allowed: spell numbers with
    :func:`number_to_words` first. Idempotent: ``normalize(normalize(t)) == normalize(t)``.

    Raises:
        TextError (a ValueError): unknown language, or a digit (any Unicode number) in ``text``.
    """
    _check_language(language)
    lowered = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).lower())
    chars = [
        _APOSTROPHES.get(c, _HYPHENS.get(c, c))
        for c in lowered
        if unicodedata.category(c) != "Cf"
    ]
    out: list[str] = []
    for i, ch in enumerate(chars):
        cat = unicodedata.category(ch)
        if cat.startswith("N"):
            raise TextError(
                f"digit {ch!r} in text {text!r}: spell numbers out (number_to_words) first"
            )
        if cat.startswith("L") or ch == "'":
            out.append(ch)
        elif cat.startswith("M") and out and unicodedata.category(out[-1])[0] in "LM":
            out.append(ch)  # a combining mark NFC could not fold into its letter
        elif (
            ch == "-"
            and 0 < i < len(chars) - 1
            and _is_letter(chars[i - 1])
            and _is_letter(chars[i + 1])
        ):
            out.append(ch)
        else:
            out.append(" ")
    tokens = "".join(out).split()
    return " ".join(t for t in tokens if any(_is_letter(c) for c in t))


# --------------------------------------------------------------------------------------------
# Numbers and dates
# --------------------------------------------------------------------------------------------

_EN_ONES = _w(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
)
_EN_TENS = _w("_ _ twenty thirty forty fifty sixty seventy eighty ninety")

_FR_ONES = _w(
    "zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze seize"
)
_FR_TENS = _w("_ _ vingt trente quarante cinquante soixante")

_IT_ONES = _w(
    "zero uno due tre quattro cinque sei sette otto nove dieci undici dodici tredici quattordici "
    "quindici sedici diciassette diciotto diciannove"
)
_IT_TENS = _w("_ _ venti trenta quaranta cinquanta sessanta settanta ottanta novanta")

_NL_ONES = _w(
    "nul een twee drie vier vijf zes zeven acht negen tien elf twaalf dertien veertien vijftien "
    "zestien zeventien achttien negentien"
)
_NL_TENS = _w("_ _ twintig dertig veertig vijftig zestig zeventig tachtig negentig")


def _en_below_1000(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    words = [_EN_ONES[hundreds], "hundred"] if hundreds else []
    if rest:
        tens, unit = divmod(rest, 10)
        if rest < 20:
            words.append(_EN_ONES[rest])
        else:
            words.append(_EN_TENS[tens] + (f"-{_EN_ONES[unit]}" if unit else ""))
    return " ".join(words)


def _en_number(n: int) -> str:
    if n == 0:
        return "zero"
    thousands, rest = divmod(n, 1000)
    words = [_en_below_1000(thousands), "thousand"] if thousands else []
    if rest:
        words.append(_en_below_1000(rest))
    return " ".join(words)


def _fr_below_100(n: int, final: bool) -> str:
    # `final`: nothing follows, so quatre-vingts/cents keep their plural s.
    if n <= 16:
        return _FR_ONES[n]
    if n < 20:
        return "dix-" + _FR_ONES[n - 10]
    tens, unit = divmod(n, 10)
    if tens <= 6:
        base = _FR_TENS[tens]
        if unit == 0:
            return base
        return f"{base} et un" if unit == 1 else f"{base}-{_FR_ONES[unit]}"
    if tens == 7:
        return "soixante et onze" if n == 71 else "soixante-" + _fr_below_100(n - 60, final)
    if n == 80:
        return "quatre-vingts" if final else "quatre-vingt"
    return "quatre-vingt-" + _fr_below_100(n - 80, final)


def _fr_below_1000(n: int, final: bool) -> str:
    hundreds, rest = divmod(n, 100)
    if not hundreds:
        return _fr_below_100(rest, final)
    head = "cent" if hundreds == 1 else f"{_FR_ONES[hundreds]} cent"
    if not rest:
        return head + ("s" if hundreds > 1 and final else "")
    return f"{head} {_fr_below_100(rest, final)}"


def _fr_number(n: int) -> str:
    if n == 0:
        return "zéro"
    thousands, rest = divmod(n, 1000)
    words = []
    if thousands:
        # "mille" is invariable and makes the preceding vingt/cent non-final: deux cent mille.
        words.append("mille" if thousands == 1 else _fr_below_1000(thousands, False) + " mille")
    if rest:
        words.append(_fr_below_1000(rest, True))
    return " ".join(words)


def _it_below_100(n: int) -> str:
    if n < 20:
        return _IT_ONES[n]
    tens, unit = divmod(n, 10)
    base = _IT_TENS[tens]
    if unit in (1, 8):
        base = base[:-1]  # ventuno, ventotto
    return base + (_IT_ONES[unit] if unit else "")


def _it_below_1000(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    head = "" if not hundreds else ("cento" if hundreds == 1 else _IT_ONES[hundreds] + "cento")
    if not rest:
        return head
    tail = _it_below_100(rest)
    if head and tail.startswith("ott"):
        head = head[:-1]  # centotto, centottanta
    return head + tail


def _it_number(n: int) -> str:
    if n == 0:
        return "zero"
    thousands, rest = divmod(n, 1000)
    word = ""
    if thousands == 1:
        word = "mille"
    elif thousands:
        group = _it_below_1000(thousands)
        if group.endswith("uno"):
            group = group[:-1]  # ventunmila
        word = group + "mila"
    if rest:
        word += _it_below_1000(rest)
    if word.endswith("tre") and word != "tre":
        word = word[:-3] + "tré"  # ventitré, centotré, milletré
    return word


def _nl_below_1000(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    head = "" if not hundreds else ("honderd" if hundreds == 1 else _NL_ONES[hundreds] + "honderd")
    if not rest:
        return head
    if rest < 20:
        return head + _NL_ONES[rest]
    tens, unit = divmod(rest, 10)
    if not unit:
        return head + _NL_TENS[tens]
    ones = _NL_ONES[unit]
    link = "ën" if ones.endswith("e") else "en"  # tweeëntwintig, drieëndertig
    return head + ones + link + _NL_TENS[tens]


def _nl_number(n: int) -> str:
    if n == 0:
        return "nul"
    thousands, rest = divmod(n, 1000)
    words = []
    if thousands:
        words.append("duizend" if thousands == 1 else _nl_below_1000(thousands) + "duizend")
    if rest:
        words.append(_nl_below_1000(rest))
    if words[-1] == "een":
        words[-1] = "één"  # a stand-alone one is the number, not the article
    return " ".join(words)


_NUMBER_FUNCS = {"en": _en_number, "fr": _fr_number, "it": _it_number, "nl": _nl_number}


def number_to_words(n: int, language: str) -> str:
    """Spell a cardinal number 0..999_999 in normalized form (see the module docstring).

    Examples: en 342 -> ``three hundred forty-two``; fr 71 -> ``soixante et onze``,
    80 -> ``quatre-vingts``; it 21 -> ``ventuno``; nl 123 -> ``honderddrieëntwintig``.

    Raises:
        TextError (a ValueError): unknown language, or ``n`` not an integer in 0..999_999.
    """
    _check_language(language)
    _check_int("number", n, 0, MAX_NUMBER)
    return _NUMBER_FUNCS[language](n)


_MONTHS: dict[str, tuple[str, ...]] = {
    "en": _w(
        "january february march april may june july august september october november december"
    ),
    "fr": _w(
        "janvier février mars avril mai juin juillet août septembre octobre novembre décembre"
    ),
    "it": _w(
        "gennaio febbraio marzo aprile maggio giugno luglio agosto settembre ottobre novembre "
        "dicembre"
    ),
    "nl": _w(
        "januari februari maart april mei juni juli augustus september oktober november december"
    ),
}
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February 29 allowed
_EN_ORDINAL_IRREGULAR = {
    "one": "first", "two": "second", "three": "third", "five": "fifth",
    "eight": "eighth", "nine": "ninth", "twelve": "twelfth",
}  # fmt: skip


def _en_ordinal(n: int) -> str:
    words = _en_number(n)
    cut = max(words.rfind(" "), words.rfind("-")) + 1
    head, last = words[:cut], words[cut:]
    if last in _EN_ORDINAL_IRREGULAR:
        last = _EN_ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return head + last


def date_to_words(day: int, month: int, language: str) -> str:
    """Spell a day of a month the way it is read aloud (no year).

    en ``the third of may``; fr ``le trois mai`` (1 -> ``le premier mai``); it ``il tre maggio``
    (1 -> ``il primo maggio``, 8 -> ``l'otto maggio``, 11 -> ``l'undici maggio``); nl ``drie mei``
    (1 -> ``één mei``). February 29 is accepted.

    Raises:
        TextError (a ValueError): unknown language, month outside 1..12 or a day the month lacks.
    """
    _check_language(language)
    _check_int("month", month, 1, 12)
    _check_int("day", day, 1, _DAYS_IN_MONTH[month - 1])
    name = _MONTHS[language][month - 1]
    if language == "en":
        return f"the {_en_ordinal(day)} of {name}"
    if language == "fr":
        return f"le {'premier' if day == 1 else _fr_number(day)} {name}"
    if language == "it":
        if day == 1:
            return f"il primo {name}"
        word = _it_number(day)
        return f"l'{word} {name}" if word[0] in "aeiou" else f"il {word} {name}"
    return f"{_nl_number(day)} {name}"


# --------------------------------------------------------------------------------------------
# Grammar nodes
# --------------------------------------------------------------------------------------------


class _Part(ABC):
    """A grammar node: samples a token list and knows every word and every length it can yield.

    A node with no possible output (``lengths`` empty) is dropped by the :class:`_Alt` and
    :class:`_Seq` above it, so capped word classes never leave unreachable words behind.
    """

    words: frozenset[str]
    lengths: frozenset[int]
    firsts: frozenset[str]  # words a non-empty output can start with

    @abstractmethod
    def sample(self, rng: random.Random) -> list[str]: ...


class _Lit(_Part):
    def __init__(self, text: str) -> None:
        self.tokens = tuple(text.split())
        self.words = frozenset(self.tokens)
        self.lengths = frozenset({len(self.tokens)})
        self.firsts = frozenset(self.tokens[:1])

    def sample(self, rng: random.Random) -> list[str]:
        return list(self.tokens)


class _Alt(_Part):
    def __init__(self, options: Sequence[_Part], weights: Sequence[float] | None = None) -> None:
        weights = [1.0] * len(options) if weights is None else weights
        kept = [(o, w) for o, w in zip(options, weights, strict=True) if o.lengths and w > 0]
        self.options = [o for o, _ in kept]
        self.cumulative = list(itertools.accumulate(w for _, w in kept))
        self.words = frozenset().union(*(o.words for o in self.options))
        self.lengths = frozenset().union(*(o.lengths for o in self.options))
        self.firsts = frozenset().union(*(o.firsts for o in self.options))

    def sample(self, rng: random.Random) -> list[str]:
        i = bisect.bisect_right(self.cumulative, rng.random() * self.cumulative[-1])
        return self.options[min(i, len(self.options) - 1)].sample(rng)


class _Seq(_Part):
    def __init__(self, parts: Sequence[_Part]) -> None:
        self.parts = list(parts)
        lengths = frozenset({0})
        for p in self.parts:
            lengths = frozenset(a + b for a in lengths for b in p.lengths)
        self.lengths = lengths
        self.words = frozenset().union(*(p.words for p in self.parts)) if lengths else frozenset()
        firsts: frozenset[str] = frozenset()
        for p in self.parts if lengths else ():
            firsts |= p.firsts
            if 0 not in p.lengths:
                break
        self.firsts = firsts

    def sample(self, rng: random.Random) -> list[str]:
        return [w for p in self.parts for w in p.sample(rng)]


def _as_part(item: _Part | str) -> _Part:
    return _Lit(item) if isinstance(item, str) else item


def _seq(*items: _Part | str) -> _Part:
    return _Seq([_as_part(i) for i in items])


def _alt(*items: _Part | str, weights: Sequence[float] | None = None) -> _Part:
    return _Alt([_as_part(i) for i in items], weights)


def _lit(text: str) -> _Part:
    return _Lit(text)


def _pick(texts: Iterable[str]) -> _Part:
    return _Alt([_Lit(t) for t in texts])


@dataclass(frozen=True)
class _Template:
    name: str
    part: _Part
    clause: bool  # a declarative clause that may be joined to another by "and"


# --------------------------------------------------------------------------------------------
# Lexicons
# --------------------------------------------------------------------------------------------

_THING, _FOOD, _TEXT, _ANIMATE = "thing", "food", "text", "animate"
_OBJECTS = frozenset({_THING, _FOOD, _TEXT})
_ANY = _OBJECTS | {_ANIMATE}


@dataclass(frozen=True)
class _Noun:
    sg: str
    pl: str
    gender: str  # fr/it "m"/"f", nl "de"/"het", en ""
    kind: str


@dataclass(frozen=True)
class _Verb:
    third: str  # third person singular present
    kinds: frozenset[str]  # noun kinds it takes as object
    base: str = ""  # English infinitive (for "does ... see")


@dataclass(frozen=True)
class _Lexicon:
    """Open word classes, most general entries first (``lexicon_size`` keeps a prefix)."""

    names: tuple[tuple[str, str], ...]  # (name, "m"/"f")
    things: tuple[_Noun, ...]
    animates: tuple[_Noun, ...]
    verbs: tuple[_Verb, ...]
    intransitive: tuple[str, ...]
    # Adjective forms: en (form,); fr/it (m sg, f sg, m pl, f pl); nl (base, inflected).
    colors: tuple[tuple[str, ...], ...]
    adjectives: tuple[tuple[str, ...], ...]
    places: tuple[str, ...]
    locations: tuple[str, ...]
    states: tuple[tuple[str, str], ...]  # predicate (masculine, feminine)
    months: tuple[str, ...]
    weekdays: tuple[str, ...]

    def capped(self, k: int) -> _Lexicon:
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name)[:k] for f in dataclasses.fields(self)}
        )


def _nouns(
    spec: str, kinds: dict[str, str] | None = None, default: str = _THING
) -> tuple[_Noun, ...]:
    """Parse ``"sg pl gender; ..."`` (``_`` for no gender); ``kinds`` maps sg -> kind."""
    out = []
    for entry in spec.split(";"):
        sg, pl, gender = entry.split()
        out.append(_Noun(sg, pl, "" if gender == "_" else gender, (kinds or {}).get(sg, default)))
    return tuple(out)


def _forms(spec: str) -> tuple[tuple[str, ...], ...]:
    """Parse ``"a b c d; e f g h"`` into adjective form tuples."""
    return tuple(tuple(entry.split()) for entry in spec.split(";"))


def _names(spec: str) -> tuple[tuple[str, str], ...]:
    return tuple((w[:-2], w[-1]) for w in spec.split())  # "john/m" -> ("john", "m")


def _verbs(entries: Sequence[tuple[str, frozenset[str]]]) -> tuple[_Verb, ...]:
    return tuple(_Verb(third, kinds) for third, kinds in entries)


_KINDS = {
    "en": {"book": _TEXT, "apple": _FOOD, "letter": _TEXT, "newspaper": _TEXT, "cake": _FOOD,
           "fish": _FOOD, "orange": _FOOD, "cheese": _FOOD},
    "fr": {"livre": _TEXT, "pomme": _FOOD, "lettre": _TEXT, "journal": _TEXT, "gâteau": _FOOD,
           "poisson": _FOOD, "orange": _FOOD, "fromage": _FOOD},
    "it": {"libro": _TEXT, "mela": _FOOD, "lettera": _TEXT, "giornale": _TEXT, "torta": _FOOD,
           "pesce": _FOOD, "arancia": _FOOD, "formaggio": _FOOD},
    "nl": {"boek": _TEXT, "appel": _FOOD, "brief": _TEXT, "krant": _TEXT, "taart": _FOOD,
           "vis": _FOOD, "sinaasappel": _FOOD, "kaas": _FOOD},
}  # fmt: skip

_WEEKDAYS = {
    "en": _w("monday tuesday wednesday thursday friday saturday sunday"),
    "fr": _w("lundi mardi mercredi jeudi vendredi samedi dimanche"),
    "it": _w("lunedì martedì mercoledì giovedì venerdì sabato domenica"),
    "nl": _w("maandag dinsdag woensdag donderdag vrijdag zaterdag zondag"),
}

_LEXICONS: dict[str, _Lexicon] = {
    "en": _Lexicon(
        names=_names(
            "john/m mary/f peter/m sarah/f james/m emma/f david/m lucy/f thomas/m alice/f"
        ),
        things=_nouns(
            "car cars _; book books _; apple apples _; house houses _; table tables _; "
            "chair chairs _; letter letters _; newspaper newspapers _; cake cakes _; bike bikes _; "
            "glass glasses _; window windows _; door doors _; key keys _; fish fish _; "
            "flower flowers _; bag bags _; boat boats _; coat coats _; shoe shoes _; lamp lamps _; "
            "pen pens _; orange oranges _; umbrella umbrellas _; cheese cheeses _",
            _KINDS["en"],
        ),
        animates=_nouns(
            "dog dogs _; cat cats _; teacher teachers _; doctor doctors _; child children _; "
            "girl girls _; boy boys _; woman women _; man men _; student students _",
            default=_ANIMATE,
        ),
        verbs=tuple(
            _Verb(third, kinds, base)
            for third, base, kinds in (
                ("sees", "see", _ANY), ("buys", "buy", _OBJECTS), ("has", "have", _ANY),
                ("wants", "want", _OBJECTS), ("takes", "take", _OBJECTS),
                ("finds", "find", _ANY), ("looks for", "look for", _ANY),
                ("eats", "eat", frozenset({_FOOD})), ("reads", "read", frozenset({_TEXT})),
                ("writes", "write", frozenset({_TEXT})), ("sells", "sell", _OBJECTS),
                ("carries", "carry", _OBJECTS), ("draws", "draw", _ANY),
                ("washes", "wash", frozenset({_THING})), ("cooks", "cook", frozenset({_FOOD})),
                ("watches", "watch", _ANY),
            )
        ),
        intransitive=_w("sleeps runs sings dances works waits laughs swims walks"),
        colors=_forms("red; blue; green; black; white; yellow; gray"),
        adjectives=_forms("new; expensive; heavy; clean; dirty; empty; broken; old"),
        places=_w("london paris rome berlin madrid amsterdam vienna dublin lisbon prague"),
        locations=("in the garden", "at home", "in the kitchen", "at school", "in the park",
                   "at the station", "in the office"),
        states=tuple((s, s) for s in _w("tired happy sad busy hungry sick")),
        months=_MONTHS["en"],
        weekdays=_WEEKDAYS["en"],
    ),
    "fr": _Lexicon(
        names=_names(
            "marie/f pierre/m julie/f louis/m claire/f paul/m sophie/f nicolas/m camille/f "
            "antoine/m"
        ),
        things=_nouns(
            "voiture voitures f; livre livres m; pomme pommes f; maison maisons f; "
            "table tables f; chaise chaises f; lettre lettres f; journal journaux m; "
            "gâteau gâteaux m; vélo vélos m; verre verres m; fenêtre fenêtres f; "
            "porte portes f; "
            "clé clés f; poisson poissons m; fleur fleurs f; sac sacs m; bateau bateaux m; "
            "manteau manteaux m; chaussure chaussures f; lampe lampes f; stylo stylos m; "
            "orange oranges f; parapluie parapluies m; fromage fromages m",
            _KINDS["fr"],
        ),
        animates=_nouns(
            "chien chiens m; chat chats m; professeur professeurs m; médecin médecins m; "
            "enfant enfants m; fille filles f; garçon garçons m; femme femmes f; "
            "homme hommes m; étudiant étudiants m",
            default=_ANIMATE,
        ),
        verbs=_verbs(
            [("voit", _ANY), ("achète", _OBJECTS), ("a", _ANY), ("veut", _OBJECTS),
             ("prend", _OBJECTS), ("trouve", _ANY), ("cherche", _ANY),
             ("mange", frozenset({_FOOD})), ("lit", frozenset({_TEXT})),
             ("écrit", frozenset({_TEXT})), ("vend", _OBJECTS), ("porte", _OBJECTS),
             ("dessine", _ANY), ("lave", frozenset({_THING})), ("cuisine", frozenset({_FOOD})),
             ("regarde", _ANY)]
        ),
        intransitive=_w("dort court chante danse travaille attend rit nage marche"),
        colors=_forms(
            "rouge rouge rouges rouges; bleu bleue bleus bleues; vert verte verts vertes; "
            "noir noire noirs noires; blanc blanche blancs blanches; "
            "jaune jaune jaunes jaunes; gris grise gris grises"
        ),
        adjectives=_forms(
            "neuf neuve neufs neuves; cher chère chers chères; lourd lourde lourds lourdes; "
            "propre propre propres propres; sale sale sales sales; vide vide vides vides; "
            "cassé cassée cassés cassées; ancien ancienne anciens anciennes"
        ),
        places=_w("paris londres rome berlin madrid lyon marseille bruxelles genève lille"),
        locations=("dans le jardin", "à la maison", "dans la cuisine", "à l'école", "au parc",
                   "à la gare", "au bureau"),
        states=(("fatigué", "fatiguée"), ("content", "contente"), ("triste", "triste"),
                ("occupé", "occupée"), ("affamé", "affamée"), ("malade", "malade")),
        months=_MONTHS["fr"],
        weekdays=_WEEKDAYS["fr"],
    ),
    "it": _Lexicon(
        names=_names(
            "giulia/f marco/m francesca/f luca/m chiara/f paolo/m sara/f giovanni/m elena/f "
            "matteo/m"
        ),
        things=_nouns(
            "macchina macchine f; libro libri m; mela mele f; casa case f; tavolo tavoli m; "
            "sedia sedie f; lettera lettere f; giornale giornali m; torta torte f; "
            "bicicletta biciclette f; bicchiere bicchieri m; finestra finestre f; porta porte f; "
            "chiave chiavi f; pesce pesci m; fiore fiori m; borsa borse f; barca barche f; "
            "cappotto cappotti m; scarpa scarpe f; specchio specchi m; penna penne f; "
            "arancia arance f; ombrello ombrelli m; formaggio formaggi m",
            _KINDS["it"],
        ),
        animates=_nouns(
            "cane cani m; gatto gatti m; maestra maestre f; medico medici m; "
            "bambino bambini m; ragazza ragazze f; ragazzo ragazzi m; donna donne f; "
            "uomo uomini m; studente studenti m",
            default=_ANIMATE,
        ),
        verbs=_verbs(
            [("vede", _ANY), ("compra", _OBJECTS), ("ha", _ANY), ("vuole", _OBJECTS),
             ("prende", _OBJECTS), ("trova", _ANY), ("cerca", _ANY),
             ("mangia", frozenset({_FOOD})), ("legge", frozenset({_TEXT})),
             ("scrive", frozenset({_TEXT})), ("vende", _OBJECTS), ("porta", _OBJECTS),
             ("disegna", _ANY), ("lava", frozenset({_THING})), ("cucina", frozenset({_FOOD})),
             ("guarda", _ANY)]
        ),
        intransitive=_w("dorme corre canta balla lavora aspetta ride nuota cammina"),
        colors=_forms(
            "rosso rossa rossi rosse; blu blu blu blu; verde verde verdi verdi; "
            "nero nera neri nere; bianco bianca bianchi bianche; giallo gialla gialli gialle; "
            "grigio grigia grigi grigie"
        ),
        adjectives=_forms(
            "nuovo nuova nuovi nuove; caro cara cari care; pesante pesante pesanti pesanti; "
            "pulito pulita puliti pulite; sporco sporca sporchi sporche; "
            "vuoto vuota vuoti vuote; rotto rotta rotti rotte; vecchio vecchia vecchi vecchie"
        ),
        places=_w("roma milano napoli torino firenze venezia parigi londra berlino bologna"),
        locations=("in giardino", "a casa", "in cucina", "a scuola", "al parco",
                   "alla stazione", "in ufficio"),
        states=(("stanco", "stanca"), ("contento", "contenta"), ("triste", "triste"),
                ("occupato", "occupata"), ("affamato", "affamata"), ("malato", "malata")),
        months=_MONTHS["it"],
        weekdays=_WEEKDAYS["it"],
    ),
    "nl": _Lexicon(
        names=_names("anna/f jan/m sanne/f pieter/m emma/f daan/m lotte/f bram/m eva/f thijs/m"),
        things=_nouns(
            "auto auto's de; boek boeken het; appel appels de; huis huizen het; "
            "tafel tafels de; stoel stoelen de; brief brieven de; krant kranten de; "
            "taart taarten de; fiets fietsen de; glas glazen het; raam ramen het; "
            "deur deuren de; sleutel sleutels de; vis vissen de; bloem bloemen de; tas tassen de; "
            "boot boten de; jas jassen de; schoen schoenen de; lamp lampen de; pen pennen de; "
            "sinaasappel sinaasappels de; paraplu paraplu's de; kaas kazen de",
            _KINDS["nl"],
        ),
        animates=_nouns(
            "hond honden de; kat katten de; leraar leraren de; dokter dokters de; "
            "kind kinderen het; meisje meisjes het; jongen jongens de; vrouw vrouwen de; "
            "man mannen de; student studenten de",
            default=_ANIMATE,
        ),
        verbs=_verbs(
            [("ziet", _ANY), ("koopt", _OBJECTS), ("heeft", _ANY), ("wil", _OBJECTS),
             ("pakt", _OBJECTS), ("vindt", _ANY), ("zoekt", _ANY),
             ("eet", frozenset({_FOOD})), ("leest", frozenset({_TEXT})),
             ("schrijft", frozenset({_TEXT})), ("verkoopt", _OBJECTS), ("draagt", _OBJECTS),
             ("tekent", _ANY), ("wast", frozenset({_THING})), ("kookt", frozenset({_FOOD})),
             ("bekijkt", _ANY)]
        ),
        intransitive=_w("slaapt rent zingt danst werkt wacht lacht zwemt loopt"),
        colors=_forms(
            "rood rode; blauw blauwe; groen groene; zwart zwarte; wit witte; geel gele; "
            "grijs grijze"
        ),
        adjectives=_forms(
            "nieuw nieuwe; duur dure; zwaar zware; schoon schone; vies vieze; leeg lege; "
            "kapot kapotte; oud oude"
        ),
        places=_w(
            "amsterdam rotterdam utrecht groningen eindhoven leiden parijs londen berlijn brussel"
        ),
        locations=("in de tuin", "thuis", "in de keuken", "op school", "in het park",
                   "op het station", "op kantoor"),
        states=tuple((s, s) for s in _w("moe blij verdrietig druk hongerig ziek")),
        months=_MONTHS["nl"],
        weekdays=_WEEKDAYS["nl"],
    ),
}


# --------------------------------------------------------------------------------------------
# Per-language phrase rules and templates
# --------------------------------------------------------------------------------------------


class _Builder(ABC):
    """Builds one language's templates from a (capped) lexicon; subclasses add agreement."""

    code = ""
    copula = ""
    intensifier = ""
    conjunction = ""

    def __init__(self, lex: _Lexicon, max_number: int) -> None:
        self.lex = lex
        self.max_number = max_number
        self._objects: dict[frozenset[str], _Part] = {}
        self._counts: dict[frozenset[str], _Part] = {}

    # -- agreement hooks ---------------------------------------------------------------------
    @abstractmethod
    def np(self, noun: _Noun, definite: bool, adj: tuple[str, ...] | None) -> str:
        """Singular noun phrase with article and optional adjective."""

    @abstractmethod
    def plural(self, noun: _Noun, adj: tuple[str, ...] | None) -> str:
        """Bare plural noun with optional adjective (follows a number)."""

    def predicate(self, adj: tuple[str, ...], gender: str) -> str:
        """Adjective after the copula, agreeing with a singular subject of ``gender``."""
        return adj[0]

    def count_word(self, n: int, noun: _Noun) -> str:
        return number_to_words(n, self.code)

    def conjoin(self, next_word: str) -> str:
        """The "and" that joins two clauses, given the first word of the second one."""
        return self.conjunction

    @abstractmethod
    def templates(self) -> list[_Template]: ...

    # -- shared parts ------------------------------------------------------------------------
    def num(self, n: int) -> str:
        return number_to_words(n, self.code)

    def names(self) -> _Part:
        return _pick(name for name, _ in self.lex.names)

    def animate_subjects(self) -> list[str]:
        return [self.np(a, True, None) for a in self.lex.animates]

    def subject(self) -> _Part:
        return _alt(self.names(), _pick(self.animate_subjects()))

    def gendered_subjects(self) -> dict[str, list[str]]:
        """Singular subjects (names, definite animate nouns) by grammatical gender m/f."""
        out: dict[str, list[str]] = {"m": [], "f": []}
        for name, gender in self.lex.names:
            out[gender].append(name)
        for noun in self.lex.animates:
            out["f" if noun.gender == "f" else "m"].append(self.np(noun, True, None))
        return out

    def nouns(self, kinds: frozenset[str]) -> list[_Noun]:
        return [n for n in self.lex.things + self.lex.animates if n.kind in kinds]

    def adjs_for(self, noun: _Noun) -> tuple[tuple[str, ...], ...]:
        # Animate nouns take no adjective: "a red teacher" is not a sentence anyone says.
        return () if noun.kind == _ANIMATE else self.lex.colors + self.lex.adjectives

    def obj(self, kinds: frozenset[str]) -> _Part:
        """A singular object noun phrase, definite or not, with an adjective half the time."""
        if kinds not in self._objects:
            per_noun = []
            for noun in self.nouns(kinds):
                adjs = self.adjs_for(noun)
                per_det = []
                for definite in (True, False):
                    bare = _lit(self.np(noun, definite, None))
                    with_adj = _pick(self.np(noun, definite, a) for a in adjs)
                    per_det.append(_alt(bare, with_adj))
                per_noun.append(_alt(*per_det))
            self._objects[kinds] = _alt(*per_noun)
        return self._objects[kinds]

    def definite(self, nouns: Iterable[_Noun]) -> _Part:
        return _pick(self.np(n, True, None) for n in nouns)

    def verb_obj(self) -> _Part:
        return _alt(*(_seq(v.third, self.obj(v.kinds)) for v in self.lex.verbs))

    def count(self, kinds: frozenset[str]) -> _Part:
        """``<number 2..max> [adjective] <plural noun>`` with number agreement."""
        if kinds not in self._counts:
            numbers = range(2, self.max_number + 1)
            per_noun = []
            for noun in self.nouns(kinds):
                adjs = self.adjs_for(noun)
                noun_part = _alt(
                    self.plural(noun, None), _pick(self.plural(noun, a) for a in adjs)
                )
                per_noun.append(_seq(_pick(self.count_word(n, noun) for n in numbers), noun_part))
            self._counts[kinds] = _alt(*per_noun)
        return self._counts[kinds]

    def verb_count(self) -> _Part:
        return _alt(*(_seq(v.third, self.count(v.kinds)) for v in self.lex.verbs))

    def usable_verbs(self) -> list[_Verb]:
        return [v for v in self.lex.verbs if self.nouns(v.kinds)]

    def digits(self) -> _Part:
        digit = _pick(self.num(d) for d in range(min(9, self.max_number) + 1))
        return _alt(_seq(digit, digit, digit), _seq(digit, digit, digit, digit))

    def dates(self) -> _Part:
        """Valid day/month pairs (days up to the number cap, months from the capped list)."""
        per_month = []
        for m in range(1, len(self.lex.months) + 1):
            last = min(self.max_number, _DAYS_IN_MONTH[m - 1])
            per_month.append(_pick(date_to_words(d, m, self.code) for d in range(1, last + 1)))
        return _alt(*per_month)

    def hours(self) -> range:
        return range(1, min(12, self.max_number) + 1)

    def states(self, gender: str) -> _Part:
        forms = [s[0] if gender == "m" else s[1] for s in self.lex.states]
        return _alt(_pick(forms), _seq(self.intensifier, _pick(forms)))

    def state_clause(self, copula: str) -> _Part:
        groups = self.gendered_subjects()
        return _alt(
            *(_seq(_pick(groups[g]), copula, self.states(g)) for g in ("m", "f")),
            weights=[len(groups["m"]), len(groups["f"])],
        )

    def adjective_clause(self) -> _Part:
        """``<the noun> is [very] <adjective>`` with predicate agreement."""
        per_noun = []
        for noun in self.lex.things:
            colors = _pick(self.predicate(c, noun.gender) for c in self.lex.colors)
            adjs = _pick(self.predicate(a, noun.gender) for a in self.lex.adjectives)
            per_noun.append(
                _seq(
                    self.np(noun, True, None),
                    self.copula,
                    _alt(colors, adjs, _seq(self.intensifier, adjs)),
                )
            )
        return _alt(*per_noun)

    def location_clause(self) -> _Part:
        nouns = self.lex.animates + self.lex.things
        return _seq(self.definite(nouns), self.copula, _pick(self.lex.locations))

    def common(self) -> list[_Template]:
        """Templates whose word order is the same in all four languages."""
        lex = self.lex
        return [
            _Template("svo", _seq(self.subject(), self.verb_obj()), True),
            _Template("sv", _seq(self.subject(), _pick(lex.intransitive)), True),
            _Template("count", _seq(self.subject(), self.verb_count()), True),
            _Template("state", self.state_clause(self.copula), True),
            _Template("adjective", self.adjective_clause(), True),
            _Template("location", self.location_clause(), True),
            _Template("fragment", _pick(_FRAGMENTS[self.code]), False),
            _Template("greeting", _seq(_pick(_GREETINGS[self.code]), self.names()), False),
        ]


_FRAGMENTS = {
    "en": ("hello", "goodbye", "thanks", "yes", "no"),
    "fr": ("bonjour", "merci", "salut", "oui", "non"),
    "it": ("ciao", "grazie", "buongiorno", "sì", "no"),
    "nl": ("hallo", "dag", "bedankt", "ja", "nee"),
}
_GREETINGS = {
    "en": ("hello", "good morning", "good evening", "thank you", "goodbye"),
    "fr": ("bonjour", "bonsoir", "merci", "au revoir", "salut"),
    "it": ("ciao", "buongiorno", "buonasera", "grazie", "arrivederci"),
    "nl": ("hallo", "goedemorgen", "goedenavond", "dank je", "dag"),
}


class _English(_Builder):
    code, copula, intensifier, conjunction = "en", "is", "very", "and"

    def np(self, noun: _Noun, definite: bool, adj: tuple[str, ...] | None) -> str:
        head = f"{adj[0]} {noun.sg}" if adj else noun.sg
        article = "the" if definite else ("an" if head[0] in "aeiou" else "a")
        return f"{article} {head}"

    def plural(self, noun: _Noun, adj: tuple[str, ...] | None) -> str:
        return f"{adj[0]} {noun.pl}" if adj else noun.pl

    def times(self) -> list[str]:
        out = []
        for h in self.hours():
            w = self.num(h)
            out += [f"{w} o'clock", f"a quarter past {w}", f"half past {w}", f"a quarter to {w}"]
        return out

    def templates(self) -> list[_Template]:
        lex, subj = self.lex, self.subject()
        times = self.times()
        return [
            *self.common(),
            _Template("place", _seq(subj, _pick(lex.intransitive), _alt(
                _pick(lex.locations), _pick(f"in {p}" for p in lex.places))), True),
            _Template("there_are", _seq("there are", self.count(_ANY)), True),
            _Template("who", _seq("who", self.verb_obj()), False),
            _Template("where", _seq("where is", self.definite(lex.things + lex.animates)), False),
            _Template("color", _seq("what color is", self.definite(lex.things)), False),
            _Template("yes_no", _seq("does", subj, _alt(
                *(_seq(v.base, self.obj(v.kinds)) for v in lex.verbs))), False),
            _Template("what", _seq("what does", subj, _pick(
                v.base for v in self.usable_verbs())), False),
            _Template("how_many", _alt(*(
                _seq("how many", _pick(n.pl for n in self.nouns(v.kinds)), "does", subj, v.base)
                for v in lex.verbs)), False),
            _Template("my_name", _seq("my name is", self.names()), True),
            _Template("lives", _seq(self.names(), "lives in", _pick(lex.places)), True),
            _Template("count_to", _seq(self.names(), "counts to", _pick(
                self.num(n) for n in range(1, self.max_number + 1))), True),
            _Template("code", _seq("the code is", self.digits()), True),
            _Template("price", _seq(self.definite(lex.things), "costs", _pick(
                self.num(n) for n in range(2, self.max_number + 1)), "euros"), True),
            _Template("date", _seq(_alt("today is", "my birthday is on", "the party is on",
                                        _seq(self.names(), "arrives on")), self.dates()), True),
            _Template("weekday", _alt(_seq("today is", _pick(lex.weekdays)), _seq(
                subj, self.verb_obj(), "on", _pick(lex.weekdays))), True),
            _Template("time", _alt(_seq("it is", _pick(times)), _seq(_alt(
                _pick(["the train leaves", "the bus leaves", "the film starts",
                       "the lesson starts"]), _seq(self.names(), "arrives")),
                "at", _pick(times))), True),
        ]  # fmt: skip


_FR_H_MUET = frozenset({"homme", "hommes", "heure", "heures", "histoire", "hiver", "hôtel"})


def _fr_elides(word: str) -> bool:
    return word[0] in "aeiouàâéèêîïôû" or word.split()[0] in _FR_H_MUET


def _elide(short: str, word: str, elides: bool) -> str:
    """``que`` + ``antoine`` -> ``qu'antoine``; otherwise the two words with a space."""
    return f"{short[:-1]}'{word}" if elides else f"{short} {word}"


def _gender_index(gender: str, plural: bool) -> int:
    return (1 if gender == "f" else 0) + (2 if plural else 0)


class _French(_Builder):
    code, copula, intensifier, conjunction = "fr", "est", "très", "et"

    def np(self, noun: _Noun, definite: bool, adj: tuple[str, ...] | None) -> str:
        masc = noun.gender == "m"
        if definite:
            head = _elide("le" if masc else "la", noun.sg, _fr_elides(noun.sg))
        else:
            head = f"{'un' if masc else 'une'} {noun.sg}"
        return f"{head} {adj[_gender_index(noun.gender, False)]}" if adj else head

    def plural(self, noun: _Noun, adj: tuple[str, ...] | None) -> str:
        return f"{noun.pl} {adj[_gender_index(noun.gender, True)]}" if adj else noun.pl

    def predicate(self, adj: tuple[str, ...], gender: str) -> str:
        return adj[_gender_index(gender, False)]

    def count_word(self, n: int, noun: _Noun) -> str:
        word = self.num(n)
        if noun.gender == "f" and word.endswith(("-un", " un")):
            word += "e"  # vingt et une pommes
        return word

    def times(self) -> list[str]:
        out = []
        for h in self.hours():
            hour = "une heure" if h == 1 else f"{self.num(h)} heures"
            out += [hour, f"{hour} et quart", f"{hour} et demie", f"{hour} moins le quart"]
        return out

    def templates(self) -> list[_Template]:
        lex, subj = self.lex, self.subject()
        times = self.times()

        def que(prefix: str) -> _Part:  # "est-ce que" + subject, eliding before a vowel
            return _alt(*(_pick(_elide(prefix, s, _fr_elides(s)) for s in group) for group in (
                [n for n, _ in lex.names], self.animate_subjects())))

        return [
            *self.common(),
            _Template("place", _seq(subj, _pick(lex.intransitive), _alt(
                _pick(lex.locations), _pick(f"à {p}" for p in lex.places))), True),
            _Template("there_are", _seq("il y a", self.count(_ANY)), True),
            _Template("who", _seq("qui", self.verb_obj()), False),
            _Template("where", _seq("où est", self.definite(lex.things + lex.animates)), False),
            _Template("color", _seq("de quelle couleur est", self.definite(lex.things)), False),
            _Template("yes_no", _seq(que("est-ce que"), self.verb_obj()), False),
            _Template("what", _seq(que("qu'est-ce que"), _pick(
                v.third for v in self.usable_verbs())), False),
            _Template("how_many", _seq(_pick(
                _elide("combien de", n.pl, _fr_elides(n.pl)) for n in self.nouns(_ANY)),
                "y a-t-il"), False),
            _Template("my_name", _seq("je m'appelle", self.names()), True),
            _Template("lives", _seq(self.names(), "habite à", _pick(lex.places)), True),
            _Template("count_to", _seq(self.names(), "compte jusqu'à", _pick(
                self.num(n) for n in range(1, self.max_number + 1))), True),
            _Template("code", _seq("le code est", self.digits()), True),
            _Template("price", _seq(self.definite(lex.things), "coûte", _pick(
                self.num(n) for n in range(2, self.max_number + 1)), "euros"), True),
            _Template("date", _seq(_alt("nous sommes", "mon anniversaire est", "la fête est",
                                        _seq(self.names(), "arrive")), self.dates()), True),
            _Template("weekday", _alt(_seq("aujourd'hui c'est", _pick(lex.weekdays)), _seq(
                subj, self.verb_obj(), _pick(lex.weekdays))), True),
            _Template("time", _alt(_seq("il est", _pick(times)), _seq(_alt(
                _pick(["le train part", "le bus part", "le film commence",
                       "le cours commence"]), _seq(self.names(), "arrive")),
                "à", _pick(times))), True),
        ]  # fmt: skip


def _it_article(word: str, gender: str, plural: bool, definite: bool) -> str:
    """Italian article for a noun phrase starting with ``word``; a trailing ``'`` attaches."""
    vowel = word[0] in "aeiouàèéìòù"
    impure = (  # s + consonant, z, gn, ps, x, y take lo/uno/gli
        (word[0] == "s" and len(word) > 1 and word[1] not in "aeiou")
        or word[0] in "zxy"
        or word.startswith(("gn", "ps", "pn"))
    )
    if gender == "f":
        if plural:
            return "le"
        if definite:
            return "l'" if vowel else "la"
        return "un'" if vowel else "una"
    if plural:
        return "gli" if vowel or impure else "i"
    if definite:
        return "l'" if vowel else ("lo" if impure else "il")
    return "uno" if impure else "un"


def _attach(article: str, word: str) -> str:
    return article + word if article.endswith("'") else f"{article} {word}"


class _Italian(_Builder):
    code, copula, intensifier, conjunction = "it", "è", "molto", "e"

    def np(self, noun: _Noun, definite: bool, adj: tuple[str, ...] | None) -> str:
        head = _attach(_it_article(noun.sg, noun.gender, False, definite), noun.sg)
        return f"{head} {adj[_gender_index(noun.gender, False)]}" if adj else head

    def plural(self, noun: _Noun, adj: tuple[str, ...] | None) -> str:
        return f"{noun.pl} {adj[_gender_index(noun.gender, True)]}" if adj else noun.pl

    def predicate(self, adj: tuple[str, ...], gender: str) -> str:
        return adj[_gender_index(gender, False)]

    def conjoin(self, next_word: str) -> str:
        return "ed" if next_word[0] in "eèé" else "e"  # euphonic d: ed è, ed elena

    def clock(self, at: bool) -> list[str]:
        """``sono le sette e mezza`` (``at``: ``alle sette e mezza``); one o'clock is ``l'una``."""
        out = []
        for h in self.hours():
            if h == 1:
                head = "all'una" if at else "è l'una"
            else:
                head = f"{'alle' if at else 'sono le'} {self.num(h)}"
            out += [head, f"{head} e un quarto", f"{head} e mezza", f"{head} meno un quarto"]
        return out

    def templates(self) -> list[_Template]:
        lex, subj = self.lex, self.subject()
        quanti = []  # "quante mele compra giulia": quanti/quante agrees with the noun
        for v in lex.verbs:
            for gender, word in (("m", "quanti"), ("f", "quante")):
                nouns = [n.pl for n in self.nouns(v.kinds) if n.gender == gender]
                quanti.append((_seq(word, _pick(nouns), v.third, subj), len(nouns)))
        return [
            *self.common(),
            _Template("place", _seq(subj, _pick(lex.intransitive), _alt(
                _pick(lex.locations), _pick(f"a {p}" for p in lex.places))), True),
            _Template("there_are", _seq("ci sono", self.count(_ANY)), True),
            _Template("who", _seq("chi", self.verb_obj()), False),
            _Template("where", _seq("dov'è", self.definite(lex.things + lex.animates)), False),
            _Template("color", _seq("di che colore è", self.definite(lex.things)), False),
            _Template("what", _seq("che cosa", _pick(
                v.third for v in self.usable_verbs()), subj), False),
            _Template("how_many", _alt(*(p for p, _ in quanti),
                                       weights=[w for _, w in quanti]), False),
            _Template("my_name", _seq("mi chiamo", self.names()), True),
            _Template("lives", _seq(self.names(), "abita a", _pick(lex.places)), True),
            _Template("count_to", _seq(self.names(), "conta fino a", _pick(
                self.num(n) for n in range(1, self.max_number + 1))), True),
            _Template("code", _seq("il codice è", self.digits()), True),
            _Template("price", _seq(self.definite(lex.things), "costa", _pick(
                self.num(n) for n in range(2, self.max_number + 1)), "euro"), True),
            _Template("date", _seq(_alt("oggi è", "il mio compleanno è", "la festa è",
                                        _seq(self.names(), "arriva")), self.dates()), True),
            _Template("weekday", _alt(_seq("oggi è", _pick(lex.weekdays)), _seq(
                subj, self.verb_obj(), _pick(lex.weekdays))), True),
            _Template("time", _alt(_pick(self.clock(at=False)), _seq(_alt(
                _pick(["il treno parte", "l'autobus parte", "il film comincia",
                       "la lezione comincia"]), _seq(self.names(), "arriva")),
                _pick(self.clock(at=True)))), True),
        ]  # fmt: skip


class _Dutch(_Builder):
    code, copula, intensifier, conjunction = "nl", "is", "erg", "en"

    def np(self, noun: _Noun, definite: bool, adj: tuple[str, ...] | None) -> str:
        article = ("het" if noun.gender == "het" else "de") if definite else "een"
        if not adj:
            return f"{article} {noun.sg}"
        # Uninflected only for a het-word after "een": een groot huis / het grote huis.
        form = adj[0] if (not definite and noun.gender == "het") else adj[1]
        return f"{article} {form} {noun.sg}"

    def plural(self, noun: _Noun, adj: tuple[str, ...] | None) -> str:
        return f"{adj[1]} {noun.pl}" if adj else noun.pl

    def times(self) -> list[str]:
        out = []
        for h in self.hours():
            w = self.num(h)
            out += [f"{w} uur", f"kwart over {w}", f"half {w}", f"kwart voor {w}"]
        return out

    def templates(self) -> list[_Template]:
        lex, subj = self.lex, self.subject()
        times = self.times()
        return [
            *self.common(),
            _Template("place", _seq(subj, _pick(lex.intransitive), _alt(
                _pick(lex.locations), _pick(f"in {p}" for p in lex.places))), True),
            _Template("there_are", _seq("er zijn", self.count(_ANY)), True),
            _Template("who", _seq("wie", self.verb_obj()), False),
            _Template("where", _seq("waar is", self.definite(lex.things + lex.animates)), False),
            _Template("color", _seq("welke kleur heeft", self.definite(lex.things)), False),
            _Template("yes_no", _alt(*(
                _seq(v.third, subj, self.obj(v.kinds)) for v in lex.verbs)), False),
            _Template("what", _seq("wat", _pick(v.third for v in self.usable_verbs()), subj),
                      False),
            _Template("how_many", _alt(*(
                _seq("hoeveel", _pick(n.pl for n in self.nouns(v.kinds)), v.third, subj)
                for v in lex.verbs)), False),
            _Template("my_name", _seq("ik heet", self.names()), True),
            _Template("lives", _seq(self.names(), "woont in", _pick(lex.places)), True),
            _Template("count_to", _seq(self.names(), "telt tot", _pick(
                self.num(n) for n in range(1, self.max_number + 1))), True),
            _Template("code", _seq("de code is", self.digits()), True),
            _Template("price", _seq(self.definite(lex.things), "kost", _pick(
                self.num(n) for n in range(2, self.max_number + 1)), "euro"), True),
            _Template("date", _seq(_alt("vandaag is het", "mijn verjaardag is op",
                                        "het feest is op", _seq(self.names(), "komt op")),
                                   self.dates()), True),
            _Template("weekday", _alt(_seq("vandaag is het", _pick(lex.weekdays)), _seq(
                subj, self.verb_obj(), "op", _pick(lex.weekdays))), True),
            _Template("time", _alt(_seq("het is", _pick(times)), _seq(_alt(
                _pick(["de trein vertrekt", "de bus vertrekt", "de film begint",
                       "de les begint"]), _seq(self.names(), "komt")),
                "om", _pick(times))), True),
        ]  # fmt: skip


_BUILDERS: dict[str, type[_Builder]] = {
    "en": _English, "fr": _French, "it": _Italian, "nl": _Dutch,
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Sentence generation
# --------------------------------------------------------------------------------------------

_MAX_TRIES = 100_000


class _Grammar:
    """All templates of one language at one lexicon size, plus length bookkeeping."""

    def __init__(self, builder: _Builder) -> None:
        self.templates = [t for t in builder.templates() if t.part.lengths]
        self.conjoin = builder.conjoin
        clauses = [t for t in self.templates if t.clause]
        self.clauses = clauses
        self.clause_lengths = sorted(frozenset().union(*(t.part.lengths for t in clauses)))
        # chain[n]: n words can be one or more clauses joined by "and";
        # joined[n]: at least two such clauses.
        n_max = MAX_SENTENCE_WORDS
        self.chain = [False] * (n_max + 1)
        self.joined = [False] * (n_max + 1)
        for n in range(1, n_max + 1):
            rests = [n - k - 1 for k in self.clause_lengths if n - k - 1 >= 1]
            self.joined[n] = any(self.chain[r] for r in rests)
            self.chain[n] = n in self.clause_lengths or self.joined[n]
        words = frozenset().union(*(t.part.words for t in self.templates))
        if any(self.joined):
            firsts = frozenset().union(*(t.part.firsts for t in clauses))
            words |= {self.conjoin(w) for w in firsts}
        self.words = words

    def feasible(self, n: int) -> bool:
        return self.joined[n] or any(n in t.part.lengths for t in self.templates)

    def sentence(self, rng: random.Random, n: int) -> list[str]:
        """A sentence of exactly ``n`` words: one template, or clauses joined by "and"."""
        options: list[_Template | None] = [t for t in self.templates if n in t.part.lengths]
        if self.joined[n]:
            options.append(None)
        choice = options[rng.randrange(len(options))]
        if choice is not None:
            return _exact(choice.part, n, rng)
        clauses: list[list[str]] = []
        left = n
        while left > 0:
            sizes = [
                k
                for k in self.clause_lengths
                if (k == left and clauses) or (left - k - 1 >= 1 and self.chain[left - k - 1])
            ]
            k = sizes[rng.randrange(len(sizes))]
            candidates = [t for t in self.clauses if k in t.part.lengths]
            clauses.append(_exact(candidates[rng.randrange(len(candidates))].part, k, rng))
            left -= k + 1
        words = clauses[0]
        for clause in clauses[1:]:
            words = [*words, self.conjoin(clause[0]), *clause]
        return words


def _exact(part: _Part, n: int, rng: random.Random) -> list[str]:
    """Sample ``part`` until it yields ``n`` words (``n`` is known to be among its lengths)."""
    for _ in range(_MAX_TRIES):
        words = part.sample(rng)
        if len(words) == n:
            return words
    raise RuntimeError(f"no {n}-word sample after {_MAX_TRIES} tries")  # pragma: no cover


@lru_cache(maxsize=32)
def _grammar(language: str, lexicon_size: int | None) -> _Grammar:
    lex = _LEXICONS[language]
    max_number = SENTENCE_MAX_NUMBER
    if lexicon_size is not None:
        lex = lex.capped(lexicon_size)
        max_number = min(max_number, lexicon_size)
    grammar = _Grammar(_BUILDERS[language](lex, max_number))
    bad = sorted(
        w
        for w in grammar.words
        if normalize(w, language) != w or not set(w) <= ALPHABETS[language]
    )
    if bad:  # a typo in the tables above, not a user error
        raise RuntimeError(f"{language} grammar yields unnormalized words: {bad}")
    return grammar


def _check_lexicon_size(lexicon_size: int | None) -> None:
    if lexicon_size is not None:
        _check_int("lexicon_size", lexicon_size, 1)


def make_sentences(
    language: str,
    count: int,
    seed: int,
    *,
    min_words: int = 3,
    max_words: int = 8,
    lexicon_size: int | None = None,
) -> list[str]:
    """``count`` normalized sentences of ``min_words..max_words`` words from the grammar.

    Each sentence first draws its length uniformly among the lengths the grammar can make in
    the range, then a template (statement, question, greeting, date, time, count, price...)
    that fits it; lengths no single template reaches are made by joining statements with
    "and". Deterministic: the output depends only on the arguments (a private
    ``random.Random`` seeded from a hash of them, nothing global), and sentence ``i`` does not
    depend on ``count``, so a longer list extends a shorter one.

    ``lexicon_size`` keeps the first ``k`` entries of every word class (names, nouns, verbs,
    adjectives, colors, places, locations, states, months, weekdays) and limits numbers to
    ``0..k``; numbers never exceed :data:`SENTENCE_MAX_NUMBER`.

    Returns:
        list of ``count`` strings; words are ``str.split()`` tokens.

    Raises:
        TextError (a ValueError): unknown language, ``count < 0``, ``min_words < 1``,
        ``max_words < min_words`` or above :data:`MAX_SENTENCE_WORDS`, ``lexicon_size < 1``,
        or a range no sentence of the capped grammar fits.
    """
    _check_language(language)
    _check_int("count", count, 0)
    _check_int("seed", seed)
    _check_int("min_words", min_words, 1, MAX_SENTENCE_WORDS)
    _check_int("max_words", max_words, min_words, MAX_SENTENCE_WORDS)
    _check_lexicon_size(lexicon_size)
    grammar = _grammar(language, lexicon_size)
    lengths = [n for n in range(min_words, max_words + 1) if grammar.feasible(n)]
    if not lengths:
        raise TextError(
            f"no {language} sentence has {min_words}..{max_words} words "
            f"with lexicon_size={lexicon_size}"
        )
    key = f"sparse_rnnt.text|{language}|{seed}|{min_words}|{max_words}|{lexicon_size}"
    rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
    return [
        " ".join(grammar.sentence(rng, lengths[rng.randrange(len(lengths))]))
        for _ in range(count)
    ]


def vocabulary(language: str, lexicon_size: int | None = None) -> set[str]:
    """Every word :func:`make_sentences` can produce for ``language`` and ``lexicon_size``
    (over all ``min_words``/``max_words``), and no other: the corpus's closed word list."""
    _check_language(language)
    _check_lexicon_size(lexicon_size)
    return set(_grammar(language, lexicon_size).words)
