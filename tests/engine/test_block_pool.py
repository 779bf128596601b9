"""BlockPool: allocation, refcounts, hash-chained prefix cache, LRU eviction."""

from pikaserve.kv.block_pool import BlockPool, chain_hash


def test_allocate_and_free_returns_everything():
    pool = BlockPool(4, 16, enable_prefix_caching=True)
    blocks = pool.allocate(3)
    assert len(blocks) == 3 and pool.num_free_blocks == 1
    assert pool.allocate(2) is None and pool.num_free_blocks == 1  # all-or-nothing
    pool.free(blocks)
    assert pool.num_free_blocks == 4


def test_chain_hash_depends_on_the_whole_prefix():
    a = chain_hash(None, [1, 2])
    assert chain_hash(a, [3, 4]) != chain_hash(chain_hash(None, [9, 9]), [3, 4])
    assert chain_hash(a, [3, 4]) == chain_hash(chain_hash(None, [1, 2]), [3, 4])


def test_cached_blocks_are_reused_then_evicted_lru():
    pool = BlockPool(3, 2, enable_prefix_caching=True)
    h1 = chain_hash(None, [1, 2])
    h2 = chain_hash(h1, [3, 4])
    b = pool.allocate(2)
    pool.cache_block(b[0], h1)
    pool.cache_block(b[1], h2)
    pool.free(b)
    assert pool.num_free_blocks == 3  # cached but evictable counts as free
    assert pool.match_prefix([h1, h2]) == b
    assert pool.num_free_blocks == 1
    pool.free(b)
    # Freed tail-first, so the head block is evicted last.
    taken = pool.allocate(2)
    assert b[0] not in taken[1:] and pool.match_prefix([h1]) == [b[0]]


def test_prefix_caching_off_never_matches():
    pool = BlockPool(2, 2, enable_prefix_caching=False)
    h = chain_hash(None, [1, 2])
    b = pool.allocate(1)
    pool.cache_block(b[0], h)
    pool.free(b)
    assert pool.match_prefix([h]) == []


def test_reset_prefix_cache():
    pool = BlockPool(2, 2, enable_prefix_caching=True)
    b = pool.allocate(1)
    pool.cache_block(b[0], 123)
    pool.free(b)
    assert pool.reset_prefix_cache()
    assert pool.match_prefix([123]) == []
