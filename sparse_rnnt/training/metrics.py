"""Word error rate: substitutions, deletions and insertions from a Levenshtein alignment."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass
class ErrorCounts:
    """Corpus-level counts; ``wer = (S + D + I) / N`` with N the number of reference words."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    hits: int = 0
    utterances: int = 0

    @property
    def reference_words(self) -> int:
        return self.substitutions + self.deletions + self.hits

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        n = self.reference_words
        if n == 0:
            return 0.0 if self.insertions == 0 else float("inf")
        return self.errors / n

    def __iadd__(self, other: ErrorCounts) -> ErrorCounts:
        self.substitutions += other.substitutions
        self.deletions += other.deletions
        self.insertions += other.insertions
        self.hits += other.hits
        self.utterances += other.utterances
        return self

    def to_dict(self) -> dict[str, float | int]:
        return {
            "wer": self.wer,
            "substitutions": self.substitutions,
            "deletions": self.deletions,
            "insertions": self.insertions,
            "hits": self.hits,
            "reference_words": self.reference_words,
            "utterances": self.utterances,
        }


def align_counts(reference: Sequence[str], hypothesis: Sequence[str]) -> ErrorCounts:
    """Minimum-edit alignment of two token sequences.

    Among minimum-cost alignments a substitution is preferred to a deletion plus an insertion
    (a usual scoring convention), which makes the S/D/I split well defined. The totals and the
    WER equal jiwer's; its S/D/I split can differ where several alignments tie.
    """
    n, m = len(reference), len(hypothesis)
    # cost[j], with parallel arrays of (S, D, I, H) along the chosen path.
    prev = [(j, 0, 0, j, 0) for j in range(m + 1)]  # (cost, S, D, I, H)
    for i in range(1, n + 1):
        cur = [(i, 0, i, 0, 0)]
        ref_tok = reference[i - 1]
        for j in range(1, m + 1):
            c, s, d, ins, h = prev[j - 1]
            if ref_tok == hypothesis[j - 1]:
                diag = (c, s, d, ins, h + 1)
            else:
                diag = (c + 1, s + 1, d, ins, h)
            c, s, d, ins, h = prev[j]
            up = (c + 1, s, d + 1, ins, h)  # deletion of the reference word
            c, s, d, ins, h = cur[j - 1]
            left = (c + 1, s, d, ins + 1, h)  # insertion of a hypothesis word
            cur.append(min(diag, up, left, key=lambda t: (t[0], t[4])))
        prev = cur
    _, s, d, ins, h = prev[m]
    return ErrorCounts(substitutions=s, deletions=d, insertions=ins, hits=h, utterances=1)


def word_errors(references: Iterable[str], hypotheses: Iterable[str]) -> ErrorCounts:
    """Corpus-level error counts over paired transcripts (split on whitespace)."""
    total = ErrorCounts()
    refs, hyps = list(references), list(hypotheses)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    for r, h in zip(refs, hyps, strict=True):
        total += align_counts(r.split(), h.split())
    return total


def wer(references: Iterable[str], hypotheses: Iterable[str]) -> float:
    return word_errors(references, hypotheses).wer
