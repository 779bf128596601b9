"""Training a head on a tiny random model, saving it, loading it back."""

from __future__ import annotations

import json

import pytest
import torch

from pikaserve.engine.pooling_params import SpanStates
from pikaserve.heads.head import ClassificationHead, HeadLoadError

from .conftest import COLOURS, MARKER, SCHEMA, SYSTEM


def test_training_separates_synthetic_labels(head_files):
    _, _, out = head_files
    head = ClassificationHead.load(out)
    dev = head.info.training["dev_accuracy"]
    assert dev["colour"] >= 0.95 and dev["loud"] >= 0.95, dev
    assert head.info.schema == SCHEMA and head.info.system_prompt == SYSTEM
    assert [f.labels for f in head.fields] == [tuple(COLOURS), (False, True)]
    assert head.info.span_marker == MARKER and len(head.info.recipes) == 2


def test_saved_head_reloads_to_identical_outputs(head_files, tmp_path):
    _, _, out = head_files
    head = ClassificationHead.load(out)
    again = ClassificationHead.load(head.save(tmp_path / "copy"))
    spans = [SpanStates(torch.randn(t, len(head.layers), head.info.hidden_size), t // 2)
             for t in (1, 4, 9)]
    for a, b in zip(head(spans), again(spans)):
        for x, y in zip(a.logits, b.logits):
            assert torch.equal(x, y)


def test_missing_and_corrupt_files_are_clear_errors(head_files, tmp_path):
    _, _, out = head_files
    with pytest.raises(HeadLoadError, match="missing head.json"):
        ClassificationHead.load(tmp_path)
    bad = ClassificationHead.load(out).save(tmp_path / "bad")
    (bad / "head.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HeadLoadError, match="corrupt"):
        ClassificationHead.load(bad)
    bad = ClassificationHead.load(out).save(tmp_path / "bad2")
    meta = json.loads((bad / "head.json").read_text())
    meta["schema"]["properties"]["colour"] = {"type": "string"}
    (bad / "head.json").write_text(json.dumps(meta))
    with pytest.raises(HeadLoadError, match="cannot be answered"):
        ClassificationHead.load(bad)
    bad = ClassificationHead.load(out).save(tmp_path / "bad3")
    meta = json.loads((bad / "head.json").read_text())
    meta["hidden_size"] += 1
    (bad / "head.json").write_text(json.dumps(meta))
    with pytest.raises(HeadLoadError, match="expected shape"):
        ClassificationHead.load(bad)


def test_refit_on_dev_trains_on_both_splits(head_files, tmp_path):
    from pikaserve.cli import main

    model, d, _ = head_files
    out = tmp_path / "refit"
    argv = ["heads", "train", "--model", str(model), "--data", str(d / "train.jsonl"),
            "--dev-fraction", "0.25", "--schema", str(d / "schema.json"), "--layers", "2",
            "--pooling", "after", "--refit-on-dev", "--out", str(out), "--dtype", "float32"]
    assert main(argv) == 0
    head = ClassificationHead.load(out)
    assert head.info.training["refit_on_dev"] and head.info.training["dev_examples"] == 22
    assert [r.layers for r in head.info.recipes] == [(2,), (2,)]
    assert [r.pooling for r in head.info.recipes] == ["after", "after"]


def test_bad_training_input_is_a_clear_error(head_files, tmp_path, capsys):
    from pikaserve.cli import main

    model, d, _ = head_files
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x", "colour": "purple", "loud": true}\n')
    argv = ["heads", "train", "--model", str(model), "--data", str(bad), "--schema",
            str(d / "schema.json"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "colour='purple' is not one of the schema's labels" in capsys.readouterr().err


def test_max_layer_bounds_the_search(head_files, tmp_path):
    from pikaserve.cli import main

    model, d, _ = head_files
    out = tmp_path / "low"
    argv = ["heads", "train", "--model", str(model), "--data", str(d / "train.jsonl"),
            "--dev", str(d / "dev.jsonl"), "--schema", str(d / "schema.json"),
            "--max-layer", "1", "--out", str(out), "--dtype", "float32"]
    assert main(argv) == 0
    assert max(ClassificationHead.load(out).layers) <= 1


def test_recipes_from_an_earlier_head_retrains_without_a_search(head_files, tmp_path, capsys):
    from pikaserve.cli import main
    from .conftest import synthetic_rows, write_jsonl

    model, d, first = head_files
    more = write_jsonl(tmp_path / "more.jsonl", synthetic_rows(150, seed=3))
    base = ["heads", "train", "--model", str(model), "--data", str(more), "--dev",
            str(d / "dev.jsonl"), "--schema", str(d / "schema.json"), "--system-prompt",
            str(d / "system.txt"), "--span-marker", MARKER, "--dtype", "float32",
            "--recipes-from", str(first)]
    out = tmp_path / "again"
    assert main([*base, "--out", str(out)]) == 0
    head, earlier = ClassificationHead.load(out), ClassificationHead.load(first)
    assert head.info.recipes == earlier.info.recipes
    assert head.info.training["train_examples"] == 150
    assert min(head.info.training["dev_accuracy"].values()) >= 0.9
    trials = [line for line in capsys.readouterr().out.splitlines() if line.startswith("    ")]
    assert len(trials) == 2  # one per field: no search

    assert main([*base, "--pooling", "after", "--out", str(tmp_path / "x")]) == 2
    assert "--recipes-from takes the whole recipe" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**SCHEMA, "properties": {"hue": SCHEMA["properties"]["colour"],
                                                          "loud": {"type": "boolean"}},
                                 "required": ["hue", "loud"]}))
    hue = [a if a != str(d / "schema.json") else str(other) for a in base]
    assert main([*hue, "--out", str(tmp_path / "y")]) == 2
    assert "answers the fields ['colour', 'loud'], the schema has ['hue', 'loud']" in \
        capsys.readouterr().err
