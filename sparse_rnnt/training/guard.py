"""Non-finite loss guard: skip a step whose loss is NaN/inf, give up after too many in a row.

A single bad batch (an utterance whose alignment is impossible, an overflow) should cost one
skipped step, not the run; a diverged model produces non-finite losses on every batch and must
stop with a message naming the steps and batches instead of writing NaN weights.

Usage in a training step (the caller zeroes the gradients and skips ``optimizer.step()``)::

    if not guard.check(loss, batch.keys, step):
        optimizer.zero_grad(set_to_none=True)
        continue
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UserError

log = logging.getLogger(__name__)


@dataclass
class _Skip:
    step: int
    keys: list[str]
    value: float


@dataclass
class LossGuard:
    """Counts skipped steps; raises when more than ``max_consecutive`` non-finite losses occur in
    a row.

    ``max_consecutive=0`` makes the first non-finite loss fatal.
    """

    max_consecutive: int = 5
    skipped: int = 0  # non-finite steps over the whole run
    _streak: list[_Skip] = field(default_factory=list, repr=False)  # the current run of bad steps

    def __post_init__(self) -> None:
        if isinstance(self.max_consecutive, bool) or not isinstance(self.max_consecutive, int) \
                or self.max_consecutive < 0:
            raise UserError(f"LossGuard: max_consecutive must be an integer >= 0, got {self.max_consecutive!r}")

    @property
    def consecutive(self) -> int:
        """Non-finite losses in a row so far (0 after a finite one)."""
        return len(self._streak)

    def check(self, loss: torch.Tensor | float, batch_keys: list[str], step: int) -> bool:
        """True when ``loss`` (a scalar ``[]``, or any shape: every element must be finite) is
        finite: proceed with the optimizer step. False: skip this step (zero the gradients, do not
        step the optimizer or the scheduler).

        Raises :class:`UserError` naming the steps and batch keys of the streak when this is the
        ``max_consecutive + 1``-th non-finite loss in a row.
        """
        t = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        if bool(torch.isfinite(t).all()):
            self._streak.clear()
            return True
        value = float(t.float().flatten()[~torch.isfinite(t.float().flatten())][0])
        self.skipped += 1
        self._streak.append(_Skip(step=int(step), keys=[str(k) for k in batch_keys], value=value))
        if len(self._streak) > self.max_consecutive:
            raise UserError(self._message())
        log.warning("step %d: non-finite loss (%s), skipping the batch %s", step, value, ", ".join(batch_keys[:8]))
        return False

    def _message(self) -> str:
        steps = sorted({s.step for s in self._streak})
        lines = [
            f"training diverged: {len(self._streak)} non-finite losses in a row (more than "
            f"max_consecutive={self.max_consecutive}) at step(s) {', '.join(map(str, steps))}; batches:"
        ]
        tries: dict[int, int] = {}
        for s in self._streak:  # a skipped batch takes no step: the next one tries the same step
            tries[s.step] = tries.get(s.step, 0) + 1
            keys = ", ".join(s.keys[:10]) + (f" (+{len(s.keys) - 10} more)" if len(s.keys) > 10 else "")
            lines.append(f"  step {s.step}, batch {tries[s.step]} (loss {s.value}): {keys}")
        lines.append("check these utterances; to skip past them, resume with a larger limit (--resume --set "
                     "train.max_nonfinite_steps=N, a key that may change on resume); or train again with a "
                     "lower optim.lr")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state (for ``checkpoint.json``'s ``extra``)."""
        return {
            "max_consecutive": self.max_consecutive,
            "skipped": self.skipped,
            # JSON has no NaN/inf literal in strict mode: store the value as text.
            "streak": [{"step": s.step, "keys": list(s.keys), "value": repr(s.value)} for s in self._streak],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters from :meth:`state_dict` (the limit stays this guard's own)."""
        try:
            self.skipped = int(state["skipped"])
            self._streak = [
                _Skip(step=int(s["step"]), keys=[str(k) for k in s["keys"]], value=_float(s["value"]))
                for s in state.get("streak", [])
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"LossGuard: bad saved state ({type(e).__name__}: {e})") from None


def _float(value: Any) -> float:
    """``float`` of a saved value: a number or its ``repr`` ("nan", "inf", "-inf", "1.5")."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)
