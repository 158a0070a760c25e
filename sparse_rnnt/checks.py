"""Value checks shared by the config sections, the command line and the pipelines (no imports
from the package, so every module can use them)."""

from __future__ import annotations

import math

MAX_SEED = 2**32 - 1  # numpy's and sentencepiece's seeds are unsigned 32-bit integers
# Threads or worker processes, on the command line and in configs: far above any useful count, far
# below what overflows torch's C int (2**32) or spawns a pool that exhausts the process table. A
# constant, not this machine's core count: a run saved on a bigger machine must load on a smaller.
MAX_THREADS = 1024


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """An ``int`` or ``float`` (not a ``bool``) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_device_spec(spec: object) -> bool:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    return isinstance(spec, str) and (spec in ("auto", "cpu", "cuda") or
                                      (spec.startswith("cuda:") and spec[5:].isdigit()))
