"""Lending the device to a trainer: ``sleep`` frees the KV cache (level 2: the weights too),
``wake_up`` takes the memory back.

Captured CUDA graphs bake in the addresses of the KV cache (and of the weights), and memory
handed back to the driver comes back at other addresses. So sleep drops the graphs too (their
memory pool goes with them) and wake-up re-allocates the cache at the same size and captures
the graphs again. The compiled model (torch.compile pieces) is kept: wake-up re-captures
without recompiling.

Level 2 discards the weights, as vLLM's does: a trainer pushes new ones with
``update_weights`` right after waking the engine, so a host copy would cost host memory and
two transfers per cycle for nothing. Each parameter's storage is freed in place (the tensor
objects stay, so loaders, tied weights and the compiled model still find them) and comes back
filled with NaN, a value no trained weight holds: a parameter the trainer never pushed is
found by ``count_unset_params``, and the engine refuses to generate while one is left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MemoryReport:
    """What ``sleep`` released, or ``wake_up`` took back, on one rank."""

    kv_cache_bytes: int
    weight_bytes: int  # 0 unless level 2
    # Change of the device's free memory (CUDA: ``mem_get_info``): the KV cache, the weights,
    # the graphs' pool and the allocator's cache together. None on a CPU.
    device_bytes: int | None
    seconds: float
    graph_capture_seconds: float = 0.0  # wake_up: re-capturing the CUDA graphs


def kv_cache_bytes(kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(k.nbytes + v.nbytes for k, v in kv_caches)


def release_weights(model: nn.Module) -> int:
    """Free every parameter's storage, keeping the tensor objects; returns the bytes freed."""
    freed = 0
    for p in model.parameters():  # tied weights appear once
        storage = p.data.untyped_storage()
        freed += storage.nbytes()
        storage.resize_(0)
    return freed


def weights_released(model: nn.Module) -> bool:
    return next(model.parameters()).untyped_storage().nbytes() == 0


def restore_weights(model: nn.Module) -> int:
    """Re-allocate every parameter's storage, filled with the never-written marker (NaN)."""
    restored = 0
    for p in model.parameters():
        nbytes = p.numel() * p.element_size()  # parameters are contiguous, offset 0
        p.data.untyped_storage().resize_(nbytes)
        p.data.fill_(float("nan"))
        restored += nbytes
    return restored


def count_unset_params(model: nn.Module) -> int:
    """Parameters still holding the marker somewhere (a sum is NaN iff an element is)."""
    return sum(bool(torch.isnan(p.sum(dtype=torch.float32))) for p in model.parameters())


def device_free_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.mem_get_info(device)[0]


def return_memory(device: torch.device) -> None:
    """Hand the freed device memory from the CUDA allocator's cache to the driver, where a
    trainer's allocator (or another process) can take it. The tensors themselves are freed
    by reference counting as sleep drops them (no ``gc.collect()``: it takes 0.1-0.4 s with
    torch and transformers loaded, per RL step)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()

