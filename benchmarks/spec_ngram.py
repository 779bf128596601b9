"""N-gram speculative decoding (prompt lookup) against plain decoding, side by side in one run.

Two workloads on the default model, greedy, every prompt new (to both engines):
- `copy`: "repeat this text" over a distinct generated paragraph: the answer quotes its prompt,
  where prompt lookup pays;
- `free`: an open question: the answer rarely repeats its context, so proposals are mostly
  rejected and show what they cost.
For each batch size the two engines (speculation off and on, each its own LLM) take turns on
the same prompts, alternating which goes first. Reported per engine: output tokens per second
of wall time, forward passes per output token, and the proposals' acceptance. Writes
benchmarks/results/spec_ngram.json.

    python benchmarks/spec_ngram.py [--batch 1,4,16] [--rounds 2] [--k 4]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from pikaserve.bench.workloads import _WORDS
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.llm import LLM
from pikaserve.machine import describe_machine

OUT = Path(__file__).parent / "results" / "spec_ngram.json"
TOPICS = ("the sea", "a robot", "school", "rain", "a red kite", "breakfast", "the moon", "music",
          "a small dog", "trains", "winter", "a garden", "football", "a library", "birds", "a river")


def paragraph(seed: int) -> str:
    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 10))).capitalize() + "."
                 for _ in range(5)]
    return " ".join(sentences)


def prompts(workload: str, first: int, n: int) -> list[list[dict[str, str]]]:
    if workload == "copy":
        return [[{"role": "user", "content": f"Repeat this text exactly, word for word:\n\n{paragraph(first + i)}"}]
                for i in range(n)]
    return [[{"role": "user", "content": f"Tell me something interesting about {TOPICS[(first + i) % len(TOPICS)]} "
                                         f"(idea {first + i})."}] for i in range(n)]


def run(llm: LLM, batch: list[list[dict[str, str]]], max_tokens: int) -> dict[str, float]:
    engine = llm.engine
    before, passes = engine.stats(), engine.num_forward_passes
    start = time.perf_counter()
    out = llm.generate(batch, SamplingParams(max_tokens=max_tokens, temperature=0))
    seconds = time.perf_counter() - start
    after = engine.stats()
    return {
        "seconds": seconds,
        "tokens": sum(len(c.token_ids) for c in out),
        "passes": engine.num_forward_passes - passes,
        "draft_tokens": after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens,
        "accepted": after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens,
        "texts": [c.text for c in out],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="1,4,16", help="batch sizes (requests generated together)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per batch size")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    engines = {"off": LLM(), "ngram": LLM(speculative_config=spec)}
    results = []
    seed = 0
    for workload in ("copy", "free"):
        for b in (int(x) for x in args.batch.split(",")):
            totals = {name: {"seconds": 0.0, "tokens": 0, "passes": 0, "draft_tokens": 0, "accepted": 0} for name in engines}
            same = True
            for r in range(args.rounds):
                batch = prompts(workload, seed, b)
                seed += b
                order = list(engines) if r % 2 == 0 else list(engines)[::-1]
                texts = {}
                for name in order:
                    got = run(engines[name], batch, args.max_tokens)
                    texts[name] = got.pop("texts")
                    for key, value in got.items():
                        totals[name][key] += value
                same = same and texts["off"] == texts["ngram"]
            row = {"workload": workload, "batch": b, "same_output": same}
            for name, t in totals.items():
                row[name] = {
                    "tokens_per_s": t["tokens"] / t["seconds"],
                    "passes_per_token": t["passes"] / t["tokens"],
                    "acceptance": t["accepted"] / t["draft_tokens"] if t["draft_tokens"] else None,
                    **t,
                }
            row["speedup"] = row["ngram"]["tokens_per_s"] / row["off"]["tokens_per_s"]
            results.append(row)
            print(f"{workload:5s} batch {b:3d}: off {row['off']['tokens_per_s']:.1f} tok/s, ngram "
                  f"{row['ngram']['tokens_per_s']:.1f} tok/s ({row['speedup']:.2f}x), acceptance "
                  f"{row['ngram']['acceptance'] or 0:.2f}, same output: {same}", flush=True)
    args.out.write_text(json.dumps({"machine": describe_machine(), "speculative_config": spec,
                                    "max_tokens": args.max_tokens, "rounds": args.rounds, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
