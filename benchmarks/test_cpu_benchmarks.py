"""pytest-benchmark for the CPU paths (not part of ``make test``): ``make bench-cpu``.

Each group puts the providers of one operation side by side in one pytest run.
"""

import pytest
import torch
import torch.nn.functional as F

from sparse_rnnt.kernels.masked_linear import masked_linear_ref
from sparse_rnnt.kernels.rerank import rerank_masks_torch
from sparse_rnnt.pruning.ranking import magnitude_masks

N = 1_000_000


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(N // 8 // 1000, 1000, generator=g) for i in range(8)}


@pytest.mark.benchmark(group="rerank-1M-cpu")
def test_rerank_magnitude_masks(benchmark, weights):
    benchmark(magnitude_masks, weights, 0.7)


@pytest.mark.benchmark(group="rerank-1M-cpu")
def test_rerank_sort_reference(benchmark, weights):
    benchmark(rerank_masks_torch, weights, 0.7)


@pytest.mark.benchmark(group="rerank-1M-cpu")
def test_rerank_kthvalue(benchmark, weights):
    flat = torch.cat([w.reshape(-1) for w in weights.values()]).abs()
    benchmark(torch.kthvalue, flat, int(0.7 * flat.numel()))


@pytest.fixture(scope="module")
def linear():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 144, generator=g)
    w = torch.randn(576, 144, generator=g)
    return x, w, torch.rand(576, 144, generator=g) < 0.3


@pytest.mark.benchmark(group="masked-linear-1024x144x576-cpu")
def test_linear_dense(benchmark, linear):
    x, w, _ = linear
    benchmark(F.linear, x, w)


@pytest.mark.benchmark(group="masked-linear-1024x144x576-cpu")
def test_linear_masked_reference(benchmark, linear):
    x, w, m = linear
    benchmark(masked_linear_ref, x, w, m)
