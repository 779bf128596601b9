"""Speculative decoding with a draft model (engine/draft_model.py): outputs are those without
speculation, whatever the draft guesses; the draft's own KV cache leaks nothing and caches only
the requests' own tokens.

Drafts: the target itself (its greedy guesses are the target's greedy tokens: accepted), a tiny
Qwen2 sharing the target's tokenizer (random: mostly rejected), and models that do not share
it (refused at start).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pikaserve.config import ConfigError
from pikaserve.data import pika_answer_schema
from pikaserve.engine.draft_model import DraftModelProposer
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.engine.sampling_params import StructuredOutputsParams as S
from pikaserve.kv.block_pool import chain_hash, salt_root
from pikaserve.kv.kv_cache import bytes_per_token
from pikaserve.llm import LLM
from test_speculative import GREEDY, greedy_variants, run, same


NEAR_NOISE = 0.01


def draft_config(path, k: int = 4) -> dict:
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": k,
            "disable_by_batch_size": 64}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def other_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir("qwen2"))


@pytest.fixture(scope="module")
def near_dir(model_dir, tmp_path_factory) -> str:
    """The target with noise on its weights: a draft whose guesses are partly accepted."""
    import transformers

    path = tmp_path_factory.mktemp("near_draft")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * NEAR_NOISE)
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def plain(model_dir) -> LLM:
    return LLM(model_dir, dtype="float32", max_model_len=256)


@pytest.fixture(scope="module")
def itself(model_dir) -> LLM:
    return LLM(model_dir, dtype="float32", max_model_len=256,
               speculative_config=draft_config(model_dir))


@pytest.fixture(scope="module")
def other(model_dir, other_dir) -> LLM:
    return LLM(model_dir, dtype="float32", max_model_len=256,
               speculative_config=draft_config(other_dir))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    from reference import make_prompts

    return make_prompts(10, 400)


def proposer(llm: LLM) -> DraftModelProposer:
    p = llm.engine.proposer
    assert isinstance(p, DraftModelProposer)
    return p


def draft_pool_is_idle(llm: LLM) -> bool:
    pool = proposer(llm).pool
    return pool.num_free_blocks == pool.num_blocks


# --- outputs ------------------------------------------------------------------------------
def test_the_target_as_its_own_draft_is_accepted_and_saves_passes(plain, itself, prompts):
    ps = greedy_variants(len(prompts))
    want, _ = run(plain, prompts, [GREEDY] * len(prompts))
    got, counts = run(itself, prompts, [GREEDY] * len(prompts))
    assert same(got, want) and draft_pool_is_idle(itself)
    assert counts.drafts > 0 and counts.accepted == counts.draft_tokens
    before = (plain.engine.num_forward_passes, itself.engine.num_forward_passes)
    for p, w in zip(prompts[:3], want):
        assert same(run(itself, [p], [GREEDY])[0], [w])
        run(plain, [p], [GREEDY])
    plain_passes = plain.engine.num_forward_passes - before[0]
    spec_passes = itself.engine.num_forward_passes - before[1]
    assert spec_passes * 3 < plain_passes  # 4 guesses + 1 sampled token per pass
    want, _ = run(plain, prompts, ps)  # penalties see the tokens of earlier rounds
    got, _ = run(itself, prompts, ps)
    assert same(got, want)


def test_a_different_draft_is_mostly_rejected_and_changes_nothing(plain, other, prompts):
    ps = greedy_variants(len(prompts))
    want, _ = run(plain, prompts, ps)
    got, counts = run(other, prompts, ps)
    assert same(got, want) and draft_pool_is_idle(other)
    assert counts.drafts > 0 and counts.rejected > counts.accepted
    for p, q, w in zip(prompts[:3], ps, want):
        assert same(run(other, [p], [q])[0], [w])


@pytest.mark.parametrize("which", ["itself", "other"])
def test_seeded_sampling_is_the_same_token_for_token(plain, itself, other, prompts, which):
    llm = itself if which == "itself" else other
    ps = [SamplingParams(max_tokens=30, temperature=0.5, seed=i, ignore_eos=True,
                         logprobs=2 if i % 2 else None) for i in range(len(prompts))]
    want, _ = run(plain, prompts, ps)
    got, counts = run(llm, prompts, ps)
    assert same(got, want) and counts.drafts > 0
    if llm is itself:  # the greedy guess is sometimes the token sampled
        assert counts.accepted > 0


def test_stops_max_tokens_and_the_context_end(model_dir, plain, itself, prompts):
    base, _ = run(plain, prompts, [GREEDY] * len(prompts))
    ps = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                         stop=[r.text[len(r.text) // 2 : len(r.text) // 2 + 2]])
          if i % 2 else
          SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                         stop_token_ids=[r.token_ids[len(r.token_ids) // 2]])
          for i, r in enumerate(base)]
    want, _ = run(plain, prompts, ps)
    got, _ = run(itself, prompts, ps)
    assert same(got, want) and all(r.finish_reason == "stop" for r in got)
    for max_tokens in (1, 2, 3, 5, 6, 7):
        q = [SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)]
        assert same(run(itself, prompts, q * len(prompts))[0],
                    run(plain, prompts, q * len(prompts))[0])
    short = LLM(model_dir, dtype="float32", max_model_len=96,
                speculative_config=draft_config(model_dir))
    got, counts = run(short, prompts, [SamplingParams(max_tokens=None, temperature=0,
                                                      ignore_eos=True)] * len(prompts))
    want, _ = run(plain, prompts, [SamplingParams(max_tokens=96 - len(p), temperature=0,
                                                  ignore_eos=True) for p in prompts])
    assert same(got, want) and counts.accepted > 0
    assert all(r.finish_reason == "length" for r in got)


def test_structured_output_keeps_its_grammar_drafts(plain, other, prompts):
    pika = SamplingParams(max_tokens=40, temperature=0, structured_outputs=S(
        json=pika_answer_schema()))
    ps = [pika if i % 2 else GREEDY for i in range(len(prompts))]
    want, _ = run(plain, prompts, ps)
    got, counts = run(other, prompts, ps)
    assert same(got, want) and counts.drafts > 0
    for r in got[1::2]:
        assert set(json.loads(r.text)) == {"emotion", "learn_score"}


# --- the draft's cache --------------------------------------------------------------------
def record_proposals(llm: LLM, monkeypatch) -> list[tuple[list[int], list[int]]]:
    """(the request's tokens, what the draft proposed after them), for each proposal."""
    seen = []
    continuations = DraftModelProposer.continuations

    def recording(self, wanted):
        out = continuations(self, wanted)
        seen.extend((list(req.all_token_ids), tokens) for (req, _, _), tokens in zip(wanted, out)
                    if tokens)
        return out

    monkeypatch.setattr(DraftModelProposer, "continuations", recording)
    return seen


def assert_draft_greedy(draft_dir: str, proposals) -> None:
    """Each proposal is the draft model's own greedy continuation of the request's tokens:
    its cache was caught up, rolled back and reused right."""
    draft = LLM(draft_dir, dtype="float32", max_model_len=256)
    outs = draft.generate([t for t, _ in proposals],
                          [SamplingParams(max_tokens=len(p), temperature=0, ignore_eos=True)
                           for _, p in proposals])
    assert [o.token_ids for o in outs] == [p for _, p in proposals]


def test_proposals_are_the_drafts_greedy_tokens(model_dir, near_dir, plain, prompts,
                                                monkeypatch):
    """With a pool too small for the batch (preemption) and a token budget smaller than the
    prompts (the draft catches up in chunks), mostly rejected proposals (rolled back): each
    proposal is still what the draft model alone decodes, outputs are unchanged and neither
    pool leaks."""
    block_bytes = bytes_per_token(plain.engine.model_config, torch.float32) * 16
    small = LLM(model_dir, dtype="float32", max_model_len=128, block_size=16,
                kv_cache_memory_bytes=16 * block_bytes, max_num_batched_tokens=24,
                speculative_config=draft_config(near_dir))
    assert small.engine.pool.num_blocks == proposer(small).pool.num_blocks == 8  # half each
    batch = prompts * 2
    proposals = record_proposals(small, monkeypatch)
    want, _ = run(plain, batch, [GREEDY] * len(batch))
    got, counts = run(small, batch, [GREEDY] * len(batch))
    assert small.engine.scheduler.num_preemptions > 0
    assert same(got, want) and counts.rejected > 0 and counts.accepted > 0
    assert draft_pool_is_idle(small)
    assert len(proposals) >= counts.drafts  # some did not fit in the token budget
    assert_draft_greedy(near_dir, proposals)


def test_the_draft_cache_holds_only_the_requests_own_tokens(model_dir, other_dir, plain,
                                                           prompts, monkeypatch):
    other = LLM(model_dir, dtype="float32", max_model_len=256,
                speculative_config=draft_config(other_dir))
    got, counts = run(other, prompts, [GREEDY] * len(prompts))
    assert counts.rejected > 0
    pool = proposer(other).pool
    bs, kept = pool.block_size, set()
    for p, r in zip(prompts, got):
        tokens, h = p + r.token_ids, salt_root(None)
        for b in range(len(tokens) // bs):
            h = chain_hash(h, tokens[b * bs : (b + 1) * bs])
            kept.add(h)
    published = {b.block_hash for b in pool.blocks if b.block_hash is not None}
    assert published and published <= kept
    # a second run finds the prompts in the draft's prefix cache, proposes and answers the same
    hits = pool.hits
    longer = [p + r.token_ids for p, r in zip(prompts, got)]
    proposals = record_proposals(other, monkeypatch)
    assert same(run(other, longer, [GREEDY] * len(longer))[0],
                run(plain, longer, [GREEDY] * len(longer))[0])
    assert draft_pool_is_idle(other)
    assert pool.hits - hits > sum(map(len, prompts))  # outputs' blocks were reused too
    assert_draft_greedy(other_dir, proposals)


def test_aborts_free_the_draft_blocks(itself, prompts):
    engine = itself.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"abort-{i}", p, GREEDY)
    for _ in range(3):
        engine.step()
    assert not draft_pool_is_idle(itself)
    for i in range(len(prompts)):
        engine.abort_request(f"abort-{i}")
    assert engine.pool_is_idle() and draft_pool_is_idle(itself) and not engine.requests


# --- configuration ------------------------------------------------------------------------
def test_a_draft_must_share_the_tokenizer(model_dir, tmp_path):
    import transformers

    bigger = tmp_path / "bigger_vocab"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    model.save_pretrained(bigger)
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(bigger)
    with pytest.raises(ConfigError, match="vocabulary of .* tokens, the target .* must share"):
        LLM(model_dir, dtype="float32", max_model_len=64, speculative_config=draft_config(bigger))

    swapped = tmp_path / "swapped_tokens"
    shutil.copytree(model_dir, swapped)
    tokenizer = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ConfigError, match="tokenizer differs from the target's"):
        LLM(model_dir, dtype="float32", max_model_len=64, speculative_config=draft_config(swapped))

    with pytest.raises(Exception, match="neither a local path"):
        LLM(model_dir, dtype="float32", max_model_len=64,
            speculative_config=draft_config("no/such-draft"))


def test_the_draft_cache_shares_the_memory_budget(model_dir):
    budget = 64 * bytes_per_token(
        LLM(model_dir, dtype="float32", max_model_len=64).engine.model_config, torch.float32) * 16
    alone = LLM(model_dir, dtype="float32", max_model_len=64, block_size=16,
                kv_cache_memory_bytes=budget)
    both = LLM(model_dir, dtype="float32", max_model_len=64, block_size=16,
               kv_cache_memory_bytes=budget, speculative_config=draft_config(model_dir))
    assert alone.engine.pool.num_blocks == 64 and both.engine.pool.num_blocks == 32
