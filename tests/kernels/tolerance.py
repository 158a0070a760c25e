"""The kernels' accuracy rule: within twice PyTorch's own error in the same dtype (plus one ulp of
the result's scale), both measured against a float64 reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def assert_close_to(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor, what: str) -> None:
    """``out`` (kernel) within 2x the error of ``torch_out`` (PyTorch, same dtype) of ``ref64``."""
    assert out.shape == ref64.shape, what
    assert not out.isnan().any(), f"{what}: NaN (unwritten element?)"
    torch_err = (torch_out.double() - ref64).abs().max().item()
    err = (out.double() - ref64).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * ref64.abs().max().item()
    assert err <= 2 * torch_err + ulp, f"{what}: error {err:.3g} vs torch {torch_err:.3g} (ulp {ulp:.3g})"


def assert_linear_close_to(out: torch.Tensor, x: torch.Tensor, dense_w: torch.Tensor, b: torch.Tensor | None,
                           what: str) -> None:
    """``out`` vs ``F.linear(x, dense_w, b)``, under :func:`assert_close_to`'s rule."""
    ref64 = F.linear(x.double(), dense_w.double(), None if b is None else b.double())
    assert_close_to(out, ref64, F.linear(x, dense_w, b), what)
