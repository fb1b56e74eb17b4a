"""The tensor-parallel group of this process.

One process is one rank. The group is set once when a worker starts (``init_tensor_parallel``)
and read by the layers when they are built; with no group set, the process is rank 0 of 1 and
every collective is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int
    world_size: int
    group: dist.ProcessGroup | None  # None when world_size == 1


_TP = TensorParallelGroup(rank=0, world_size=1, group=None)


def init_tensor_parallel(rank: int, world_size: int, group: dist.ProcessGroup | None) -> None:
    global _TP
    _TP = TensorParallelGroup(rank, world_size, group)


def reset_tensor_parallel() -> None:
    init_tensor_parallel(0, 1, None)


def get_tp_rank() -> int:
    return _TP.rank


def get_tp_world_size() -> int:
    return _TP.world_size


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the TP group, in place (a graph can capture this on NCCL)."""
    if _TP.world_size == 1:
        return x
    dist.all_reduce(x, group=_TP.group)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate each rank's ``x`` along ``dim``."""
    if _TP.world_size == 1:
        return x
    dim = dim % x.dim()
    out = torch.empty((_TP.world_size, *x.shape), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=_TP.group)
    return torch.cat(out.unbind(0), dim=dim)
