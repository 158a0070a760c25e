"""Shared fixtures: a tiny corpus in the real MLS layout, read into manifests."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Triton kernels run on CPU tensors under the interpreter; it is chosen when a kernel module is
# imported, so it must be set before any test imports sparse_rnnt.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="session")
def tiny_manifests(tmp_path_factory) -> Path:
    """Manifests of a 2-language (en, fr) MLS-layout corpus, 8 utterances per split."""
    # Imported here: the fixture writes audio (soundfile), which the GPU image lacks, and its
    # CUDA tests must collect there.
    from sparse_rnnt.data.mls import read_mls, write_manifests
    from tests.data.mls_fixture import build_mls_fixture

    root = tmp_path_factory.mktemp("tiny_mls")
    build_mls_fixture(root / "corpus", languages=("en", "fr"), per_split=8)
    utts, report = read_mls(root / "corpus", progress=False)
    write_manifests(root / "manifests", utts, report)
    return root / "manifests"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With ``SPARSE_RNNT_FAILURES_NOW=1``, print each failure's traceback as soon as it is known.

    The GPU session runs the tests under a wall-clock bound; pytest prints tracebacks only at the
    end, so a run cut by the bound would keep the test names and lose the reasons.
    """
    if os.environ.get("SPARSE_RNNT_FAILURES_NOW") == "1" and report.failed:
        print(f"\n--- FAILED {report.nodeid} ({report.when})\n{report.longreprtext[-3000:]}\n---", flush=True)
