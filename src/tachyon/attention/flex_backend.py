"""FlexAttention over the paged KV cache, capturable by FULL CUDA graphs (support ALWAYS).

The whole batch is one FlexAttention call. Queries of all requests are flattened into one
sequence of ``T`` tokens (the padded token count); the key/value "sequence" is the physical
paged cache itself, ``[1, num_kv_heads, num_blocks * block_size, head_dim]``. Which query may
see which cache slot is decided by a ``BlockMask``:

* **Block level** (``kv_indices`` / ``kv_num_blocks``): query block ``i`` (``Q_BLOCK`` = 16
  tokens) lists the distinct KV pages of every request that has a token in it; the KV block of
  the mask is one page, so a page id *is* a KV block id. Pages are gathered from the block
  tables and de-duplicated on the device (prefix-cached pages are shared between requests).
* **Element level** (``mask_mod``, a few tensor lookups): with ``doc = doc_ids[q]`` and
  ``page = kv // block_size``, ``logical = page_logical[page]``, the pair is allowed iff
  ``block_table[doc, logical] == page`` (the page belongs to this request, at that logical
  index) and ``logical * block_size + kv % block_size <= q_pos[q]`` (causal, by absolute
  position). A physical page holds one logical block of every request that shares it (prefix
  caching matches from the start), so ``page_logical`` is well defined within a step.

The persistent-buffer contract (seed 003): every tensor the kernel reads lives in a buffer
allocated once at its maximum size and is refilled by prefix copies in ``build_metadata``,
which runs outside any graph: ``doc_ids`` / ``q_pos`` ``[max_tokens]``, the sanitised block
table ``[max_num_seqs + 1, max_blocks_per_seq]`` (the last row is the "no request" row, all
-1), ``page_logical`` ``[num_blocks + 1]``, ``kv_indices`` ``[max_q_blocks, width + 1]``,
``kv_num_blocks`` ``[max_q_blocks]`` and the KV-write plan. The ``BlockMask`` for a padded
size ``T`` is built once and cached, so warm-up, capture and replay hand the compiled kernel
the very same object: same tensors, same shapes, nothing that depends on the batch's maximum
sequence length, hence no recompilation while capturing.

The KV write is capture-safe (no boolean-mask indexing, no host sync): padded tokens (slot -1)
are redirected to re-write the slot of the batch's first real token with that token's own
K/V, so duplicate indices all carry identical bytes; a batch without any real token rewrites
slot 0 with its current contents.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from tachyon.attention.base import AttentionBackend, AttentionSpec, CommonAttentionMetadata
from tachyon.cudagraph.modes import CGSupport

Q_BLOCK = 16  # query tokens per block-mask row; the smallest tile Triton's tl.dot accepts

# Scores the eager (unfused, dense) path may materialise per call; longer batches are split.
_EAGER_CHUNK_BYTES = 256 << 20
# Compilations of the flex call a process may need: a static first size, the dynamic-shape
# variants (one query block or many; short or long queries), bf16 and fp16.
_RECOMPILE_LIMIT = 32

_compiled_flex: Any = None


def _flex_call(q, k, v, block_mask, scale, enable_gqa, kernel_options):
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                          kernel_options=kernel_options)


def _compiled_flex_call() -> Any:
    """``torch.compile(fullgraph=True)`` of the flex call, created once per process. Its own
    code object keeps its compile cache apart from other users of ``flex_attention``."""
    global _compiled_flex
    if _compiled_flex is None:
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, _RECOMPILE_LIMIT)
        _compiled_flex = torch.compile(_flex_call, fullgraph=True)
    return _compiled_flex


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class FlexAttentionMetadata:
    num_tokens: int  # padded token count T: the query length of the flex call
    num_reqs: int
    # None only before the KV cache is known (first step); forward then builds it.
    block_mask: BlockMask | None
    common: CommonAttentionMetadata


class FlexAttentionBackend(AttentionBackend):
    name: ClassVar[str] = "flex"
    cudagraph_support: ClassVar[CGSupport] = CGSupport.ALWAYS

    def __init__(self, spec: AttentionSpec, use_compile: bool | None = None) -> None:
        """``use_compile``: run flex through ``torch.compile`` (default: on CUDA; the env var
        ``TACHYON_FLEX_COMPILE=0|1`` overrides the default). Eager flex is CPU/debug only: it
        materialises the scores densely over the whole cache."""
        super().__init__(spec)
        dev, bs = spec.device, spec.block_size
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"num_heads ({spec.num_heads}) must be a multiple of num_kv_heads "
                             f"({spec.num_kv_heads}) for the flex attention backend")
        if dev.type == "cuda" and (bs < 16 or bs & (bs - 1)):
            raise ValueError(f"the flex attention backend needs a power-of-two block_size >= 16 "
                             f"on CUDA, got {bs}; use --block-size 16")
        env = os.environ.get("TACHYON_FLEX_COMPILE")
        if use_compile is None:
            use_compile = dev.type == "cuda" if env is None else env not in ("", "0")
        self.compiled = use_compile
        self.max_tokens = _cdiv(spec.max_num_batched_tokens, Q_BLOCK) * Q_BLOCK
        self.max_q_blocks = self.max_tokens // Q_BLOCK
        self.max_pages = spec.max_blocks_per_seq
        self.null_req = spec.max_num_seqs  # the block-table row that owns nothing
        i32 = {"dtype": torch.int32, "device": dev}
        i64 = {"dtype": torch.int64, "device": dev}
        self._arange32 = torch.arange(max(self.max_tokens, self.max_pages), **i32)
        self._arange64 = torch.arange(self.max_tokens, **i64)
        # Per query token: its request (null_req for padding) and absolute position (-1).
        self._doc = torch.full((self.max_tokens,), self.null_req, **i32)
        self._qpos = torch.full((self.max_tokens,), -1, **i32)
        # Block tables with every entry past a request's length set to -1.
        self._bt = torch.full((spec.max_num_seqs + 1, self.max_pages), -1, **i32)
        # KV write plan: source token, destination slot, and whether the source is real.
        self._kv_src = torch.zeros(self.max_tokens, **i64)
        self._kv_slot = torch.zeros(self.max_tokens, **i64)
        self._kv_ok = torch.zeros(self.max_tokens, dtype=torch.bool, device=dev)
        self._kv_num_blocks = torch.zeros(self.max_q_blocks, **i32)
        self._no_full = torch.zeros(self.max_q_blocks, **i32)
        self._q_offset = torch.zeros((), **i32)  # eager path only: first query of a chunk
        self.kernel_options: dict[str, Any] | None = None
        if dev.type == "cuda":
            self.kernel_options = {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_M": Q_BLOCK,
                                   "BLOCK_N": min(bs, 64)}
        # Sized by the KV cache: set by bind_kv_cache.
        self.num_blocks: int | None = None
        self._page_logical: torch.Tensor | None = None
        self._kv_indices: torch.Tensor | None = None
        self._mask_mod: Any = None
        self._block_masks: dict[int, BlockMask] = {}

    # -- KV cache binding ------------------------------------------------------------------
    def bind_kv_cache(self, num_blocks: int) -> None:
        """Allocate the buffers whose size depends on the number of KV blocks. Called once the
        cache exists (``forward`` does it on the first step if nobody did before)."""
        if self.num_blocks == num_blocks:
            return
        dev, bs, m = self.spec.device, self.spec.block_size, self.max_pages
        self.num_blocks = num_blocks
        self._page_logical = torch.zeros(num_blocks + 1, dtype=torch.int32, device=dev)
        # A row never holds more than min(Q_BLOCK * pages, num_blocks) distinct pages; the extra
        # last column receives the de-duplicated-away entries of the packing scatter.
        self._width = min(Q_BLOCK * m, num_blocks) + 1
        if self.compiled and dev.type == "cpu":
            self._width = num_blocks + 1  # Inductor's C++ template wants a row per KV block
        self._kv_indices = torch.zeros(self.max_q_blocks, self._width, dtype=torch.int32,
                                       device=dev)
        self._block_masks.clear()
        doc, qpos, bt, page_logical = self._doc, self._qpos, self._bt.view(-1), self._page_logical

        def mask_mod(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            page = kv_idx // bs
            logical = page_logical[page]
            owned = bt[doc[q_idx] * m + logical] == page
            return owned & (logical * bs + kv_idx % bs <= qpos[q_idx])

        q_offset = self._q_offset

        def chunk_mask_mod(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor
                           ) -> torch.Tensor:
            return mask_mod(b, h, q_idx + q_offset, kv_idx)

        self._mask_mod = mask_mod
        self._chunk_mask_mod = chunk_mask_mod
        # Eager path: query tokens per call so that scores and mask temporaries stay bounded.
        per_token = num_blocks * bs * (4 * self.spec.num_heads + 48)
        self._eager_chunk = max(Q_BLOCK, _EAGER_CHUNK_BYTES // per_token // Q_BLOCK * Q_BLOCK)

    # -- metadata --------------------------------------------------------------------------
    def build_metadata(self, common: CommonAttentionMetadata) -> FlexAttentionMetadata:
        t, r = common.num_tokens, common.num_reqs
        if t > self.max_tokens or r > self.spec.max_num_seqs:
            raise ValueError(f"batch of {t} tokens / {r} requests exceeds the flex backend's "
                             f"capacity ({self.max_tokens} / {self.spec.max_num_seqs})")
        self._fill_token_maps(common)
        md = FlexAttentionMetadata(t, r, None, common)
        if self.num_blocks is not None:
            md.block_mask = self._build_block_mask(common)
        return md

    def _fill_token_maps(self, common: CommonAttentionMetadata) -> None:
        """doc ids, query positions, sanitised block tables and the KV-write plan."""
        t, r, bs = common.num_tokens, common.num_reqs, self.spec.block_size
        tp = _cdiv(t, Q_BLOCK) * Q_BLOCK
        qsl, seq = common.query_start_loc, common.seq_lens
        ends = qsl[1:r + 1]
        tok = self._arange32[:tp]
        # Token t belongs to the first request whose end is past t; past the last: padding.
        doc = torch.searchsorted(ends, tok, right=True, out_int32=True)
        real = doc < r
        d = doc.clamp(max=max(r - 1, 0))
        if r:
            qpos = torch.where(real, tok + seq[d] - ends[d], -1)
        else:
            qpos = torch.full_like(tok, -1)
        self._doc[:tp].copy_(torch.where(real, doc, self.null_req))
        self._qpos[:tp].copy_(qpos)

        width = common.block_table.shape[1]
        if width > self.max_pages:
            raise ValueError(f"block table has {width} columns, more than {self.max_pages}")
        if r:
            nblk = (seq + (bs - 1)) // bs
            live = self._arange32[:width].unsqueeze(0) < nblk.unsqueeze(1)
            self._bt[:r, :width].copy_(torch.where(live, common.block_table, -1))

        slot = common.slot_mapping[:t]
        valid = slot >= 0
        anchor = valid.int().argmax()  # first real token (0 if there is none)
        src = torch.where(valid, self._arange64[:t], anchor)
        dst = slot[src]
        self._kv_src[:t].copy_(src)
        self._kv_ok[:t].copy_(dst >= 0)
        self._kv_slot[:t].copy_(dst.clamp(min=0))

    def _build_block_mask(self, common: CommonAttentionMetadata) -> BlockMask:
        assert self.num_blocks is not None and self._kv_indices is not None
        assert self._page_logical is not None
        t, r, bs = common.num_tokens, common.num_reqs, self.spec.block_size
        nqb = _cdiv(t, Q_BLOCK)
        big = self.num_blocks
        mb = max(1, min(_cdiv(common.max_seq_len, bs), self.max_pages))
        cols = self._arange32[:mb]
        bt = self._bt[:, :mb]
        if r:
            # page -> its logical index (entries past a request's length go to a dummy slot).
            rows = bt[:r]
            idx = torch.where(rows >= 0, rows, big).long().flatten()
            self._page_logical.scatter_(0, idx, cols.expand(r, mb).flatten())
        # Pages of every request with a token in each query block: [nqb, Q_BLOCK, mb].
        doc = self._doc[:nqb * Q_BLOCK].view(nqb, Q_BLOCK)
        first = torch.ones_like(doc, dtype=torch.bool)
        first[:, 1:] = doc[:, 1:] != doc[:, :-1]  # tokens of one request are contiguous
        pages = bt.index_select(0, doc.flatten()).view(nqb, Q_BLOCK, mb)
        pages = torch.where(first.unsqueeze(-1) & (pages >= 0), pages, big)
        # Shared (prefix-cached) pages sit at the same logical index in every request, so
        # sorting each column across the block's requests puts duplicates side by side.
        x = pages.transpose(1, 2).sort(dim=-1).values  # [nqb, mb, Q_BLOCK]
        keep = x != big
        keep[..., 1:] &= x[..., 1:] != x[..., :-1]
        x, keep = x.reshape(nqb, -1), keep.reshape(nqb, -1)
        pos = torch.where(keep, keep.cumsum(-1) - 1, self._width - 1)
        self._kv_indices[:nqb].scatter_(1, pos, torch.where(keep, x, 0))
        self._kv_num_blocks[:nqb].copy_(keep.sum(-1))
        return self._block_mask_for(t)

    def _block_mask_for(self, t: int) -> BlockMask:
        """The BlockMask for padded size ``t``: views of the persistent buffers, built once."""
        bm = self._block_masks.get(t)
        if bm is None:
            assert self._kv_indices is not None and self.num_blocks is not None
            nqb = _cdiv(t, Q_BLOCK)
            full: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
            if self.compiled and self.spec.device.type == "cpu":
                # Inductor's C++ flex template does not compile without full blocks: give it
                # an empty set (no block is ever "full": every pair goes through mask_mod).
                full = (self._no_full[:nqb][None, None], self._no_full[:nqb, None][None, None])
            bm = BlockMask.from_kv_blocks(
                self._kv_num_blocks[:nqb][None, None], self._kv_indices[:nqb][None, None],
                *full, BLOCK_SIZE=(Q_BLOCK, self.spec.block_size), mask_mod=self._mask_mod,
                seq_lengths=(t, self.num_blocks * self.spec.block_size), compute_q_blocks=False,
            )
            self._block_masks[t] = bm
        return bm

    # -- forward ---------------------------------------------------------------------------
    def forward(self, query, key, value, k_cache, v_cache, metadata, output) -> None:
        md: FlexAttentionMetadata = metadata
        t = md.num_tokens
        if query.shape[0] != t:
            raise ValueError(f"flex backend: query has {query.shape[0]} tokens, metadata {t}")
        if md.block_mask is None or self.num_blocks != k_cache.shape[0]:
            # First step (the cache was not bound yet): eager, before any capture.
            self.bind_kv_cache(k_cache.shape[0])
            md.block_mask = self._build_block_mask(md.common)
        hk, d = k_cache.shape[2], k_cache.shape[3]
        flat_k, flat_v = k_cache.view(-1, hk, d), v_cache.view(-1, hk, d)
        src, slot = self._kv_src[:t], self._kv_slot[:t]
        ok = self._kv_ok[:t].view(t, 1, 1)
        for new, flat in ((key, flat_k), (value, flat_v)):
            vals = new.index_select(0, src).to(flat.dtype)
            flat.index_copy_(0, slot, torch.where(ok, vals, flat.index_select(0, slot)))

        q = query.unsqueeze(0).transpose(1, 2)  # [1, Hq, T, D]
        k = k_cache.view(1, -1, hk, d).transpose(1, 2)  # [1, Hk, num_blocks * bs, D]
        v = v_cache.view(1, -1, hk, d).transpose(1, 2)
        gqa = query.shape[1] != hk
        if self.compiled:
            out = _compiled_flex_call()(q, k, v, md.block_mask, self.spec.scale, gqa,
                                        self.kernel_options)
            output.copy_(out[0].transpose(0, 1))
            return
        for start in range(0, t, self._eager_chunk):  # eager: CPU / debugging only
            end = min(t, start + self._eager_chunk)
            bm = md.block_mask
            if end - start < t:
                self._q_offset.fill_(start)
                rows = slice(start // Q_BLOCK, _cdiv(end, Q_BLOCK))
                bm = BlockMask.from_kv_blocks(
                    self._kv_num_blocks[rows][None, None], self._kv_indices[rows][None, None],
                    BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=self._chunk_mask_mod,
                    seq_lengths=(end - start, bm.seq_lengths[1]), compute_q_blocks=False)
            out = flex_attention(q[:, :, start:end], k, v, block_mask=bm, scale=self.spec.scale,
                                 enable_gqa=gqa)
            output[start:end].copy_(out[0].transpose(0, 1))
