"""The offline API: ``LLM(model).generate(prompts, params)``, as in vLLM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tachyon.config import EngineArgs
from tachyon.engine.llm_engine import LLMEngine, Prompt
from tachyon.outputs import RequestOutput
from tachyon.sampling_params import SamplingParams


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

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            params = [SamplingParams()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one, "
                    f"or one per prompt"
                )
        # Validate everything before queueing anything: a bad prompt loses nothing.
        for p in params:
            self.engine._check_params(p)
        for prompt in prompts:
            self.engine._check_prompt(self.engine.tokenize(prompt)[1])
        ids = []
        for prompt, p in zip(prompts, params, strict=True):
            ids.append(self.engine.add_request(f"gen-{self._counter}", prompt, p))
            self._counter += 1
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [apply_chat_template(self.get_tokenizer(), c, add_generation_prompt)
                   for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

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


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str | dict):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if all(isinstance(t, int) for t in prompts):  # one prompt of token ids
        return [prompts]
    return prompts
