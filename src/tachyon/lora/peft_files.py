"""Read a PEFT LoRA adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only what tachyon can serve is accepted; everything else is a ``ValueError`` that names the
adapter and what is wrong, raised before any engine state changes.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch

from tachyon.lora.request import LoRARequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# HF module names tachyon applies LoRA to (packed into qkv_proj and gate_up_proj as usual).
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj")
# PEFT saves tensors as "base_model.model.<HF module>.lora_A.weight".
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?"
                  r"\.weight$")


@dataclass(frozen=True)
class PeftAdapter:
    """An adapter's full (unsharded) tensors: HF module name -> (A [r, in], B [out, r] with the
    scale already folded in: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA)."""

    name: str
    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]


def read_adapter(req: LoRARequest, max_rank: int,
                 tensors: dict[str, torch.Tensor] | None = None) -> PeftAdapter:
    """Read and check ``req.lora_path``. ``tensors`` (PEFT-named, e.g. a PEFT model's
    ``get_peft_model_state_dict``) replace the directory's weights file: the config still
    comes from the directory."""
    where = f"LoRA adapter {req.lora_name!r} ({req.lora_path})"
    cfg = _read_config(req.lora_path, where)
    if tensors is None:
        tensors = _read_weights(req.lora_path, where)
    pairs = _pair_tensors(tensors, where)
    alpha, rslora = float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora", False))
    modules, rank = {}, 0
    for module, (a, b) in pairs.items():
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
            raise ValueError(f"{where}: {module}: lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)} do not make a rank-r pair")
        if r > max_rank:
            raise ValueError(f"{where}: rank {r} of {module} exceeds max_lora_rank "
                             f"({max_rank}); start the engine with --max-lora-rank {r} or more")
        scale = alpha / (math.sqrt(r) if rslora else r)
        modules[module] = (a.float(), b.float() * scale)
        rank = max(rank, r)
    return PeftAdapter(req.lora_name, rank, modules)


def _read_config(path: str, where: str) -> dict:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"{where}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    try:
        with open(file) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: cannot read {CONFIG_FILE}: {e}") from e
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{where}: peft_type {cfg['peft_type']!r} is not LORA")
    unsupported = {"use_dora": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
                   "modules_to_save": None, "fan_in_fan_out": False}
    for key, ok in unsupported.items():
        if cfg.get(key, ok) not in (ok, None, {}, [], False):
            raise ValueError(f"{where}: {key}={cfg[key]!r} is not supported (only {ok!r})")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):  # a regex over module names: checked against the tensors
        targets = []
    unknown = sorted(set(targets) - set(SUPPORTED_TARGETS))
    if unknown:
        raise ValueError(f"{where}: target module(s) {', '.join(unknown)} not supported; "
                         f"LoRA applies to {', '.join(SUPPORTED_TARGETS)}")
    return cfg


def _read_weights(path: str, where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        bin_file = os.path.exists(os.path.join(path, "adapter_model.bin"))
        hint = " (adapter_model.bin is not read: save with safe_serialization=True)" \
            if bin_file else ""
        raise ValueError(f"{where}: no {WEIGHTS_FILE}{hint}")
    try:
        return load_file(file)
    except Exception as e:  # a truncated or foreign file: safetensors' own error types
        raise ValueError(f"{where}: cannot read {WEIGHTS_FILE}: {e}") from e


def _pair_tensors(tensors: dict[str, torch.Tensor],
                  where: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{where}: tensor {key!r} is not a LoRA A/B weight "
                             f"(embedding, bias or modules_to_save tensors are not supported)")
        module = m.group("module")
        if module.rsplit(".", 1)[-1] not in SUPPORTED_TARGETS:
            raise ValueError(f"{where}: target module {module!r} not supported; LoRA "
                             f"applies to {', '.join(SUPPORTED_TARGETS)}")
        found.setdefault(module, {})[m.group("ab")] = t
    if not found:
        raise ValueError(f"{where}: {WEIGHTS_FILE} holds no LoRA weights")
    lonely = sorted(m for m, ab in found.items() if len(ab) != 2)
    if lonely:
        raise ValueError(f"{where}: {lonely[0]} has lora_A or lora_B but not both")
    return {m: (ab["A"], ab["B"]) for m, ab in found.items()}
