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
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .naive import BitmapWeight

__all__ = ["SOURCE", "clear_stale_lock", "cuda_bitmap_linear", "get_extension"]

log = logging.getLogger(__name__)

# csrc/ at the top of the repository, installed as the package sparse_rnnt.csrc.
SOURCE = Path(importlib.import_module("sparse_rnnt.csrc").__file__ or "").resolve().parent / "bitmap_spmm.cu"
_NAME = "sparse_rnnt_small_row_bitmap"
MAX_ROWS = 64  # rows per call of the CUDA op (csrc kMaxRows)
STALE_LOCK_S = 180.0  # a cold build takes about 40 s; a lock this old belongs to no live build


@functools.cache
def get_extension() -> Any | None:
    """``torch.ops.sparse_rnnt_small_row`` once the extension is built and loaded, else ``None``.

    Needs CUDA and a working nvcc; any failure is logged once (warning) and cached as ``None``.
    """
    try:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        from torch.utils.cpp_extension import load

        build_dir = _build_directory()
        clear_stale_lock(build_dir)
        load(name=_NAME, sources=[str(SOURCE)], extra_cuda_cflags=["-O3", "-std=c++17"],
             is_python_module=False, verbose=False, build_directory=str(build_dir))
        ops = torch.ops.sparse_rnnt_small_row
        _ = ops.bitmap_linear  # raises if registration failed
        return ops
    except Exception as exc:  # any build/load failure means "not available"
        log.warning("CUDA bitmap extension unavailable (%s: %s); use backend='triton'", type(exc).__name__, exc)
        return None


def _build_directory() -> Path:
    """Where the extension is built: one folder per torch and CUDA version."""
    return build_directory(f"{_NAME}-torch{torch.__version__}-cuda{torch.version.cuda}")


def build_directory(name: str) -> Path:
    """``$TORCH_EXTENSIONS_DIR`` (else torch's default root) / ``name`` (``+`` made ``_``), created."""
    import os

    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    build = root / name.replace("+", "_")
    build.mkdir(parents=True, exist_ok=True)
    return build


def clear_stale_lock(build_dir: Path, stale_s: float = STALE_LOCK_S, poll_s: float = 1.0,
                     logger: logging.Logger = log) -> bool:
    """Wait while another process builds in ``build_dir`` (its ``lock`` file), but remove a lock
    older than ``stale_s``: a build killed mid-way (SIGTERM, SIGKILL) leaves it behind, and torch's
    loader would wait on it forever. Returns True if a stale lock was removed."""
    lock = build_dir / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        if age > stale_s:
            logger.warning("removing the stale build lock %s (%.0f s old: a build that was killed)", lock, age)
            lock.unlink(missing_ok=True)
            return True
        time.sleep(poll_s)


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
