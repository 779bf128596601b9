"""On a CUDA GPU: the engine against transformers on the same GPU, graphs against eager, the
kernels on real hardware. Skipped without a GPU (the GPU check, benchmarks/gpu/check.sh, runs
them). The Triton kernels' CPU tests are in tests/attention and tests/kernels."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_KINDS
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.llm import LLM
from reference import PROMPTS, assert_matches_reference, hf_greedy, make_prompts

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

NEW_TOKENS = 24
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# In half precision two kernels that sum in different orders may round a near-tie either way;
# a greedy divergence is accepted only where transformers' own top two logprobs were that close.
TIE = {"float16": 2e-2, "bfloat16": 6e-2}


def greedy(llm: LLM, prompts, n: int = NEW_TOKENS):
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=2)
    return llm.generate(prompts, params)


def assert_same_up_to_ties(got: list[int], want: list[int], top2_gaps: list[float], tie: float):
    """Equal tokens, except that at a step where the reference's top two were within `tie` the
    two may part (and then go on as different texts)."""
    for step, (g, w) in enumerate(zip(got, want)):
        if g != w:
            assert top2_gaps[step] < tie, (step, g, w, top2_gaps[step])
            return
    assert len(got) == len(want)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_greedy_matches_transformers_on_cuda(kind, dtype, tiny_model_dir):
    import transformers

    path = tiny_model_dir(kind)
    # cast after loading: older transformers (on GPU machines) ignore `dtype=`
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).to("cuda", DTYPES[dtype]).eval()
    llm = LLM(str(path), dtype=dtype, device="cuda")
    assert llm.engine.runner.backend.name == "triton" and llm.engine.runner.graphs is not None
    for out in greedy(llm, PROMPTS):
        want, ref_logprobs = hf_greedy(hf, out.prompt_token_ids, NEW_TOKENS)
        gaps = [float(top2[0] - top2[1]) for top2 in (lp.topk(2).values for lp in ref_logprobs)]
        assert_same_up_to_ties(out.token_ids, want, gaps, TIE[dtype])


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_float32_matches_transformers_exactly(kind, tiny_model_dir):
    import transformers

    path = tiny_model_dir(kind)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager").to("cuda", torch.float32).eval()
    llm = LLM(str(path), dtype="float32", device="cuda")
    assert_matches_reference(llm, hf, PROMPTS, max_tokens=NEW_TOKENS)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphs_equal_eager(dtype, tiny_model_dir):
    """Replayed graphs compute what eager passes do. cuBLAS may pick another algorithm for a
    padded row count, so bfloat16 is compared up to near-ties; float32 exactly."""
    path = str(tiny_model_dir("qwen3"))
    prompts = make_prompts(24, 400, seed=7)
    eager = greedy(LLM(path, dtype=dtype, device="cuda", enforce_eager=True), prompts)
    graphed_llm = LLM(path, dtype=dtype, device="cuda", max_cudagraph_capture_size=64)
    graphed = greedy(graphed_llm, prompts)
    graphs = graphed_llm.engine.runner.graphs
    assert graphs.graphs and graphs.num_steps > 0  # captured, and replayed
    for g, e in zip(graphed, eager):
        if dtype == "float32":
            assert g.token_ids == e.token_ids
            assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(g.logprobs, e.logprobs))
        else:
            gaps = [lp.top[0][1] - lp.top[1][1] for lp in e.logprobs]
            assert_same_up_to_ties(g.token_ids, e.token_ids, gaps, TIE[dtype])


def test_scheduling_features_leave_greedy_unchanged(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    prompts = make_prompts(48, 400, seed=11)
    alone = [greedy(LLM(path, dtype="float32", device="cuda", enable_prefix_caching=False),
                    [p])[0].token_ids for p in prompts[:8]]
    llm = LLM(path, dtype="float32", device="cuda", max_num_batched_tokens=37, block_size=2,
              max_model_len=128)
    outs = greedy(llm, prompts)
    assert [o.token_ids for o in outs[:8]] == alone
    assert llm.engine.pool.hits > 0 and llm.engine.pool_is_idle()


def test_fp8_kv_cache(tiny_model_dir):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    path = str(tiny_model_dir("llama"))
    llm = LLM(path, dtype="bfloat16", device="cuda", kv_cache_dtype="fp8")
    assert llm.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    full = LLM(path, dtype="bfloat16", device="cuda")
    got, want = greedy(llm, PROMPTS), greedy(full, PROMPTS)
    # e4m3 keeps ~2 significant digits: answers agree except where bf16's top two were close
    for g, w in zip(got, want):
        gaps = [lp.top[0][1] - lp.top[1][1] for lp in w.logprobs]
        assert_same_up_to_ties(g.token_ids, w.token_ids, gaps, 0.3)


def test_sampling_on_the_device_is_seeded(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    llm = LLM(path, dtype="float32", device="cuda")
    params = SamplingParams(max_tokens=16, temperature=0.9, top_k=50, top_p=0.9, min_p=0.05,
                            seed=1234)
    first = [o.token_ids for o in llm.generate(PROMPTS, params)]
    again = [o.token_ids for o in llm.generate(PROMPTS, params)]
    assert first == again


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculation_leaves_greedy_unchanged(method, tiny_model_dir):
    """Proposals checked in graphed passes, and a draft model's own passes on the device: the
    same tokens as without speculation (float32), with proposals accepted."""
    path = str(tiny_model_dir("llama"))
    config = {"method": method, "num_speculative_tokens": 4, "disable_by_batch_size": 64}
    config.update({"prompt_lookup_max": 3, "prompt_lookup_min": 1} if method == "ngram"
                  else {"model": path})
    prompts = make_prompts(12, 400, seed=5) + [[7, 8, 9, 10] * 8, [20, 21] * 15]
    want = greedy(LLM(path, dtype="float32", device="cuda"), prompts)
    llm = LLM(path, dtype="float32", device="cuda", speculative_config=config)
    got = greedy(llm, prompts)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    stats = llm.engine.stats()
    assert stats.spec_decode_num_accepted_tokens > 0 and llm.engine.pool_is_idle()


def test_the_host_tier_under_cuda_keeps_greedy_unchanged(tiny_model_dir):
    """Evicted prefix blocks go to pinned host memory and come back into a graphed engine's
    cache: the same tokens as recomputing them."""
    path = str(tiny_model_dir("llama"))
    gen = torch.Generator().manual_seed(3)
    prefixes = [torch.randint(5, 300, (96,), generator=gen).tolist() for _ in range(6)]
    prompts = [p + torch.randint(5, 300, (5,), generator=gen).tolist()
               for _ in range(3) for p in prefixes]
    block_bytes = 3 * 2 * 16 * 4 * 2 * 4  # tiny llama, float32, blocks of 4 tokens
    common = dict(dtype="float32", device="cuda", block_size=4, max_model_len=128,
                  kv_cache_memory_bytes=64 * block_bytes)  # two prefixes' worth, not six
    outs = {}
    for tier_gib in (0, 0.01):
        llm = LLM(path, kv_offloading_size=tier_gib, **common)
        outs[tier_gib] = [greedy(llm, [p], 6)[0].token_ids for p in prompts]
        assert llm.engine.pool_is_idle()
    assert outs[0.01] == outs[0]
    tier = llm.engine.pool.tier
    assert tier is not None and tier.restored > 0
    assert tier.pinned
