"""Benchmarks: providers side by side in one process, results saved with machine and versions."""
