"""The tensor-parallel group of this process.

One process is one rank. The group is set once when a worker starts (``init_distributed``,
or ``init_tensor_parallel`` directly) and read by the layers when they are built; with no
group set, the process is rank 0 of 1 and every collective is a no-op.

The whole ``torch.distributed`` world is the TP group: NCCL on CUDA, gloo on CPU. Beside it,
``init_distributed`` opens a gloo *control plane* (see ``control.py``) for what the ranks agree
on at start-up and, under a launcher, for each step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tachyon.distributed.control import ControlPlane

# torch >= 2.13 renames all_gather_into_tensor (same arguments) and deprecates the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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
    # Gathered along dim 0 (the one layout gloo accepts as well as NCCL), then moved to dim.
    out = torch.empty((_TP.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype,
                      device=x.device)
    _all_gather_single(out, x.contiguous(), group=_TP.group)
    return torch.cat(out.chunk(_TP.world_size, dim=0), dim=dim)


# -- the world ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchEnv:
    """Where a launcher (``torchrun``) placed this process: torch.distributed's env:// variables."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environ(cls) -> LaunchEnv | None:
        """The launcher's placement, or None for a plain process (no world of more than one)."""
        env = os.environ
        if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
            return None
        world = int(env["WORLD_SIZE"])
        if world < 2:
            return None
        rank = int(env["RANK"])
        return cls(rank, world, int(env.get("LOCAL_RANK", rank)))


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(rank: int, world_size: int, device: torch.device, backend: str,
                     init_method: str | None) -> ControlPlane:
    """Join the world as ``rank`` and make it this process's TP group.

    ``init_method`` None reads the env:// variables a launcher set; otherwise it is where the
    ranks meet (``file://`` of a fresh temp file: no port to pick, so engines never collide).
    On CUDA the communicator is created now, not lazily at the first collective, so that the
    first collective a graph capture sees is not the one that builds it.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank,
                            world_size=world_size,
                            device_id=device if device.type == "cuda" else None)
    init_tensor_parallel(rank, world_size, dist.group.WORLD)
    return ControlPlane.create(rank)


def destroy_distributed() -> None:
    reset_tensor_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
