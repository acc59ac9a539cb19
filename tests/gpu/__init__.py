"""Checks that need a CUDA GPU (benchmarks/gpu_suite.sh) and the suite's own fit to a device command."""
