"""Speculative decoding by prompt lookup (engine/ngram.py, checked as in engine/drafts.py)
changes how many passes a request takes, never what it samples.

A tiny random model decoding greedily often falls into loops, which prompt lookup predicts,
and prompts that repeat a pattern get proposals from their first step; the rest of the time
proposals are wrong. Outputs with speculation are compared with the same engine without it:
token for token (greedy, seeded), in distribution (unseeded).
"""

from __future__ import annotations

import collections
import json
import math
import random
from dataclasses import dataclass, field

import pytest

from pikaserve.config import ConfigError, EngineConfig
from pikaserve.data import pika_answer_schema
from pikaserve.engine import drafts as drafts_mod
from pikaserve.engine.constraint import Draft
from pikaserve.engine.drafts import DraftRows
from pikaserve.engine.outputs import EngineStats
from pikaserve.engine.request import Request
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.engine.sampling_params import StructuredOutputsParams as S
from pikaserve.kv.block_pool import chain_hash, salt_root
from pikaserve.llm import LLM, Completion
from pikaserve.server.metrics import ServerMetrics
from reference import make_prompts

# proposals at every batch size here (the default stops them past 8 running requests)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1, "disable_by_batch_size": 64}
GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def plain(model_dir) -> LLM:
    return LLM(model_dir, dtype="float32", max_model_len=256)


@pytest.fixture(scope="module")
def spec(model_dir) -> LLM:
    return LLM(model_dir, dtype="float32", max_model_len=256, speculative_config=NGRAM)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Random prompts, then prompts that repeat a short pattern."""
    rng = random.Random(0)
    patterns = [[rng.randrange(3, 400) for _ in range(rng.randint(2, 7))] for _ in range(6)]
    return make_prompts(8, 400) + [p * (30 // len(p)) for p in patterns]


@dataclass
class Result:
    token_ids: list[int]
    text: str
    finish_reason: str | None
    sampled: list[tuple[int, list[int]]]  # each token with logprobs, and its top alternatives
    # rows computed in differently shaped passes differ in the last bits
    logprobs: list[float] = field(compare=False)

    @classmethod
    def of(cls, c: Completion) -> Result:
        return cls(c.token_ids, c.text, c.finish_reason,
                   [(lp.token_id, [t for t, _ in lp.top]) for lp in c.logprobs],
                   [lp.logprob for lp in c.logprobs])


def same(a: list[Result], b: list[Result]) -> bool:
    return a == b and all(x.logprobs == pytest.approx(y.logprobs, abs=1e-4)
                          for x, y in zip(a, b))


@dataclass
class Counts:
    drafts: int
    draft_tokens: int
    accepted: int

    @property
    def rejected(self) -> int:
        return self.draft_tokens - self.accepted


def run(llm: LLM, prompts, params) -> tuple[list[Result], Counts]:
    """Outputs, and the engine's speculative counters over the run; checks that nothing
    is left running and no KV block is held."""
    before = llm.engine.stats()
    outs = llm.generate(prompts, params)
    engine = llm.engine
    assert engine.pool_is_idle() and not engine.has_unfinished_requests()
    assert not engine.requests
    after = engine.stats()
    counts = Counts(after.spec_decode_num_drafts - before.spec_decode_num_drafts,
                    after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens,
                    after.spec_decode_num_accepted_tokens
                    - before.spec_decode_num_accepted_tokens)
    return [Result.of(o) for o in outs], counts


def greedy_variants(n: int) -> list[SamplingParams]:
    """Greedy, and greedy with penalties (which must see the tokens of earlier rounds)."""
    variants = [GREEDY,
                SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                               repetition_penalty=1.3),
                SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                               frequency_penalty=0.4, presence_penalty=0.2, logprobs=2)]
    return [variants[i % len(variants)] for i in range(n)]


# --- outputs ------------------------------------------------------------------------------
def test_greedy_outputs_equal_without_speculation_batched_and_alone(plain, spec, prompts):
    ps = greedy_variants(len(prompts))
    want, _ = run(plain, prompts, ps)
    got, counts = run(spec, prompts, ps)
    assert same(got, want)
    assert counts.accepted > 0 and counts.rejected > 0  # both paths ran
    passes = {"plain": 0, "spec": 0}
    for p, q, w in zip(prompts[-4:], ps[-4:], want[-4:]):
        for name, llm in (("plain", plain), ("spec", spec)):
            before = llm.engine.num_forward_passes
            alone, _ = run(llm, [p], [q])
            assert same(alone, [w])
            passes[name] += llm.engine.num_forward_passes - before
    assert passes["spec"] < passes["plain"]


def test_seeded_sampling_is_the_same_token_for_token(plain, spec, prompts):
    """Sampling first and comparing after draws each token with the request's own generator,
    in the same order as without speculation."""
    ps = [SamplingParams(max_tokens=30, temperature=0.3, seed=i, ignore_eos=True,
                         logprobs=2 if i % 2 else None) for i in range(len(prompts))]
    want, _ = run(plain, prompts, ps)
    got, counts = run(spec, prompts, ps)
    assert same(got, want)
    assert counts.accepted > 0 and counts.rejected > 0


def test_stop_strings_and_stop_tokens_cut_the_same_way(plain, spec, prompts):
    base, _ = run(plain, prompts, [GREEDY] * len(prompts))
    ps = []
    for i, r in enumerate(base):
        middle = len(r.text) // 2
        if i % 3 == 0:
            ps.append(SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                     stop=[r.text[middle : middle + 2]]))
        elif i % 3 == 1:
            ps.append(SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                     stop=[r.text[middle : middle + 3]],
                                     include_stop_str_in_output=True))
        else:
            ps.append(SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                     stop_token_ids=[r.token_ids[len(r.token_ids) // 2]]))
    want, _ = run(plain, prompts, ps)
    got, counts = run(spec, prompts, ps)
    assert same(got, want)
    assert [r.finish_reason for r in got].count("stop") == len(prompts)
    assert counts.accepted > 0


def test_max_tokens_anywhere_in_a_proposal(plain, spec, prompts):
    for max_tokens in range(1, 12):
        ps = [SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)]
        want, _ = run(plain, prompts, ps * len(prompts))
        got, _ = run(spec, prompts, ps * len(prompts))
        assert same(got, want)
        assert all(len(r.token_ids) == max_tokens for r in got)


def test_logprobs_are_those_without_speculation(plain, spec, prompts):
    ps = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=3)]
    want, _ = run(plain, prompts, ps * len(prompts))
    got, counts = run(spec, prompts, ps * len(prompts))
    assert same(got, want) and counts.accepted > 0
    assert all(len(r.sampled) == 30 for r in got)


def test_context_end_inside_a_proposal(model_dir, plain, prompts):
    """A request that runs to max_model_len: proposals are cut to fit."""
    short = LLM(model_dir, dtype="float32", max_model_len=64, speculative_config=NGRAM)
    prompts = [p for p in prompts if len(p) < 40]
    ps = [SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)]
    got, counts = run(short, prompts, ps * len(prompts))
    assert all(r.finish_reason == "length" for r in got) and counts.accepted > 0
    want, _ = run(plain, prompts, [SamplingParams(max_tokens=64 - len(p), temperature=0,
                                                  ignore_eos=True) for p in prompts])
    assert same(got, want)


# --- scheduling ---------------------------------------------------------------------------
def test_forced_preemption(model_dir, plain, prompts):
    from pikaserve.kv.kv_cache import bytes_per_token
    import torch

    block_bytes = bytes_per_token(plain.engine.model_config, torch.float32) * 16
    small = LLM(model_dir, dtype="float32", max_model_len=128, block_size=16,
                kv_cache_memory_bytes=8 * block_bytes, speculative_config=NGRAM)
    assert small.engine.pool.num_blocks == 8
    batch = prompts * 2
    want, _ = run(plain, batch, [GREEDY] * len(batch))
    got, counts = run(small, batch, [GREEDY] * len(batch))
    assert small.engine.scheduler.num_preemptions > 0
    assert same(got, want) and counts.accepted > 0


@pytest.mark.parametrize("which", ["with a draft", "without a draft"])
def test_abort_in_the_middle(plain, spec, prompts, which):
    engine = spec.engine
    batch = prompts[-6:]
    want, _ = run(plain, batch, [GREEDY] * len(batch))
    for i, p in enumerate(batch):
        engine.add_request(f"abort-{i}", p, GREEDY)
    got: dict[str, list[int]] = collections.defaultdict(list)
    aborted = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        # accepted tokens count as computed: only the last sampled one is left to compute
        assert all(r.num_computed_tokens == r.num_tokens - 1 for r in engine.requests.values())
        running = [r for r in engine.requests.values() if len(r.output_token_ids) > 4]
        if aborted is None and running:
            victim = next((r for r in running if (r.draft is not None) == (which == "with a draft")),
                          None)
            if victim is not None:
                aborted = victim.request_id
                last = engine.abort_request(aborted)
                assert last is not None and last.finish_reason == "abort"
    assert aborted is not None
    assert engine.pool_is_idle() and not engine.requests
    for i, w in enumerate(want):
        if f"abort-{i}" != aborted:
            assert got[f"abort-{i}"] == w.token_ids


def test_structured_output_keeps_its_grammar_drafts(plain, spec, prompts, monkeypatch):
    """Constrained requests get grammar drafts, not proposals; batched with free ones, every
    output is what it is without speculation, and the Pika answers are valid JSON."""
    checked: list[tuple[bool, bool, bool]] = []  # (constrained, a proposal, confirmed whole)
    match = drafts_mod.DraftCheck.match

    def recording(check):
        first = check.matched == 0
        m = match(check)
        if first:
            draft = check.rows.draft
            checked.append((check.request.constraint is not None, draft.verify_each,
                            m == len(draft.token_ids)))
        return m

    pika = SamplingParams(max_tokens=40, temperature=0, structured_outputs=S(
        json=pika_answer_schema()))
    batch = [p for pair in zip(prompts, prompts[::-1]) for p in pair]
    ps = [pika if i % 2 else GREEDY for i in range(len(batch))]
    want, _ = run(plain, batch, ps)
    monkeypatch.setattr(drafts_mod.DraftCheck, "match", recording)
    got, counts = run(spec, batch, ps)
    assert same(got, want)
    for r in got[1::2]:
        answer = json.loads(r.text)
        assert set(answer) == {"emotion", "learn_score"}
    assert (True, False, True) in checked  # a grammar draft came true
    assert not [c for c in checked if c[0] and c[1]]  # no proposal for a constrained request
    assert counts.drafts == sum(1 for c in checked if c[1]) and counts.accepted > 0


def test_prefix_cache_holds_only_confirmed_tokens(model_dir, plain, prompts):
    """Blocks published while proposals were checked hold the request's own tokens: their
    hashes are those of the tokens it kept, and requests that reuse them answer as before."""
    llm = LLM(model_dir, dtype="float32", max_model_len=256, speculative_config=NGRAM)
    got, counts = run(llm, prompts, [GREEDY] * len(prompts))
    assert counts.accepted > 0 and counts.rejected > 0
    bs = llm.engine.pool.block_size
    kept = set()
    for p, r in zip(prompts, got):
        tokens, h = p + r.token_ids, salt_root(None)
        for b in range(len(tokens) // bs):
            h = chain_hash(h, tokens[b * bs : (b + 1) * bs])
            kept.add(h)
    published = {b.block_hash for b in llm.engine.pool.blocks if b.block_hash is not None}
    assert published and published <= kept
    longer = [p + r.token_ids for p, r in zip(prompts, got)]
    hits = llm.engine.pool.hits
    want, _ = run(plain, longer, [GREEDY] * len(longer))
    again, _ = run(llm, longer, [GREEDY] * len(longer))
    assert same(again, want)
    assert llm.engine.pool.hits - hits > sum(map(len, prompts))  # outputs' blocks were reused


# --- distribution -------------------------------------------------------------------------
class GreedyPathProposer:
    """Proposes the greedy continuation of the prompt, whatever was sampled: likely tokens,
    so that proposals are often accepted and often not."""

    def __init__(self, path: list[int], k: int) -> None:
        self.path, self.k = path, k

    def propose(self, reqs: list[Request], num_running: int) -> None:
        for req in reqs:
            n = len(req.output_token_ids)
            tokens = self.path[n : n + self.k]
            req.draft = Draft(tokens, None, verify_each=True) if tokens else None

    def release(self, req: Request) -> None:
        pass


def chi_square_stat(a: collections.Counter, b: collections.Counter, min_count: int = 10):
    """Two-sample chi-square statistic (equal sizes) over the values seen at least
    `min_count` times in both samples together, the others pooled; and its degrees of
    freedom."""
    keys = [k for k in a.keys() | b.keys() if a[k] + b[k] >= min_count]
    rest_a = sum(a.values()) - sum(a[k] for k in keys)
    rest_b = sum(b.values()) - sum(b[k] for k in keys)
    cells = [(a[k], b[k]) for k in keys] + ([(rest_a, rest_b)] if rest_a + rest_b else [])
    return sum((x - y) ** 2 / (x + y) for x, y in cells), len(cells) - 1


def chi_square_bound(df: int, z: float = 4.75) -> float:
    """The chi-square quantile at about 1 - 1e-6 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.slow
def test_sampling_keeps_the_distribution(model_dir, plain):
    """Unseeded requests draw their noise from the engine's generator, seeded differently
    here, so the two runs are independent samples; at each position the histograms of many
    requests must agree within a chi-square bound at p ~ 1e-6 (the seeds are fixed, so the
    test is deterministic). The proposals are the prompt's greedy continuation, accepted
    about a third of the time: accepting a proposed token whenever it is the most likely
    one, instead of sampling, exceeds the bound 2-3.5x at positions 2 to 4 (those sampled
    from a proposal's rows)."""
    spec = LLM(model_dir, dtype="float32", max_model_len=256, seed=1, speculative_config=NGRAM)
    prompt = [random.Random(1).randrange(3, 400) for _ in range(12)]
    (path,), _ = run(plain, [prompt], [GREEDY])
    spec.engine.proposer = GreedyPathProposer(path.token_ids, 4)
    n = 200
    params = [SamplingParams(max_tokens=5, temperature=0.25, ignore_eos=True)] * n
    want, _ = run(plain, [prompt] * n, params)
    got, counts = run(spec, [prompt] * n, params)
    assert counts.accepted > n and counts.rejected > n
    for pos in range(5):
        stat, df = chi_square_stat(collections.Counter(r.token_ids[pos] for r in want),
                                   collections.Counter(r.token_ids[pos] for r in got))
        assert df >= 1 and stat < chi_square_bound(df), (pos, stat, df)
    pairs = [collections.Counter(tuple(r.token_ids[2:4]) for r in rs) for rs in (want, got)]
    stat, df = chi_square_stat(*pairs)
    assert df >= 1 and stat < chi_square_bound(df), (stat, df)


# --- rows ---------------------------------------------------------------------------------
def test_rows_of_a_draft():
    grammar = DraftRows(Draft([7, 8, 9], None), [5])
    assert [grammar.row_after(i) for i in range(4)] == [None, None, 5, None]
    proposal = DraftRows(Draft([7, 8, 9], None, verify_each=True), [3, 4, 5])
    assert [proposal.row_after(i) for i in range(4)] == [3, 4, 5, None]


# --- configuration and metrics ------------------------------------------------------------
@pytest.mark.parametrize("config,message", [
    ({"method": "eagle", "num_speculative_tokens": 3},
     "method must be 'ngram' .* or 'draft_model'; got 'eagle'"),
    ({"num_speculative_tokens": 3}, "method must be 'ngram'.*got None"),
    ({"method": "draft_model", "num_speculative_tokens": 3}, "draft_model method needs 'model'"),
    ({"method": "draft_model", "model": "x"}, "draft_model method needs num_speculative_tokens"),
    ({"method": "draft_model", "model": "x", "num_speculative_tokens": 3,
      "prompt_lookup_max": 3}, "unknown or unsupported key.*'prompt_lookup_max'.*the "
     "draft_model method takes method, model"),
    ({"method": "ngram"}, "needs num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an "
     "integer >= 1; got 0"),
    ({"method": "ngram", "num_speculative_tokens": True}, "must be an integer >= 1"),
    ({"method": "ngram", "num_speculative_tokens": "3"}, "must be an integer >= 1"),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 0},
     "prompt_lookup_max must be an integer >= 1"),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2,
      "prompt_lookup_min": 3}, r"prompt_lookup_min \(3\) must be <= prompt_lookup_max \(2\)"),
    ({"method": "ngram", "num_speculative_tokens": 3, "speculative_token_tree": "[(0,)]"},
     "unknown or unsupported key.*'speculative_token_tree'"),
    ({"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 0},
     "disable_by_batch_size must be an integer >= 1"),
    ("ngram", "must be a JSON object"),
])
def test_bad_speculative_configs_fail_clearly(config, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(speculative_config=config).validate()


def test_speculative_config_defaults_as_vllm():
    def parsed(**keys):
        return EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                **keys}).speculative()

    assert (parsed().prompt_lookup_min, parsed().prompt_lookup_max) == (5, 5)
    c = parsed(prompt_lookup_max=4)
    assert (c.prompt_lookup_min, c.prompt_lookup_max, c.num_speculative_tokens) == (4, 4, 2)
    c = parsed(prompt_lookup_min=2)
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (2, 2)
    assert EngineConfig().speculative() is None


def test_metrics_export_the_counters_with_vllm_names(spec, prompts):
    run(spec, prompts[-2:], [GREEDY] * 2)
    stats = spec.engine.stats()
    assert stats.spec_decode_num_accepted_tokens == sum(
        stats.spec_decode_num_accepted_tokens_per_pos)
    assert len(stats.spec_decode_num_accepted_tokens_per_pos) == 4
    assert list(stats.spec_decode_num_accepted_tokens_per_pos) == sorted(
        stats.spec_decode_num_accepted_tokens_per_pos, reverse=True)  # i accepted: all before
    fake = EngineStats(0, 0, 0.0, 0, 0, 0, spec_decode_num_drafts=7,
                       spec_decode_num_draft_tokens=20, spec_decode_num_accepted_tokens=9,
                       spec_decode_num_accepted_tokens_per_pos=(5, 3, 1))
    text = ServerMetrics("m", lambda: fake, prefix="vllm").render().decode()
    for line in ('vllm:spec_decode_num_drafts_total{model_name="m"} 7.0',
                 'vllm:spec_decode_num_draft_tokens_total{model_name="m"} 20.0',
                 'vllm:spec_decode_num_accepted_tokens_total{model_name="m"} 9.0',
                 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",'
                 'position="0"} 5.0',
                 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",'
                 'position="2"} 1.0'):
        assert line in text


def test_no_proposals_while_more_requests_run_than_disable_by_batch_size(model_dir, plain, prompts):
    capped = LLM(model_dir, dtype="float32", max_model_len=256,
                 speculative_config={**NGRAM, "disable_by_batch_size": 2})
    ps = [GREEDY] * len(prompts)
    want, _ = run(plain, prompts, ps)
    got, counts = run(capped, prompts, ps)  # all run together to the end: never 2 or fewer
    assert same(got, want) and counts.drafts == 0
    _, alone = run(capped, prompts[-1:], ps[-1:])
    assert alone.drafts > 0
