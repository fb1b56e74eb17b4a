"""PEFT adapters for the LoRA tests (CPU and GPU), and PEFT itself as the reference.

Adapters are made by ``peft.get_peft_model`` on the tiny HF checkpoint and saved with
``save_pretrained``, exactly what a user hands tachyon. PEFT initialises B to zero (an adapter
that changes nothing); both A and B are re-drawn here with a spread that moves the logits by
O(1), so a missing, misplaced or mis-scaled delta changes the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Std of re-drawn A and B entries: with the tiny models' hidden size (64) the delta of each
# layer is a sizeable fraction of the base output.
LORA_STD = 0.3


@dataclass(frozen=True)
class AdapterSpec:
    r: int
    alpha: float
    targets: tuple[str, ...] = ALL_TARGETS
    rslora: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # more LoraConfig fields


def write_adapter(base: Path, out: Path, spec: AdapterSpec, seed: int) -> Path:
    """A PEFT LoRA adapter directory for the checkpoint at ``base``, random A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                     use_rslora=spec.rslora, lora_dropout=0.0, **spec.extra)
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(LORA_STD * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def peft_reference(base: Path, adapter: Path | None, merged: bool = False) -> Any:
    """The HF model in float64 with the adapter applied by PEFT (``merged``: folded into the
    base weights by ``merge_and_unload``); the plain HF model for ``adapter=None``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).double()
        if merged:
            model = model.merge_and_unload()
    return model.eval()


def reference_logprobs(model: Any, prompt: list[int], token_ids: list[int]) -> torch.Tensor:
    """Log-probabilities at each generated step, from one cache-free forward."""
    ids = torch.tensor([prompt + token_ids[:-1]])
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:].double(),
                                 dim=-1)


def max_logprob_error(model: Any, prompt: list[int], out: Any, relative: bool = True) -> float:
    """Largest error over every logprob tachyon returned for ``out``: relative,
    ``|tachyon - reference| / max(1, |reference|)``, or absolute. Relative because a float32
    engine's rounding grows with the logit's magnitude (a top-4 logprob of -12 carries ~10x
    the absolute error of one near 0); the floor of 1 keeps logprobs near 0 absolute."""
    ref = reference_logprobs(model, prompt, out.token_ids)
    return max(abs(lp - float(ref[step, t]))
               / (max(1.0, abs(float(ref[step, t]))) if relative else 1.0)
               for step, top in enumerate(out.logprobs) for t, lp in top.items())
