"""Integer helpers for launchers (host code).

``triton.cdiv`` and ``triton.next_power_of_2`` are Triton constexpr functions: called from
Python they cost a few microseconds each (argument unwrapping), and a launch path calls them
several times. These are the plain-integer equivalents.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers, ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` for ``n >= 1`` (0 for ``n <= 0``, as Triton's)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()
