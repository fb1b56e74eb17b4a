"""A check of the graph contract: what a FULL graph baked in at capture must hold at replay.

A captured graph replays its kernels with the launch grids, scalar arguments and tensor
addresses of the capture. So every value in a backend's metadata that can reach a kernel must
be the same for the live batch as for the captured one: tensors must be the same buffers (same
address, shape, strides), and every scalar (request count, number of decode splits, ...) must
be equal. Values a backend only uses on the host, outside the graph, are exempt when the
metadata class names them in ``HOST_ONLY``.

``signature`` reduces a metadata object to that contract; ``check_replay`` compares the live
batch's signature with the captured one and fails loudly, naming the field. The graph runner
runs the check on every FULL replay under emulation (CPU tests) and when
``TACHYON_DEBUG_CUDAGRAPHS=1`` on a GPU.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch

ENV_DEBUG_GRAPHS = "TACHYON_DEBUG_CUDAGRAPHS"

Signature = dict[str, Any]


class GraphContractError(RuntimeError):
    """A replayed graph would read a value that differs from the one it captured."""


def _leaf(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", value.device.type, value.data_ptr(), tuple(value.shape),
                value.stride(), value.dtype)
    if value is None or isinstance(value, bool | int | float | str | enum.Enum):
        return value
    if callable(value):  # e.g. a mask function: the same function object
        return ("callable", id(value))
    return None  # not a dataclass, tensor or scalar: nothing here a kernel can read


def signature(metadata: Any, prefix: str = "") -> Signature:
    """Flatten ``metadata`` into ``{dotted field path: contract value}``."""
    out: Signature = {}
    if dataclasses.is_dataclass(metadata) and not isinstance(metadata, type):
        exempt = getattr(type(metadata), "HOST_ONLY", frozenset())
        for f in dataclasses.fields(metadata):
            if f.name not in exempt:
                out.update(signature(getattr(metadata, f.name), f"{prefix}{f.name}."))
        return out
    if isinstance(metadata, tuple | list):
        for i, item in enumerate(metadata):
            out.update(signature(item, f"{prefix}{i}."))
        return out
    as_tuple = getattr(metadata, "as_tuple", None)  # FlexAttention's BlockMask
    if callable(as_tuple) and not isinstance(metadata, torch.Tensor):
        return signature(tuple(as_tuple()), prefix)
    out[prefix.rstrip(".") or "<metadata>"] = _leaf(metadata)
    return out


def check_replay(what: str, captured: Signature, live: Signature) -> None:
    """Raise ``GraphContractError`` naming every field where ``live`` differs from capture."""
    if captured == live:
        return
    diffs = [f"{k}: captured {captured.get(k)!r}, replay {live.get(k)!r}"
             for k in sorted(captured.keys() | live.keys()) if captured.get(k) != live.get(k)]
    raise GraphContractError(
        f"{what}: the live batch's attention metadata differs from what the graph captured "
        f"(a kernel-shaping value must come from shapes or live in a persistent buffer): "
        + "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    )
