"""The second tier of the prefix cache (`kv_offloading_size`, vLLM's flag name).

A cached block that the block pool evicts to make room is copied here first, keyed by its
chained hash; a later request whose prefix runs on into blocks held here gets them copied back
into fresh pool blocks instead of recomputing them. The tier lives in host memory (pinned
under CUDA, so the copies are DMA; plain memory on a CPU, where it extends the prefix cache
beyond the KV budget). Least recently used entries go first. Only published blocks, which
belong to no unfinished computation, are ever evicted from the pool, so the tier never holds
a block of an unfinished request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence

import torch


class HostKVTier:
    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV offloading tier needs room for at least one block")
        self.num_blocks = num_blocks
        self._device_caches = kv_caches
        pin = kv_caches[0][0].device.type == "cuda"
        self._host_caches = [
            tuple(torch.zeros((num_blocks, *t.shape[1:]), dtype=t.dtype, pin_memory=pin)
                  for t in layer)
            for layer in kv_caches
        ]
        self._slots: OrderedDict[int, int] = OrderedDict()  # block hash -> host slot, LRU first
        self._free_slots = list(range(num_blocks - 1, -1, -1))
        self.offloaded = 0  # blocks copied into the tier
        self.restored = 0  # blocks copied back on a prefix hit

    @staticmethod
    def block_bytes(kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Host bytes one block takes (every layer's keys and values)."""
        return sum(t[0].numel() * t.element_size() for layer in kv_caches for t in layer)

    @property
    def pinned(self) -> bool:
        """Page-locked (under CUDA): copies to and from the device run as DMA."""
        return self._host_caches[0][0].is_pinned()

    @property
    def num_used_blocks(self) -> int:
        return len(self._slots)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._slots

    def offload(self, blocks: Sequence[tuple[int, int]], keep: Collection[int] = ()) -> None:
        """Copies (block id, hash) pool blocks into the tier, evicting its least recently used
        entries, never one whose hash is in `keep` (about to be restored). A hash already held
        is only marked as recently used."""
        ids: list[int] = []
        slots: list[int] = []
        added: set[int] = set()
        for block_id, block_hash in blocks:
            if block_hash in self._slots:
                self._slots.move_to_end(block_hash)
                continue
            slot = self._take_slot(keep, added)
            if slot is None:
                break
            added.add(block_hash)
            self._slots[block_hash] = slot
            ids.append(block_id)
            slots.append(slot)
        if ids:
            self._copy(self._device_caches, ids, self._host_caches, slots)
            self.offloaded += len(ids)

    def restore(self, blocks: Sequence[tuple[int, int]]) -> None:
        """Copies the tier's copy of each (hash, block id) back into that pool block."""
        slots = []
        for block_hash, _ in blocks:
            slots.append(self._slots[block_hash])
            self._slots.move_to_end(block_hash)
        if slots:
            self._copy(self._host_caches, slots, self._device_caches, [b for _, b in blocks])
            self.restored += len(slots)

    def clear(self) -> None:
        self._free_slots.extend(self._slots.values())
        self._slots.clear()

    def _take_slot(self, keep: Collection[int], added: Collection[int]) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        for block_hash in self._slots:  # least recently used first
            if block_hash not in keep and block_hash not in added:
                return self._slots.pop(block_hash)
        return None

    @staticmethod
    def _copy(src: Sequence[Sequence[torch.Tensor]], src_rows: list[int],
              dst: Sequence[Sequence[torch.Tensor]], dst_rows: list[int]) -> None:
        device = src[0][0].device
        src_index = torch.tensor(src_rows, device=device)
        dst_index = torch.tensor(dst_rows, device=dst[0][0].device)
        for src_layer, dst_layer in zip(src, dst):
            for s, d in zip(src_layer, dst_layer):
                d.index_copy_(0, dst_index, s.index_select(0, src_index).to(d.device))
