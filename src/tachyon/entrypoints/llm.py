"""The offline API: ``LLM(model).generate(prompts, params)``, as in vLLM."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tachyon.config import EngineArgs
from tachyon.engine.llm_engine import LLMEngine, Prompt
from tachyon.lora.request import LoRARequest
from tachyon.outputs import RequestOutput
from tachyon.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tachyon.loader.update import NamedTensors, WeightUpdateReport
    from tachyon.worker.sleep import MemoryReport


class LLM:
    """Load a model once, then generate for batches of prompts.

    ``model=None`` runs the embedded SmolLM2-135M-Instruct. Any ``EngineArgs`` field can be
    passed as a keyword (``max_model_len=2048``, ``cudagraph_mode="FULL"``, ...).
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        args = EngineArgs.from_kwargs(model=model, **engine_args)
        self.engine = LLMEngine.from_engine_args(args)
        self._counter = 0

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = LLMEngine.from_engine_args(args)
        llm._counter = 0
        return llm

    def shutdown(self) -> None:
        """Release the engine's device memory (model, KV cache, graphs) now."""
        self.engine.shutdown()

    def get_tokenizer(self) -> Any:
        return self.engine.get_tokenizer()

    # -- RL: weights that change under a running engine; memory lent to a trainer ---------
    def update_weights(self, named_tensors: NamedTensors) -> WeightUpdateReport:
        """Copy a training model's weights into the engine, in place.

        ``named_tensors``: ``(HF name, tensor)`` pairs as ``model.named_parameters()`` or a
        state dict give them (any subset; tensors of any float dtype and device). They are
        packed and TP-sharded as when loading and copied into the existing parameters, so
        captured CUDA graphs stay valid. An unknown name or a wrong shape raises
        ``ValueError`` naming it, with nothing applied. The prefix cache is reset (its K/V
        came from the old weights). Needs an idle engine; allowed at sleep level 1.
        """
        return self.engine.update_weights(named_tensors)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block not in use."""
        self.engine.reset_prefix_cache()

    def sleep(self, level: int = 1) -> MemoryReport:
        """Free device memory for a trainer until ``wake_up()``: level 1 the KV cache and the
        CUDA graphs, level 2 the weights too (discarded: push them with ``update_weights``
        after waking; generating before that raises). Needs an idle engine; generating while
        asleep raises. Returns what was released (per rank)."""
        return self.engine.sleep(level)

    def wake_up(self) -> MemoryReport:
        """Re-allocate the KV cache at its old size (and the weights after level 2) and
        re-capture the CUDA graphs. Returns what was taken back and how long it took."""
        return self.engine.wake_up()

    # -- LoRA adapters: PEFT directories served per request (docs/lora.md) ----------------
    def add_lora(self, lora_request: LoRARequest) -> None:
        """Load an adapter now (``generate`` also loads one on first use). The same id again
        replaces its weights. ``ValueError`` for a bad adapter; the engine goes on."""
        self.engine.add_lora(lora_request)

    def update_lora(self, lora_request: LoRARequest,
                    named_tensors: NamedTensors | Mapping[str, Any]) -> None:
        """Replace an adapter's weights in place with a trainer's: PEFT-named LoRA tensors
        (``peft.get_peft_model_state_dict(model)``, or the ``lora_A``/``lora_B`` entries of
        ``model.named_parameters()``). The rank and scale come from ``lora_path``'s
        ``adapter_config.json``; the weights file there is not read. Checked like a file."""
        from tachyon.loader.update import named_tensor_list

        self.engine.update_lora(lora_request, dict(named_tensor_list(named_tensors)))

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.engine.remove_lora(lora_int_id)

    def list_loras(self) -> list[LoRARequest]:
        return self.engine.list_loras()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """``lora_request``: one adapter for every prompt, or one (or None) per prompt."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        loras = _as_lora_list(lora_request, len(prompts))
        # Validate everything before queueing anything: a bad prompt loses nothing.
        for p in params:
            self.engine._check_params(p)
        for prompt in prompts:
            self.engine._check_prompt(self.engine.tokenize(prompt)[1])
        for lora in loras:
            self.engine.core.ensure_lora(lora)
        ids = []
        for prompt, p, lora in zip(prompts, params, loras, strict=True):
            ids.append(self.engine.add_request(f"gen-{self._counter}", prompt, p,
                                               lora_request=lora))
            self._counter += 1
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them."""
        convs = _as_conversations(messages)
        prompts = [apply_chat_template(self.get_tokenizer(), c, add_generation_prompt)
                   for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm,
                             lora_request=lora_request)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        self.engine.emit_unfinished = False
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            self.engine.abort_request(ids)
            raise
        finally:
            self.engine.emit_unfinished = True
            if bar is not None:
                bar.close()
        return [done[i] for i in ids]


def apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]],
                        add_generation_prompt: bool = True) -> list[int]:
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so it has no chat template")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; use generate() with a plain prompt")
    norm = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError("each message needs 'role' and 'content'")
        content = m["content"]
        if isinstance(content, list):  # OpenAI-style list of parts: keep the text parts
            content = "".join(p.get("text", "") for p in content
                              if isinstance(p, dict) and p.get("type", "text") == "text")
        if not isinstance(content, str):
            raise ValueError("message content must be a string or a list of text parts")
        norm.append({"role": m["role"], "content": content})
    ids = tokenizer.apply_chat_template(norm, add_generation_prompt=add_generation_prompt,
                                        tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _as_conversations(messages: object) -> list[list[dict[str, Any]]]:
    """One conversation (a list of message dicts) or a list of conversations."""
    if isinstance(messages, list | tuple) and messages:
        if all(isinstance(m, dict) for m in messages):
            return [list(messages)]
        if all(isinstance(c, list | tuple) and c and all(isinstance(m, dict) for m in c)
               for c in messages):
            return [list(c) for c in messages]
    raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} "
                     "dicts (one conversation) or a list of such lists")


def _as_lora_list(lora_request: object, num_prompts: int) -> list[LoRARequest | None]:
    """None, one ``LoRARequest`` for every prompt, or a list of one (or None) per prompt."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * num_prompts
    if not isinstance(lora_request, list | tuple):
        raise ValueError(f"lora_request must be a tachyon.LoRARequest, a list of them (one "
                         f"per prompt, None for none) or None; got "
                         f"{type(lora_request).__name__}")
    if len(lora_request) != num_prompts:
        raise ValueError(f"got {len(lora_request)} lora requests for {num_prompts} prompts")
    bad = [r for r in lora_request if r is not None and not isinstance(r, LoRARequest)]
    if bad:
        raise ValueError(f"lora_request entries must be LoRARequest or None, got {bad[0]!r}")
    return list(lora_request)


def _as_params_list(sampling_params: object, num_prompts: int) -> list[SamplingParams]:
    """None (defaults), one ``SamplingParams`` for every prompt, or a list of one per prompt.
    The entries' types are checked by the engine, with the rest of each request."""
    if sampling_params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * num_prompts
    if not isinstance(sampling_params, list | tuple):
        raise ValueError(f"sampling_params must be a tachyon.SamplingParams, a list of them "
                         f"(one per prompt) or None; got {type(sampling_params).__name__}")
    if len(sampling_params) != num_prompts:
        raise ValueError(f"got {len(sampling_params)} SamplingParams for {num_prompts} "
                         f"prompts; pass one, or one per prompt")
    return list(sampling_params)


# What generate() accepts, for the error messages.
_PROMPT_FORMS = ("a prompt is a string, a list of token ids (ints), or a dict with 'prompt' "
                 "(a string) or 'prompt_token_ids' (a list of ints)")
_PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids"})


def _as_prompt_list(prompts: object) -> list[Prompt]:
    """One prompt or a sequence of them -> a list of prompts, each checked for its form (the
    engine checks the content: length, vocabulary)."""
    if isinstance(prompts, str | dict):
        return [_checked_prompt(prompts, None)]
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes | bytearray):
        raise ValueError(f"prompts must be one prompt or a list of prompts; {_PROMPT_FORMS}; "
                         f"got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if all(_is_token_id(t) for t in prompts):  # one prompt of token ids
        return [prompts]
    if any(_is_token_id(t) for t in prompts):
        raise ValueError("the prompts mix token ids and other values: pass one prompt as a "
                         "list of ints, or a list of prompts (strings, lists of ints, dicts)")
    return [_checked_prompt(p, i) for i, p in enumerate(prompts)]


def _checked_prompt(prompt: object, index: int | None) -> Prompt:
    where = "the prompt" if index is None else f"prompt {index}"
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list | tuple):
        bad = [t for t in prompt if not _is_token_id(t)]
        if bad:
            raise ValueError(f"{where} holds {bad[0]!r}, not a token id; {_PROMPT_FORMS}")
        return list(prompt)
    if isinstance(prompt, dict):
        _check_prompt_dict(prompt, where)
        return prompt
    raise ValueError(f"{where} is a {type(prompt).__name__}; {_PROMPT_FORMS}")


def _check_prompt_dict(prompt: dict[Any, Any], where: str) -> None:
    if not prompt or set(prompt) - _PROMPT_KEYS:
        raise ValueError(f"{where} is a dict with keys {sorted(map(str, prompt))}; "
                         f"{_PROMPT_FORMS}")
    ids = prompt.get("prompt_token_ids", [])
    if not isinstance(ids, list | tuple) or not all(_is_token_id(t) for t in ids):
        raise ValueError(f"{where}: 'prompt_token_ids' must be a list of ints, got {ids!r}")
    if not isinstance(prompt.get("prompt", ""), str):
        raise ValueError(f"{where}: 'prompt' must be a string, got {prompt['prompt']!r}")


def _is_token_id(t: object) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)
