"""Triton kernels of sparse_rnnt, installed as ``sparse_rnnt.kernels``.

One folder per op: ``naive.py`` (pure PyTorch reference) beside the Triton kernel module. The
backend (``"triton"`` or ``"torch"``) is always an explicit argument chosen by the caller's config;
nothing here reads global state to decide it.
"""
