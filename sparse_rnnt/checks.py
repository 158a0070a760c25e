"""Value checks shared by the config sections, the command line and the pipelines (no imports
from the package, so every module can use them)."""

from __future__ import annotations

import math
import os

MAX_SEED = 2**32 - 1  # numpy's and sentencepiece's seeds are unsigned 32-bit integers
# Threads or worker processes: far above any useful count, far below what overflows torch's C int
# or exhausts the process table.
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))


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
