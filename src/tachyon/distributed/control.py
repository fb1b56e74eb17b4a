"""The gloo control plane: a CPU group over every rank, beside the TP group.

It carries what the ranks agree on at start-up (``min_int``: the KV block count) and, under
a launcher (torchrun, possibly several machines), each step from rank 0 to the others
(``broadcast_bytes``). Ranks spawned on one machine get their steps from the shared-memory
ring instead (``shm_broadcast.py``): no collective per step.

Ranks under a launcher spend their life in ``broadcast_bytes`` waiting for the next step, so
the control group is separate from the TP group (whose collectives run inside the forward, on
NCCL when on CUDA) and has a timeout that outlasts any idle spell of the engine: gloo cannot
wait forever. A rank that dies is not waited for: its peers' sockets close and gloo raises.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

# Long enough for a server to sit idle, short enough to fit gloo's millisecond clock.
CONTROL_TIMEOUT = timedelta(days=365)
_SRC = 0  # the rank that drives


class ControlPlane:
    def __init__(self, group: dist.ProcessGroup, rank: int) -> None:
        self.group, self.rank = group, rank

    @classmethod
    def create(cls, rank: int) -> ControlPlane:
        """A gloo group over the whole (already initialised) world; every rank must call it."""
        return cls(dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT), rank)

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0 passes ``data``, the others pass None; every rank returns rank 0's bytes."""
        size = torch.tensor([len(data) if self.rank == _SRC else 0], dtype=torch.int64)
        dist.broadcast(size, src=_SRC, group=self.group)
        if self.rank == _SRC:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            buf = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(buf, src=_SRC, group=self.group)
        return data if self.rank == _SRC else buf.numpy().tobytes()

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over all ranks (e.g. KV blocks: every rank must fit them)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())
