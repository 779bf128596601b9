"""The LM head over a subset of the vocabulary (the tokens a grammar allows next)."""

from __future__ import annotations

import torch

from pikaserve.llm import LLM

from .test_cpu_weights import prefill_logits


def test_logits_of_allowed_tokens_equal_the_full_head(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32")
    prompt = [1, 17, 42, 99, 5]
    full = prefill_logits(llm, prompt)
    rows = torch.tensor([3, 10, 42, full.shape[0] - 1])
    part = prefill_logits(llm, prompt, vocab_rows=rows)
    torch.testing.assert_close(part[rows], full[rows], rtol=1e-5, atol=1e-5)
    others = torch.ones(full.shape[0], dtype=torch.bool)
    others[rows] = False
    assert torch.isneginf(part[others]).all()


def test_grammar_held_steps_compute_only_allowed_rows(tiny_model_dir, monkeypatch):
    from pikaserve.engine.sampling_params import SamplingParams, StructuredOutputsParams

    llm = LLM(str(tiny_model_dir("llama")), dtype="float32")
    seen = []
    execute = llm.engine.runner.execute
    monkeypatch.setattr(
        llm.engine.runner, "execute", lambda out, rows=None: seen.append(rows) or execute(out, rows)
    )
    so = StructuredOutputsParams(choice=["yes please", "no thanks", "maybe"])
    params = SamplingParams(max_tokens=8, temperature=0, structured_outputs=so)
    out = llm.generate(["Answer:"], params)
    assert out[0].text in {"yes please", "no thanks", "maybe"}
    assert seen and all(rows is not None and len(rows) <= 3 for rows in seen)
    llm.generate(["Answer:"], SamplingParams(max_tokens=2, temperature=0))  # unconstrained
    assert seen[-1] is None
