"""Direct launches (``kernels/launch.py``): the same kernels and arguments as Triton's own path.

The launch check runs in a subprocess without the interpreter, on a driver that compiles for
sm_90 and records launches instead of running them (``benchmarks/host_driver.py``). On a GPU,
``test_cuda_direct_launches_give_triton_results`` compares the outputs of both paths.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_rnnt.kernels.launch import DirectLauncher, _int_class

ROOT = Path(__file__).resolve().parents[2]


def test_direct_launches_match_triton_launches():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, "-m", "tests.kernels.launch_check"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "direct launches: 0 failures" in out, out[-6000:]
    # Both checks ran: the specialization sweep on both probes, and every op took the direct path.
    assert re.search(r"specialization _probe_kernel: \d+ signatures", out), out[-3000:]
    assert re.search(r"specialization _tuned_probe_kernel: \d+ signatures", out), out[-3000:]
    assert len(re.findall(r"^ok   ops ", out, re.M)) == 16, out[-3000:]
    assert len(re.findall(r"^ok   uncacheable: ", out, re.M)) == 2, out[-3000:]


def test_host_launch_benchmark_times_both_paths_over_the_same_launches(tmp_path):
    # The benchmark's providers must launch the same kernels per call, and "triton-launch" must
    # really go through Triton (its launchers off), or the ratio it reports compares nothing.
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    out = tmp_path / "host.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.host_launch", "--samples", "20", "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    doc = json.loads(out.read_text())
    assert doc["environment"]["commit"] and doc["environment"]["torch"]
    rows = {(r["op"], r["provider"]): r for r in doc["rows"]}
    ops = {op for op, _ in rows}
    assert len(ops) == 6 and {op for op, p in rows if p == "torch"} == {"masked_linear fwd", "masked_linear fwd+bwd"}
    for op in ops:
        t, d = rows[(op, "triton-launch")], rows[(op, "direct")]
        assert t["triton_launches_per_call"] == d["triton_launches_per_call"] >= 1
        assert t["us"] > 0 and d["vs_triton_launch"] == pytest.approx(t["us"] / d["us"])


def _triton_int_spec(v: int) -> tuple:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, v, False, True, True)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.integers(-(1 << 64), 1 << 64), st.sampled_from(
    [0, 1, 2, 15, 16, 17, (1 << 31) - 16, (1 << 31) - 1, 1 << 31, -(1 << 31), -(1 << 31) - 16, (1 << 63) - 16,
     (1 << 63) - 1, 1 << 63, (1 << 64) - 16])), st.integers(-(1 << 64), 1 << 64))
def test_int_classes_are_tritons_specializations(a: int, b: int):
    # Two ints share a cache class exactly when Triton specializes them alike (its C++ function).
    if not (-(1 << 63) <= a < (1 << 64) and -(1 << 63) <= b < (1 << 64)):
        return  # Triton refuses ints outside int64/uint64 at all
    assert (_int_class(a) == _int_class(b)) == (_triton_int_spec(a) == _triton_int_spec(b))


def test_launcher_is_off_under_the_interpreter_and_forwards_to_triton():
    # The suite runs under TRITON_INTERPRET=1: nothing is compiled, so every call must take
    # Triton's path (the kernel tests then check what it computes).
    from sparse_rnnt.kernels.masked_linear import fused

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the suite's interpreter setting is what this checks")
    launcher = fused._mask_grad_launch
    assert isinstance(launcher, DirectLauncher) and not launcher.enabled
    g = torch.ones(5, 7)
    m = torch.tensor([[0b0101_0101] for _ in range(5)], dtype=torch.uint8)
    launcher[(1, 1)](g, m, 5, 7, g.stride(0), g.stride(1), m.stride(0), MASK_MODE=1, BLOCK_N=8, BLOCK_K=8)
    assert torch.equal(g, torch.tensor([[1.0, 0, 1, 0, 1, 0, 1]] * 5))
    assert launcher.hits == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_direct_launches_give_triton_results(dtype):
    # Same outputs and gradients, bit for bit, with direct launches and with Triton's path, over
    # row counts and alignments that change the signature between calls (a misaligned x view).
    from sparse_rnnt.kernels.launch import DirectLauncher
    from sparse_rnnt.kernels.masked_linear import fused, masked_linear, pack_rows

    launchers = [v for v in vars(fused).values() if isinstance(v, DirectLauncher)]
    g = torch.Generator().manual_seed(0)
    k, n = 515, 1031
    w = torch.randn(n, k, generator=g).to("cuda", dtype).requires_grad_(True)
    mask = pack_rows(torch.rand(n, k, generator=g) < 0.3).cuda()
    hits = sum(lau.hits for lau in launchers)
    for rows, offset in ((4099, 0), (4099, 1), (77, 0), (4099, 0), (77, 1), (4099, 1)):
        base = torch.randn(rows, k + 1, generator=g).to("cuda", dtype)
        x = base[:, offset:offset + k].requires_grad_(True)
        dy = torch.randn(rows, n, generator=g).to("cuda", dtype)
        results = []
        for direct in (True, False):
            for lau in launchers:
                lau.enabled = direct
            try:
                y = masked_linear(x, w, mask, hard=True)
                results.append((y, *torch.autograd.grad(y, (x, w), dy)))
            finally:
                for lau in launchers:
                    lau.enabled = True
        for a, b in zip(*results, strict=True):
            assert torch.equal(a, b)
    assert sum(lau.hits for lau in launchers) > hits  # the repeated signatures went direct


def test_package_launchers_cover_every_kernel_module_and_can_be_switched_off():
    from sparse_rnnt.kernels import launch

    kernels = ROOT / "kernels"
    using = {str(p.relative_to(kernels).with_suffix("")).replace(os.sep, ".") for p in kernels.rglob("*.py")
             if "DirectLauncher(" in p.read_text(encoding="utf-8") and p.name != "launch.py"}
    assert using == set(launch._MODULES)
    launchers = launch.package_launchers()
    # No kernel is launched around its launcher: `kernel[grid](...)` appears only as the tests'
    # explicit-config path (`_x_kernel.fn[grid]`, through a variable), never on a kernel itself.
    for p in kernels.rglob("*.py"):
        assert not re.findall(r"(?<![.\w])_\w+_kernel\[", p.read_text(encoding="utf-8")), p
    # Every `name_launch[...]` site names a launcher of those modules.
    sites = {m for p in kernels.rglob("*.py") for m in re.findall(r"(\w+_launch)\[", p.read_text(encoding="utf-8"))}
    names = {name for mod in launch._MODULES for name, v in vars(__import__(
        f"sparse_rnnt.kernels.{mod}", fromlist=["_"])).items() if isinstance(v, DirectLauncher)}
    assert sites and sites <= names
    before = [lau.enabled for lau in launchers]
    with launch.triton_launches():
        assert not any(lau.enabled for lau in launchers)
    assert [lau.enabled for lau in launchers] == before
