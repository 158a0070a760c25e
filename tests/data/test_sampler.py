"""Bucketed batch sampler: coverage, frame budget, languages, determinism, resume, sharding."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_rnnt.data.sampler import BatchConfig, BucketBatchSampler
from sparse_rnnt.errors import UserError

LANGS = ["en", "fr", "it", "nl"]


def corpus(n: int, seed: int = 0) -> tuple[list[int], list[float], list[str]]:
    """Durations drawn as whole centiseconds so the frame count is 1 + centiseconds exactly."""
    rng = random.Random(seed)
    cs = [rng.randint(50, 1600) for _ in range(n)]
    return cs, [c / 100 for c in cs], [rng.choice(LANGS) for _ in range(n)]


def padded_frames(batch: list[int], cs: list[int]) -> int:
    return len(batch) * max(1 + cs[i] for i in batch)


def test_every_index_once_and_budget() -> None:
    cs, durs, langs = corpus(500)
    for mode in ("mixed", "monolingual"):
        cfg = BatchConfig(max_frames=6000, max_batch=16, mode=mode)
        batches = list(BucketBatchSampler(durs, langs, cfg))
        assert sorted(i for b in batches for i in b) == list(range(500))
        for b in batches:
            assert 1 <= len(b) <= 16
            assert padded_frames(b, cs) <= 6000


def test_monolingual_batches_are_single_language_and_mixed_mixes() -> None:
    _, durs, langs = corpus(400, seed=1)
    mono = BucketBatchSampler(durs, langs, BatchConfig(max_frames=8000, mode="monolingual"))
    assert all(len({langs[i] for i in b}) == 1 for b in mono)
    mixed = BucketBatchSampler(durs, langs, BatchConfig(max_frames=8000, mode="mixed"))
    assert any(len({langs[i] for i in b}) > 1 for b in mixed)


def test_unshuffled_order_is_duration_sorted_and_greedy() -> None:
    cs, durs, langs = corpus(300, seed=2)
    cfg = BatchConfig(max_frames=5000, max_batch=12, shuffle=False)
    batches = list(BucketBatchSampler(durs, langs, cfg))
    flat = [i for b in batches for i in b]
    assert flat == sorted(range(300), key=lambda i: (cs[i], i))
    # Greedy packing: each batch but the last could not take the next utterance.
    for b, nxt in itertools.pairwise(batches):
        assert len(b) == 12 or padded_frames([*b, nxt[0]], cs) > 5000


def test_shuffled_batches_stay_within_buckets() -> None:
    _, durs, langs = corpus(600, seed=3)
    cfg = BatchConfig(max_frames=4000, bucket_width_s=1.0, mode="monolingual")
    batches = list(BucketBatchSampler(durs, langs, cfg))
    by_lang: dict[str, list[tuple[int, int]]] = {}
    for b in batches:
        buckets = [int(durs[i] // 1.0) for i in b]
        by_lang.setdefault(langs[b[0]], []).append((min(buckets), max(buckets)))
    # Batches are runs of a bucket-sorted order: their bucket ranges overlap in at most one bucket.
    for spans in by_lang.values():
        for x, (lo1, hi1) in enumerate(spans):
            for lo2, hi2 in spans[x + 1 :]:
                assert max(lo1, lo2) >= min(hi1, hi2)


def test_epochs_and_seeds() -> None:
    _, durs, langs = corpus(300, seed=4)
    cfg = BatchConfig(max_frames=5000, seed=11)
    s1 = BucketBatchSampler(durs, langs, cfg)
    s2 = BucketBatchSampler(durs, langs, cfg)
    s1.set_epoch(3)
    s2.set_epoch(3)
    e3 = list(s1)
    assert e3 == list(s2)
    assert e3 == list(s1)  # a second pass over the same epoch repeats it
    s1.set_epoch(4)
    assert list(s1) != e3
    other_seed = BucketBatchSampler(durs, langs, BatchConfig(max_frames=5000, seed=12))
    other_seed.set_epoch(3)
    assert list(other_seed) != e3
    # The same set of utterances every epoch.
    assert sorted(i for b in s1 for i in b) == sorted(i for b in e3 for i in b)


def test_len_matches_iteration() -> None:
    _, durs, langs = corpus(250, seed=5)
    for world_size in (1, 3):
        s = BucketBatchSampler(
            durs, langs, BatchConfig(max_frames=3000), rank=world_size - 1, world_size=world_size
        )
        for epoch in range(3):
            s.set_epoch(epoch)
            assert len(s) == len(list(s))


def test_resume_mid_epoch_yields_remaining_batches() -> None:
    _, durs, langs = corpus(400, seed=6)
    cfg = BatchConfig(max_frames=4000, seed=5)
    ref = BucketBatchSampler(durs, langs, cfg)
    ref.set_epoch(2)
    full = list(ref)
    ref.set_epoch(3)
    next_epoch = list(ref)

    run = BucketBatchSampler(durs, langs, cfg)
    run.set_epoch(2)
    it = iter(run)
    first = [next(it) for _ in range(7)]
    state = json.loads(json.dumps(run.state_dict()))  # must survive a checkpoint round-trip
    assert state["epoch"] == 2 and state["consumed"] == 7

    resumed = BucketBatchSampler(durs, langs, cfg)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert first + rest == full
    resumed.set_epoch(3)
    assert list(resumed) == next_epoch


def test_resume_with_explicit_consumed_count() -> None:
    _, durs, langs = corpus(200, seed=7)
    cfg = BatchConfig(max_frames=3000)
    s = BucketBatchSampler(durs, langs, cfg)
    full = list(s)
    # A DataLoader may have drawn more batches than were trained on.
    state = s.state_dict(consumed=4)
    r = BucketBatchSampler(durs, langs, cfg)
    r.load_state_dict(state)
    assert list(r) == full[4:]


def test_resume_rejects_other_seed() -> None:
    _, durs, langs = corpus(50)
    s = BucketBatchSampler(durs, langs, BatchConfig(seed=1))
    with pytest.raises(UserError, match="seed"):
        BucketBatchSampler(durs, langs, BatchConfig(seed=2)).load_state_dict(s.state_dict())


def test_rank_sharding_partitions_with_equal_counts() -> None:
    _, durs, langs = corpus(500, seed=8)
    cfg = BatchConfig(max_frames=3000)
    whole = BucketBatchSampler(durs, langs, cfg)
    whole.set_epoch(1)
    full = list(whole)
    world = 3
    shards = []
    for r in range(world):
        s = BucketBatchSampler(durs, langs, cfg, rank=r, world_size=world)
        s.set_epoch(1)
        shards.append(list(s))
    counts = {len(sh) for sh in shards}
    assert counts == {len(full) // world}
    usable = len(full) // world * world
    interleaved = [shards[k % world][k // world] for k in range(usable)]
    assert interleaved == full[:usable]
    seen = Counter(i for sh in shards for b in sh for i in b)
    assert max(seen.values()) == 1


def test_oversized_utterance_forms_its_own_batch() -> None:
    durs = [1.0, 1.0, 30.0, 1.0, 1.0]
    langs = ["en"] * 5
    cfg = BatchConfig(max_frames=1000, shuffle=False)
    with pytest.warns(UserWarning, match="1 utterance"):
        s = BucketBatchSampler(durs, langs, cfg)
    assert s.oversized == 1
    batches = list(s)
    assert [2] in batches
    assert sorted(i for b in batches for i in b) == list(range(5))


def test_drop_last_drops_only_leftover_batches() -> None:
    _, durs, langs = corpus(300, seed=9)
    cfg = BatchConfig(max_frames=5000, mode="monolingual", drop_last=True, shuffle=False)
    kept = list(BucketBatchSampler(durs, langs, cfg))
    full = list(
        BucketBatchSampler(
            durs, langs, BatchConfig(max_frames=5000, mode="monolingual", shuffle=False)
        )
    )
    assert all(b in full for b in kept)
    assert len(full) - len(kept) <= len(set(langs))
    flat = [i for b in kept for i in b]
    assert len(flat) == len(set(flat))


def test_config_errors() -> None:
    with pytest.raises(UserError, match="mode"):
        BucketBatchSampler([1.0], ["en"], BatchConfig(mode="bilingual"))
    with pytest.raises(UserError, match="max_frames"):
        BucketBatchSampler([1.0], ["en"], BatchConfig(max_frames=0))
    with pytest.raises(UserError, match="duration"):
        BucketBatchSampler([1.0, float("nan")], ["en", "en"], BatchConfig())
    with pytest.raises(UserError, match="order 'random'"):
        BucketBatchSampler([1.0], ["en"], BatchConfig(mode="monolingual", order="random"))
    with pytest.raises(UserError, match="needs mode monolingual"):
        BucketBatchSampler([1.0], ["en"], BatchConfig(order="round-robin"))


def test_round_robin_unshuffled_by_hand() -> None:
    # One utterance per batch; en has 3, fr 1, it 2. Unshuffled: each language by duration, and
    # the languages take turns in sorted order (en, fr, it) until each runs out.
    durs = [3.0, 1.0, 2.0, 0.5, 4.0, 1.5]
    langs = ["en", "en", "en", "fr", "it", "it"]
    cfg = BatchConfig(max_batch=1, mode="monolingual", order="round-robin", shuffle=False)
    assert list(BucketBatchSampler(durs, langs, cfg)) == [[1], [3], [5], [2], [4], [0]]


def test_round_robin_shuffled_takes_turns_over_the_same_batches() -> None:
    _, durs, langs = corpus(300, seed=5)
    kw = {"max_frames": 4000, "max_batch": 8, "mode": "monolingual", "seed": 3}
    rr = BucketBatchSampler(durs, langs, BatchConfig(order="round-robin", **kw))
    shuffled = BucketBatchSampler(durs, langs, BatchConfig(**kw))
    for epoch in (0, 1):
        rr.set_epoch(epoch)
        shuffled.set_epoch(epoch)
        got = list(rr)
        # the same batches as the shuffled order (packing does not depend on the order)
        assert sorted(map(sorted, got)) == sorted(map(sorted, shuffled))
        # turns: the batch languages follow the sorted cycle, a language leaving when it runs out
        left = Counter(langs[b[0]] for b in got)
        expected = []
        while sum(left.values()):
            for lang in sorted(left):
                if left[lang]:
                    expected.append(lang)
                    left[lang] -= 1
        assert [langs[b[0]] for b in got] == expected
    rr.set_epoch(0)
    first = list(rr)
    rr.set_epoch(1)
    assert list(rr) != first  # a language's batches come in a new order each epoch


@st.composite
def sampler_cases(draw: st.DrawFn) -> tuple:
    n = draw(st.integers(1, 60))
    cs = draw(st.lists(st.integers(0, 4000), min_size=n, max_size=n))
    langs = draw(st.lists(st.sampled_from(LANGS[:3]), min_size=n, max_size=n))
    cfg = BatchConfig(
        max_frames=draw(st.integers(50, 5000)),
        max_batch=draw(st.integers(1, 16)),
        bucket_width_s=draw(st.sampled_from([0.25, 1.0, 5.0])),
        mode=(mode := draw(st.sampled_from(["mixed", "monolingual"]))),
        order=draw(st.sampled_from(["shuffled", "round-robin"] if mode == "monolingual" else ["shuffled"])),
        shuffle=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31)),
    )
    epoch = draw(st.integers(0, 5))
    world = draw(st.integers(1, 3))
    return cs, langs, cfg, epoch, world, draw(st.integers(0, 100))


@pytest.mark.filterwarnings("ignore:.*exceed max_frames")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sampler_cases())
def test_sampler_properties(case: tuple) -> None:
    cs, langs, cfg, epoch, world, cut = case
    durs = [c / 100 for c in cs]
    s = BucketBatchSampler(durs, langs, cfg)
    shards = [BucketBatchSampler(durs, langs, cfg, rank=r, world_size=world) for r in range(world)]
    again = BucketBatchSampler(durs, langs, cfg)
    s.set_epoch(epoch)
    batches = list(s)
    # Partition of all indices.
    assert sorted(i for b in batches for i in b) == list(range(len(cs)))
    for b in batches:
        assert 1 <= len(b) <= cfg.max_batch
        assert len(b) == 1 or padded_frames(b, cs) <= cfg.max_frames
        if cfg.mode == "monolingual":
            assert len({langs[i] for i in b}) == 1
    # Oversized utterances are alone.
    for i, c in enumerate(cs):
        if 1 + c > cfg.max_frames:
            assert [i] in batches
    # Determinism.
    again.set_epoch(epoch)
    assert list(again) == batches
    # Resume after `cut` batches.
    k = cut % (len(batches) + 1)
    again.set_epoch(epoch)
    it = iter(again)
    for _ in range(k):
        next(it)
    resumed = BucketBatchSampler(durs, langs, cfg)
    resumed.load_state_dict(again.state_dict())
    assert list(resumed) == batches[k:]
    # Sharding.
    for sh in shards:
        sh.set_epoch(epoch)
    got = [list(sh) for sh in shards]
    assert all(len(g) == len(batches) // world for g in got)
    for r, g in enumerate(got):
        assert g == batches[r : len(batches) // world * world : world]


def test_drop_last_keeps_full_final_batches_and_a_groups_only_batch() -> None:
    # 16 equal utterances, max_batch 8: two full batches, nothing is left over.
    s = BucketBatchSampler([2.0] * 16, ["en"] * 16, BatchConfig(max_frames=10**6, max_batch=8, drop_last=True,
                                                                 shuffle=False))
    assert [len(b) for b in s] == [8, 8]
    # A final batch closed by the frame budget is full too: 3 x 201 frames fit 603, a fourth would not.
    s = BucketBatchSampler([2.0] * 6, ["en"] * 6, BatchConfig(max_frames=603, drop_last=True, shuffle=False))
    assert [len(b) for b in s] == [3, 3]
    # 43 en (5 full batches and 3 left over: dropped) and 5 nl (its only batch, partial: kept).
    langs = ["en"] * 43 + ["nl"] * 5
    s = BucketBatchSampler([2.0] * 48, langs, BatchConfig(max_frames=10**6, max_batch=8, drop_last=True,
                                                          mode="monolingual", shuffle=False))
    sizes = sorted((langs[b[0]], len(b)) for b in s)
    assert sizes == [("en", 8)] * 5 + [("nl", 5)]
