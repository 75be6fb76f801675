"""Triton kernels of the GPU backend. Importing this package imports triton: GPU path only."""
