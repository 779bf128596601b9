"""Paged KV block bookkeeping with automatic prefix caching.

Blocks are reference-counted. A full block gets a hash chained from its parent block's hash and
its own tokens, so equal prefixes map to equal blocks across requests. When its last user frees
it, a hashed block stays cached, evictable in least-recently-freed order; a block without a hash
goes straight back to the free list. With a second tier (host_tier.py), an evicted cached block
is copied there first, and a prefix lookup that runs on into the tier copies its blocks back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pikaserve.kv.host_tier import HostKVTier


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


def chain_hash(parent: int | None, tokens: Sequence[int]) -> int:
    return hash((parent, tuple(tokens)))


def salt_root(salt: str | None) -> int | None:
    """The parent of a request's first block hash: a salt starts a chain of its own, so
    equal tokens under different salts never share a cached block."""
    return None if salt is None else hash(("cache_salt", salt))


def extend_hashes(
    hashes: list[int], tokens: Sequence[int], num_blocks: int, block_size: int, salt: str | None
) -> None:
    """Appends the chained hashes of `tokens`' full blocks until `hashes` has `num_blocks`."""
    while len(hashes) < num_blocks:
        b = len(hashes)
        parent = hashes[-1] if hashes else salt_root(salt)
        hashes.append(chain_hash(parent, tokens[b * block_size : (b + 1) * block_size]))


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 tier: HostKVTier | None = None) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() from the end
        # cached, unreferenced: block id -> its hash
        self._evictable: OrderedDict[int, int] = OrderedDict()
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.tier = tier if enable_prefix_caching else None
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of which found (in either tier)

    # --- capacity -----------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation can take: truly free plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # --- allocation ---------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks with ref_count 1, or None (and nothing taken) if they don't fit."""
        if n > self.num_free_blocks:
            return None
        out, evicted = self._take(n)
        if self.tier is not None:
            self.tier.offload(evicted)
        return out

    def _take(self, n: int) -> tuple[list[int], list[tuple[int, int]]]:
        """n blocks (n fits), and the (block id, hash) of the cached ones evicted for them,
        whose contents are still intact."""
        out, evicted = [], []
        for _ in range(n):
            if self._free:
                block_id = self._free.pop()
            else:
                block_id, block_hash = self._evictable.popitem(last=False)  # least recently freed
                del self._cached[block_hash]
                self.blocks[block_id].block_hash = None
                evicted.append((block_id, block_hash))
            self.blocks[block_id].ref_count = 1
            out.append(block_id)
        return out, evicted

    def grow(self, block_ids: list[int], num_tokens: int) -> bool:
        """Extends a sequence's blocks until they hold `num_tokens`; False (and nothing
        taken) when the blocks it needs do not fit."""
        need = -(-num_tokens // self.block_size) - len(block_ids)
        if need <= 0:
            return True
        blocks = self.allocate(need)
        if blocks is None:
            return False
        block_ids.extend(blocks)
        return True

    def free(self, block_ids: Sequence[int]) -> None:
        # Free the tail first so a prefix's head blocks are evicted last.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    self._free.append(block_id)
                else:
                    self._evictable[block_id] = block.block_hash

    # --- prefix cache -------------------------------------------------------------------
    def match_prefix(self, block_hashes: Sequence[int]) -> list[int]:
        """Take a reference on the longest run of cached blocks matching these hashes."""
        found = []
        if self.enable_prefix_caching:
            for h in block_hashes:
                block_id = self._cached.get(h)
                if block_id is None:
                    break
                found.append(block_id)
        for block_id in found:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._evictable[block_id]
            block.ref_count += 1
        if self.tier is not None:
            found += self._restore(self.tier, block_hashes[len(found):])
        return found

    def _restore(self, tier: HostKVTier, block_hashes: Sequence[int]) -> list[int]:
        """Fresh blocks holding the tier's copies of the run of these blocks it has (as many
        as fit in the pool), published again."""
        run: list[int] = []
        for h in block_hashes:
            if h not in tier or len(run) == self.num_free_blocks:
                break
            run.append(h)
        if not run:
            return []
        block_ids, evicted = self._take(len(run))
        tier.offload(evicted, keep=run)  # before the restore overwrites those blocks
        tier.restore(list(zip(run, block_ids)))
        for block_id, block_hash in zip(block_ids, run):
            self.cache_block(block_id, block_hash)
        return block_ids

    def cache_block(self, block_id: int, block_hash: int) -> None:
        """Publish a block that just became full; the first copy of a prefix wins."""
        if not self.enable_prefix_caching or block_hash in self._cached:
            return
        self.blocks[block_id].block_hash = block_hash
        self._cached[block_hash] = block_id

    def record_lookup(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit

    def reset_prefix_cache(self) -> bool:
        """Drop every unreferenced cached block; False if some cached block is still in use."""
        for block_id, block_hash in self._evictable.items():
            del self._cached[block_hash]
            self.blocks[block_id].block_hash = None
            self._free.append(block_id)
        self._evictable.clear()
        if self.tier is not None:
            self.tier.clear()
        return not self._cached
