"""Structured output through the engine on the default model (SmolLM2-135M-Instruct, CPU).

The Pika answer is always valid and takes 2 forward passes once the system prompt is cached
(more for a suffixed label); fast-forward leaves greedy output unchanged; constrained and free
requests batch together; bad specs raise InvalidRequestError and the engine serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

import pytest

from pikaserve.data import pika_answer_schema, pika_messages, pika_turns
from pikaserve.engine.async_engine import AsyncEngine
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.engine.sampling_params import StructuredOutputsParams as S
from pikaserve.errors import InvalidRequestError
from pikaserve.structured import build_constraint

from .test_structured_matcher import NESTED

pytestmark = pytest.mark.slow

PIKA = S(json=pika_answer_schema())
LABELS = set(pika_answer_schema()["properties"]["emotion"]["enum"])
# Four free choices (first label token, end-or-"_", "2"-or-"3", true-or-false) need four
# sampled tokens: no tokenizer split merges them (see docs/structured_output.md).
FOUR_CHOICE_LABELS = {"playful_2", "playful_3"}


def max_passes(label: str) -> int:
    """Passes a greedy Pika request may need with its system prompt cached: the prompt's pass
    samples the first label token; the next computes a guess of the rest of the label (a
    grammar draft) and samples the boolean after it. A wrong guess ("no" -> "isy", but the
    answer is "no_problem") costs one more pass; two suffix choices one more again."""
    return 4 if label in FOUR_CHOICE_LABELS else 3


def pika(temperature: float = 0.0, seed: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=50, temperature=temperature, seed=seed, structured_outputs=PIKA)


def check_pika(text: str) -> dict:
    answer = json.loads(text)
    assert set(answer) == {"emotion", "learn_score"}
    assert answer["emotion"] in LABELS
    assert isinstance(answer["learn_score"], bool)
    return answer


@pytest.fixture(scope="module")
def llm(default_llm_fp32):
    llm = default_llm_fp32
    llm.generate([pika_messages(pika_turns()[0])], pika())  # warm the system prompt
    return llm


@contextlib.contextmanager
def fast_forward(llm, on: bool):
    config = llm.engine.config
    before = config.structured_output_fast_forward
    config.structured_output_fast_forward = on
    try:
        yield
    finally:
        config.structured_output_fast_forward = before


def test_all_pika_turns_greedy_valid_mostly_in_two_passes(llm):
    """One request at a time, system prompt cached: the engine's pass counter per request.
    Drafts guess right for most answers (37 of these 40 in float32)."""
    two_passes = 0
    for i, turn in enumerate(pika_turns()):
        before = llm.engine.num_forward_passes
        out = llm.generate([pika_messages(turn)], pika())[0]
        passes = llm.engine.num_forward_passes - before
        answer = check_pika(out.text)
        assert out.finish_reason == "stop"
        assert out.num_cached_tokens >= 300  # the system prompt came from the prefix cache
        assert passes <= max_passes(answer["emotion"]), (i, out.text)
        two_passes += passes == 2
    assert two_passes >= 36
    assert llm.engine.pool_is_idle()


def test_all_pika_turns_sampled_valid_in_one_batch(llm):
    """All 40 turns at once with sampling; a request's sampled passes are its outputs (the
    engine emits one per pass that samples for it)."""
    engine = llm.engine
    for i, turn in enumerate(pika_turns()):
        engine.add_request(f"pika-{i}", llm.prompt_token_ids(pika_messages(turn)),
                           pika(temperature=0.8, seed=i))
    outputs: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert len(outputs) == 40
    for rid, outs in outputs.items():
        text = "".join(o.new_text for o in outs)
        answer = check_pika(text)
        assert outs[-1].finish_reason == "stop"
        assert len(outs) <= (4 if answer["emotion"] in FOUR_CHOICE_LABELS else 3), (rid, text)
    assert engine.pool_is_idle()


def test_canonical_forcing_in_an_enum(llm):
    """After "th" the tokenizer's own split of "thats_right" is forced: "thinking" is one token,
    so "th" + "inking" is never how this text is tokenized."""
    tok = llm.tokenizer
    c = build_constraint(PIKA, tok)
    c.accept(c.forced_tokens())
    th = tok.encode("th", add_special_tokens=False)
    assert len(th) == 1
    c.accept(th)
    assert tok.decode(c.forced_tokens()) == "ats_right"


CASES = {
    "nested": ([{"role": "user", "content": "Describe a fictional person as JSON."}], S(json=NESTED)),
    "pika": (pika_messages(pika_turns()[5]), PIKA),
    "regex": ([{"role": "user", "content": "Give me a US phone number."}],
              S(regex=r"\(\d{3}\) \d{3}-\d{4}")),
    "choice": ([{"role": "user", "content": "Is 'I loved it' positive or negative?"}],
               S(choice=["positive", "negative", "neutral"])),
    "json_object": ([{"role": "user", "content": "The weather as a JSON object."}],
                    S(json_object=True)),
    "grammar": ([{"role": "user", "content": "How many legs has a cat?"}],
                S(grammar='start: "A cat has " NUM " legs."\nNUM: /[0-9]+/')),
}


@pytest.mark.parametrize("name", CASES)
def test_fast_forward_leaves_greedy_output_unchanged(llm, name):
    messages, spec = CASES[name]
    max_tokens = 24 if name == "json_object" else 60  # free-form JSON runs to the limit
    params = SamplingParams(max_tokens=max_tokens, temperature=0, structured_outputs=spec)
    runs = {}
    for on in (False, True):
        with fast_forward(llm, on):
            before = llm.engine.num_forward_passes
            out = llm.generate([messages], params)[0]
            runs[on] = (out.token_ids, out.text, out.finish_reason,
                        llm.engine.num_forward_passes - before)
    assert runs[True][:3] == runs[False][:3]
    assert runs[True][3] <= runs[False][3]
    if name in ("nested", "pika", "regex", "grammar"):
        assert runs[True][3] < runs[False][3]


def test_mixed_batch_equals_each_request_alone(llm):
    greedy = SamplingParams(max_tokens=10, temperature=0)
    seeded = SamplingParams(max_tokens=50, temperature=0.8, seed=7, structured_outputs=PIKA)
    work = [
        (pika_messages(pika_turns()[1]), pika()),
        ([{"role": "user", "content": "Write a haiku about rain."}], greedy),
        CASES["regex"],
        (pika_messages(pika_turns()[2]), seeded),
        ("Once upon a time", greedy),
        CASES["choice"],
    ]
    work = [(m, p if isinstance(p, SamplingParams) else
             SamplingParams(max_tokens=40, temperature=0, structured_outputs=p)) for m, p in work]
    alone = [llm.generate([m], p)[0] for m, p in work]
    together = llm.generate([m for m, _ in work], [p for _, p in work])
    for a, b in zip(alone, together):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
    check_pika(together[0].text)
    assert together[5].text in ("positive", "negative", "neutral")
    assert llm.engine.pool_is_idle()


def test_several_samples_of_one_prompt(llm):
    """n > 1 arrives as separate requests (the server fans out): each gets its own matcher."""
    messages = pika_messages(pika_turns()[9])
    params = [pika(1.0, seed=s) for s in range(6)] + [pika(), pika()]
    outs = llm.generate([messages] * len(params), params)
    answers = [check_pika(o.text) for o in outs]
    assert outs[-1].token_ids == outs[-2].token_ids  # greedy copies agree
    again = llm.generate([messages], pika(1.0, seed=3))[0]
    assert again.token_ids == outs[3].token_ids  # a seeded sample is reproducible alone
    assert len({json.dumps(a) for a in answers}) > 1


def test_async_streaming_compiles_off_the_loop(llm, monkeypatch):
    from pikaserve.structured.compiler import GrammarCompiler

    threads = []
    real = GrammarCompiler._build

    def recording(self, spec):
        threads.append(threading.current_thread().name)
        return real(self, spec)

    monkeypatch.setattr(GrammarCompiler, "_build", recording)  # every compile, wherever
    turn = pika_turns()[11]
    want = llm.generate([pika_messages(turn)], pika())[0]  # Pika's schema compiled by now
    offline = len(threads)
    engine = AsyncEngine(engine=llm.engine)
    ids = llm.prompt_token_ids(pika_messages(turn))

    async def stream(request_id, params):
        chunks = [out async for out in engine.generate(request_id, ids, params)]
        return chunks

    async def main():
        with pytest.raises(InvalidRequestError):  # raised to the caller, before queueing
            await stream("bad", SamplingParams(structured_outputs=S(json={"type": "strin"})))
        free = SamplingParams(max_tokens=8, temperature=0)
        return await asyncio.gather(stream("a", pika()), stream("b", free), stream("c", pika()))

    try:
        a, b, c = asyncio.run(main())
    finally:
        engine.shutdown()
    for chunks in (a, c):
        assert "".join(o.new_text for o in chunks) == want.text
        assert [t for o in chunks for t in o.new_token_ids] == want.token_ids
        assert chunks[-1].finished and chunks[-1].finish_reason == "stop"
    assert len(b[-1].new_token_ids) + sum(len(o.new_token_ids) for o in b[:-1]) <= 8
    # the async path compiled only the new (bad) schema, on a grammar thread, never on the
    # engine's loop, and reused the compiled Pika grammar for "a" and "c"
    assert len(threads) == offline + 1 and threads[-1].startswith("pikaserve-grammar")
    assert llm.engine.pool_is_idle()


@pytest.mark.parametrize("spec", [
    S(json={"type": "object", "properties": {"a": {"type": "strin"}}}),
    S(json={"type": "integer", "minimum": 5, "maximum": 2}),
    S(regex="(?<=a)b"),
    S(regex="[0-"),
    S(grammar="start: undefined_rule"),
])
def test_invalid_specs_raise_and_the_engine_serves_on(llm, spec):
    with pytest.raises(InvalidRequestError):
        llm.generate(["Hello", "World"], SamplingParams(max_tokens=4, structured_outputs=spec))
    assert not llm.engine.has_unfinished_requests()  # nothing was queued
    out = llm.generate([pika_messages(pika_turns()[4])], pika())[0]
    check_pika(out.text)


def test_a_rejected_token_ends_the_request_cleanly(llm):
    class Unmasked:
        """A matcher whose mask is skipped, so the model samples what the grammar rejects."""

        def __init__(self, inner):
            self.inner = inner

        def mask_logits(self, logits):
            pass

        def allowed_tokens(self):
            return None

        def __getattr__(self, name):
            return getattr(self.inner, name)

    engine = llm.engine
    ids = llm.prompt_token_ids([{"role": "user", "content": "Say hello."}])
    c = Unmasked(build_constraint(S(regex="[0-9]{30}"), llm.tokenizer))
    engine.add_request("rejected", ids, SamplingParams(max_tokens=20, temperature=0), c)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert c.inner.error is not None
    assert llm.engine.pool_is_idle()
    check_pika(llm.generate([pika_messages(pika_turns()[6])], pika())[0].text)


def test_a_fully_forced_answer_needs_no_forward_pass(llm):
    before = llm.engine.num_forward_passes
    params = SamplingParams(max_tokens=20, temperature=0, structured_outputs=S(choice=["Pika!"]))
    out = llm.generate(["Who are you?"], params)[0]
    assert (out.text, out.finish_reason) == ("Pika!", "stop")
    assert llm.engine.num_forward_passes == before
    short = SamplingParams(max_tokens=1, structured_outputs=S(choice=["Pika says hello"]))
    out = llm.generate(["Who are you?"], short)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 1
