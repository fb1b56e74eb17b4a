"""A reference attention backend that keeps the FULL-graph contract, for CPU tests that
capture and replay graphs under emulation (``TACHYON_EMULATE_CUDAGRAPHS=1``).

A plain module (not a conftest), imported by the test modules that need it.
"""

from __future__ import annotations

from typing import ClassVar

from tachyon.attention.torch_backend import TorchAttentionBackend, TorchAttentionMetadata
from tachyon.cudagraph.modes import CGSupport


class PersistentTorchBackend(TorchAttentionBackend):
    """The torch reference attention made capturable: its metadata holds only views of the
    persistent buffers, and it plans from the device tensors at forward time (on a CPU that
    costs nothing), never from host copies, so a replayed graph sees the live batch."""

    name: ClassVar[str] = "torch-persistent"
    cudagraph_support: ClassVar[CGSupport] = CGSupport.ALWAYS

    def build_metadata(self, common):
        return TorchAttentionMetadata(common, [])  # nothing planned from host copies

    def forward(self, query, key, value, k_cache, v_cache, metadata, output):
        c = metadata.common
        qsl, lens = c.query_start_loc.tolist(), c.seq_lens.tolist()
        spans = [(r, qsl[r], qsl[r + 1], lens[r]) for r in range(c.num_reqs)
                 if lens[r] > 0 and qsl[r + 1] > qsl[r]]
        super().forward(query, key, value, k_cache, v_cache,
                        TorchAttentionMetadata(c, spans), output)
