"""Persistent step-input buffers: allocated once at maximum size, filled by prefix copies.

Every tensor a CUDA graph reads lives here, so its address and strides never change. The
host side is a pinned staging area laid out exactly like the device side; a step fills a
prefix of it with numpy and sends it over in two copies (one per dtype).
"""

from __future__ import annotations

import numpy as np
import torch

from tachyon.sampling_params import SamplingParams


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` without an asynchronous copy out of pageable memory: on a GPU
    it is pinned first (torch's caching host allocator keeps the pinned block until the
    copy has read it, so this is safe for tensors made after the step's ``StagingFence``
    record, where a reused buffer would not be)."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class InputBuffers:
    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int,
                 device: torch.device) -> None:
        self.max_num_tokens, self.max_num_seqs = max_num_tokens, max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        pin = device.type == "cuda"
        t, s, m = max_num_tokens, max_num_seqs, max_blocks_per_seq
        # int64 group: input_ids | positions | slot_mapping | logits_indices | lora_slots
        self._i64_sizes = (t, t, t, s, t)
        # int32 group: query_start_loc (s + 1) | seq_lens | block_table (row-major, last)
        self._i32_sizes = (s + 1, s, s * m)
        self.host_i64 = torch.zeros(sum(self._i64_sizes), dtype=torch.int64, pin_memory=pin)
        self.host_i32 = torch.zeros(sum(self._i32_sizes), dtype=torch.int32, pin_memory=pin)
        self.dev_i64 = torch.zeros_like(self.host_i64, device=device)
        self.dev_i32 = torch.zeros_like(self.host_i32, device=device)
        self.np_i64, self.np_i32 = self.host_i64.numpy(), self.host_i32.numpy()

        def split(buf: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
            return list(buf.split(sizes))

        # lora_slots: each token's LoRA adapter slot, -1 for none (tachyon.lora).
        (self.input_ids, self.positions, self.slot_mapping,
         self.logits_indices, self.lora_slots) = split(self.dev_i64, self._i64_sizes)
        self.query_start_loc, self.seq_lens, bt = split(self.dev_i32, self._i32_sizes)
        self.block_table = bt.view(s, m)
        (self.np_input_ids, self.np_positions, self.np_slot_mapping,
         self.np_logits_indices, self.np_lora_slots) = np.split(
             self.np_i64, np.cumsum(self._i64_sizes)[:-1])
        np_qsl, np_seq_lens, np_bt = np.split(self.np_i32, np.cumsum(self._i32_sizes)[:-1])
        self.np_query_start_loc, self.np_seq_lens = np_qsl, np_seq_lens
        self.np_block_table = np_bt.reshape(s, m)
        self.host_query_start_loc = self.host_i32[: s + 1]
        self.host_seq_lens = self.host_i32[s + 1: 2 * s + 1]

    def copy_to_device(self, num_reqs: int) -> None:
        """Send the staged step over: all int64 inputs, and int32 metadata up to the last
        block-table row in use (the table is last, so a prefix copy covers it)."""
        self.dev_i64.copy_(self.host_i64, non_blocking=True)
        n32 = 2 * self.max_num_seqs + 1 + num_reqs * self.max_blocks_per_seq
        self.dev_i32[:n32].copy_(self.host_i32[:n32], non_blocking=True)


class StagingFence:
    """Keeps the host from refilling the pinned staging buffers while a queued step still has
    to copy them to the device.

    A step's host-to-device copies are asynchronous: they read the pinned buffers when the
    stream reaches them, not when they are queued. Under asynchronous scheduling the host
    stages step N+1 while the device may still be busy with work queued before step N's
    copies (a long prefill chunk that samples nothing gives the host no event to wait on), so
    without this fence step N could run with step N+1's inputs. ``record()`` after the last
    copy of a step, ``wait()`` before the first host write of the next one; the wait is free
    whenever the copies are already done, which is almost always.
    """

    def __init__(self, device: torch.device) -> None:
        self._event = torch.cuda.Event() if device.type == "cuda" else None
        self._pending = False

    def wait(self) -> None:
        if self._pending:
            self._event.synchronize()
            self._pending = False

    def record(self) -> None:
        if self._event is not None:
            self._event.record()
            self._pending = True


class SamplingBuffers:
    """Per-row sampling parameters for one step, staged in pinned memory and sent with a
    single asynchronous copy per dtype before the forward pass is queued.

    Each row remembers whose parameters it holds: a row that has the same ``SamplingParams``
    object as last step is not written again (params are not changed once a request runs).
    Next to the values, each row keeps the host-side facts the sampler's control flow
    needs, decided in Python exactly as before, so a step reduces them with numpy."""

    FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty")
    # Per-row flags: greedy, top-p on, min-p on, a penalty on.
    GREEDY, TOP_P, MIN_P, PENALTY = range(4)

    def __init__(self, max_num_seqs: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        n = len(self.FLOAT_FIELDS)
        self.host_f = torch.zeros((n, max_num_seqs), dtype=torch.float32, pin_memory=pin)
        self.host_k = torch.zeros(max_num_seqs, dtype=torch.int32, pin_memory=pin)
        self.dev_f = torch.zeros_like(self.host_f, device=device)
        self.dev_k = torch.zeros_like(self.host_k, device=device)
        self.np_f, self.np_k = self.host_f.numpy(), self.host_k.numpy()
        self.flags = np.zeros((4, max_num_seqs), dtype=bool)
        self.num_logprobs = np.full(max_num_seqs, -1, dtype=np.int64)  # -1: none asked
        self.owners: list[SamplingParams | None] = [None] * max_num_seqs

    def stage(self, params: list[SamplingParams]) -> None:
        """Write the rows whose params changed, then send them all (whole buffers: a copy
        of a column slice would go through a pageable temporary)."""
        owners, np_f, flags = self.owners, self.np_f, self.flags
        for i, p in enumerate(params):
            if owners[i] is p:
                continue
            owners[i] = p
            np_f[:, i] = (p.temperature, p.top_p, p.min_p, p.presence_penalty,
                          p.frequency_penalty, p.repetition_penalty)
            self.np_k[i] = p.top_k
            flags[:, i] = (p.temperature == 0.0, p.top_p < 1.0, p.min_p > 0.0,
                           p.has_penalties)
            self.num_logprobs[i] = -1 if p.logprobs is None else p.logprobs
        self.dev_f.copy_(self.host_f, non_blocking=True)
        self.dev_k.copy_(self.host_k, non_blocking=True)

    def field(self, name: str, k: int) -> torch.Tensor:
        return self.dev_f[self.FLOAT_FIELDS.index(name), :k]

    def top_k(self, k: int) -> torch.Tensor:
        return self.dev_k[:k]


class VerifyBuffers:
    """The logits rows of a speculative step: which token position each row scores and the
    draft it checks (``NO_DRAFT`` on a request's bonus row). Staged in pinned memory and
    sent with one copy; read by the rejection sampler, outside any graph."""

    def __init__(self, max_num_logits: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.host = torch.zeros((2, max_num_logits), dtype=torch.int64, pin_memory=pin)
        self.dev = torch.zeros_like(self.host, device=device)
        self.np_logits_indices, self.np_draft_ids = self.host.numpy()
        self.logits_indices, self.draft_ids = self.dev

    def copy_to_device(self, num_rows: int) -> None:
        """Both rows whole: a column slice of the pair would go through a pageable
        temporary (``num_rows``: kept for the caller; the buffers are small)."""
        del num_rows
        self.dev.copy_(self.host, non_blocking=True)
