"""How the Triton autotuners of this package time their configs.

:func:`autotune_bench` is passed as ``do_bench`` to every ``triton.autotune`` here:

- shorter timing than Triton's default (5 ms warm-up, 25 ms of repetitions instead of 25/100):
  the autotuned kernels took 0.06-1.7 ms per call on the H200, so 25 ms is still many
  repetitions, and a test suite or a first training step autotunes dozens of shapes;
- a config that fails to build or run (beyond the resource errors Triton already skips) is
  timed as infinitely slow and logged, naming the kernel and the config, once per kernel and
  error, instead of aborting the whole autotuning; if every config fails, the launch with the
  chosen one raises the real error.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

WARMUP_MS = 5
REP_MS = 25
# (kernel, error) pairs already logged: an autotuner that tries the same failing config at every
# new key would otherwise log it once per shape.
_reported: set[tuple[str, str]] = set()


def _describe(fn: Callable[[], object]) -> tuple[str, str]:
    """(kernel name, config) of a call that Triton's autotuner hands to ``do_bench``, read from
    its closure; ``("?", "?")`` where it does not hold them."""
    try:
        found = inspect.getclosurevars(fn).nonlocals
    except (TypeError, ValueError):
        return "?", "?"
    tuner, config = found.get("self"), found.get("config")
    base = getattr(tuner, "base_fn", None)
    return getattr(base, "__name__", "?"), "?" if config is None else str(config)


def autotune_bench(fn: Callable[[], object], quantiles: Sequence[float] | None = None) -> float | list[float]:
    """``triton.testing.do_bench`` with short timing; ``inf`` for a config that fails."""
    from triton.testing import do_bench

    try:
        return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, quantiles=list(quantiles) if quantiles else None)
    except Exception as e:  # a config the compiler or the device rejects: skip it
        first = (str(e).splitlines() or [""])[0][:200]
        kernel, config = _describe(fn)
        if (kernel, first) not in _reported:
            _reported.add((kernel, first))
            log.warning("autotuning %s skipped a config that failed (%s; %s: %s)", kernel, config,
                        type(e).__name__, first)
        return [math.inf] * len(quantiles) if quantiles else math.inf
