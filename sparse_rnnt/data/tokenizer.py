"""One SentencePiece tokenizer shared by all languages; the RNN-T blank is appended after it.

Symbol layout seen by the model: ids ``0 .. vocab_size - 1`` are SentencePiece pieces (id 0 is
``<unk>``, there is no bos/eos/pad), and ``blank == vocab_size`` is the last symbol, so the model
has ``num_symbols = vocab_size + 1`` outputs and ``rnnt_loss(blank=-1)`` / ``RNNTBeamSearch(blank=
num_symbols - 1)`` agree with it.

Texts are NFC-normalized before training and encoding; SentencePiece's own normalization is
disabled (``identity``) so that ``decode(encode(text)) == text`` for NFC text with single spaces.
"""

from __future__ import annotations

import io
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from ..errors import UserError
from ..io import atomic_write_bytes

MODEL_TYPES: tuple[str, ...] = ("char", "unigram", "bpe")
_UNK_ID = 0


@dataclass(frozen=True)
class TokenizerConfig:
    """SentencePiece training settings."""

    model_type: str = "char"  # char | unigram | bpe
    vocab_size: int = 0  # pieces incl. <unk>; 0: every character seen (char models only)
    character_coverage: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise UserError(
                f"tokenizer model_type {self.model_type!r}: choose from {', '.join(MODEL_TYPES)}"
            )
        if self.vocab_size < 0:
            raise UserError(f"tokenizer vocab_size must be >= 0, got {self.vocab_size}")
        if self.vocab_size == 0 and self.model_type != "char":
            raise UserError(
                f"tokenizer vocab_size must be given for model_type {self.model_type!r}"
            )
        if not 0.0 < self.character_coverage <= 1.0:
            raise UserError(
                f"tokenizer character_coverage must lie in (0, 1], got {self.character_coverage}"
            )


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _normal(text: str) -> str:
    """What the model sees of a text: NFC, every run of whitespace (tab, no-break space, newline)
    one space, as in training (SentencePiece's identity rule knows only the space)."""
    return " ".join(_nfc(text).split())


def _char_pieces_needed(lines: list[str], coverage: float) -> int:
    """Pieces of a char model over ``lines``: ``<unk>`` plus the characters SentencePiece keeps
    at ``coverage`` (the word boundary "▁", one per word, counts as a character): the most
    frequent ones until their share of all character occurrences reaches ``coverage``."""
    counts = Counter(c for t in lines for c in t if c != " ")
    counts["\u2581"] += sum(len(t.split()) for t in lines)
    total = sum(counts.values())
    kept = covered = 0
    for n in sorted(counts.values(), reverse=True):
        if covered / total >= coverage:  # SentencePiece's own test
            break
        covered += n
        kept += 1
    return kept + 1


def is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (valid JSON, not valid UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Tokenizer:
    """Text <-> token ids in ``[0, vocab_size)``; ``blank = vocab_size`` is reserved for RNN-T."""

    def __init__(self, model_proto: bytes, source: str = "tokenizer bytes") -> None:
        """Wrap a serialized SentencePiece model; ``source`` names it in error messages."""
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError, TypeError) as e:
            raise UserError(f"{source}: not a SentencePiece model ({e})") from None
        if (
            sp.get_piece_size() == 0
            or sp.unk_id() != _UNK_ID
            or sp.bos_id() >= 0
            or sp.eos_id() >= 0
        ):
            raise UserError(
                f"{source}: SentencePiece model was not trained by sparse_rnnt (unk/bos/eos)"
            )
        self._sp = sp
        self._proto = bytes(model_proto)

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def train(
        cls, texts: list[str], config: TokenizerConfig, out_path: str | os.PathLike[str]
    ) -> Tokenizer:
        """Train one model over the texts of all languages and write it to ``out_path``.

        Deterministic for the same texts and config (no input shuffling or sampling, one
        thread). The ``.model`` file is written atomically.
        """
        config.validate()
        # Not valid Unicode (lone surrogates): left out here, and screened out as unencodable.
        lines = [_normal(t) for t in texts if is_unicode(t)]
        lines = [t for t in lines if t]
        if not lines:
            raise UserError(
                f"cannot train a tokenizer for {out_path}: no (non-empty) training text"
            )
        vocab_size = config.vocab_size
        if config.model_type == "char":
            needed = _char_pieces_needed(lines, config.character_coverage)
            if vocab_size == 0:
                chars = {c for t in lines for c in t if c != " "}
                vocab_size = len(chars) + 2  # + <unk> + "▁": a cap, the coverage may keep fewer
            elif vocab_size < needed:
                # A char model has no pieces but the characters: a smaller vocabulary drops
                # characters, and transcripts holding them cannot be encoded.
                raise UserError(
                    f"cannot train a tokenizer for {out_path}: a char model of these transcripts needs "
                    f"vocab_size >= {needed} (one piece per character, <unk> and the word boundary), "
                    f"got {vocab_size}; use {needed} or 0 (every character)"
                )
        writer = io.BytesIO()
        # The trainer's RNG is process-global (used by unigram EM sampling only).
        spm.set_random_generator_seed(config.seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=writer,
                model_type=config.model_type,
                vocab_size=vocab_size,
                # Char models have no pieces beyond the characters: take as many as exist.
                hard_vocab_limit=config.model_type != "char",
                character_coverage=config.character_coverage,
                normalization_rule_name="identity",
                unk_id=_UNK_ID,
                bos_id=-1,
                eos_id=-1,
                pad_id=-1,
                input_sentence_size=0,
                shuffle_input_sentence=False,
                num_threads=1,
                max_sentence_length=1 << 16,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise UserError(f"cannot train a tokenizer for {out_path}: {e}") from None
        tok = cls(writer.getvalue(), source=str(out_path))
        atomic_write_bytes(out_path, tok.to_bytes())
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Read a ``.model`` file; :class:`UserError` if it is missing or not a valid model."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer model not found: {path}")
        return cls(path.read_bytes(), source=str(path))

    def to_bytes(self) -> bytes:
        """The serialized model proto (to embed in checkpoints)."""
        return self._proto

    @classmethod
    def from_bytes(cls, data: bytes) -> Tokenizer:
        """Inverse of :meth:`to_bytes`."""
        return cls(data)

    # --- symbols ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of non-blank symbols."""
        return int(self._sp.get_piece_size())

    @property
    def blank(self) -> int:
        """The RNN-T blank id: the last symbol."""
        return self.vocab_size

    @property
    def num_symbols(self) -> int:
        """Output size of the model: pieces + blank."""
        return self.vocab_size + 1

    @property
    def unk(self) -> int:
        return _UNK_ID

    def id_to_piece(self, i: int) -> str:
        return "<blank>" if i == self.blank else str(self._sp.id_to_piece(i))

    # --- text ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids in ``[0, vocab_size)``; unknown characters become ``unk`` (see
        :meth:`encodable`)."""
        return [int(i) for i in self._sp.encode(_normal(text))]

    def unknown_characters(self, text: str) -> list[str]:
        """The distinct non-space characters of ``text`` the model maps to ``unk``, sorted."""
        out = []
        for c in sorted(set(_normal(text))):
            if c.isspace():
                continue
            if _UNK_ID in self._sp.encode(c):
                out.append(c)
        return out

    def encodable(self, text: str) -> bool:
        """False when ``text`` holds characters the model does not know, or is not valid Unicode
        (a lone surrogate such as JSON's ``"\\udc80"``, which sentencepiece cannot take)."""
        return is_unicode(text) and _UNK_ID not in self.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; blanks are ignored, other out-of-range ids raise ``ValueError``."""
        keep = []
        for i in ids:
            i = int(i)
            if i == self.blank:
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} outside [0, {self.vocab_size}] (blank {self.blank})"
                )
            keep.append(i)
        return str(self._sp.decode(keep))
