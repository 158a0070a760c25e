"""The autotuners' timing function: short timing, failing configs skipped (not fatal)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from sparse_rnnt.kernels import tuning
from sparse_rnnt.kernels.masked_linear import fused
from sparse_rnnt.kernels.small_row import bitmap, bsr


def test_every_autotuner_uses_it():
    for kernel in (fused._fwd_kernel, fused._dx_kernel, fused._dw_kernel, bitmap._bitmap_kernel, bsr._bsr_kernel):
        assert kernel.do_bench is tuning.autotune_bench


def test_a_failing_config_is_infinitely_slow_and_logged_once(caplog, monkeypatch):
    seen = []

    def fake_do_bench(fn, warmup, rep, quantiles):  # stands in for the GPU timer on CPU
        seen.append((warmup, rep, quantiles))
        fn()
        return [1.0, 0.5, 2.0] if quantiles else 1.0

    monkeypatch.setattr("triton.testing.do_bench", fake_do_bench)
    monkeypatch.setattr(tuning, "_reported", set())

    def broken():
        raise RuntimeError("PassManager::run failed\ndetails")

    with caplog.at_level(logging.WARNING, logger="sparse_rnnt.kernels.tuning"):
        assert tuning.autotune_bench(lambda: None, (0.5, 0.2, 0.8)) == [1.0, 0.5, 2.0]
        assert tuning.autotune_bench(broken, (0.5, 0.2, 0.8)) == [math.inf] * 3
        assert tuning.autotune_bench(broken) == math.inf
    assert seen[0] == (tuning.WARMUP_MS, tuning.REP_MS, [0.5, 0.2, 0.8])
    warnings = [r for r in caplog.records if "PassManager::run failed" in r.getMessage()]
    assert len(warnings) == 1 and "details" not in warnings[0].getMessage()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_times_a_working_config():
    x = torch.randn(1 << 20, device="cuda")
    times = tuning.autotune_bench(lambda: x.mul_(1.0), (0.5, 0.2, 0.8))
    assert len(times) == 3 and all(0 < t < 10 for t in times) and times[1] <= times[0] <= times[2]


def test_the_log_names_the_kernel_and_config_once_per_kernel_and_error(caplog, monkeypatch):
    """The call Triton 3.6's autotuner hands to ``do_bench`` is read for its kernel and config (a
    real ``Autotuner._bench``, its timer captured); one error text from two kernels is logged for
    each."""
    monkeypatch.setattr(tuning, "_reported", set())
    calls = {}
    for kernel in (fused._fwd_kernel, bsr._bsr_kernel):
        monkeypatch.setattr(kernel, "nargs", {}, raising=False)
        monkeypatch.setattr(kernel, "do_bench", lambda fn, quantiles, k=kernel: calls.setdefault(k, fn))
        kernel._bench(config=kernel.configs[0])
    assert tuning._describe(calls[fused._fwd_kernel]) == ("_fwd_kernel", str(fused._fwd_kernel.configs[0]))

    def failing(fn):
        def bench(fn=fn, warmup=None, rep=None, quantiles=None):
            raise RuntimeError("PassManager::run failed")
        return bench

    with caplog.at_level(logging.WARNING, logger="sparse_rnnt.kernels.tuning"):
        for kernel in (fused._fwd_kernel, bsr._bsr_kernel, fused._fwd_kernel):
            monkeypatch.setattr("triton.testing.do_bench", failing(calls[kernel]))
            assert tuning.autotune_bench(calls[kernel]) == math.inf
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith(f"autotuning _fwd_kernel skipped a config that failed ({fused._fwd_kernel.configs[0]};")
    assert messages[1].startswith("autotuning _bsr_kernel skipped")
    assert tuning._describe(lambda: None) == ("?", "?")
