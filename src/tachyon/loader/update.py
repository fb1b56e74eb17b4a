"""New weights for a loaded model, copied in place (RL: the trainer's state dict each step).

Every tensor goes through the same name mapping, packing and TP sharding as loading
(``model.weight_loader_for``), and lands in the existing parameter storage: addresses do not
move, so captured CUDA graphs and compiled code keep reading the right memory.

Nothing is half-applied by a bad update: every tensor is first dry-run through its loader on
``meta`` tensors (the same shape checks, no data touched), and only when all pass are they
copied. The iterable is read once, into a list of references (no copies).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from tachyon.models.llama import WeightLoader

NamedTensors = Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class WeightUpdateReport:
    """What one ``update_weights`` call did on one rank."""

    num_tensors: int  # HF tensors received (those with no place by design included)
    num_bytes: int  # their size as received, before any dtype conversion
    seconds: float  # validation and copies, device work included
    # Parameters still holding the never-written marker after ``sleep(level=2)`` (see
    # worker/sleep.py); the engine refuses to generate while any are left. 0 otherwise.
    params_unset: int = 0


@dataclass(frozen=True)
class _Planned:
    hf_name: str
    param: torch.Tensor
    load: WeightLoader
    tensor: torch.Tensor


def named_tensor_list(named_tensors: NamedTensors | Mapping[str, torch.Tensor],
                      ) -> list[tuple[str, torch.Tensor]]:
    """``model.named_parameters()``, a state dict or its ``items()``, as a list of
    ``(name, detached tensor)``; ``ValueError`` for anything else."""
    if isinstance(named_tensors, Mapping):
        named_tensors = named_tensors.items()
    if isinstance(named_tensors, str | bytes) or not isinstance(named_tensors, Iterable):
        raise ValueError("update_weights takes (name, tensor) pairs, e.g. "
                         "model.named_parameters() or a state dict")
    pairs = []
    for item in named_tensors:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"update_weights takes (name, tensor) pairs; got {item!r:.80}")
        name, tensor = item
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            what = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"update_weights: {name!r} is {what}, not a floating-point tensor")
        pairs.append((name, tensor.detach()))
    return pairs


def update_model_weights(model: nn.Module, named_tensors: NamedTensors) -> WeightUpdateReport:
    """Copy HF-named full tensors into ``model``'s (packed, sharded) parameters in place,
    converting dtype and device. Raises ``ValueError`` naming the first unknown name or
    shape mismatch, having changed nothing."""
    start = time.perf_counter()
    received = named_tensor_list(named_tensors)
    planned = [p for name, tensor in received if (p := _plan(model, name, tensor)) is not None]
    for p in planned:
        _dry_run(p)
    with torch.no_grad():
        for p in planned:
            p.load(p.param, p.tensor)
    _synchronize(model)
    return WeightUpdateReport(len(received), sum(t.nbytes for _, t in received),
                              time.perf_counter() - start)


def _plan(model: nn.Module, name: str, tensor: torch.Tensor) -> _Planned | None:
    try:
        where = model.weight_loader_for(name)
    except ValueError as e:
        raise ValueError(f"update_weights: {e} (names are the HF checkpoint's, as in "
                         f"'model.layers.0.self_attn.q_proj.weight')") from None
    if where is None:
        return None
    target, load = where
    return _Planned(name, model.get_parameter(target), load, tensor)


def _dry_run(p: _Planned) -> None:
    """The loader's own shape checks and slicing on meta tensors: no memory, no data."""
    param = torch.empty_like(p.param, device="meta")
    tensor = torch.empty_like(p.tensor, device="meta")
    try:
        p.load(param, tensor)
    except (ValueError, RuntimeError) as e:  # RuntimeError: torch's own slicing errors
        raise ValueError(f"update_weights: {p.hf_name!r} (shape {tuple(p.tensor.shape)}) "
                         f"does not fit parameter of shape {tuple(p.param.shape)}: {e}") from None


def _synchronize(model: nn.Module) -> None:
    # Copies from host memory or another stream may still be queued: the reported time
    # includes them, and the caller may free the source tensors once this returns.
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
