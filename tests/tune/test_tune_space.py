"""`pikaserve tune`'s inputs: the space, the SLO and the candidates, refused clearly when wrong."""

from __future__ import annotations

import argparse

import pytest

from pikaserve.tune.cli import parse_budget
from pikaserve.tune.space import Candidate, candidates, parse_pikaserve_space, parse_slo, parse_template_space


def test_slo_with_and_without_a_percentile():
    spec = parse_slo("ttft=50ms,e2e=0.2s,p=95")
    assert [(s.metric, s.limit_s) for s in spec.slos] == [("ttft", 0.05), ("e2e", 0.2)]
    assert spec.percentile == 95
    assert parse_slo("e2e=200ms").percentile == 99


@pytest.mark.parametrize("text, message", [
    ("p=99", "at least one limit"),
    ("e2e=200ms,p=0", "p must be in"),
    ("e2e=200ms,p=high", "p must be a number"),
    ("e2e=200ms,p=90,p=95", "twice"),
    ("latency=200ms", "bad SLO"),
    ("e2e=fast", "not a duration"),
])
def test_bad_slo_text(text, message):
    with pytest.raises(ValueError, match=message):
        parse_slo(text)


def test_pikaserve_space_takes_yaml_values_of_serve_settings():
    knobs = parse_pikaserve_space(["max_num_seqs=8,32", "enable-prefix-caching=true,false", "dtype=bfloat16,float32"])
    assert [(k.name, k.values) for k in knobs] == [
        ("max-num-seqs", (8, 32)), ("enable-prefix-caching", (True, False)), ("dtype", ("bfloat16", "float32"))]


def test_a_mapping_value_keeps_its_commas():
    (knob,) = parse_pikaserve_space(["speculative_config=null,{method: ngram, num_speculative_tokens: 4}"])
    assert knob.values == (None, {"method": "ngram", "num_speculative_tokens": 4})
    labels = [c.label for c in candidates((knob,), template=False)]
    assert labels == ["default (speculative_config=null)", 'speculative_config={"method":"ngram","num_speculative_tokens":4}']


@pytest.mark.parametrize("items, message", [
    (["max_num_seqs"], "expected KNOB=VALUE"),
    (["max_num_seqs=8,"], "expected KNOB=VALUE"),
    (["max_seqs=8"], "unknown key 'max_seqs'"),
    (["max_num_seqs=eight"], "'eight' is not a valid int"),
    (["max_num_seqs=0"], "max_num_seqs must be >= 1"),
    (["enforce_eager=maybe"], "must be true or false"),
    (["dtype=int3"], "dtype must be one of"),
    (["port=8000,8001"], "set by the tuner"),
    (["enable_lora=x"], "does not implement"),
    (["max_num_seqs=8", "max-num-seqs=16"], "twice"),
    (["block_size=4,4"], "repeats a value"),
])
def test_bad_pikaserve_space(items, message):
    with pytest.raises(ValueError, match=message):
        parse_pikaserve_space(items)


def test_template_space_needs_port_and_a_value_for_every_placeholder():
    cmd = "server --port {port} --threads {threads} --batch {batch}"
    knobs = parse_template_space(["threads=1,2", "batch=8"], cmd)
    assert [(k.name, k.values) for k in knobs] == [("threads", ("1", "2")), ("batch", ("8",))]
    with pytest.raises(ValueError, match=r"needs a \{port\}"):
        parse_template_space(["threads=1"], "server --threads {threads}")
    with pytest.raises(ValueError, match="not a placeholder"):
        parse_template_space(["threads=1", "batch=8", "cache=on"], cmd)
    with pytest.raises(ValueError, match="without values in --space: batch"):
        parse_template_space(["threads=1"], cmd)
    with pytest.raises(ValueError, match="bad --server-cmd template"):
        parse_template_space(["threads=1"], "server --port {port")


def test_pikaserve_candidates_start_with_the_built_in_default():
    knobs = parse_pikaserve_space(["max_num_seqs=8,32", "block_size=4,16"])
    found = candidates(knobs, template=False)
    assert found[0] == Candidate((), is_default=True)
    assert found[0].label == "default"
    assert [c.label for c in found[1:]] == [
        "max_num_seqs=8 block_size=4", "max_num_seqs=8 block_size=16",
        "max_num_seqs=32 block_size=4", "max_num_seqs=32 block_size=16"]


def test_a_combination_equal_to_the_defaults_is_the_default_not_a_second_run():
    knobs = parse_pikaserve_space(["max_num_seqs=128,8", "block_size=4"])  # 128 and 4 are the defaults
    found = candidates(knobs, template=False)
    assert [(c.label, c.is_default) for c in found] == [
        ("default (max_num_seqs=128 block_size=4)", True), ("max_num_seqs=8 block_size=4", False)]


def test_template_default_is_the_first_value_of_every_knob():
    knobs = parse_template_space(["threads=2,1"], "s --port {port} -t {threads}")
    assert [(c.label, c.is_default) for c in candidates(knobs, template=True)] == [
        ("default (threads=2)", True), ("threads=1", False)]


def test_candidate_keys_change_with_the_context():
    c = Candidate((("max-num-seqs", 8),))
    assert c.key({"slo": "a"}) == c.key({"slo": "a"}) != c.key({"slo": "b"})


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("90s", 90), ("1.5h", 5400), ("600", 600)])
def test_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "0"])
def test_bad_budget(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_budget(text)
