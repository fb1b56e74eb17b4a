"""Triton kernels behind the layers (one file per kernel family)."""
