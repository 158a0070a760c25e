"""Sparsity schedules against hand-computed values."""

from __future__ import annotations

import itertools

import pytest

from sparse_rnnt.errors import UserError
from sparse_rnnt.pruning.schedules import (
    Cubic,
    OneShot,
    SparsitySchedule,
    Staircase,
    schedule_from_config,
)


def test_staircase_default() -> None:
    s = Staircase()
    expected = {0: 0.2, 1: 0.2, 999: 0.2, 1000: 0.5, 1999: 0.5, 2000: 0.7, 2999: 0.7, 3000: 0.7, 10**7: 0.7}
    for step, value in expected.items():
        assert s.sparsity_at(step) == value, step
    prune = {0: True, 1: False, 999: False, 1000: True, 1500: False, 2000: True, 3000: False, 4000: False}
    for step, flag in prune.items():
        assert s.is_prune_step(step) is flag, step
    assert s.prune_steps() == [0, 1000, 2000]
    assert s.levels() == [0.2, 0.5, 0.7]
    assert isinstance(s, SparsitySchedule)


def test_staircase_starting_dense() -> None:
    s = Staircase(levels=(0.0, 0.4, 0.8), interval=10)
    assert not s.is_prune_step(0)
    assert [t for t in range(100) if s.is_prune_step(t)] == [10, 20] == s.prune_steps()
    assert s.levels() == [0.4, 0.8]
    assert s.sparsity_at(9) == 0.0 and s.sparsity_at(10) == 0.4 and s.sparsity_at(35) == 0.8


def test_cubic_hand_values() -> None:
    # s_i = 0.1, s_f = 0.7, t0 = 100, dT = 100, N = 4: s_k = 0.7 - 0.6 (1 - k/4)^3.
    c = Cubic(initial=0.1, final=0.7, start=100, steps=400, frequency=100)
    hand = {
        0: 0.0, 99: 0.0,                      # before t0: dense
        100: 0.1, 150: 0.1, 199: 0.1,         # k = 0
        200: 0.7 - 0.6 * 0.421875,            # k = 1: (3/4)^3
        300: 0.7 - 0.6 * 0.125,               # k = 2: (1/2)^3
        399: 0.7 - 0.6 * 0.125,
        400: 0.7 - 0.6 * 0.015625,            # k = 3: (1/4)^3
        500: 0.7, 501: 0.7, 10**6: 0.7,       # end and after
    }
    for step, value in hand.items():
        assert c.sparsity_at(step) == pytest.approx(value, abs=1e-12), step
    assert c.sparsity_at(500) == 0.7  # exactly s_f at the end
    assert c.prune_steps() == [100, 200, 300, 400, 500]
    assert [t for t in range(0, 2000) if c.is_prune_step(t)] == c.prune_steps()
    assert c.levels() == pytest.approx([0.1, 0.446875, 0.625, 0.690625, 0.7])
    values = [c.sparsity_at(t) for t in range(0, 800)]
    assert all(b >= a for a, b in itertools.pairwise(values))


def test_cubic_from_zero_and_flat() -> None:
    c = Cubic(initial=0.0, final=0.5, steps=30, frequency=10)
    assert not c.is_prune_step(0)
    assert c.prune_steps() == [10, 20, 30]
    assert c.sparsity_at(10) == pytest.approx(0.5 - 0.5 * (2 / 3) ** 3)
    flat = Cubic(initial=0.5, final=0.5, steps=100, frequency=10)
    assert flat.prune_steps() == [0] and flat.levels() == [0.5]
    assert flat.sparsity_at(55) == 0.5


def test_oneshot() -> None:
    o = OneShot(sparsity=0.6, step=50)
    assert o.sparsity_at(0) == 0.0 and o.sparsity_at(49) == 0.0
    assert o.sparsity_at(50) == 0.6 and o.sparsity_at(10**6) == 0.6
    assert [t for t in range(200) if o.is_prune_step(t)] == [50] == o.prune_steps()
    assert o.levels() == [0.6]
    assert OneShot(0.7).is_prune_step(0)
    assert OneShot(0.0).prune_steps() == []


def test_from_config() -> None:
    s = schedule_from_config("staircase", levels=[0.2, 0.5], interval=10)
    assert isinstance(s, Staircase) and s.sparsity_at(15) == 0.5
    c = schedule_from_config("cubic", initial=0.0, final=0.7, steps=100, frequency=20, start=5)
    assert isinstance(c, Cubic) and c.sparsity_at(105) == 0.7 and c.sparsity_at(4) == 0.0
    o = schedule_from_config("oneshot", sparsity=0.3)
    assert isinstance(o, OneShot) and o.sparsity_at(0) == 0.3


@pytest.mark.parametrize(
    ("kind", "kw", "match"),
    [
        ("linear", {}, "unknown sparsity schedule"),
        ("staircase", {"levels": [0.5, 0.5]}, "increasing"),
        ("staircase", {"levels": [0.7, 0.5]}, "increasing"),
        ("staircase", {"levels": [0.5, 1.0]}, r"\[0, 1\)"),
        ("staircase", {"levels": [-0.1, 0.5]}, r"\[0, 1\)"),
        ("staircase", {"levels": []}, "non-empty"),
        ("staircase", {"interval": 0}, "interval"),
        ("staircase", {"interval": 1.5}, "interval"),
        ("staircase", {"steps": 10}, "unexpected keyword"),
        ("cubic", {"initial": 0.5, "final": 0.2, "steps": 10, "frequency": 5}, "<= final"),
        ("cubic", {"initial": 0.0, "final": 0.7, "steps": 10, "frequency": 3}, "multiple"),
        ("cubic", {"initial": 0.0, "final": 0.7, "steps": 10, "frequency": 0}, "frequency"),
        ("cubic", {"initial": 0.0, "final": 0.7, "steps": 10, "frequency": 5, "start": -1}, "start"),
        ("cubic", {"initial": 0.0, "final": 0.7}, "missing"),
        ("oneshot", {"sparsity": 1.0}, r"\[0, 1\)"),
        ("oneshot", {"sparsity": 0.5, "step": -3}, "step"),
    ],
)
def test_validation_errors(kind: str, kw: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        schedule_from_config(kind, **kw)


def test_negative_step_rejected() -> None:
    for s in (Staircase(), Cubic(initial=0.0, final=0.5, steps=10, frequency=5), OneShot(0.5)):
        with pytest.raises(ValueError):
            s.sparsity_at(-1)
