"""Hand-written GPU kernels for the attention backends."""
