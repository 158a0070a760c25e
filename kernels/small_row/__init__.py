"""Compact sparse weight formats and small-row (``R <= 64``) sparse matmuls for exported models.

- :class:`BitmapWeight` (unstructured; bits + values + per-tile offsets) with
  :func:`bitmap_linear` (``backend="triton" | "cuda" | "torch"``);
- :class:`BsrWeight` (block sparse, torch BSR layout) with :func:`bsr_linear`
  (``backend="triton" | "torch" | "torch-bsr"``).

Formats and references live in ``naive.py``; the CUDA extension is loaded lazily by
``cuda_ext.get_extension()``. On the CPU, ``cpu.CpuSparseWeight`` (a bitmap weight plus uint16
columns) and ``cpu.cpu_sparse_linear`` run the C++ kernel of ``csrc/cpu_spmm.cpp``, loaded
lazily by ``cpu.get_cpu_extension()``.
"""

from .bitmap import bitmap_linear
from .bsr import bsr_linear
from .naive import BitmapWeight, BsrWeight, bitmap_linear_gather, bitmap_linear_ref, bsr_linear_ref

__all__ = [
    "BitmapWeight",
    "BsrWeight",
    "bitmap_linear",
    "bitmap_linear_gather",
    "bitmap_linear_ref",
    "bsr_linear",
    "bsr_linear_ref",
]
