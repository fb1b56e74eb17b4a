"""The LoRA adapters of one model on one rank: GPU slots, a CPU cache, LRU between them.

An adapter is read once (``add``), sharded for this rank by the linear layers' own weight
loaders (so packing into qkv/gate_up and tensor-parallel slicing follow exactly the rules
of the base weights) into host tensors laid out like a slot, and kept in an LRU cache of
``max_cpu_loras``. Before each step the model runner asks ``slot_of`` for every request's
adapter; an adapter not resident is copied into a free slot or the least recently used one
this step does not need. The copy is queued on the stream before the step's forward, never
inside a graph, and the scheduler guarantees a step needs at most ``max_loras`` adapters.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from tachyon.config import LoRAConfig
from tachyon.layers.linear import ColumnParallelLinear, RowParallelLinear, default_weight_loader
from tachyon.lora.peft_files import PeftAdapter, read_adapter
from tachyon.lora.request import LoRARequest
from tachyon.lora.slots import LoRASlots

LoRALayer = ColumnParallelLinear | RowParallelLinear
# One adapter on this rank: our layer name -> (A rows, B) laid out exactly like one slot.
RankWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]
NO_SLOT = -1  # a token without an adapter (the slot-id buffer's value for it)


class LoRAManager:
    def __init__(self, model: nn.Module, config: LoRAConfig, token_slots: torch.Tensor,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.model, self.config, self.dtype = model, config, dtype
        self.layers: dict[str, LoRALayer] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, ColumnParallelLinear | RowParallelLinear):
                mod.lora = LoRASlots(config.max_loras, config.max_lora_rank, mod.weight.shape[1],
                                     mod.output_slices(), token_slots, dtype, device)
                self.layers[name] = mod
        self.known: dict[int, LoRARequest] = {}
        self._cpu: OrderedDict[int, RankWeights] = OrderedDict()  # least recent first
        self._pushed: set[int] = set()  # weights from update(), not on disk: never dropped
        self._gpu: OrderedDict[int, int] = OrderedDict()  # lora id -> slot, least recent first
        self._free = list(range(config.max_loras))
        self._this_step: set[int] = set()

    # -- registry --------------------------------------------------------------------------
    def add(self, req: LoRARequest, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Read (or, with ``tensors``, take) and check an adapter, then keep it. The same id
        again replaces its weights, in its slot too if resident. ``ValueError`` on a bad
        adapter, with nothing changed."""
        weights = self._rank_weights(read_adapter(req, self.config.max_lora_rank,
                                                  dict(tensors) if tensors is not None else None))
        if tensors is None:
            self._pushed.discard(req.lora_int_id)
        else:
            self._pushed.add(req.lora_int_id)
        self.known[req.lora_int_id] = req
        self._cache(req.lora_int_id, weights)
        slot = self._gpu.get(req.lora_int_id)
        if slot is not None:
            self._copy_into(slot, weights)

    def remove(self, lora_id: int) -> bool:
        if self.known.pop(lora_id, None) is None:
            return False
        self._cpu.pop(lora_id, None)
        self._pushed.discard(lora_id)
        slot = self._gpu.pop(lora_id, None)
        if slot is not None:
            self._free.append(slot)
        return True

    def resident(self) -> list[int]:
        """Adapter ids in GPU slots, least recently used first."""
        return list(self._gpu)

    # -- per step --------------------------------------------------------------------------
    def begin_step(self, lora_ids: set[int]) -> None:
        """The adapters the coming step needs: none of them is evicted for another."""
        self._this_step = lora_ids

    def slot_of(self, lora_id: int) -> int:
        """The GPU slot holding adapter ``lora_id`` for this step (``NO_SLOT`` for 0),
        loading it now if it is not resident."""
        if not lora_id:
            return NO_SLOT
        slot = self._gpu.get(lora_id)
        if slot is not None:
            self._gpu.move_to_end(lora_id)
            return slot
        slot = self._take_slot()
        self._copy_into(slot, self._weights(lora_id))
        self._gpu[lora_id] = slot
        return slot

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        victim = next((i for i in self._gpu if i not in self._this_step), None)
        if victim is None:  # the scheduler admits at most max_loras adapters per step
            raise RuntimeError(f"a step needs more than max_loras={self.config.max_loras} "
                               f"adapters")
        return self._gpu.pop(victim)

    def _weights(self, lora_id: int) -> RankWeights:
        weights = self._cpu.get(lora_id)
        if weights is None:  # dropped from the CPU cache since: read it again
            req = self.known[lora_id]
            weights = self._rank_weights(read_adapter(req, self.config.max_lora_rank))
            self._cache(lora_id, weights)
        self._cpu.move_to_end(lora_id)
        return weights

    def _cache(self, lora_id: int, weights: RankWeights) -> None:
        self._cpu[lora_id] = weights
        self._cpu.move_to_end(lora_id)
        while len(self._cpu) > self.config.max_cpu_loras:
            victim = next((i for i in self._cpu if i not in self._pushed and i != lora_id),
                          None)
            if victim is None:
                break  # only pushed adapters left: they have no file to come back from
            del self._cpu[victim]

    def _copy_into(self, slot: int, weights: RankWeights) -> None:
        for name, layer in self.layers.items():
            lw = weights.get(name)
            if lw is None:
                layer.lora.a[slot].zero_()
                layer.lora.b[slot].zero_()
            else:
                layer.lora.a[slot].copy_(lw[0], non_blocking=True)
                layer.lora.b[slot].copy_(lw[1], non_blocking=True)

    # -- sharding --------------------------------------------------------------------------
    def _rank_weights(self, adapter: PeftAdapter) -> RankWeights:
        """This rank's slot layout of every matrix the adapter has, through the layers'
        weight loaders: a column-parallel layer's B splits like its weight's rows (packed at
        the matrix's offset), a row-parallel layer's A like its weight's columns."""
        out: RankWeights = {}
        r_max = self.config.max_lora_rank
        for module, (a, b) in adapter.modules.items():
            target, shard = self.model.packed_name(f"{module}.weight")
            name = target.rsplit(".", 1)[0]
            layer = self.layers.get(name)
            if layer is None:
                raise ValueError(f"LoRA adapter {adapter.name!r}: the model has no module "
                                 f"{module!r}")
            if name not in out:
                in_f, out_f = layer.weight.shape[1], layer.weight.shape[0]
                out[name] = (torch.zeros(len(layer.shard_ids) * r_max, in_f, dtype=self.dtype),
                             torch.zeros(out_f, r_max, dtype=self.dtype))
            a_rows, b_cols = out[name]
            r = a.shape[0]
            try:
                if isinstance(layer, RowParallelLinear):
                    layer.weight_loader(a_rows[:r], a)
                    default_weight_loader(b_cols[:, :r], b)
                else:
                    i = layer.shard_ids.index(shard)
                    default_weight_loader(a_rows[i * r_max:i * r_max + r], a)
                    dst = b_cols[:, :r]
                    if shard is None:
                        layer.weight_loader(dst, b)
                    else:
                        layer.weight_loader(dst, b, shard)
            except ValueError as e:
                raise ValueError(f"LoRA adapter {adapter.name!r}: {module} (rank {r}) does "
                                 f"not fit the model: {e}") from None
        return out
