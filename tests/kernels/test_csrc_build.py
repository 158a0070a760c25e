"""The CUDA bitmap extension compiles with nvcc (no GPU needed) and, on CUDA, matches a float64
dense reference within twice PyTorch's own error in the same dtype.
"""

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from sparse_rnnt.kernels.small_row import BitmapWeight, bitmap_linear, cuda_ext
from tests.kernels.tolerance import assert_linear_close_to


def _nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not installed")
def test_bitmap_spmm_compiles_for_sm90(tmp_path: Path) -> None:
    # The flags torch's JIT loader passes (no half operators/conversions), so code that only
    # builds without them is caught here too.
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [
        _nvcc(), "-c", str(cuda_ext.SOURCE), "-o", str(tmp_path / "bitmap_spmm.o"),
        "-arch=sm_90", "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=bitmap_spmm_build_test",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__", "-Werror", "all-warnings", "-Xptxas", "-v",
        "-I", sysconfig.get_paths()["include"],
    ]
    for inc in cpp_extension.include_paths():
        cmd += ["-I", inc]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-4000:]}"
    obj = tmp_path / "bitmap_spmm.o"
    assert obj.stat().st_size > 0
    # ptxas -v: these kernels are bound by memory latency, so no instance may spill registers to
    # local memory (an earlier gemv spilled 24 bytes at 4 rows).
    spills = re.findall(r"(\d+) bytes spill stores", proc.stdout + proc.stderr)
    assert len(spills) >= 28 and all(int(b) == 0 for b in spills), spills
    # The object holds a kernel instance per (dtype, R_MAX), the latency-bound one up to 8 rows,
    # and the op's registration.
    nm = shutil.which("nm")
    if nm is not None:
        syms = subprocess.run([nm, "-C", str(obj)], capture_output=True, text=True, check=True).stdout
        for dtype in ("float", "c10::Half", "c10::BFloat16"):
            for r_max in (1, 2, 4, 8, 16, 32, 64):
                kernel = "bitmap_gemv_kernel" if r_max <= 8 else "bitmap_spmm_kernel"
                other = "bitmap_spmm_kernel" if r_max <= 8 else "bitmap_gemv_kernel"
                assert f"{kernel}<{dtype}, {r_max}>" in syms, (dtype, r_max)
                assert f"{other}<{dtype}, {r_max}>" not in syms, (dtype, r_max)
        assert "TORCH_LIBRARY_init_sparse_rnnt_small_row" in syms


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# Rows > 8 take the chunked kernel: (12, 7, 77) is one partial chunk and a block with an empty
# row, (33, 45, 1000) a partial last chunk with rows to spare in a 64-row instance.
@pytest.mark.parametrize("r,n,k", [(1, 37, 53), (3, 37, 130), (8, 75, 1100), (5, 512, 2048), (17, 512, 2048),
                                   (12, 7, 77), (33, 45, 1000), (64, 3072, 768), (70, 768, 3072)])
def test_cuda_extension_matches_reference(r, n, k, dtype):
    assert cuda_ext.get_extension() is not None, "the CUDA extension failed to build (see the warning)"
    g = torch.Generator().manual_seed(r)
    x = torch.randn(r, k, generator=g).to("cuda", dtype)
    w = torch.randn(n, k, generator=g).to("cuda", dtype)
    b = torch.randn(n, generator=g).to("cuda", dtype)
    mask = (torch.rand(n, k, generator=g) < 0.3).cuda()
    with torch.no_grad():
        y = bitmap_linear(x, BitmapWeight.from_dense(w, mask), b, backend="cuda")
    assert_linear_close_to(y, x, w * mask, b, f"cuda ext r={r} {dtype}")


def test_a_stale_build_lock_is_removed_and_a_live_one_waited_for(tmp_path: Path, caplog) -> None:
    # A build killed mid-way (the GPU script's `timeout`) leaves `lock` behind, and torch's loader
    # waits on it forever: every later bitmap user of the session hung for its whole budget.
    import threading
    import time

    lock = tmp_path / "lock"
    assert not cuda_ext.clear_stale_lock(tmp_path)  # no lock: nothing to wait for
    lock.write_text("")
    os.utime(lock, (time.time() - 1000, time.time() - 1000))
    with caplog.at_level("WARNING"):
        assert cuda_ext.clear_stale_lock(tmp_path, stale_s=180)
    assert not lock.exists() and "stale build lock" in caplog.text
    lock.write_text("")  # a live build: waited for until it lets go of the lock, not removed
    threading.Timer(0.3, lock.unlink).start()
    t0 = time.monotonic()
    assert not cuda_ext.clear_stale_lock(tmp_path, stale_s=180, poll_s=0.05)
    assert 0.25 <= time.monotonic() - t0 < 10
    lock.write_text("")  # a lock that ages past the limit while waited on
    assert cuda_ext.clear_stale_lock(tmp_path, stale_s=0.3, poll_s=0.05) and not lock.exists()
