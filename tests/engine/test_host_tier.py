"""The prefix cache's second tier (kv_offloading_size): evicted cached blocks are kept in host
memory and copied back on a later hit, bit for bit; greedy outputs never change."""

from __future__ import annotations

import pytest
import torch

from pikaserve.config import ConfigError
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.kv.block_pool import BlockPool, chain_hash
from pikaserve.kv.host_tier import HostKVTier
from pikaserve.llm import LLM
from pikaserve.server.metrics import ServerMetrics

BLOCK = 2


def kv_caches(num_blocks: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(num_blocks, BLOCK, 2, 4), torch.zeros(num_blocks, BLOCK, 2, 4))
            for _ in range(layers)]


def fill(caches, block_id: int, value: float) -> None:
    for layer, (k, v) in enumerate(caches):
        k[block_id] = value + layer
        v[block_id] = -value - layer


def contents(caches, block_id: int) -> list[torch.Tensor]:
    return [t[block_id].clone() for layer in caches for t in layer]


def chain(n: int, start: int = 0) -> list[int]:
    hashes: list[int] = []
    for i in range(n):
        hashes.append(chain_hash(hashes[-1] if hashes else None, [start + i, start + i]))
    return hashes


def cached_prefix(pool: BlockPool, caches, hashes: list[int], value: float) -> list[int]:
    """Blocks computed for `hashes`, published and freed (cached, evictable)."""
    blocks = pool.allocate(len(hashes))
    for i, (b, h) in enumerate(zip(blocks, hashes)):
        fill(caches, b, value + i)
        pool.cache_block(b, h)
    pool.free(blocks)
    return blocks


def tiered(pool_blocks: int, tier_blocks: int):
    """KV caches, their tier and a pool over them, with a prefix of `pool_blocks` blocks
    computed, published and freed (cached, evictable)."""
    caches = kv_caches(pool_blocks)
    tier = HostKVTier(caches, tier_blocks)
    pool = BlockPool(pool_blocks, BLOCK, True, tier)
    prefix = chain(pool_blocks)
    blocks = cached_prefix(pool, caches, prefix, 1.0)
    return caches, tier, pool, prefix, blocks


def test_an_evicted_prefix_comes_back_from_the_tier_bit_for_bit():
    caches, tier, pool, a, blocks = tiered(3, 4)
    want = [contents(caches, b) for b in blocks]
    taken = pool.allocate(3)  # evicts all three, overwritten below
    for b in taken:
        fill(caches, b, 99.0)
    assert tier.offloaded == 3 and tier.num_used_blocks == 3
    pool.free(taken)  # unhashed: straight back to the free list
    found = pool.match_prefix(a)
    assert len(found) == 3 and tier.restored == 3
    for b, expected in zip(found, want):
        assert all(torch.equal(x, y) for x, y in zip(contents(caches, b), expected))
    pool.free(found)
    assert pool.match_prefix(a) == found  # republished: a plain pool hit now
    assert tier.restored == 3


def test_the_pool_run_continues_into_the_tier():
    caches, tier, pool, a, _ = tiered(4, 8)
    pool.free(pool.allocate(2))  # evicts the two tail blocks (freed first) into the tier
    assert tier.offloaded == 2
    found = pool.match_prefix(a)
    assert len(found) == 4 and tier.restored == 2
    assert [contents(caches, b)[0][0, 0, 0].item() for b in found] == [1.0, 2.0, 3.0, 4.0]


def test_the_tier_evicts_least_recently_used_and_never_what_is_being_restored():
    caches = kv_caches(2, layers=1)
    tier = HostKVTier(caches, 2)
    tier.offload([(0, 111), (1, 222)])
    assert 111 in tier and 222 in tier
    tier.restore([(111, 0)])  # 111 becomes the most recently used
    tier.offload([(1, 333)])
    assert 111 in tier and 333 in tier and 222 not in tier
    tier.offload([(0, 444)], keep=[111, 333])  # no slot may be taken: dropped
    assert 444 not in tier and tier.num_used_blocks == 2
    tier.offload([(0, 555), (1, 666), (0, 777)])  # one call never overwrites its own copies
    assert {h for h in (111, 333, 555, 666, 777) if h in tier} == {555, 666}


def test_a_restore_takes_no_more_blocks_than_are_free():
    _, _, pool, a, _ = tiered(3, 8)
    held = pool.allocate(3)  # all three offloaded, none free now
    pool.free(held[2:])
    assert len(pool.match_prefix(a)) == 1
    assert pool.num_free_blocks == 0


def test_reset_prefix_cache_empties_the_tier():
    _, tier, pool, a, _ = tiered(2, 4)
    pool.free(pool.allocate(2))
    assert tier.num_used_blocks == 2
    assert pool.reset_prefix_cache()
    assert tier.num_used_blocks == 0 and pool.match_prefix(a) == []


# --- the engine -----------------------------------------------------------------------------
PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PREFIX_TOKENS = 96  # each system prompt: 24 blocks of 4
NUM_PREFIXES = 6
POOL_BLOCKS = 64  # holds two prefixes and their requests, not six
BLOCK_BYTES = 3 * 2 * 16 * 4 * 2 * 4  # tiny llama: 3 layers x 2 KV heads x 16, K and V, fp32


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def prefix_workload() -> list[list[int]]:
    """Rounds over six distinct long prefixes, a new suffix each time: more cached prefixes
    than the pool holds, so each round evicts what the next round needs."""
    gen = torch.Generator().manual_seed(3)
    prefixes = [torch.randint(5, 300, (PREFIX_TOKENS,), generator=gen).tolist()
                for _ in range(NUM_PREFIXES)]
    return [p + torch.randint(5, 300, (5,), generator=gen).tolist()
            for _ in range(3) for p in prefixes]


def serve_one_by_one(model_dir: str, prompts: list[list[int]], **engine_args):
    llm = LLM(model_dir, dtype="float32", max_model_len=128, block_size=4,
              kv_cache_memory_bytes=POOL_BLOCKS * BLOCK_BYTES, **engine_args)
    outs = [llm.generate([p], PARAMS)[0] for p in prompts]
    assert llm.engine.pool_is_idle() and not llm.engine.has_unfinished_requests()
    return outs, llm


def test_the_tier_serves_evicted_prefixes_and_leaves_outputs_unchanged(model_dir):
    prompts = prefix_workload()
    without, plain = serve_one_by_one(model_dir, prompts)
    tiered_outs, tiered = serve_one_by_one(model_dir, prompts, kv_offloading_size=0.01)
    assert plain.engine.pool.num_blocks == POOL_BLOCKS
    assert [o.token_ids for o in tiered_outs] == [o.token_ids for o in without]
    stats = tiered.engine.stats()
    assert stats.kv_offload_restored > 0 and stats.kv_offload_stored > 0
    assert stats.prefix_cache_hits > plain.engine.stats().prefix_cache_hits
    # every later round finds its whole prefix (24 blocks) in one tier or the other
    later = tiered_outs[NUM_PREFIXES:]
    assert all(o.num_cached_tokens >= PREFIX_TOKENS for o in later)
    assert all(o.num_cached_tokens < PREFIX_TOKENS for o in without[NUM_PREFIXES:])
    text = ServerMetrics("m", tiered.engine.stats).render().decode()
    assert f'pikaserve:kv_offload_restored_blocks_total{{model_name="m"}} ' \
           f'{float(stats.kv_offload_restored)}' in text


def test_tier_settings_are_checked(model_dir):
    with pytest.raises(ConfigError, match="prefix caching"):
        LLM(model_dir, dtype="float32", enable_prefix_caching=False, kv_offloading_size=1)
    with pytest.raises(ConfigError, match=">= 0"):
        LLM(model_dir, dtype="float32", kv_offloading_size=-1)
    with pytest.raises(ConfigError, match="holds no KV block"):
        LLM(model_dir, dtype="float32", kv_offloading_size=1e-9)
