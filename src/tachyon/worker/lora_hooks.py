"""The runner's side of LoRA: each token's adapter slot, staged with the step."""

from __future__ import annotations

import numpy as np

from tachyon.lora.manager import NO_SLOT, LoRAManager

# Per scheduled request: (first token in the batch, its tokens, its adapter id; 0: none).
LoRASpans = list[tuple[int, int, int]]


def stage_lora_slots(lora: LoRAManager, lora_slots: np.ndarray, spans: LoRASpans,
                     num_tokens: int) -> bool:
    """Each token's adapter slot; adapters not resident are copied in now (queued before
    this step's forward), never evicting one this step needs. Returns whether any of the
    ``num_tokens`` staged tokens has a slot (the step's ``has_lora``)."""
    lora.begin_step({lora_id for _, _, lora_id in spans})
    for pos, n, lora_id in spans:
        lora_slots[pos:pos + n] = lora.slot_of(lora_id)
    return bool(lora_slots[:num_tokens].max() > NO_SLOT)  # slots are >= 0, NO_SLOT below


def require_lora(lora: LoRAManager | None) -> LoRAManager:
    if lora is None:
        raise ValueError("LoRA is off: start the engine with enable_lora=True "
                         "(--enable-lora)")
    return lora
