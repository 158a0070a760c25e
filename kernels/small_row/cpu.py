"""Small-row sparse matmul on the CPU ``y = x Wᵀ + b`` (C++, ``csrc/cpu_spmm.cpp``).

On the CPU a streaming step multiplies a few rows (one stream: 5 rows in the encoder, 1 in the
joiner) by every weight, so its time is the time to stream the weights through the core: a 70%
sparse weight holds 30% of the values. :class:`CpuSparseWeight` is a :class:`BitmapWeight` plus
one uint16 column index per kept value (2 bytes, so the kernel never decodes bits);
:func:`cpu_sparse_linear` computes with it through the C++ op, or the reference
(``backend="torch"``: densify + ``F.linear``).

The extension is JIT-built with ``torch.utils.cpp_extension.load`` (g++ ``-O3 -march=native``)
on first use, in a build folder per torch version and CPU feature set (``-march=native`` code
must not run on another CPU), and registers ``torch.ops.sparse_rnnt_cpu.sparse_linear``. A failed
build or load logs one warning and yields ``None``; the outcome is cached, the only state kept
here. Inference only (no autograd).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .cuda_ext import build_directory, clear_stale_lock
from .naive import (
    BitmapWeight,
    BsrWeight,
    check_linear_inputs,
    prepare_inference_inputs,
    unpack_bits,
)

__all__ = ["SOURCE", "CpuSparseWeight", "cpu_sparse_linear", "cpu_sparse_linear_ref", "get_cpu_extension",
           "sparse_linear_op"]

log = logging.getLogger(__name__)

SOURCE = Path(importlib.import_module("sparse_rnnt.csrc").__file__ or "").resolve().parent / "cpu_spmm.cpp"
_NAME = "sparse_rnnt_cpu_spmm"
MAX_K = 65536  # uint16 column indices
_CPUINFO = "/proc/cpuinfo"


@dataclass
class CpuSparseWeight:
    """Unstructured sparse weight ``[N, K]`` for the CPU kernel: ``bitmap`` (a
    :class:`BitmapWeight`: bits, kept values row-major, per-tile offsets) and ``cols`` int16
    ``[nnz]``, the column of each kept value read as uint16 (``K <= 65536``)."""

    bitmap: BitmapWeight
    cols: Tensor

    @classmethod
    def from_bitmap(cls, bitmap: BitmapWeight) -> CpuSparseWeight:
        """Add the column indices to a bitmap weight (``ValueError`` if ``K > 65536``)."""
        k = bitmap.shape[1]
        if k > MAX_K:
            raise ValueError(f"CpuSparseWeight: K = {k} > {MAX_K} (uint16 column indices)")
        cols = unpack_bits(bitmap.bits, k).nonzero()[:, 1]  # row-major, like the values
        # uint16 in int16: columns >= 2^15 wrap to negative, which the kernel reads back as uint16.
        cols = torch.where(cols >= 2**15, cols - 2**16, cols).to(torch.int16).contiguous()
        return cls(bitmap=bitmap, cols=cols)

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor, tile: int = 128) -> CpuSparseWeight:
        """Keep ``weight[mask]`` (``weight [N, K]``, ``mask`` bool ``[N, K]``)."""
        return cls.from_bitmap(BitmapWeight.from_dense(weight, mask, tile))

    @classmethod
    def from_bsr(cls, bsr: BsrWeight, tile: int = 128) -> CpuSparseWeight:
        """The nonzero weights of a BSR weight's blocks (zeros inside kept blocks are pruned
        weights, dropped here; the product is the same)."""
        dense = bsr.to_dense()
        return cls.from_dense(dense, dense != 0, tile)

    @property
    def shape(self) -> tuple[int, int]:
        return self.bitmap.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.bitmap.dtype

    @property
    def device(self) -> torch.device:
        return self.bitmap.device

    def tensors(self) -> dict[str, Tensor]:
        """The bitmap weight's tensors and ``"cols"``."""
        return {**self.bitmap.tensors(), "cols": self.cols}

    @property
    def nbytes(self) -> int:
        """Bytes held: the bitmap weight's tensors and the column indices."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to_dense(self) -> Tensor:
        """Dense ``[N, K]`` weight, zeros where pruned (exact)."""
        return self.bitmap.to_dense()

    def to(self, device: torch.device | str) -> CpuSparseWeight:
        """The same weight on ``device``."""
        return dataclasses.replace(self, bitmap=self.bitmap.to(device), cols=self.cols.to(device))


def _cpu_tag() -> str:
    """A short hash of this CPU's model and feature flags (``-march=native`` code is only valid
    on a CPU with the same features)."""
    text = platform.machine() + platform.processor()
    try:
        with open(_CPUINFO, encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "Features", "model name"))]
        text += "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _build_directory() -> Path:
    """Where the extension is built: one folder per torch version and CPU."""
    return build_directory(f"{_NAME}-torch{torch.__version__}-cpu{_cpu_tag()}")


def _registered() -> bool:
    """Whether ``torch.ops.sparse_rnnt_cpu.sparse_linear`` is registered in this process."""
    try:
        return torch.ops.sparse_rnnt_cpu.sparse_linear is not None
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def get_cpu_extension() -> Any | None:
    """``torch.ops.sparse_rnnt_cpu`` once the extension is built and loaded, else ``None``.

    The first call on a machine compiles it (about 25 s on 2 cores; logged at INFO); any failure
    (no C++ compiler, a build error) is logged once (warning) and cached as ``None``."""
    try:
        if _registered():  # loaded before in this process (a second library would register twice)
            return torch.ops.sparse_rnnt_cpu
        from torch.utils.cpp_extension import load

        build_dir = _build_directory()
        clear_stale_lock(build_dir, logger=log)
        t0 = time.perf_counter()
        log.info("loading the CPU sparse kernel (built in %s on first use)", build_dir)
        # -fopenmp: at::parallel_for is inline OpenMP code; without the flag it runs on one thread.
        load(name=_NAME, sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native", "-std=c++17", "-fopenmp"],
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False, build_directory=str(build_dir))
        ops = torch.ops.sparse_rnnt_cpu
        _ = ops.sparse_linear  # raises if registration failed
        log.info("CPU sparse kernel ready (%.1f s)", time.perf_counter() - t0)
        return ops
    except Exception as exc:  # any build/load failure means "not available"
        log.warning("CPU sparse kernel unavailable (%s: %s); sparse layers run dense on the CPU",
                    type(exc).__name__, _reason(str(exc)))
        log.debug("CPU sparse kernel build output:\n%s", exc)
        return None


def _reason(text: str) -> str:
    """The line of a build failure that says why: torch's message starts with the compiler's
    command line, and the compiler's diagnostic comes later."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if "error:" in low or "not found" in low or "no such file" in low:
            return ln
    return lines[-1] if lines else ""


def cpu_sparse_linear_ref(x: Tensor, w: CpuSparseWeight, bias: Tensor | None = None) -> Tensor:
    """``y [*, N] = x [*, K] Wᵀ + b`` with ``W = w.to_dense()`` (``F.linear``)."""
    check_linear_inputs(x, w.shape, w.dtype, w.device, bias, "cpu_sparse_linear")
    return F.linear(x, w.to_dense(), bias)


def cpu_sparse_linear(x: Tensor, w: CpuSparseWeight, bias: Tensor | None = None, *,
                      backend: str = "cpp") -> Tensor:
    """``y [*, N] = x [*, K] Wᵀ + b`` for a :class:`CpuSparseWeight` ``W [N, K]``, inference only.

    ``backend``: ``"cpp"`` (the C++ kernel; ``RuntimeError`` if it cannot be built or loaded) or
    ``"torch"`` (the reference). ``x``, ``bias [N]`` and the weight's values share one dtype
    (float32, bfloat16, float16) and are on the CPU; products accumulate in float32.
    """
    if backend == "torch":
        return cpu_sparse_linear_ref(x, w, bias)
    if backend != "cpp":
        raise ValueError(f"cpu_sparse_linear: backend must be 'cpp' or 'torch', got {backend!r}")
    x2, bias_c = prepare_inference_inputs(x, w.bitmap, bias, "cpu_sparse_linear", "cpp")
    if x2.device.type != "cpu":
        raise ValueError(f"cpu_sparse_linear(backend='cpp'): tensors must be on the CPU, got {x2.device}")
    if get_cpu_extension() is None:
        raise RuntimeError("cpu_sparse_linear(backend='cpp'): the C++ extension could not be built or loaded "
                           "(see the warning logged by sparse_rnnt.kernels.small_row.cpu)")
    return sparse_linear_op(x2, w, bias_c).reshape(*x.shape[:-1], w.shape[0])


def sparse_linear_op(x2: Tensor, w: CpuSparseWeight, bias: Tensor | None) -> Tensor:
    """The C++ op on inputs already checked: ``x2 [R, K]`` contiguous, in ``w``'s dtype, on the
    CPU, the extension loaded. What exported layers call per step (the op still checks shapes
    and dtypes; :func:`cpu_sparse_linear`'s Python checks cost several µs a call)."""
    k = w.shape[1]
    return torch.ops.sparse_rnnt_cpu.sparse_linear(x2, w.bitmap.offsets, w.cols, w.bitmap.values, k,
                                                   w.bitmap.tile, bias)
