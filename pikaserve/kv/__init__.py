"""The KV cache: its tensors (kv_cache.py) and the block pool that hands out their blocks and
keeps the prefix cache (block_pool.py)."""
