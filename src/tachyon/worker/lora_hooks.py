"""The runner's side of LoRA: each token's adapter slot, staged with the step."""

from __future__ import annotations

import numpy as np

from tachyon.lora.manager import LoRAManager

# Per scheduled request: (first token in the batch, its tokens, its adapter id; 0: none).
LoRASpans = list[tuple[int, int, int]]


def stage_lora_slots(lora: LoRAManager, lora_slots: np.ndarray, spans: LoRASpans) -> None:
    """Each token's adapter slot; adapters not resident are copied in now (queued before
    this step's forward), never evicting one this step needs."""
    lora.begin_step({lora_id for _, _, lora_id in spans})
    for pos, n, lora_id in spans:
        lora_slots[pos:pos + n] = lora.slot_of(lora_id)


def require_lora(lora: LoRAManager | None) -> LoRAManager:
    if lora is None:
        raise ValueError("LoRA is off: start the engine with enable_lora=True "
                         "(--enable-lora)")
    return lora
