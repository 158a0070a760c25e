"""CUDA C++ sources (installed as ``sparse_rnnt.csrc``): optional kernels built on first use with
``torch.utils.cpp_extension.load``; see ``sparse_rnnt.kernels.small_row.cuda_ext`` for the loader
and its fallback."""
