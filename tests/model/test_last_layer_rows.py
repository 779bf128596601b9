"""A prefill's last layer runs only the logits rows past attention (LlamaForCausalLM.forward):
the same logits, fewer rows through its output projection and MLP."""

from __future__ import annotations

import pytest
import torch

from pikaserve.kernels import q4_matmul
from pikaserve.llm import LLM

from .conftest import Q
from .test_cpu_weights import prefill_logits

PROMPT = [1, 17, 42, 99, 5, 23, 8, 64, 3]


def rows_into(linear, seen: list[int]) -> None:
    """Records the rows of each input to `linear`."""
    forward = linear.forward

    def counted(x):
        seen.append(x.shape[0])
        return forward(x)

    linear.forward = counted


@pytest.mark.skipif(not q4_matmul.available(), reason="x86 AVX2 kernels")
def test_the_logits_keep_their_bits_on_the_integer_kernels(tiny_gguf):
    llm = LLM(str(tiny_gguf("llama", Q.Q4_1).path), dtype="float32", q4_int8_matmul="on",
              enable_prefix_caching=False)
    layers = llm.engine.runner.model.decoder_layers
    last, first = [], []
    rows_into(layers[-1].gate_up_proj, last)
    rows_into(layers[0].gate_up_proj, first)
    every = prefill_logits(llm, PROMPT, every_row=True)
    assert last == first == [len(PROMPT)]  # every row's logits asked for: nothing skipped
    assert torch.equal(prefill_logits(llm, PROMPT), every[-1])
    assert last[-1] == 1 and first[-1] == len(PROMPT)


def test_greedy_tokens_unchanged_on_float_weights(tiny_model_dir):
    """Later steps read the keys and values every row of the last layer still wrote."""
    from pikaserve.engine.sampling_params import SamplingParams

    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", enable_prefix_caching=False)
    every = prefill_logits(llm, PROMPT, every_row=True)
    torch.testing.assert_close(prefill_logits(llm, PROMPT), every[-1], rtol=1e-5, atol=1e-5)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    pruned = llm.generate([PROMPT], params)[0].token_ids
    model = llm.engine.runner.model
    forward = model.forward

    def every_row(ids, positions, kv_caches, meta, rows, *args, **kwargs):
        """Asks for every row's logits, so the last layer runs them all, as before."""
        logits, _ = forward(ids, positions, kv_caches, meta, torch.arange(ids.shape[0]),
                            *args, **kwargs)
        return logits[rows], None

    model.forward = every_row
    try:
        full = llm.generate([PROMPT], params)[0].token_ids
    finally:
        del model.forward
    assert pruned == full
