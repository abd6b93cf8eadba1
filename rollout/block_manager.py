"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts and the prefix cache.

A full block is identified by a hash chained from its predecessor's, with its token ids kept to
rule out collisions. Freed blocks keep their hash until they are reused, so a later request with
the same prefix (or a preempted one being recomputed) finds them.
"""

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from rollout.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = field(default=())


def chain_hash(prefix: bytes | None, token_ids: list[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(prefix or b"")
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def _take(self, block_id: int | None = None) -> int:
        if block_id is None:
            block_id, _ = self.free.popitem(last=False)
        else:
            del self.free[block_id]
        self.blocks[block_id].ref_count = 1
        return block_id

    def _allocate_fresh(self) -> int:
        block_id = self._take()
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        return block_id

    def match_prefix(self, seq: Sequence) -> int:
        """Share the cached blocks that start `seq`; returns how many tokens they cover.
        Tokens whose logits are needed (the last one, or a scored response) are never matched."""
        if not self.enable_prefix_caching:
            return 0
        prefix = None
        matched = 0
        for i in range(seq.num_matchable_tokens // self.block_size):
            tokens = seq.block_tokens(i)
            h = chain_hash(prefix, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(tokens):
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self._take(block_id)
            else:
                block.ref_count += 1
            seq.block_table.append(block_id)
            prefix = h
            matched += 1
        return matched * self.block_size

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for the next `num_new_tokens` of `seq`; False (and no change) if full."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self.free):
            return False
        seq.block_table.extend(self._allocate_fresh() for _ in range(need))
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the blocks of `seq` that are now full and computed to the prefix cache."""
        if not self.enable_prefix_caching or not seq.cacheable:
            return
        full = seq.num_computed_tokens // self.block_size
        first = full  # hashed blocks form a prefix: walk back to its end
        while first > 0 and self.blocks[seq.block_table[first - 1]].hash is None:
            first -= 1
        prefix = self.blocks[seq.block_table[first - 1]].hash if first else None
        for i in range(first, full):
            block = self.blocks[seq.block_table[i]]
            tokens = seq.block_tokens(i)
            block.hash, block.token_ids = chain_hash(prefix, tokens), tuple(tokens)
            self.cached.setdefault(block.hash, block.block_id)
            prefix = block.hash

    def free_sequence(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.cacheable = True  # recomputed from scratch next time

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give `child` the blocks of `parent`: full blocks shared, a partial last block copied.
        Returns (source, destination) of the block whose contents must be copied, if any.
        The caller checks there is a free block when `parent` ends in a partial block."""
        full = parent.num_computed_tokens // self.block_size
        for block_id in parent.block_table[:full]:
            self.blocks[block_id].ref_count += 1
        child.block_table = parent.block_table[:full]
        child.num_computed_tokens = parent.num_computed_tokens
        if full == len(parent.block_table):
            return None
        copy = self._allocate_fresh()
        child.block_table.append(copy)
        return parent.block_table[full], copy

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (after a weight update: their K/V are stale)."""
        for block in self.blocks:
            block.hash, block.token_ids = None, ()
        self.cached.clear()
