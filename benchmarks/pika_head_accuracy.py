"""How right Pika's answers are, on turns the head never saw: the head's recipe vs the grammar
path vs the majority guess, on the default model.

The labelled turns (pikaserve/data/pika/train.jsonl + dev.jsonl) were written by several
writers (field `writer`), each with its own topics and style. Leave one writer out: for each
writer, the shipped head's recipes (pikaserve/data/heads/pika/head.json) are fit on the other
writers' turns and scored on the held-out writer's, so every figure is on turns written by
someone the head never learned from. (The recipes were chosen on writer C, the dev split, when
only writers A-D existed: C's fold is slightly optimistic; E-H's folds are not at all.)
- head: features from the same engine passes the server runs (pooling requests, prefix cache on);
- grammar: the model itself writes the answer under the answer schema, temperature 0, as
  `pikaserve serve --default-response-format answer.schema.json` answers the seed request;
- majority: always the most frequent label of the training writers.

Reported per writer and on average: emotion exact-label accuracy, emotion family accuracy (the
label without its _2/_3 suffix) and learn_score accuracy. Writes
benchmarks/results/pika_head_accuracy.json.

    python benchmarks/pika_head_accuracy.py [--head DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from collections import Counter
from pathlib import Path

from pikaserve.data import PIKA, pika_answer_schema, pika_system_prompt
from pikaserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
from pikaserve.heads.data import load_labelled
from pikaserve.heads.features import pooled_parts
from pikaserve.heads.head import ClassificationHead
from pikaserve.heads.served import BUILTIN_HEADS
from pikaserve.heads.train import fit, split_of
from pikaserve.llm import LLM
from pikaserve.machine import describe_machine

RESULTS = Path(__file__).parent / "results"
FILES = ("train.jsonl", "dev.jsonl")


def family(label: str) -> str:
    return re.sub(r"_\d+$", "", label)


def scores(pred_emotion: list[str], pred_learn: list, gold_emotion: list[str],
           gold_learn: list[bool]) -> dict[str, float]:
    n = len(gold_emotion)
    return {
        "emotion_exact": sum(p == g for p, g in zip(pred_emotion, gold_emotion)) / n,
        "emotion_family": sum(family(p) == family(g)
                              for p, g in zip(pred_emotion, gold_emotion)) / n,
        "learn_score": sum(p == g for p, g in zip(pred_learn, gold_learn)) / n,
    }


def grammar_answers(llm: LLM, chats: list[list[dict]]) -> list[dict | None]:
    so = StructuredOutputsParams(json=pika_answer_schema())
    params = SamplingParams(max_tokens=50, temperature=0, structured_outputs=so)
    out = []
    for i in range(0, len(chats), 16):
        for c in llm.generate(chats[i:i + 16], params):
            try:
                out.append(json.loads(c.text))
            except ValueError:
                out.append(None)
    return out


def mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head", type=Path, default=BUILTIN_HEADS["pika"],
                        help="a head folder (default: the built-in Pika head)")
    parser.add_argument("--out", type=Path, default=RESULTS / "pika_head_accuracy.json")
    args = parser.parse_args()

    head = ClassificationHead.load(args.head)
    data = [load_labelled(PIKA / f, head.fields, pika_system_prompt()) for f in FILES]
    messages = [m for d in data for m in d.messages]
    labels = [a + b for a, b in zip(data[0].labels, data[1].labels)]
    writers = [json.loads(line)["writer"] for f in FILES
               for line in (PIKA / f).read_text(encoding="utf-8").splitlines() if line.strip()]
    emotions, learn = head.fields[0].labels, head.fields[1].labels
    gold_e = [emotions[i] for i in labels[0]]
    gold_l = [learn[i] for i in labels[1]]

    llm = LLM(None)
    started = time.perf_counter()
    parts = pooled_parts(llm.engine, [head.prompt(llm.tokenizer, m) for m in messages],
                         head.layers, "features")
    feature_seconds = time.perf_counter() - started
    started = time.perf_counter()
    grammar = grammar_answers(llm, messages)
    grammar_seconds = time.perf_counter() - started

    per_writer = {}
    for w in sorted(set(writers)):
        held = [i for i, x in enumerate(writers) if x == w]
        rest = [i for i, x in enumerate(writers) if x != w]
        fold = fit(head.info, split_of(parts, head.layers, labels, rest))
        answers = fold.answer(parts[held], head.layers)
        ge, gl = [gold_e[i] for i in held], [gold_l[i] for i in held]
        maj_e = Counter(gold_e[i] for i in rest).most_common(1)[0][0]
        maj_f = Counter(family(gold_e[i]) for i in rest).most_common(1)[0][0]
        maj_l = Counter(gold_l[i] for i in rest).most_common(1)[0][0]
        per_writer[w] = {
            "examples": len(held),
            "head": scores([emotions[int(a.logits[0].argmax())] for a in answers],
                           [learn[int(a.logits[1].argmax())] for a in answers], ge, gl),
            "grammar": scores([grammar[i]["emotion"] if grammar[i] else "" for i in held],
                              [grammar[i]["learn_score"] if grammar[i] else None
                               for i in held], ge, gl),
            "majority": scores([maj_e] * len(held), [maj_l] * len(held), ge, gl)
            | {"emotion_family": sum(family(g) == maj_f for g in ge) / len(held)},
            "head_confusions": Counter(
                f"{family(ge[k])}->{family(emotions[int(a.logits[0].argmax())])}"
                for k, a in enumerate(answers)
                if family(ge[k]) != family(emotions[int(a.logits[0].argmax())])
            ).most_common(8),
        }
    result = {
        "benchmark": "pika_head_accuracy",
        "machine": describe_machine(),
        "dtype": str(llm.engine.dtype).removeprefix("torch."),
        "head": {"recipes": [dataclasses.asdict(r) for r in head.info.recipes],
                 "training": head.info.training},
        "protocol": "leave one writer out: fit on the other writers, score on the held-out one",
        "examples": len(messages),
        "mean_over_writers": {m: mean([per_writer[w][m] for w in per_writer])
                              for m in ("head", "grammar", "majority")},
        "per_writer": per_writer,
        "seconds": {"features_all_turns": feature_seconds, "grammar_all_turns": grammar_seconds},
        "grammar_invalid_answers": sum(a is None for a in grammar),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: result[k] for k in ("dtype", "examples", "mean_over_writers")},
                     indent=2))
    for w, r in per_writer.items():
        print(w, {m: {k: round(v, 3) for k, v in r[m].items()}
                  for m in ("head", "grammar", "majority")})


if __name__ == "__main__":
    main()
