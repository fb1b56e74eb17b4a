"""Per-request sampling settings, shaped like vLLM's ``SamplingParams``."""

from __future__ import annotations

from dataclasses import dataclass, field

from tachyon.structured_output.params import StructuredOutputsParams

# The OpenAI API allows at most 20 top logprobs; we allow the same.
MAX_LOGPROBS = 20
# Seeds go to torch.Generator.manual_seed and into int64 tensors: [0, 2**63).
SEED_LIMIT = 2**63
# top_k travels to the sampler as int32; any value >= the vocabulary size disables it anyway.
TOP_K_LIMIT = 2**31
# The float fields travel as float32: a larger temperature would become inf there.
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class SamplingParams:
    """How to sample one prompt's completions; ``validate()`` raises a ``ValueError`` naming
    the accepted range of any bad field.

    ``seed``: an integer in ``[0, 2**63)``; sample ``i`` of ``n`` uses ``seed + i``, so
    ``seed + n - 1`` must stay below ``2**63`` as well. ``None`` draws from the engine's
    generator (seeded once by the engine's ``seed``).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (sampled one included)
    # Top-k logprobs per prompt token after the first (the prompt token's own included).
    # Such a request skips the prefix cache: cached positions would have no logits.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Constrain the output (a JSON schema, regex, choice or grammar); None: free text.
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        elif isinstance(self.stop, list | tuple):
            self.stop_strings = list(self.stop)
        else:
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, list | tuple):
            raise ValueError("stop_token_ids must be a list of non-negative integers")
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def has_penalties(self) -> bool:
        """Presence, frequency or repetition penalty on: sampling then reads every token
        generated so far (the engine's synchronous path; no speculative drafts)."""
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)

    def validate(self) -> None:
        # n has no upper bound here: the server caps it (--max-n); offline, a large n is
        # only a lot of work, like a large max_tokens.
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not _fits_float32(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number in [0, {FLOAT32_MAX:.4g}] "
                             f"(0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k < TOP_K_LIMIT:
            raise ValueError(f"top_k must be 0 or -1 (disabled) or an integer in [1, 2**31), "
                             f"got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        if not _fits_float32(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a number in (0, {FLOAT32_MAX:.4g}] "
                             f"(1 = off), got {self.repetition_penalty!r}")
        self._validate_lengths()
        self._validate_seed()
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, list | tuple)
            or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids)
        ):
            raise ValueError("stop_token_ids must be a list of non-negative integers")

    def _validate_lengths(self) -> None:
        # No upper bound: the engine stops every request at max_model_len anyway.
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(
                f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")

    def _validate_seed(self) -> None:
        if self.seed is None:
            return
        if not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        if self.seed + self.n > SEED_LIMIT:  # the last sample's seed is seed + n - 1
            raise ValueError(f"seed + n - 1 must be < 2**63 (sample i uses seed + i); "
                             f"got seed {self.seed} with n = {self.n}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _fits_float32(x: object) -> bool:
    # A finite float32, as the field reaches the device. A comparison, not math.isfinite:
    # that raises OverflowError for ints beyond a float64.
    return _is_number(x) and abs(x) <= FLOAT32_MAX


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x == x  # NaN fails
