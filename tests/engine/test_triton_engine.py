"""The triton attention backend and the padded (CUDA-graph) pass through the whole engine.

On a CPU the kernels run under TRITON_INTERPRET=1; on CUDA the same tests run on the GPU.
What only a GPU can show (capture and replay, fp16/bf16 against transformers on CUDA) is in
tests/cuda/.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_KINDS
from pikaserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
from pikaserve.llm import LLM
from reference import PROMPTS, assert_matches_reference, make_prompts

pytest.importorskip("triton")
pytestmark = [pytest.mark.triton, pytest.mark.slow]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)


def triton_llm(path, **kw) -> LLM:
    kw.setdefault("enforce_eager", True)  # graphs are what the padded tests below add
    return LLM(str(path), dtype="float32", device=DEVICE, attention_backend="triton", **kw)


def with_padded_passes(llm: LLM, sizes=(1, 2, 4, 8, 16, 32)) -> LLM:
    """Routes every step of up to 32 tokens through CudaGraphs' padded buffers; on a CPU
    (nothing to capture) they run eagerly, which is the path capture records on a GPU."""
    from pikaserve.engine.cuda_graphs import CudaGraphs

    runner = llm.engine.runner
    width = -(-llm.engine.max_model_len // llm.engine.config.block_size)
    runner.graphs = CudaGraphs(runner.model, runner.kv_caches, runner.backend, list(sizes),
                               width, runner.device)
    return llm


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_models_match_transformers(kind, tiny_model_dir):
    import transformers

    path = tiny_model_dir(kind)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = triton_llm(path)
    assert llm.engine.runner.backend.name == "triton"
    assert_matches_reference(llm, hf.to(DEVICE), PROMPTS, max_tokens=12)


def test_batched_prefix_cached_and_chunked_equal_alone(tiny_model_dir):
    path = tiny_model_dir("llama")
    prompts = make_prompts(8, 400, seed=3)
    alone = [triton_llm(path).generate([p], GREEDY)[0].token_ids for p in prompts[:3]]
    llm = triton_llm(path, max_num_batched_tokens=23, block_size=2, max_model_len=128)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs[:3]] == alone
    assert llm.engine.pool.hits > 0 and llm.engine.pool_is_idle()


def test_padded_passes_equal_unpadded(tiny_model_dir):
    """Decodes, prefill chunks over cached prefixes and ragged batches, padded to 1..32-token
    sizes: the same tokens and logprobs as the unpadded passes."""
    path = tiny_model_dir("qwen3")
    prompts = make_prompts(4, 400, seed=5)
    plain = triton_llm(path, max_num_batched_tokens=40, max_model_len=128)
    padded = with_padded_passes(triton_llm(path, max_num_batched_tokens=40, max_model_len=128))
    want = plain.generate(prompts, GREEDY)
    got = padded.generate(prompts, GREEDY)
    assert plain.engine.num_forward_passes == padded.engine.num_forward_passes
    # most steps padded; prefill chunks over 32 tokens eager
    assert 0 < padded.engine.runner.graphs.num_steps < padded.engine.num_forward_passes
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        for a, b in zip(g.logprobs, w.logprobs):
            assert abs(a.logprob - b.logprob) < 1e-5
    assert padded.engine.pool_is_idle()


def test_padded_passes_with_grammar_drafts(tiny_model_dir):
    """Structured output (forced tokens and drafts, several rows per request) through the
    padded passes gives the answers of the unpadded ones."""
    path = tiny_model_dir("llama")
    schema = {"type": "object", "properties": {"emotion": {"enum": ["happy", "sad", "calm"]},
              "learn_score": {"type": "boolean"}}, "required": ["emotion", "learn_score"],
              "additionalProperties": False}
    params = SamplingParams(max_tokens=40, temperature=0,
                            structured_outputs=StructuredOutputsParams(json=schema))
    prompts = ["Hello world! How are", "The quick brown fox", "Xin chào!"]
    want = [o.text for o in triton_llm(path).generate(prompts, params)]
    padded = with_padded_passes(triton_llm(path))
    got = [o.text for o in padded.generate(prompts, params)]
    assert got == want
    assert padded.engine.runner.graphs.num_steps == padded.engine.num_forward_passes
