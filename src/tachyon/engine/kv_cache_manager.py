"""Paged KV block accounting with prefix caching.

Blocks are reference counted. A block whose every slot holds computed K/V gets a hash that
chains over its parent (hash of the previous block + this block's token ids); later requests
whose prompt produces the same chain reuse it. Hits are verified against the stored token ids,
so a hash collision can never serve wrong K/V. Freed blocks keep their hash and go to the back
of an LRU free queue; allocation takes from the front and evicts the hash then.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tachyon.engine.request import Request

# Parent hash of a request's first block.
ROOT_HASH = 0


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # kept to verify cache hits
    parent: int = -1  # id of the block before it when it was registered (-1: first block)


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache has no blocks; give it more memory")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # LRU: front = evicted first. Insertion order is the order blocks were freed.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block_hash -> block_id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def lookup(self, block_hash: int, token_ids: tuple[int, ...], parent: int) -> KVBlock | None:
        """A hit needs the same tokens *and* the same parent block: by induction over the
        chain, its K/V was computed after exactly this prefix, whatever the hashes do."""
        block_id = self.cached.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        return block if block.token_ids == token_ids and block.parent == parent else None

    def take(self, n: int) -> list[KVBlock]:
        """``n`` fresh blocks (ref 1), evicting the least recently freed cached ones."""
        assert n <= self.num_free, "caller must check num_free first"
        out = []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, block: KVBlock) -> None:
        """Take a reference on a cached block (a prefix hit)."""
        if block.ref_cnt == 0:
            del self.free_queue[block.block_id]
        block.ref_cnt += 1

    def release(self, blocks: list[KVBlock]) -> None:
        """Drop one reference on each; blocks reaching zero join the back of the LRU queue.
        Callers pass a request's blocks tail first, so its last blocks are evicted first."""
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = None

    def register(self, block: KVBlock, block_hash: int, token_ids: tuple[int, ...],
                 parent: int) -> None:
        if block.block_hash is not None:
            return
        block.block_hash, block.token_ids, block.parent = block_hash, token_ids, parent
        self.cached.setdefault(block_hash, block.block_id)

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None and self.cached.get(block.block_hash) == block.block_id:
            del self.cached[block.block_hash]
        block.block_hash, block.token_ids, block.parent = None, None, -1

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_cnt == 0:
                self._evict(block)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_num_hashed: dict[str, int] = {}  # how many leading blocks are registered
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens served from it

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def _hashes(self, req: Request, num_blocks: int) -> list[int]:
        """The request's block hash chain, extended to ``num_blocks`` full blocks."""
        bs, hashes = self.block_size, req.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            # K/V depends on the LoRA adapter too: each adapter roots a chain of its own.
            root = hash((ROOT_HASH, req.lora_int_id)) if req.lora_int_id else ROOT_HASH
            parent = hashes[-1] if hashes else root
            hashes.append(hash((parent, tuple(req.all_token_ids[i * bs:(i + 1) * bs]))))
        return hashes[:num_blocks]

    def get_computed_blocks(self, req: Request) -> list[KVBlock]:
        """Longest cached prefix of full blocks. The last token is never served from cache so
        every request computes at least one token (its logits are needed). None for a request
        with prompt logprobs: they need the logits of every prompt position (as in vLLM)."""
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return []
        bs = self.block_size
        max_blocks = (req.num_tokens - 1) // bs
        hits: list[KVBlock] = []
        for i, h in enumerate(self._hashes(req, max_blocks)):
            parent = hits[-1].block_id if hits else -1
            block = self.pool.lookup(h, tuple(req.all_token_ids[i * bs:(i + 1) * bs]), parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed: list[KVBlock] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens after ``computed`` (prefix hits, for a
        request not yet holding blocks). All or nothing: returns False and changes nothing if
        the pool cannot provide the blocks."""
        bs = self.block_size
        if not computed:  # the per-step case (a running request): no generators, no touches
            blocks = self.req_blocks.get(req.request_id)
            total = req.num_computed_tokens + num_new_tokens
            needed = -(-total // bs) - (len(blocks) if blocks is not None else 0)
            if needed > self.pool.num_free:
                return False
            if blocks is None:
                blocks = self.req_blocks[req.request_id] = []
            if needed > 0:
                blocks.extend(self.pool.take(needed))
            if self.enable_prefix_caching and min(total, req.num_tokens) // bs \
                    > self.req_num_hashed.get(req.request_id, 0):
                self._register_full_blocks(req, blocks, total)
            return True
        held = self.req_blocks.get(req.request_id, [])
        num_computed = req.num_computed_tokens + len(computed) * bs
        needed = -(-(num_computed + num_new_tokens) // bs) - len(held) - len(computed)
        # Prefix hits sitting in the free queue stop being free once touched.
        reclaimed = sum(1 for b in computed if b.ref_cnt == 0)
        if needed + reclaimed > self.pool.num_free:
            return False
        for b in computed:
            self.pool.touch(b)
        blocks = self.req_blocks.setdefault(req.request_id, [])
        blocks.extend(computed)
        if needed > 0:
            blocks.extend(self.pool.take(needed))
        if self.enable_prefix_caching:
            self._register_full_blocks(req, blocks, num_computed + num_new_tokens)
        return True

    def _register_full_blocks(self, req: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        """Hash the blocks that will be full of computed K/V once this step has run."""
        bs = self.block_size
        num_full = min(num_tokens, req.num_tokens) // bs
        start = self.req_num_hashed.get(req.request_id, 0)
        if num_full <= start:
            return
        hashes = self._hashes(req, num_full)
        for i in range(start, num_full):
            self.pool.register(blocks[i], hashes[i],
                               tuple(req.all_token_ids[i * bs:(i + 1) * bs]),
                               blocks[i - 1].block_id if i else -1)
        self.req_num_hashed[req.request_id] = num_full

    def free(self, req: Request) -> None:
        blocks = self.req_blocks.pop(req.request_id, [])
        self.req_num_hashed.pop(req.request_id, None)
        self.pool.release(list(reversed(blocks)))

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
