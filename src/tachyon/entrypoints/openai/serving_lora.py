"""LoRA adapters over HTTP: a request whose ``model`` is an adapter's name runs with it.

POST /v1/load_lora_adapter ``{"lora_name", "lora_path"}`` and POST /v1/unload_lora_adapter
``{"lora_name"}`` (vLLM's routes and shapes: a plain-text "Success: ..." answer); a bad
adapter, LoRA off, or an adapter still in use is a 400 with the core's reason. The list
of adapters is the core's (``AsyncLLM.loras``, refreshed with every change).
"""

from __future__ import annotations

from typing import Any

from tachyon.engine.core_client import EngineDeadError
from tachyon.entrypoints.openai.protocol import Fields, OpenAIError
from tachyon.entrypoints.openai.serving_engine import OpenAIServing
from tachyon.lora.request import LoRARequest


class OpenAIServingLoRA(OpenAIServing):
    def _by_name(self, name: str) -> LoRARequest | None:
        return next((lora for lora in self.llm.loras if lora.lora_name == name), None)

    async def load(self, body: dict[str, Any]) -> str:
        f = Fields(body)
        name, path = f.string("lora_name"), f.string("lora_path")
        if not name or not path:
            raise OpenAIError("give 'lora_name' and 'lora_path'", "lora_name" if not name
                              else "lora_path")
        if name == self.model_name or self._by_name(name) is not None:
            raise OpenAIError(f"the name {name!r} is already in use", "lora_name")
        await self.add(name, path)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def add(self, name: str, path: str) -> None:
        next_id = 1 + max((lora.lora_int_id for lora in self.llm.loras), default=0)
        await self._call(self.llm.add_lora(LoRARequest(name, next_id, path)), "lora_path")

    async def unload(self, body: dict[str, Any]) -> str:
        name = Fields(body).string("lora_name")
        lora = self._by_name(name) if name else None
        if lora is None:
            raise OpenAIError(f"no LoRA adapter is named {name!r}", "lora_name", 404,
                              code="model_not_found")
        await self._call(self.llm.remove_lora(lora.lora_int_id), "lora_name")
        return f"Success: LoRA adapter '{name}' removed successfully."

    async def _call(self, change: Any, param: str) -> None:
        try:
            await change
        except EngineDeadError as e:
            raise OpenAIError(str(e), status=503, type_="server_error") from None
        except ValueError as e:
            raise OpenAIError(str(e), param) from None
