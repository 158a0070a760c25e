import jiwer
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_rnnt.training.metrics import align_counts, word_errors

WORDS = st.lists(st.sampled_from(["a", "b", "c", "d", "ee", "f"]), max_size=12)


def test_hand_computed_counts():
    # "the cat sat" vs "the bat sat down": one substitution (cat->bat), one insertion (down).
    c = align_counts(["the", "cat", "sat"], ["the", "bat", "sat", "down"])
    assert (c.substitutions, c.deletions, c.insertions, c.hits) == (1, 0, 1, 2)
    assert c.wer == pytest.approx(2 / 3)
    c = align_counts(["a", "b", "c", "d"], ["a", "d"])
    assert (c.substitutions, c.deletions, c.insertions, c.hits) == (0, 2, 0, 2)
    c = align_counts([], ["x"])
    assert c.insertions == 1 and c.wer == float("inf")
    assert align_counts([], []).wer == 0.0


def test_corpus_level_not_mean_of_utterances():
    refs = ["a b c d e f g h i j", "x"]
    hyps = ["a b c d e f g h i j", "y"]
    # corpus WER = 1 error / 11 words, not mean(0, 1) = 0.5
    assert word_errors(refs, hyps).wer == pytest.approx(1 / 11)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(WORDS, WORDS), min_size=1, max_size=5))
def test_matches_jiwer(pairs):
    refs = [" ".join(r) for r, _ in pairs]
    hyps = [" ".join(h) for _, h in pairs]
    ours = word_errors(refs, hyps)
    # jiwer refuses empty references; compare where it is defined.
    if any(not r for r in refs):
        return
    out = jiwer.process_words(refs, hyps)
    # The S/D/I split of a minimum-cost alignment is ambiguous (jiwer follows rapidfuzz's
    # backtrace); the edit distance and the WER are not.
    assert ours.errors == out.substitutions + out.deletions + out.insertions
    assert ours.reference_words == sum(len(r.split()) for r in refs)
    assert ours.hits + ours.substitutions + ours.insertions == sum(len(h.split()) for h in hyps)
    assert ours.wer == pytest.approx(out.wer)


def test_length_mismatch():
    with pytest.raises(ValueError):
        word_errors(["a"], [])
