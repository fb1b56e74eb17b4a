"""CUDA graph modes and their resolution against an attention backend's support level.

This module imports no torch: the engine, the config and the CLI import it, and attention
backends declare their ``CGSupport`` from here.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class CGSupport(enum.IntEnum):
    """How much of a batch a backend lets a FULL CUDA graph capture (ordered: more is better)."""

    NEVER = 0  # eager only
    UNIFORM_DECODE = 1  # full graphs for batches where every request computes one token
    UNIFORM_BATCH = 2  # full graphs for batches whose requests share one query length
    ALWAYS = 3  # full graphs for any batch, mixed prefill and decode included


class CUDAGraphMode(enum.Enum):
    """What runs under a CUDA graph.

    The mode is a pair (decode batches, mixed/prefill batches); each half is one of
    NONE (eager), PIECEWISE (graphs between attention calls) or FULL (one graph, attention
    included).
    """

    NONE = "NONE"
    PIECEWISE = "PIECEWISE"
    FULL = "FULL"
    FULL_DECODE_ONLY = "FULL_DECODE_ONLY"
    FULL_AND_PIECEWISE = "FULL_AND_PIECEWISE"

    @classmethod
    def parse(cls, value: str | CUDAGraphMode) -> CUDAGraphMode:
        if isinstance(value, CUDAGraphMode):
            return value
        key = str(value).strip().upper()
        try:
            return cls[key]
        except KeyError:
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown CUDA graph mode {value!r}; use one of: {allowed}") from None

    @property
    def decode_mode(self) -> RuntimeMode:
        return _HALVES[self][0]

    @property
    def mixed_mode(self) -> RuntimeMode:
        return _HALVES[self][1]

    def has_full(self) -> bool:
        return RuntimeMode.FULL in _HALVES[self]

    def has_piecewise(self) -> bool:
        return RuntimeMode.PIECEWISE in _HALVES[self]


class RuntimeMode(enum.Enum):
    """How one step actually runs (the dispatcher's answer)."""

    NONE = "NONE"
    PIECEWISE = "PIECEWISE"
    FULL = "FULL"


_HALVES: dict[CUDAGraphMode, tuple[RuntimeMode, RuntimeMode]] = {
    CUDAGraphMode.NONE: (RuntimeMode.NONE, RuntimeMode.NONE),
    CUDAGraphMode.PIECEWISE: (RuntimeMode.PIECEWISE, RuntimeMode.PIECEWISE),
    CUDAGraphMode.FULL: (RuntimeMode.FULL, RuntimeMode.FULL),
    CUDAGraphMode.FULL_DECODE_ONLY: (RuntimeMode.FULL, RuntimeMode.NONE),
    CUDAGraphMode.FULL_AND_PIECEWISE: (RuntimeMode.FULL, RuntimeMode.PIECEWISE),
}


@dataclass(frozen=True)
class Resolution:
    mode: CUDAGraphMode
    warning: str | None  # set when the requested mode was downgraded


def resolve_cudagraph_mode(
    requested: CUDAGraphMode, backend_name: str, support: CGSupport, on_cuda: bool
) -> Resolution:
    """Meet the requested mode with what the backend supports.

    Downgrades keep as much graph coverage as the backend allows and say why; a request no
    downgrade can honour without silently dropping what the user asked for (FULL on a
    backend that can never be captured) fails with advice.
    """
    if not on_cuda:
        if requested is CUDAGraphMode.NONE:
            return Resolution(CUDAGraphMode.NONE, None)
        return Resolution(
            CUDAGraphMode.NONE, f"CUDA graph mode {requested.value} needs a CUDA GPU; running NONE"
        )
    if not requested.has_full():
        return Resolution(requested, None)
    if support is CGSupport.NEVER:
        if requested is CUDAGraphMode.FULL_AND_PIECEWISE:
            return Resolution(
                CUDAGraphMode.PIECEWISE,
                f"CUDA graph mode FULL_AND_PIECEWISE downgraded to PIECEWISE: the "
                f"{backend_name!r} attention backend cannot be captured in full graphs "
                f"(support: NEVER)",
            )
        raise ValueError(
            f"{requested.value} is not supported by the {backend_name!r} attention backend "
            f"(support: NEVER); use --cudagraph-mode PIECEWISE or --attention-backend triton"
        )
    if requested is CUDAGraphMode.FULL and support < CGSupport.ALWAYS:
        return Resolution(
            CUDAGraphMode.FULL_AND_PIECEWISE,
            f"CUDA graph mode FULL downgraded to FULL_AND_PIECEWISE: the {backend_name!r} "
            f"attention backend supports full graphs only for {support.name} batches; mixed "
            f"batches run piecewise",
        )
    return Resolution(requested, None)
