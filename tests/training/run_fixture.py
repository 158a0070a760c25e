"""Helpers for training tests: a tiny dense run to start from, and a NaN loss on demand."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def nan_loss(model: Any) -> Iterator[None]:
    """Forward passes of ``model`` inside give a NaN loss, before their backward pass, so the
    gradients are NaN too (what a real NaN loss leaves)."""

    def poison(module: Any, args: Any, out: Any) -> Any:
        out.loss = out.loss * float("nan")
        return out

    handle = model.register_forward_hook(poison)
    try:
        yield
    finally:
        handle.remove()


def train_tiny_dense(manifests: Path, out: Path, steps: int) -> Path:
    """A dense en+fr run of ``steps`` steps (2 Emformer layers, one checkpoint at the end) in ``out``."""
    from sparse_rnnt.config import config_from_tree
    from sparse_rnnt.training.trainer import Trainer

    over = {
        "data.manifest_dir": str(manifests), "data.workers": 1, "train.max_steps": steps, "train.log_every": 0,
        "train.eval_every": 0, "train.checkpoint_every": steps, "train.threads": 1, "train.progress": False,
        "batch.max_frames": 400, "model.transformer_num_layers": 2, "optim.warmup_steps": steps // 2,
    }
    Trainer(config_from_tree({}, [f"{k}={v}" for k, v in over.items()]), out).run()
    return out

