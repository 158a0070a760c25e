"""Sparsity schedules: pure functions of the training step (no state, safe to resume anywhere).

Every schedule answers ``sparsity_at(step)`` (the target sparsity in force at ``step``),
``is_prune_step(step)`` (``True`` exactly at the steps where that target changes, including the
first level at its start if it is > 0), ``prune_steps()`` (all such steps, ascending) and
``levels()`` (the target at each prune step, i.e. ``[sparsity_at(t) for t in prune_steps()]``).
Before a schedule starts the model is dense (sparsity 0). Steps are integers >= 0.

- :class:`Staircase`: level ``k`` is active for steps ``[k*T, (k+1)*T)``; the last level stays.
- :class:`Cubic` (Zhu & Gupta 2018): pruning events at ``t = t0 + k*dT``, ``k = 0..N``
  (``N*dT = steps``), target ``s_f + (s_i - s_f)(1 - k*dT/(N*dT))^3``, constant between events,
  ``s_f`` from ``t0 + N*dT`` on, 0 before ``t0``.
- :class:`OneShot`: 0 before ``step``, ``sparsity`` from ``step`` on.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..checks import is_int
from ..errors import UserError


@runtime_checkable
class SparsitySchedule(Protocol):
    def sparsity_at(self, step: int) -> float: ...

    def is_prune_step(self, step: int) -> bool: ...

    def prune_steps(self) -> list[int]: ...

    def levels(self) -> list[float]: ...



def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_step(step: int) -> None:
    if not is_int(step) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")


def _check_sparsity(name: str, value: object) -> None:
    if not _is_number(value) or not 0.0 <= value < 1.0:  # type: ignore[operator]
        raise UserError(f"{name} must be a sparsity in [0, 1), got {value!r}")


@dataclass(frozen=True)
class Staircase:
    """``levels[k]`` for steps ``[k*interval, (k+1)*interval)``; the last level stays forever.

    ``levels`` must be strictly increasing, each in ``[0, 1)``; ``interval`` (T) > 0.
    """

    levels_: tuple[float, ...] = (0.2, 0.5, 0.7)
    interval: int = 1000

    def __init__(self, levels: tuple[float, ...] | list[float] = (0.2, 0.5, 0.7), interval: int = 1000) -> None:
        # A hand-written __init__ so the public keyword is ``levels`` while ``levels()`` is a method.
        object.__setattr__(self, "levels_", tuple(levels) if isinstance(levels, (list, tuple)) else levels)
        object.__setattr__(self, "interval", interval)
        self.validate()

    def __repr__(self) -> str:
        return f"Staircase(levels={self.levels_!r}, interval={self.interval!r})"

    def validate(self) -> None:
        if not isinstance(self.levels_, tuple) or not self.levels_:
            raise UserError(f"staircase levels must be a non-empty list, got {self.levels_!r}")
        for level in self.levels_:
            _check_sparsity("staircase level", level)
        for a, b in itertools.pairwise(self.levels_):
            if not b > a:
                raise UserError(f"staircase levels must be strictly increasing, got {list(self.levels_)}")
        if not is_int(self.interval) or self.interval <= 0:
            raise UserError(f"staircase interval must be an integer > 0, got {self.interval!r}")

    def sparsity_at(self, step: int) -> float:
        _check_step(step)
        return float(self.levels_[min(step // self.interval, len(self.levels_) - 1)])

    def is_prune_step(self, step: int) -> bool:
        _check_step(step)
        k, r = divmod(step, self.interval)
        return r == 0 and k < len(self.levels_) and (k > 0 or self.levels_[0] > 0)

    def prune_steps(self) -> list[int]:
        return [k * self.interval for k in range(len(self.levels_)) if k > 0 or self.levels_[0] > 0]

    def levels(self) -> list[float]:
        return [self.sparsity_at(t) for t in self.prune_steps()]


@dataclass(frozen=True, kw_only=True)
class Cubic:
    """Zhu & Gupta's cubic ramp from ``initial`` (s_i) at ``start`` (t0) to ``final`` (s_f).

    ``steps`` = N*dT is the ramp length, ``frequency`` = dT the spacing of pruning events;
    ``steps`` must be a positive multiple of ``frequency``. ``0 <= initial <= final < 1``.
    """

    initial: float
    final: float
    steps: int
    frequency: int
    start: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_sparsity("cubic initial", self.initial)
        _check_sparsity("cubic final", self.final)
        if self.initial > self.final:
            raise UserError(f"cubic initial ({self.initial}) must be <= final ({self.final})")
        for key in ("start", "steps", "frequency"):
            value = getattr(self, key)
            low = 0 if key == "start" else 1
            if not is_int(value) or value < low:
                raise UserError(f"cubic {key} must be an integer >= {low}, got {value!r}")
        if self.steps % self.frequency:
            raise UserError(f"cubic steps ({self.steps}) must be a multiple of frequency ({self.frequency})")

    @property
    def num_events(self) -> int:
        """N: number of dT intervals in the ramp (events are k = 0..N)."""
        return self.steps // self.frequency

    def _value(self, k: int) -> float:
        s_i, s_f, n = float(self.initial), float(self.final), self.num_events
        s = s_f + (s_i - s_f) * (1.0 - (k * self.frequency) / (n * self.frequency)) ** 3
        return min(max(s, s_i), s_f)

    def sparsity_at(self, step: int) -> float:
        _check_step(step)
        if step < self.start:
            return 0.0
        return self._value(min((step - self.start) // self.frequency, self.num_events))

    def is_prune_step(self, step: int) -> bool:
        _check_step(step)
        if step < self.start:
            return False
        k, r = divmod(step - self.start, self.frequency)
        if r or k > self.num_events:
            return False
        previous = 0.0 if k == 0 else self._value(k - 1)
        return self._value(k) != previous

    def prune_steps(self) -> list[int]:
        events = (self.start + k * self.frequency for k in range(self.num_events + 1))
        return [t for t in events if self.is_prune_step(t)]

    def levels(self) -> list[float]:
        return [self.sparsity_at(t) for t in self.prune_steps()]


@dataclass(frozen=True)
class OneShot:
    """Dense before ``step``, ``sparsity`` from ``step`` on."""

    sparsity: float
    step: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_sparsity("one-shot sparsity", self.sparsity)
        if not is_int(self.step) or self.step < 0:
            raise UserError(f"one-shot step must be an integer >= 0, got {self.step!r}")

    def sparsity_at(self, step: int) -> float:
        _check_step(step)
        return float(self.sparsity) if step >= self.step else 0.0

    def is_prune_step(self, step: int) -> bool:
        _check_step(step)
        return step == self.step and self.sparsity > 0

    def prune_steps(self) -> list[int]:
        return [self.step] if self.sparsity > 0 else []

    def levels(self) -> list[float]:
        return [self.sparsity_at(t) for t in self.prune_steps()]


SCHEDULES: dict[str, type] = {"staircase": Staircase, "cubic": Cubic, "oneshot": OneShot}


def schedule_from_config(kind: str, **kw: Any) -> SparsitySchedule:
    """Build a schedule by name: ``"staircase"`` (levels, interval), ``"cubic"`` (initial, final,
    steps, frequency, start) or ``"oneshot"`` (sparsity, step). :class:`UserError` on an unknown
    kind, an unknown or missing option, or a bad value."""
    if kind not in SCHEDULES:
        raise UserError(f"unknown sparsity schedule {kind!r}: choose from {', '.join(SCHEDULES)}")
    try:
        return SCHEDULES[kind](**kw)
    except TypeError as exc:
        raise UserError(f"schedule {kind!r}: {exc}") from None
