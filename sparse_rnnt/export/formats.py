"""Compressed weight formats of exported layers, and the modules that compute with them.

Each format turns one pruned linear weight ``W ⊙ M`` (``[N, K]``, out × in) into named tensors
for safetensors plus JSON-able parameters, and back into an ``nn.Module`` computing
``y = x (W ⊙ M)ᵀ + b`` for ``x [*, K]``:

- ``dense``: ``W ⊙ M`` as a dense matrix (the baseline; cuBLAS).
- ``2:4``: semi-structured sparsity. Groups of 4 along the input dimension keep 2 weights: the
  kept values ``[N, K/2]`` and a row-packed bit mask ``[N, ceil(K/8)]`` (1 bit per weight). A
  mask that is not 2:4 is projected first (in each group the 2 largest ``|W ⊙ M|`` are kept);
  the magnitude this loses is reported (``lost_l1``: Σ|dropped| / Σ|W ⊙ M|; 0 for masks trained
  with 2:4 granularity). On CUDA with fp16/bf16 the layer runs on torch's semi-structured
  tensors (sparse tensor cores) when the shape allows it, else on the dense masked weight;
  ``runtime`` says which. ``semi_structured`` picks torch's backend: ``"auto"``
  (``to_sparse_semi_structured``: cuSPARSELt when torch has it, whose wrapper sets up a plan on
  every call), ``"cutlass"`` or ``"cusparselt"``.
- ``bsr``: block-sparse rows (:class:`~sparse_rnnt.kernels.small_row.BsrWeight`), blocks that
  hold any kept weight are stored whole; Triton small-row kernel on CUDA.
- ``bitmap``: unstructured, kept values plus one bit per weight, tiled
  (:class:`~sparse_rnnt.kernels.small_row.BitmapWeight`); the CUDA C++ kernel of ``csrc/`` when it
  builds, else Triton on CUDA.

On CPU, bsr and bitmap layers run the C++ small-row kernel of ``csrc/cpu_spmm.cpp``
(:mod:`sparse_rnnt.kernels.small_row.cpu`, runtime ``cpu``) on their kept weights (a BSR
weight's nonzeros), built on first use; ``cpu_sparse`` picks: ``"auto"`` (the kernel when it
builds, else decompressed), ``"kernel"`` (the kernel, an error if it cannot be built) or
``"dense"`` (decompressed once at load and run dense: compact on disk, not in memory). 2:4
layers run dense on the CPU, and so do layers with more than 65536 inputs (the kernel's columns
are uint16; logged).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("dense", "2:4", "bsr", "bitmap")
# The tensors :func:`encode` stores per layer in each format, with their dtype (None: the
# artifact's weight dtype); loading refuses any other name or dtype.
PARTS: dict[str, dict[str, torch.dtype | None]] = {
    "dense": {"weight": None},
    "2:4": {"values": None, "mask": torch.uint8},
    "bsr": {"crow_indices": torch.int32, "col_indices": torch.int32, "values": None},
    "bitmap": {"bits": torch.int32, "values": None, "offsets": torch.int32},
}
SEMI_STRUCTURED: tuple[str, ...] = ("auto", "cutlass", "cusparselt")
CPU_SPARSE: tuple[str, ...] = ("auto", "kernel", "dense")


def check_cpu_sparse(choice: str) -> str:
    """``choice`` if it is one of CPU_SPARSE, else ``ValueError``."""
    if choice not in CPU_SPARSE:
        raise ValueError(f"cpu_sparse must be one of {', '.join(CPU_SPARSE)}, got {choice!r}")
    return choice


def resolve_cpu_sparse(choice: str) -> str:
    """What a bsr/bitmap layer on the CPU runs: ``"kernel"`` or ``"dense"``. ``"auto"`` builds
    the CPU kernel once (a failed build logs a warning and gives ``"dense"``); ``"kernel"``
    raises ``UserError`` if it cannot be built."""
    check_cpu_sparse(choice)
    if choice == "dense":
        return "dense"
    from ..kernels.small_row.cpu import get_cpu_extension

    if get_cpu_extension() is not None:
        return "kernel"
    if choice == "kernel":
        raise UserError("cpu_sparse='kernel': the CPU sparse kernel could not be built or loaded (see the warning "
                        "above; it needs a C++ compiler); use 'auto' or 'dense' to run the layers dense")
    return "dense"


def check_semi_structured(choice: str) -> str:
    if choice not in SEMI_STRUCTURED:
        raise ValueError(f"semi_structured must be one of {', '.join(SEMI_STRUCTURED)}, got {choice!r}")
    return choice


def semi_structured_unsupported(backend: str, capability: tuple[int, int]) -> str | None:
    """Why torch's 2:4 ``backend`` cannot run on a GPU of compute ``capability``, or None.
    Torch's CUTLASS 2:4 kernels are built for compute capability 8.x only: on Hopper (9.0) the
    conversion succeeds but every product fails ("Supported only on GPUs with compute
    capability 8.x", seen on an H100), so the choice is refused when the layer is built."""
    if backend == "cutlass" and capability[0] != 8:
        return (f"torch's CUTLASS 2:4 kernels run on compute capability 8.x GPUs only, this one is "
                f"{capability[0]}.{capability[1]}: use --semi-structured auto or cusparselt")
    return None


def _pack_rows(mask: Tensor) -> Tensor:
    from ..kernels.masked_linear import pack_rows

    return pack_rows(mask)


def _unpack_rows(packed: Tensor, k: int) -> Tensor:
    from ..kernels.masked_linear import unpack_rows

    return unpack_rows(packed, k)


def project_2to4(weight: Tensor) -> tuple[Tensor, float]:
    """Keep the 2 largest ``|w|`` of every group of 4 along the input dim (lower index on ties).
    ``weight [N, K]`` (already masked, ``K % 4 == 0``) -> (bool mask ``[N, K]``, lost L1 fraction)."""
    n, k = weight.shape
    groups = weight.detach().abs().float().reshape(n, k // 4, 4)
    # Stable descending order: a tie keeps the lower index.
    order = torch.sort(-groups, dim=-1, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :2], True).reshape(n, k)
    total = float(weight.detach().abs().double().sum())
    lost = float(weight.detach().abs().double()[~keep].sum())
    return keep, (lost / total if total > 0 else 0.0)


def encode(fmt: str, weight: Tensor, mask: Tensor, *, block: tuple[int, int] = (16, 16)) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``weight [N, K]`` and bool ``mask [N, K]`` -> (tensors, params) of format ``fmt``."""
    w = weight.detach().masked_fill(~mask, 0).contiguous()  # not a product: inf * 0 is NaN
    n, k = w.shape
    if fmt == "dense":
        return {"weight": w.cpu()}, {"nnz": int(mask.sum())}
    if fmt == "2:4":
        if k % 4:
            raise UserError(f"2:4 needs the input dimension to be a multiple of 4, got a [{n}, {k}] weight")
        keep, lost = project_2to4(w)
        values = w[keep].reshape(n, k // 2)
        return {"values": values.cpu(), "mask": _pack_rows(keep).cpu()}, {"lost_l1": lost, "nnz": int((keep & mask).sum())}
    if fmt == "bsr":
        from ..kernels.small_row import BsrWeight

        bw = BsrWeight.from_dense(w, mask, blocksize=block)
        return {k_: v.cpu() for k_, v in bw.tensors().items()}, {"block": list(block), "nnz": int(mask.sum())}
    if fmt == "bitmap":
        from ..kernels.small_row import BitmapWeight

        bm = BitmapWeight.from_dense(w, mask)
        return {k_: v.cpu() for k_, v in bm.tensors().items()}, {"nnz": int(mask.sum()), "tile": bm.tile}
    raise UserError(f"unknown export format {fmt!r}: choose from {', '.join(FORMATS)}")


class ExportedLinear(nn.Module, ABC):
    """A linear layer computing from a compressed weight; ``runtime`` names the path it takes.
    It computes in its weight's dtype and returns its input's: an artifact's bf16 layers sit
    between norms and LSTM that stay float32 (``EmformerRNNT.activation_dtype``)."""

    def __init__(self, fmt: str, shape: tuple[int, int], bias: Tensor | None) -> None:
        super().__init__()
        self.fmt = fmt
        self.out_features, self.in_features = shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.runtime = "torch"

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, format={self.fmt}, runtime={self.runtime}"

    @property
    @abstractmethod
    def compute_dtype(self) -> torch.dtype:
        """The dtype the layer computes in (its weight's)."""

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[*, in]`` in any float dtype -> ``[*, out]`` in x's dtype."""
        return self._linear(x.to(self.compute_dtype)).to(x.dtype)

    @abstractmethod
    def _linear(self, x: Tensor) -> Tensor:
        """The product, ``x`` already in :attr:`compute_dtype`."""


class DenseExported(ExportedLinear):
    def __init__(self, weight: Tensor, bias: Tensor | None, fmt: str = "dense", runtime: str = "cublas") -> None:
        super().__init__(fmt, tuple(weight.shape), bias)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.runtime = runtime if weight.is_cuda else "torch"

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def _linear(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class SemiStructuredExported(ExportedLinear):
    """2:4 weight on sparse tensor cores (CUDA fp16/bf16), else the dense masked weight.
    ``backend``: torch's semi-structured backend (see the module docstring)."""

    def __init__(self, dense: Tensor, bias: Tensor | None, backend: str = "auto") -> None:
        super().__init__("2:4", tuple(dense.shape), bias)
        check_semi_structured(backend)
        self.weight: Tensor | nn.Parameter = nn.Parameter(dense, requires_grad=False)
        if dense.is_cuda and dense.dtype in (torch.float16, torch.bfloat16):
            why = semi_structured_unsupported(backend, torch.cuda.get_device_capability(dense.device))
            if why is not None:
                raise UserError(why)
            try:
                from torch.sparse import (
                    SparseSemiStructuredTensorCUSPARSELT,
                    SparseSemiStructuredTensorCUTLASS,
                    to_sparse_semi_structured,
                )

                convert = {"auto": to_sparse_semi_structured, "cutlass": SparseSemiStructuredTensorCUTLASS.from_dense,
                           "cusparselt": SparseSemiStructuredTensorCUSPARSELT.from_dense}[backend]
                self.weight = nn.Parameter(convert(dense), requires_grad=False)
                self.runtime = "semi-structured" if backend == "auto" else f"semi-structured-{backend}"
            except (RuntimeError, ValueError) as e:  # shape or arch not supported: dense fallback
                log.info("2:4 layer %s kept dense: %s", list(dense.shape), str(e).splitlines()[0])
                self.runtime = "dense-fallback"

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def _linear(self, x: Tensor) -> Tensor:
        if not self.runtime.startswith("semi-structured"):
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


# Rows up to which a bitmap layer on the "cuda" runtime calls the CUDA extension; above, the
# Triton kernel. Measured on an H100 inside CUDA graphs (benchmarks/results/h100-2026-11-26/
# small-row-cuda.jsonl, base FFN layers at 70%): at 32 rows the extension's 9-64-row kernel took
# 20 and 62 us where the Triton kernel took 9 and 10; at 1 row its latency-bound kernel took 6.0
# and 10.4 us against Triton's 7.0 and 8.7.
CUDA_BITMAP_MAX_ROWS = 8


def bitmap_backend_for(runtime: str, rows: int) -> str:
    """The small-row backend a bitmap layer of ``runtime`` uses for a call of ``rows`` rows."""
    return "triton" if runtime == "cuda" and rows > CUDA_BITMAP_MAX_ROWS else runtime


class SmallRowExported(ExportedLinear):
    """BSR or bitmap weight through the small-row kernels (``sparse_rnnt.kernels.small_row``).
    Built on its final device (the packed weight is not a registered buffer: do not ``.to()`` it).
    A bitmap layer on the ``cuda`` runtime calls the CUDA extension for up to
    ``CUDA_BITMAP_MAX_ROWS`` rows and the Triton kernel for more; on the ``cpu`` runtime either
    format holds a :class:`~sparse_rnnt.kernels.small_row.cpu.CpuSparseWeight` and calls the C++
    kernel."""

    def __init__(self, fmt: str, packed: Any, bias: Tensor | None, backend: str, dtype: torch.dtype) -> None:
        super().__init__(fmt, tuple(packed.shape), bias)
        self.packed = packed
        self.runtime = backend
        self.dtype = dtype
        if backend == "cpu":
            from ..kernels.small_row.cpu import CpuSparseWeight, get_cpu_extension

            if get_cpu_extension() is None or not isinstance(packed, CpuSparseWeight):
                raise ValueError("runtime 'cpu' needs the CPU kernel and a CpuSparseWeight")
            if packed.dtype != dtype or (bias is not None and bias.dtype != dtype):
                raise ValueError(f"runtime 'cpu': weight and bias must be {dtype}")

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.dtype

    def _linear(self, x: Tensor) -> Tensor:
        from ..kernels.small_row import bitmap_linear, bsr_linear

        if self.runtime == "cpu":
            from ..kernels.small_row.cpu import sparse_linear_op

            # The op on its own: the weight was checked when the layer was built, and a step
            # makes over a hundred of these calls.
            if x.shape[-1] != self.in_features:  # reshape would regroup a wrong width silently
                raise ValueError(f"x has {x.shape[-1]} features, the layer takes {self.in_features}")
            if torch.is_grad_enabled() and x.requires_grad:
                raise ValueError("runtime 'cpu' is inference-only (no autograd): call under torch.no_grad()")
            y = sparse_linear_op(x.reshape(-1, self.in_features).contiguous(), self.packed, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        if self.fmt == "bsr":
            return bsr_linear(x, self.packed, self.bias, backend=self.runtime)
        backend = bitmap_backend_for(self.runtime, x.numel() // max(self.in_features, 1))
        return bitmap_linear(x, self.packed, self.bias, backend=backend)


def _small_row_backend(fmt: str, device: torch.device) -> str:
    if device.type != "cuda":
        return "torch"
    if fmt == "bitmap":
        from ..kernels.small_row.cuda_ext import get_extension

        if get_extension() is not None:  # builds once; a failed build logs once and falls back
            return "cuda"
    return "triton"


def decode(fmt: str, tensors: dict[str, Tensor], shape: tuple[int, int], params: dict[str, Any],
           bias: Tensor | None, device: torch.device, dtype: torch.dtype,
           semi_structured: str = "auto", cpu_sparse: str = "dense") -> ExportedLinear:
    """The module computing with a weight stored by :func:`encode` (``ValueError`` if
    inconsistent); ``semi_structured``: torch's 2:4 backend; ``cpu_sparse``: a CPU bsr/bitmap
    layer's runtime as :func:`resolve_cpu_sparse` gave it, ``"kernel"`` or ``"dense"`` (see the
    module docstring)."""
    n, k = shape
    tensors = {name: t.to(device) for name, t in tensors.items()}
    bias = None if bias is None else bias.to(device=device, dtype=dtype)
    if fmt == "dense":
        w = tensors["weight"]
        if list(w.shape) != [n, k]:
            raise ValueError(f"dense weight has shape {list(w.shape)}, expected {[n, k]}")
        return DenseExported(w.to(dtype), bias)
    if fmt == "2:4":
        values, packed = tensors["values"], tensors["mask"]
        if list(values.shape) != [n, k // 2] or k % 4:
            raise ValueError(f"2:4 values have shape {list(values.shape)}, expected {[n, k // 2]}")
        keep = _unpack_rows(packed, k)
        if list(keep.shape) != [n, k] or not bool((keep.reshape(n, k // 4, 4).sum(-1) == 2).all()):
            raise ValueError("2:4 mask does not keep exactly 2 of every 4 weights")
        dense = torch.zeros(n, k, dtype=dtype, device=device)
        dense[keep] = values.reshape(-1).to(dtype)
        return SemiStructuredExported(dense, bias, semi_structured)
    if fmt in ("bsr", "bitmap"):
        from ..kernels.small_row import BitmapWeight, BsrWeight

        cls = BsrWeight if fmt == "bsr" else BitmapWeight
        extra = {"blocksize": tuple(params["block"])} if fmt == "bsr" else {"tile": int(params["tile"])}
        packed = cls.from_tensors({name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()},
                                  (n, k), **extra)
        if device.type != "cuda":
            from ..kernels.small_row.cpu import MAX_K, CpuSparseWeight

            if cpu_sparse == "kernel" and k > MAX_K:
                log.warning("a %s layer [%d, %d] runs dense on the CPU: the CPU kernel takes at most %d inputs "
                            "(uint16 columns)", fmt, n, k, MAX_K)
            elif cpu_sparse == "kernel":
                cpu_w = CpuSparseWeight.from_bitmap(packed) if isinstance(packed, BitmapWeight) \
                    else CpuSparseWeight.from_bsr(packed)
                return SmallRowExported(fmt, cpu_w, bias, "cpu", dtype)
            # Decompressed once at load (compact on disk only).
            return DenseExported(packed.to_dense(), bias, fmt=fmt, runtime="torch")
        return SmallRowExported(fmt, packed, bias, _small_row_backend(fmt, device), dtype)
    raise ValueError(f"unknown format {fmt!r}")
