"""What the API process and the engine core process say to each other (msgspec, msgpack).

API -> core: ``AddRequest`` (one sample of one prompt: ``n`` is fanned out by the API),
``AbortRequests``, ``LoadLoRA`` / ``UnloadLoRA``, ``Shutdown``. Core -> API: ``CoreReady`` or
``CoreFailed`` once at start, then one ``StepOutputs`` per loop iteration that did anything:
every token of the step, in columns, so a step of 256 requests is one small message; the
answers to adapter changes ride in it too (``LoRAUpdate``).
"""

from __future__ import annotations

import msgspec

from tachyon.lora.request import LoRARequest
from tachyon.sampling_params import SamplingParams


class AddRequest(msgspec.Struct, tag="add", array_like=True, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # n == 1
    eos_token_ids: list[int]  # the tokenizer's EOS ids with the model's (the core has none)
    arrival_time: float  # time.monotonic() of the API process: same clock on one host
    lora_request: LoRARequest | None = None  # loaded by the core on first use


class AbortRequests(msgspec.Struct, tag="abort", array_like=True, gc=False):
    """Client gone, or a stop string found by the API process."""

    request_ids: list[str]
    stopped: bool = False  # True: a stop string (FINISHED_STOPPED), else an abort


class LoadLoRA(msgspec.Struct, tag="load_lora", array_like=True):
    seq: int  # echoed in the LoRAUpdate that answers it
    lora: LoRARequest


class UnloadLoRA(msgspec.Struct, tag="unload_lora", array_like=True):
    seq: int
    lora_int_id: int


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


CoreInput = AddRequest | AbortRequests | LoadLoRA | UnloadLoRA | Shutdown


class LoRAUpdate(msgspec.Struct, array_like=True):
    """The answer to a ``LoadLoRA`` / ``UnloadLoRA``: the adapters known after it."""

    seq: int
    loras: list[LoRARequest]
    error: str | None = None  # why the change was refused (a bad adapter, one in use, ...)


class CoreStats(msgspec.Struct, array_like=True, gc=False):
    """The core's counters after one iteration (gauges and totals since start)."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 1
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    step_seconds: float = 0.0  # wall time inside EngineCore.step(), since start
    # Of step_seconds: blocked on the device's results (async scheduling); the rest is host.
    wait_seconds: float = 0.0
    # Wall time of the loop's iterations that had work (inputs, step, outputs), and of
    # encoding and sending the outputs: loop - step is what the core adds around a step.
    loop_seconds: float = 0.0
    send_seconds: float = 0.0
    # Speculative decoding, since start (0 without it): drafted, accepted, verify passes.
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verifies: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks


class Finished(msgspec.Struct, array_like=True, gc=False):
    event: int  # index into StepOutputs.request_ids / token_ids
    reason: str  # "stop" (EOS or a stop token) | "length"
    stop_token: int | None  # the stop token id that ended it, if one did


class StepOutputs(msgspec.Struct, tag="step", array_like=True, gc=False):
    """Event ``i`` is token ``token_ids[i]`` of request ``request_ids[i]``; a request may
    appear twice when one iteration drained an asynchronous step and ran another."""

    request_ids: list[str]
    token_ids: list[int]
    finished: list[Finished]
    logprobs: list[list[tuple[int, float]] | None]  # empty if no event has any, else aligned
    rejected: dict[str, str]  # request id -> why the core refused it
    stats: CoreStats
    lora_updates: list[LoRAUpdate] = []
    # Empty if no event has any, else aligned: with a request's first token, if it asked,
    # its prompt positions 1.. in order, each (the prompt token's rank, [(prompt token,
    # logprob), top-k ...]).
    prompt_logprobs: list[list[tuple[int, list[tuple[int, float]]]] | None] = []


class CoreReady(msgspec.Struct, tag="ready", array_like=True):
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]  # from the model config
    tokenizer_path: str | None  # None: the model has no tokenizer (send token ids)
    num_blocks: int
    startup_report: str
    loras: list[LoRARequest] = []  # adapters loaded at start


class CoreFailed(msgspec.Struct, tag="failed", array_like=True):
    message: str


CoreOutput = StepOutputs | CoreReady | CoreFailed
