"""What a request names to run with an adapter (no torch: the engine and the API use it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT adapter directory, as in vLLM.

    ``lora_int_id`` (>= 1) is the adapter's identity inside the engine: requests with the same
    id share one copy of its weights. Registering the same id again with another path replaces
    those weights (a trainer pushing a new adapter each step).
    """

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) \
                or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1 (0 means no adapter), "
                             f"got {self.lora_int_id!r}")
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("lora_name must be a non-empty string")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError("lora_path must be a non-empty string (an adapter directory)")
