"""Measured skinny-GEMM launch configurations, as ``scripts/gpu_gemm_bench.py`` writes them.

Key: ``skinny_gemm.shape_class(M, N, K)`` = (rows rounded up to a power of two, ceil(log2 N),
ceil(log2 K)). Value: ``(path, block_n, block_k, split_k, num_warps, num_stages)``, or
``None`` where cuBLAS was faster. Classes without an entry use ``default_config``.
Replace this whole file with the ``skinny_gemm_table.py`` the benchmark writes to ``$OUT``.
"""

from __future__ import annotations

# Where the entries were measured (empty: nothing measured yet, defaults everywhere).
TUNED_DEVICE = ""
TUNED_CONFIGS: dict[tuple[int, int, int], tuple[str, int, int, int, int, int] | None] = {}
