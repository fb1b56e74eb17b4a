"""How many KV-cache blocks a rank gets, and the cache tensors themselves.

A block holds ``block_size`` tokens' K and V in every layer. The count comes from the config
when it fixes one (an override, an explicit byte budget, or the CPU default); on a GPU
otherwise from a measurement: what is left under ``gpu_memory_utilization`` after the
weights, a forward at the token budget and the CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tachyon.attention.base import AttentionSpec
from tachyon.config import DEFAULT_CPU_KV_CACHE_BYTES, CacheConfig

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V)


def kv_bytes_per_block(spec: AttentionSpec, num_layers: int) -> int:
    elem = torch.empty((), dtype=spec.dtype).element_size()
    return 2 * num_layers * spec.block_size * spec.num_kv_heads * spec.head_dim * elem


def configured_num_blocks(cache: CacheConfig, device: torch.device, bytes_per_block: int,
                          max_useful: int) -> int | None:
    """The block count the config decides, or None where it must be measured (a GPU with
    no explicit KV budget). On a CPU no more than ``max_useful`` (every sequence at full
    length) is allocated."""
    if cache.num_gpu_blocks_override:
        return cache.num_gpu_blocks_override
    if device.type != "cuda":
        budget = cache.kv_cache_memory or DEFAULT_CPU_KV_CACHE_BYTES
        return max(1, min(budget // bytes_per_block, max_useful))
    if cache.kv_cache_memory:
        return max(1, cache.kv_cache_memory // bytes_per_block)
    return None


def profiled_num_blocks(cache: CacheConfig, bytes_per_block: int,
                        profile_run: Callable[[], None],
                        graph_memory: Callable[[], int]) -> int:
    """Run ``profile_run`` (one forward at the token budget) and give the KV cache what is
    left under ``gpu_memory_utilization`` after weights, activations and ``graph_memory()``
    (the CUDA graphs' pool, measured after the profile)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    profile_run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    free, total = torch.cuda.mem_get_info()
    # Memory used by others (other processes, CUDA context) counts against the budget.
    used_elsewhere = total - free - torch.cuda.memory_reserved()
    budget = total * cache.gpu_memory_utilization - used_elsewhere - peak
    budget -= graph_memory()
    blocks = int(budget // bytes_per_block)
    if blocks < 1:
        raise ValueError(
            f"no GPU memory left for the KV cache (peak {peak / 2**30:.2f} GiB); raise "
            f"--gpu-memory-utilization or lower --max-num-batched-tokens"
        )
    return blocks


def allocate_kv_caches(spec: AttentionSpec, num_layers: int, num_blocks: int) -> KVCaches:
    shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    # Zeroed, not empty: kernels may read (then mask) slots no token has written, and NaN
    # garbage times a zero probability is still NaN.
    return [
        (torch.zeros(shape, dtype=spec.dtype, device=spec.device),
         torch.zeros(shape, dtype=spec.dtype, device=spec.device))
        for _ in range(num_layers)
    ]
