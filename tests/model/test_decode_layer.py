"""Decode steps on the decode-layer kernel (kernels/decode_layer.py): the same tokens and the
same logprobs, bit for bit, as the layers called op by op, alone, batched and verifying
n-gram drafts; and only for the models it covers."""

from __future__ import annotations

import pytest

from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.kernels import q4_matmul
from pikaserve.llm import LLM

from .conftest import Q

PROMPTS = [[1, 7, 3], [4, 9, 2, 6, 5, 8, 3, 1, 12, 7, 7], [2, 5, 2, 5, 2, 5, 2, 5]]
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
        "prompt_lookup_min": 1}

pytestmark = pytest.mark.skipif(not q4_matmul.available(), reason="x86 AVX2 kernels")


def generate(llm: LLM, in_c: bool, prompts) -> tuple[list, int]:
    """Greedy completions with logprobs, and how many layer fronts ran in C."""
    model = llm.engine.runner.model
    kernel = model.decode_kernel
    calls = 0
    front = kernel.front

    def counted(*args, **kwargs):
        nonlocal calls
        calls += 1
        return front(*args, **kwargs)

    kernel.front = counted
    model.decode_kernel = kernel if in_c else None
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0,
                                                    ignore_eos=True, logprobs=3))
    finally:
        model.decode_kernel = kernel
        del kernel.front
    return [(o.token_ids, [repr(lp) for lp in o.logprobs]) for o in outs], calls


@pytest.mark.parametrize("spec", [None, SPEC], ids=["plain", "ngram"])
def test_decode_steps_in_c_give_the_same_bits(tiny_gguf, spec):
    # no prefix caching: a prompt found cached would be attended by the row kernel, not the
    # prefill-chunk one, and those two sum in different orders
    llm = LLM(str(tiny_gguf("llama", Q.Q4_1).path), dtype="float32", q4_int8_matmul="on",
              speculative_config=spec, enable_prefix_caching=False)
    layers = len(llm.engine.runner.model.layers)
    for prompts in (PROMPTS[:1], PROMPTS):
        in_c, calls = generate(llm, True, prompts)
        op_by_op, none = generate(llm, False, prompts)
        assert in_c == op_by_op
        assert none == 0 and calls >= 10 * layers  # the decode steps ran in C


def test_only_models_it_covers(tiny_gguf):
    def kernel(arch, qtype, **kwargs):
        llm = LLM(str(tiny_gguf(arch, qtype).path), dtype="float32", **kwargs)
        return llm.engine.runner.model.decode_kernel

    assert kernel("llama", Q.Q4_K, q4_int8_matmul="on") is not None
    assert kernel("qwen2", Q.Q4_K, q4_int8_matmul="on") is None  # q/k/v biases
    assert kernel("llama", Q.Q4_1) is None  # an explicit float32 stays the exact model
    assert kernel("llama", Q.Q4_1, q4_int8_matmul="on", cpu_kernels="torch") is None
