"""Masked linear layers: the explicit, reversible swap through which pruning reaches the kernels.

:func:`swap_linears` replaces chosen ``nn.Linear`` modules of a model by :class:`MaskedLinear`
modules that share the *same* ``weight`` and ``bias`` Parameter objects (so parameter names,
``state_dict`` keys and optimizer state are untouched) and :meth:`LinearSwap.restore` puts the
original modules back. A :class:`MaskedLinear` without a mask is an ordinary linear layer; with
one (:meth:`MaskedLinear.set_mask`, a row-packed bit mask) its forward is the fused Triton
``y = x (W ⊙ M)ᵀ + b`` whose backward gives the straight-through weight gradient ``dYᵀX`` (soft
pruning) or ``(dYᵀX) ⊙ M`` (``hard``), without ever materializing ``W ⊙ M``.

Under autocast, a weight of another dtype is copied to the autocast dtype on every forward
anyway (autocast does the same for ``F.linear``). ``autocast_path="cast"`` (the default) zeroes
the dropped weights in that copy (``masked_cast``, one pass, reused like autocast's copy while
the weight is unchanged) and runs ``F.linear`` on it, so the GEMMs are cuBLAS's; ``"fused"`` makes
the plain copy and runs the fused kernel on it. Both give the same values and gradients; which
is faster is for the benchmarks to say (``benchmarks/kernels.py``, ``masked_linear autocast``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AUTOCAST_PATHS = ("cast", "fused")


def _check_autocast_path(path: str) -> None:
    if path not in AUTOCAST_PATHS:
        raise ValueError(f"autocast_path must be one of {', '.join(AUTOCAST_PATHS)}, got {path!r}")


class MaskedLinear(nn.Linear):
    """``nn.Linear`` sharing another layer's parameters; masked by the fused kernel when a mask is set."""

    mask: Tensor | None
    hard: bool
    backend: str
    autocast_path: str
    _copy: tuple[tuple, Tensor] | None

    @classmethod
    def wrap(cls, linear: nn.Linear, backend: str = "triton", autocast_path: str = "cast") -> MaskedLinear:
        """A MaskedLinear over ``linear``'s own Parameter objects (no copy); ``autocast_path``: see
        the module doc."""
        _check_autocast_path(autocast_path)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        layer.mask, layer.hard, layer.backend, layer.autocast_path = None, False, backend, autocast_path
        layer._copy = None
        return layer

    def set_mask(self, mask: Tensor | None, hard: bool = False) -> None:
        """``mask``: ``[out, ceil(in / 8)]`` uint8 row-packed bits (or ``[out, in]`` bool), None = dense."""
        self.mask, self.hard = mask, hard
        self._copy = None

    def _masked_copy(self, w: Tensor, dtype: torch.dtype) -> Tensor:
        """``(W ⊙ M).to(dtype)``, made once and reused while the weight (its version and storage),
        the dtype and the grad mode stay the same: autocast likewise casts a weight once per
        forward, so a layer called at every step of a recurrence (the predictor LSTM) costs one
        cast, and its gradients meet in the copy as they do in autocast's. ``set_mask`` drops
        the copy (the pruner sets the masks at every step). Triton backend only: the kernel's
        backward keeps nothing that a first backward pass frees, so a reused copy can be
        back-propagated again."""
        from ..kernels.masked_linear import masked_cast

        if self.backend != "triton":
            return masked_cast(w, self.mask, dtype, hard=self.hard, backend=self.backend)
        key = (w._version, w.data_ptr(), self.mask._version, self.mask.data_ptr(), dtype, torch.is_grad_enabled())
        if self._copy is None or self._copy[0] != key:
            self._copy = (key, masked_cast(w, self.mask, dtype, hard=self.hard, backend=self.backend))
        return self._copy[1]

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[*, in]`` -> ``[*, out]``."""
        if self.mask is None:
            return F.linear(x, self.weight, self.bias)
        from ..kernels.masked_linear import masked_linear

        w, b = self.weight, self.bias
        kind = x.device.type
        if torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
            if self.autocast_path == "cast" and w.dtype != dtype:
                # The copy autocast would make of W becomes a copy of W ⊙ M; F.linear under
                # autocast then casts x and b and runs cuBLAS.
                return F.linear(x, self._masked_copy(w, dtype), b)
            # Autocast does not reach custom kernels: cast like it would for F.linear.
            x, w = x.to(dtype), w.to(dtype)
            b = None if b is None else b.to(dtype)
            with torch.autocast(kind, enabled=False):
                return masked_linear(x, w, self.mask, b, hard=self.hard, backend=self.backend)
        # A weight in another dtype (an artifact's bf16 layers between float32 norms) computes in
        # its dtype and hands back the caller's, as the exported layers do.
        # float32: TF32 exactly when torch's flag gives it to the dense layers' cuBLAS calls.
        return masked_linear(x.to(w.dtype), w, self.mask, b, hard=self.hard, backend=self.backend,
                             allow_tf32=torch.backends.cuda.matmul.allow_tf32).to(x.dtype)


@dataclass
class LinearSwap:
    """The swapped layers, by the name of their weight parameter; :meth:`restore` undoes the swap."""

    model: nn.Module
    layers: dict[str, MaskedLinear] = field(default_factory=dict)
    _originals: dict[str, tuple[nn.Module, str, nn.Linear]] = field(default_factory=dict)

    def restore(self) -> None:
        for parent, attr, original in self._originals.values():
            setattr(parent, attr, original)
        self.layers.clear()
        self._originals.clear()

    def clear_masks(self) -> None:
        for layer in self.layers.values():
            layer.set_mask(None)


def swap_linears(model: nn.Module, weight_names: list[str] | set[str], backend: str = "triton",
                 autocast_path: str = "cast") -> LinearSwap:
    """Swap every ``nn.Linear`` whose ``weight`` is named in ``weight_names`` (e.g.
    ``"encoder.layers.0.linear.weight"``) for a :class:`MaskedLinear`; others are left alone.
    ``autocast_path``: how masked layers run under autocast (module doc)."""
    _check_autocast_path(autocast_path)
    wanted = set(weight_names)
    swap = LinearSwap(model)
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod) is nn.Linear and f"{name}.weight" in wanted]
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MaskedLinear.wrap(mod, backend, autocast_path)
        setattr(parent, attr, layer)
        swap.layers[f"{name}.weight"] = layer
        swap._originals[f"{name}.weight"] = (parent, attr, mod)
    return swap
