"""Every scheduling feature leaves greedy outputs identical to running each request alone."""

from __future__ import annotations

import pytest

from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.llm import LLM
from reference import make_prompts

MAX_TOKENS = 12
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def prompts(model_dir):
    return make_prompts(64, 400)


@pytest.fixture(scope="module")
def alone(model_dir, prompts) -> list[list[int]]:
    """Each request on its own, no prefix caching: the reference."""
    llm = LLM(model_dir, dtype="float32", enable_prefix_caching=False)
    return [llm.generate([p], PARAMS)[0].token_ids for p in prompts]


def run_all(model_dir: str, prompts, **engine_args) -> tuple[list[list[int]], LLM]:
    llm = LLM(model_dir, dtype="float32", max_model_len=128, **engine_args)
    outs = llm.generate(prompts, PARAMS)
    assert llm.engine.pool_is_idle() and not llm.engine.has_unfinished_requests()
    return [o.token_ids for o in outs], llm


@pytest.mark.parametrize(
    "engine_args",
    [
        dict(enable_prefix_caching=True),
        dict(enable_prefix_caching=False),
        dict(block_size=1),
        dict(block_size=16),
        dict(max_num_batched_tokens=7),
        dict(max_num_seqs=5),
    ],
    ids=["prefix-on", "prefix-off", "block-1", "block-16", "chunk-7", "max-seqs-5"],
)
def test_64_concurrent_requests_equal_alone(model_dir, prompts, alone, engine_args):
    outs, _ = run_all(model_dir, prompts, **engine_args)
    assert outs == alone


def test_chunk_of_one_token(model_dir, prompts, alone):
    outs, _ = run_all(model_dir, prompts[:8], max_num_batched_tokens=1)
    assert outs == alone[:8]


def test_prefix_cache_is_used(model_dir, prompts):
    _, llm = run_all(model_dir, prompts, enable_prefix_caching=True)
    assert llm.engine.pool.hits > 0


@pytest.mark.parametrize("tier_gib", [0, 0.01], ids=["pool-only", "with-host-tier"])
def test_forced_preemption(model_dir, prompts, alone, tier_gib):
    # 10 blocks of 16 tokens for 16 concurrent requests of up to ~92 tokens each.
    from pikaserve.kv.kv_cache import bytes_per_token

    llm_probe = LLM(model_dir, dtype="float32", max_model_len=128)
    import torch

    block_bytes = bytes_per_token(llm_probe.engine.model_config, torch.float32) * 16
    outs, llm = run_all(
        model_dir, prompts[:16], block_size=16, kv_cache_memory_bytes=10 * block_bytes,
        kv_offloading_size=tier_gib,
    )
    assert llm.engine.pool.num_blocks == 10
    assert llm.engine.scheduler.num_preemptions > 0
    assert outs == alone[:16]
    if tier_gib:  # preempted requests' blocks went through the tier and came back
        assert llm.engine.stats().kv_offload_restored > 0
