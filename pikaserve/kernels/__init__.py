"""Fused Triton kernels for the CUDA path, with their torch references."""
