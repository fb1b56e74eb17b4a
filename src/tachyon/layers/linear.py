"""Tensor-parallel linear layers.

Column-parallel layers split the output features over ranks (no communication);
row-parallel layers split the input features and all-reduce the partial sums. Packed layers
(qkv, gate_up) hold several HF matrices in one weight; their ``weight_loader`` takes a shard
id and writes this rank's slice of that matrix into the right rows.

Every layer multiplies through ``linear``: cuBLAS, or at decode batch sizes the skinny GEMM
(``tachyon.layers.kernels.skinny_gemm``), which decides per call from shapes alone. At those
sizes the layers also take the small op before them into the GEMM's prologue
(``forward_after_norm``, ``forward_after_silu_mul``): one launch instead of two.

LoRA (``tachyon.lora``): a layer given adapter slots (``layer.lora``) adds each token's adapter
delta to the base GEMM's output; column-parallel layers before their output leaves, row-parallel
ones into the partial sums before the all-reduce (the delta is linear in the shrunk input, so
reducing once covers both). Such a layer runs the norm or the activation before it on its own,
since the shrink needs that input too. In a batch where no token has an adapter
(``ForwardContext.has_lora`` False) it runs exactly the base layer: no LoRA kernel, fused paths
included (see ``lora_active``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tachyon.distributed.parallel_state import (
    get_tp_rank,
    get_tp_world_size,
    tensor_model_parallel_all_reduce,
)
from tachyon.forward_context import get_forward_context
from tachyon.layers.kernels.skinny_gemm import (
    Prologue,
    skinny_config,
    skinny_gemm,
    skinny_gemm_rms_norm,
)

if TYPE_CHECKING:
    from tachyon.layers.norm import RMSNorm
    from tachyon.lora.slots import LoRASlots

# (offset, size) of each packed matrix in a layer's per-rank output features.
OutputSlices = list[tuple[int, int]]


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or the skinny decode GEMM where ``skinny_config`` picks it (CUDA, at most
    16 rows of bf16/fp16, and the config table does not prefer cuBLAS for the shape)."""
    config = skinny_config(x, weight)
    if config is None:
        return F.linear(x, weight, bias)
    return skinny_gemm(x, weight, bias, config=config)


def lora_active() -> bool:
    """Whether a layer with adapter slots runs its LoRA kernels in this forward: where the
    step's batch has an adapter (a Python branch, decided once at graph capture), and always
    under torch.compile, whose traced graph must not depend on the per-step forward context
    (the compiled PIECEWISE backend captures every graph with LoRA)."""
    return torch.compiler.is_compiling() or get_forward_context().has_lora


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size ({d})")
    return n // d


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"weight shape {tuple(loaded.shape)} does not match {tuple(param.shape)}")
    param.data.copy_(loaded)


def check_full_size(loaded: torch.Tensor, dim: int, expected: int) -> None:
    """A checkpoint tensor is sliced per rank with ``narrow``, which would silently accept
    a tensor larger than the config says: check the full size first."""
    if loaded.dim() <= dim or loaded.shape[dim] != expected:
        raise ValueError(f"weight shape {tuple(loaded.shape)} does not match the config: "
                         f"expected {expected} along dim {dim}")


class ReplicatedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        default_weight_loader(param, loaded)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T`` with W's rows (output features) split over ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        self.out_per_rank = _divide(out_features, self.tp_size, "output features")
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(self.out_per_rank), requires_grad=False) if bias else None
        )
        self.lora: LoRASlots | None = None  # set by tachyon.lora.manager when LoRA is on

    # Shard ids of the packed matrices, in output order (as ``weight_loader`` takes them).
    shard_ids: tuple[str | int | None, ...] = (None,)

    def output_slices(self) -> OutputSlices:
        return [(0, self.out_per_rank)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        if self.lora is not None and lora_active():
            self.lora.add_delta(x, y)
        return y

    def forward_after_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                           norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(h), new_residual)`` with ``h, new_residual = norm(x, residual)``
        (``norm(x), x`` without a residual). At decode sizes one launch: the norm and the
        residual add run in the GEMM's prologue (x is replicated over ranks, so TP is moot)."""
        config = skinny_config(x, self.weight)
        if config is not None and (self.lora is None or not lora_active()):
            return skinny_gemm_rms_norm(x, norm.weight, norm.eps, self.weight, self.bias,
                                        residual, config=config)
        if residual is None:
            return self(norm(x)), x
        h, residual = norm(x, residual)
        return self(h), residual

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        n = param.shape[0]
        check_full_size(loaded, 0, n * self.tp_size)
        default_weight_loader(param, loaded.narrow(0, self.tp_rank * n, n))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices side by side (gate and up projections)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = [_divide(s, self.tp_size, "output features") for s in output_sizes]
        self.shard_ids = tuple(range(len(output_sizes)))

    def output_slices(self) -> OutputSlices:
        offsets = [sum(self.output_sizes[:i]) for i in range(len(self.output_sizes))]
        return list(zip(offsets, self.output_sizes, strict=True))

    def weight_loader(
        self, param: torch.Tensor, loaded: torch.Tensor, shard_id: int | None = None
    ) -> None:
        if shard_id is None:  # an already packed checkpoint tensor
            super().weight_loader(param, loaded)
            return
        size = self.output_sizes[shard_id]
        offset = sum(self.output_sizes[:shard_id])
        check_full_size(loaded, 0, size * self.tp_size)
        src = loaded.narrow(0, self.tp_rank * size, size)
        default_weight_loader(param.data.narrow(0, offset, size), src)


class QKVParallelLinear(ColumnParallelLinear):
    """Packed q, k, v projections. With more ranks than KV heads, KV heads are replicated."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool
    ) -> None:
        tp = get_tp_world_size()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp, "attention heads")
        if tp >= num_kv_heads:
            _divide(tp, num_kv_heads, "ranks per KV head")
            self.num_kv_heads, self.kv_replicas = 1, tp // num_kv_heads
        else:
            self.num_kv_heads, self.kv_replicas = _divide(num_kv_heads, tp, "KV heads"), 1
        per_rank = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, per_rank * tp, bias)

    shard_ids = ("q", "k", "v")

    def output_slices(self) -> OutputSlices:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return [(0, q), (q, kv), (q + kv, kv)]

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: str) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, rank = 0, q_size, self.tp_rank
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, rank = kv_size, self.tp_rank // self.kv_replicas
        ranks = self.tp_size if shard_id == "q" else self.tp_size // self.kv_replicas
        check_full_size(loaded, 0, size * ranks)
        src = loaded.narrow(0, rank * size, size)
        default_weight_loader(param.data.narrow(0, offset, size), src)


class RowParallelLinear(nn.Module):
    """``y = x W^T`` with W's columns (input features) split over ranks; partial sums reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        self.in_per_rank = _divide(in_features, self.tp_size, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.lora: LoRASlots | None = None  # set by tachyon.lora.manager when LoRA is on

    shard_ids: tuple[str | int | None, ...] = (None,)

    def output_slices(self) -> OutputSlices:
        return [(0, self.weight.shape[0])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = linear(x, self.weight)
        if self.lora is not None and lora_active():
            self.lora.add_delta(x, partial)
        return self._reduce(partial)

    def forward_after_silu_mul(self, x: torch.Tensor,
                               act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``self(act(x))`` where ``act`` is SiLU-and-mul of the packed gate_up output ``x``
        (this rank's gate and up shards side by side). At decode sizes one launch: the
        activation runs in the GEMM's prologue."""
        config = skinny_config(x, self.weight)
        if config is None or (self.lora is not None and lora_active()):
            return self(act(x))
        return self._reduce(skinny_gemm(x, self.weight, config=config,
                                        prologue=Prologue.SILU_MUL))

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        # Sum over ranks, then the (replicated) bias once.
        y = tensor_model_parallel_all_reduce(partial)
        return y if self.bias is None else y + self.bias

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        if param.dim() == 1:  # bias: replicated, added once after the reduction
            default_weight_loader(param, loaded)
            return
        n = param.shape[1]
        check_full_size(loaded, 1, n * self.tp_size)
        default_weight_loader(param, loaded.narrow(1, self.tp_rank * n, n))
