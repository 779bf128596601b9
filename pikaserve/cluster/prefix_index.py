"""What each replica has cached, as the router sees it: the chained block hashes of the prompts
it sent there (the same hashes the replicas' prefix caches use, kv/block_pool.py), least
recently used dropped first once a replica's share passes its capacity.

It is a model of the replicas' caches, not a copy: a replica may have evicted a block the
index still lists (then the request recomputes it there, as it would anywhere), and the index
forgets a replica that goes away.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence


class PrefixIndex:
    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError("the prefix index needs room for at least one block per replica")
        self.capacity_blocks = capacity_blocks
        self._blocks: dict[Hashable, OrderedDict[int, None]] = {}

    def matched_blocks(self, replica: Hashable, block_hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt the replica is thought to hold."""
        held = self._blocks.get(replica)
        if not held:
            return 0
        n = 0
        for h in block_hashes:
            if h not in held:
                break
            n += 1
        return n

    def num_blocks(self, replica: Hashable) -> int:
        """Blocks the replica is thought to hold."""
        return len(self._blocks.get(replica, ()))

    def record(self, replica: Hashable, block_hashes: Sequence[int]) -> None:
        """A prompt with these blocks was sent to `replica`: it will hold them."""
        held = self._blocks.setdefault(replica, OrderedDict())
        for h in block_hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity_blocks:
            held.popitem(last=False)

    def retain(self, replicas: Iterable[Hashable]) -> None:
        """Forgets every replica not among `replicas` (gone, or replaced)."""
        keep = set(replicas)
        for replica in [r for r in self._blocks if r not in keep]:
            del self._blocks[replica]
