"""Every Triton kernel of the package compiles for a Hopper GPU (sm_90) on this machine.

Most sessions have no GPU, so the code paths that only run on one (the autotuner's GPU configs,
register-operand orientations, tensor-core precisions) would otherwise meet the compiler for the
first time in a short device lease. ``sm90_compile.py`` compiles them to cubins without a driver;
it runs in a subprocess because the test session uses the Triton interpreter, which replaces the
kernels it compiles.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _python(args: list[str], timeout: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _check(result: subprocess.CompletedProcess[str]) -> int:
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    done = re.search(r"(\d+)/(\d+) kernels compiled for sm_90", out)
    assert done is not None and done.group(1) == done.group(2), out[-2000:]
    return int(done.group(2))


def test_every_kernel_and_branch_compiles_for_sm90():
    assert _check(_python(["-m", "tests.kernels.sm90_compile"], timeout=900)) > 100


def test_pruned_masked_linear_configs_fit_hopper():
    # The configs the autotuner keeps (fused._pruner) fit the shared memory, and the fp32 FMA ones
    # do not spill: checked on the compiled cubins, not on the pruner's own formula. Before that,
    # the pruner's rules on the GPU config lists (sm90_compile.pruner_rules).
    result = _python(["-m", "tests.kernels.sm90_compile", "--prune"], timeout=900)
    assert result.returncode == 0 and "config pruning: 0 failures" in result.stdout, result.stdout[-6000:]


def test_fp32_masked_linear_keeps_its_partial_sums_after_compilation():
    # The fp32 forward, dX and dW sum their reductions in groups (SPLIT_ACC), which the fp32
    # accuracy on the GPU needs. Written as acc + tl.dot(a, b) the split compiled to one running
    # sum (Triton folds the add into the dot): 16 fp32 tests failed on the H100, and this check
    # gives 12 failures on that code. It reads the compiled IR; its control kernel shows the fold.
    result = _python(["-m", "tests.kernels.sm90_compile", "--split"], timeout=900)
    assert result.returncode == 0 and "split accumulation: 0 failures" in result.stdout, result.stdout[-6000:]
    assert "ok   split=False  control" in result.stdout


def test_aligned_rerank_tiles_compile_to_16_byte_loads_and_stores():
    # The re-rank kernels read each segment's address from a table; without the ALIGNED hint on
    # the pointer every tile load was one element wide (scalar ld.global.b32/b16/b8, checked in
    # the unhinted control variants, which are also what unaligned launches run).
    result = _python(["-m", "tests.kernels.sm90_compile", "--vectors"], timeout=900)
    assert result.returncode == 0 and "vector widths: 0 failures" in result.stdout, result.stdout[-6000:]
    assert "ok   v4 loads=0" in result.stdout  # the control


def test_fold_kernel_loads_its_copies_in_blocks_without_spilling():
    # The fold loads up to 16 private histogram copies at once, about 32 int32 values per thread
    # (select.fold_layout). [8, 1024] tiles at 4 warps compiled to 255 registers and spilled, at
    # 8 warps to 150. Every layout the select launches must compile without spills.
    result = _python(["-m", "tests.kernels.sm90_compile", "--only", "_fold_kernel", "--resources"], timeout=600)
    lines = [ln for ln in result.stdout.splitlines() if "_fold_kernel chunk=" in ln]
    assert result.returncode == 0 and len(lines) >= 4, result.stdout[-3000:] + result.stderr[-3000:]
    assert any("copy_block=16" in ln for ln in lines) and any("chunk=1024 copy_block=8" in ln for ln in lines), lines
    for ln in lines:
        assert re.search(r"spill=\s*0\b", ln), ln


@pytest.mark.slow
def test_every_autotune_config_compiles_for_sm90():
    assert _check(_python(["-m", "tests.kernels.sm90_compile", "--full"], timeout=3000)) > 500


def test_the_check_catches_a_kernel_that_does_not_compile(tmp_path):
    # A dot of 1-D blocks is rejected by the compiler, not by Python: the harness must report it.
    script = textwrap.dedent("""
        import triton, triton.language as tl
        from tests.kernels.sm90_compile import _compile, _jit

        @triton.jit
        def bad(x, y, BLOCK: tl.constexpr):
            a = tl.load(x + tl.arange(0, BLOCK))
            tl.store(y + tl.arange(0, BLOCK), tl.dot(a, a))

        @triton.jit
        def good(x, y, BLOCK: tl.constexpr):
            a = tl.load(x + tl.arange(0, BLOCK))
            tl.store(y + tl.arange(0, BLOCK), a * 2)

        types = {"x": "*fp32", "y": "*fp32"}
        _compile(_jit(good), types, {"BLOCK": 64}, {"num_warps": 4})
        try:
            _compile(_jit(bad), types, {"BLOCK": 64}, {"num_warps": 4})
        except Exception as e:
            print("rejected:", type(e).__name__)
        else:
            print("accepted")
    """)
    (tmp_path / "kernels.py").write_text(script)  # Triton reads a kernel's source from its file
    result = _python([str(tmp_path / "kernels.py")], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rejected:" in result.stdout


def test_masked_linear_k_loops_keep_their_mmas_in_flight():
    # Compiled bf16 forward and dX K loops (PTX), not timings: with the masked tile as the left
    # operand the MMAs of one iteration run on while the next tiles load and the mask applies,
    # and a byte mask is applied in the operand's registers (no shared-memory store).
    result = _python(["-m", "tests.kernels.sm90_compile", "--structure"], timeout=900)
    assert result.returncode == 0 and "loop structure: 0 failures" in result.stdout, result.stdout[-6000:]


def test_loop_structure_reads_a_hand_written_loop():
    from tests.kernels.sm90_compile import loop_structure

    ptx = "\n".join([
        "\tmov.u32 %r1, 0;",
        "$L__BB0_1:                              // %.lr.ph",
        "$L__BB0_2:                              // =>This Inner Loop Header: Depth=1",
        "\tbar.sync 0;",
        "\tst.shared.v4.b32 [%r2], {%r3, %r4, %r5, %r6};",
        "\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};",
        "\twgmma.wait_group.sync.aligned 2;",
        "\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};",
        "\twgmma.wait_group.sync.aligned 0;",
        "\t@%p1 bra \t$L__BB0_2;",
        "\twgmma.wait_group.sync.aligned 0;",
        "\tbar.sync 0;",
    ])
    assert loop_structure(ptx) == {"wgmma": 2, "min_in_flight": 0, "st_shared": 1, "bar_sync": 1}
