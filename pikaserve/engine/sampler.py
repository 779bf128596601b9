"""Turns next-token logits into tokens for a whole batch at once.

Order: penalties -> constraint mask (structured output) -> greedy rows take argmax;
sampled rows get temperature, top-k, top-p and min-p, then an exponential race (Gumbel-style)
that lets seeded requests draw their noise from their own generator.
Logprobs, when asked for, are those of the model's raw distribution (after the mask, before
temperature), like vLLM's default. A token the grammar forbids has logprob -inf, reported as
-9999.0 as vLLM does, so every answer is valid JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pikaserve.engine.request import Request


MIN_LOGPROB = -9999.0


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    # per row: (chosen logprob, [(token_id, logprob), ...] top alternatives) or None
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.vocab_size = vocab_size
        # Requests without a seed of their own draw from this one: a run is reproducible from
        # engine start (EngineConfig.seed), and no global RNG state is touched.
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        logits = logits[:, : self.vocab_size]
        params = [r.sampling for r in requests]
        if any(p.has_penalties for p in params):
            logits = apply_penalties(logits, requests)
        if any(r.constraint is not None for r in requests):
            with torch.inference_mode():  # the model's logits are inference tensors: mask in place
                apply_constraints(logits, requests)
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None

        tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            chosen = _sample(logits[rows], [requests[i] for i in sampled_rows], self.generator)
            tokens[rows] = chosen
        if raw_logprobs is None:
            return SampleResult(tokens.tolist(), [None] * len(requests))
        return _with_logprobs(raw_logprobs, tokens, requests)


def apply_constraints(
    logits: torch.Tensor, requests: list[Request], batched: bool | None = None
) -> None:
    """Sets every logit a request's grammar forbids to -inf, in place.

    On a CPU each row is masked where it lies. Elsewhere each constrained row's allowed tokens
    go into one packed token bitmask on the host (as llguidance computes them, 8 tokens a
    byte), which is copied to the device once and applied to all rows together: a handful of
    kernels per step instead of a few per row. `batched` forces either way (None: batched
    off the CPU).
    """
    held = [(i, c) for i, r in enumerate(requests) if (c := r.constraint) is not None]
    if not (logits.device.type != "cpu" if batched is None else batched):
        for i, c in held:
            c.mask_logits(logits[i])
        return
    rows = [i for i, _ in held]
    vocab = logits.shape[1]
    allowed = np.zeros((len(rows), -(-vocab // 8)), dtype=np.uint8)
    for j, (_, c) in enumerate(held):
        c.allow_bits(allowed[j])
    bits = torch.from_numpy(allowed).to(logits.device, non_blocking=True)
    shifts = torch.arange(8, dtype=torch.uint8, device=logits.device)
    forbidden = ((bits.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1)[:, :vocab] == 0
    index = torch.tensor(rows, device=logits.device)
    masked = logits.index_select(0, index).masked_fill_(forbidden, float("-inf"))
    logits.index_copy_(0, index, masked)


def _sample(
    logits: torch.Tensor, requests: list[Request], generator: torch.Generator
) -> torch.Tensor:
    device = logits.device
    params = [r.sampling for r in requests]
    temps = torch.tensor([p.temperature for p in params], device=device)
    logits = logits / temps.unsqueeze(1)
    top_ks = [p.top_k for p in params]
    top_ps = [p.top_p for p in params]
    if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
        logits = _top_k_top_p(logits, top_ks, top_ps)
    probs = torch.softmax(logits, dim=-1)
    if any(p.min_p > 0 for p in params):
        min_ps = torch.tensor([p.min_p for p in params], device=device)
        threshold = probs.max(dim=-1, keepdim=True).values * min_ps.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    # argmax(p / E) with E ~ Exp(1) draws from p; seeded rows use their own generator.
    noise = torch.empty_like(probs)
    unseeded = [i for i, r in enumerate(requests) if r.generator is None]
    if unseeded:
        shape = (len(unseeded), probs.shape[1])
        noise[unseeded] = torch.empty(shape, device=device).exponential_(generator=generator)
    for i, r in enumerate(requests):
        if r.generator is not None:
            row = torch.empty(probs.shape[1], dtype=probs.dtype)
            noise[i] = row.exponential_(generator=r.generator).to(device)
    return (probs / noise).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    device = logits.device
    # top_k beyond the vocabulary (any size a client sends) means "off"
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=device)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    remove = ranks >= ks.unsqueeze(1)
    ps = torch.tensor(top_ps, device=device, dtype=logits.dtype)
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    # drop a token when the mass strictly before it already reaches top_p; the most likely
    # token always stays (a top_p that underflows float32 would otherwise drop every token)
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= ps.unsqueeze(1)
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """OpenAI presence/frequency penalties on generated tokens; repetition penalty (CTRL-style)
    on prompt and generated tokens, as vLLM does."""
    logits = logits.clone()
    vocab = logits.shape[1]
    for i, r in enumerate(requests):
        p = r.sampling
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1.0:
            # bounded so that neither division nor product overflows float32
            penalty = min(max(p.repetition_penalty, 1e-6), 1e6)
            seen_ids = sorted(t for t in set(r.all_token_ids) if t < vocab)
            seen = torch.tensor(seen_ids, dtype=torch.long, device=logits.device)
            row = logits[i, seen]
            logits[i, seen] = torch.where(row > 0, row / penalty, row * penalty)
        if r.output_token_ids and (p.presence_penalty or p.frequency_penalty):
            out_ids = [t for t in r.output_token_ids if t < vocab]
            out = torch.tensor(out_ids, dtype=torch.long, device=logits.device)
            counts = torch.zeros(vocab, device=logits.device).index_add_(
                0, out, torch.ones(len(out), device=logits.device)
            )
            logits[i] -= counts * p.frequency_penalty + (counts > 0).float() * p.presence_penalty
    return logits


def _with_logprobs(raw: torch.Tensor, tokens: torch.Tensor, requests: list[Request]) -> SampleResult:
    """Tokens, and each asking row's chosen logprob and top alternatives, read back from the
    device in one copy: ids travel as float32 (exact below 2**24) beside the logprobs."""
    ns = [r.sampling.logprobs for r in requests]
    k = max(n or 0 for n in ns)
    chosen = raw.gather(1, tokens[:, None])
    top_vals, top_ids = raw.topk(k, dim=-1) if k else (raw[:, :0], raw[:, :0])
    packed = torch.cat([tokens[:, None].float(), chosen, top_vals, top_ids.float()], dim=1)
    # JSON has no -inf or NaN: forbidden tokens (and degenerate rows) get vLLM's -9999.0
    packed = packed.nan_to_num_(nan=MIN_LOGPROB, neginf=MIN_LOGPROB)
    rows = packed.cpu().tolist()
    token_ids = [int(row[0]) for row in rows]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] = []
    for n, row in zip(ns, rows):
        if n is None:
            logprobs.append(None)
            continue
        alts = [(int(t), v) for t, v in zip(row[2 + k : 2 + k + n], row[2 : 2 + n])]
        logprobs.append((row[1], alts))
    return SampleResult(token_ids, logprobs)
