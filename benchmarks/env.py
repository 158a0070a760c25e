"""Machine, versions, commit and date recorded with every benchmark result."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from typing import Any

import torch


def unwritable(directory: str | os.PathLike[str]) -> str | None:
    """None when ``directory`` can be created and a file written in it; else why not. Benchmarks
    check their output folder before the work, which can take minutes of device time."""
    import tempfile

    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as e:
        return f"{directory}: cannot write results there ({e.strerror or e})"
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    # Machines without git (the GPU image) can pass the commit in the environment.
    if os.environ.get("SPARSE_RNNT_COMMIT"):
        return os.environ["SPARSE_RNNT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        import torchaudio

        torchaudio_version = torchaudio.__version__
    except Exception:
        torchaudio_version = None
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchaudio": torchaudio_version,
        "triton": triton_version,
        "cuda": torch.version.cuda,
    }
