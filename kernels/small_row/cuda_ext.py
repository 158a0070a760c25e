"""Lazy loader of the CUDA bitmap matmul extension (``csrc/bitmap_spmm.cu``).

The extension is JIT-built with ``torch.utils.cpp_extension.load`` on first use and registers
``torch.ops.sparse_rnnt_small_row.bitmap_linear`` (``TORCH_LIBRARY``, no pybind). A failed build
or load logs one warning and yields ``None`` (callers fall back to Triton); the outcome is cached,
which is the only state kept here.
"""

from __future__ import annotations

import functools
import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .naive import BitmapWeight

__all__ = ["SOURCE", "cuda_bitmap_linear", "get_extension"]

log = logging.getLogger(__name__)

# csrc/ at the top of the repository, installed as the package sparse_rnnt.csrc.
SOURCE = Path(importlib.import_module("sparse_rnnt.csrc").__file__ or "").resolve().parent / "bitmap_spmm.cu"
_NAME = "sparse_rnnt_small_row_bitmap"
MAX_ROWS = 64  # rows per call of the CUDA op (csrc kMaxRows)


@functools.cache
def get_extension() -> Any | None:
    """``torch.ops.sparse_rnnt_small_row`` once the extension is built and loaded, else ``None``.

    Needs CUDA and a working nvcc; any failure is logged once (warning) and cached as ``None``.
    """
    try:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        from torch.utils.cpp_extension import load

        load(name=_NAME, sources=[str(SOURCE)], extra_cuda_cflags=["-O3", "-std=c++17"],
             is_python_module=False, verbose=False)
        ops = torch.ops.sparse_rnnt_small_row
        _ = ops.bitmap_linear  # raises if registration failed
        return ops
    except Exception as exc:  # any build/load failure means "not available"
        log.warning("CUDA bitmap extension unavailable (%s: %s); use backend='triton'", type(exc).__name__, exc)
        return None


def cuda_bitmap_linear(x2: Tensor, w: BitmapWeight, bias: Tensor | None) -> Tensor:
    """``y [R, N] = x2 [R, K] Wᵀ + b`` with the CUDA extension (64 rows per launch).

    Raises ``RuntimeError`` if the extension is unavailable or the tensors are not on CUDA.
    """
    ext = get_extension()
    if ext is None:
        raise RuntimeError("bitmap_linear(backend='cuda'): the CUDA extension could not be built or loaded "
                           "(see the warning logged by sparse_rnnt.kernels.small_row.cuda_ext)")
    if x2.device.type != "cuda":
        raise RuntimeError(f"bitmap_linear(backend='cuda'): tensors must be on CUDA, got {x2.device}")
    r = x2.shape[0]
    if r <= MAX_ROWS:
        return ext.bitmap_linear(x2, w.bits, w.values, w.offsets, bias)
    return torch.cat([ext.bitmap_linear(x2[i:i + MAX_ROWS], w.bits, w.values, w.offsets, bias)
                      for i in range(0, r, MAX_ROWS)])
