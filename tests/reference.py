"""Hugging Face transformers as the correctness reference: plain greedy decoding, no tricks."""

from __future__ import annotations

import torch


def hf_greedy(model, prompt_ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the log-softmax of every step, EOS treated as an ordinary token."""
    tokens: list[int] = []
    logprobs: list[torch.Tensor] = []
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(n):
            logits = out.logits[0, -1].float()
            logprobs.append(torch.log_softmax(logits, -1))
            tokens.append(int(logits.argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                        use_cache=True)
    return tokens, logprobs
