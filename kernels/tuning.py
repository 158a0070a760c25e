"""How the Triton autotuners of this package time their configs.

:func:`autotune_bench` is passed as ``do_bench`` to every ``triton.autotune`` here:

- shorter timing than Triton's default (5 ms warm-up, 25 ms of repetitions instead of 25/100):
  the autotuned kernels took 0.06-1.7 ms per call on the H200, so 25 ms is still many
  repetitions, and a test suite or a first training step autotunes dozens of shapes;
- a config that fails to build or run (beyond the resource errors Triton already skips) is
  timed as infinitely slow and logged once, instead of aborting the whole autotuning; if every
  config fails, the launch with the chosen one raises the real error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

WARMUP_MS = 5
REP_MS = 25
_reported: set[str] = set()


def autotune_bench(fn: Callable[[], object], quantiles: Sequence[float] | None = None) -> float | list[float]:
    """``triton.testing.do_bench`` with short timing; ``inf`` for a config that fails."""
    from triton.testing import do_bench

    try:
        return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, quantiles=list(quantiles) if quantiles else None)
    except Exception as e:  # a config the compiler or the device rejects: skip it
        first = (str(e).splitlines() or [""])[0][:200]
        if first not in _reported:
            _reported.add(first)
            log.warning("autotuning skipped a config that failed (%s: %s)", type(e).__name__, first)
        return [math.inf] * len(quantiles) if quantiles else math.inf
