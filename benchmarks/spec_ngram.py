"""N-gram speculative decoding (prompt lookup) against plain decoding, side by side in one run,
with llama.cpp's server on the same GGUF at batch 1.

Workloads on the default model, greedy, every prompt new (to every engine):
- input-grounded, where prompt lookup may pay: `copy` ("repeat this text" over a generated
  paragraph), `rewrite` (the paragraph with one word replaced everywhere), `code` (rename a
  variable in a generated Python function and show the whole code);
- `free`: an open question: the answer rarely repeats its context, so proposals are mostly
  rejected and show what they cost.
For each batch size the two engines (speculation off and on, each its own LLM) take turns on
the same prompts, alternating which goes first; at batch 1 llama.cpp's server answers the same
prompts in the same rotation (over loopback HTTP; ~1 ms of a ~1 s answer). Reported per
engine: output tokens per second of wall time (prefill included), forward passes per output
token, and the proposals' acceptance. Writes benchmarks/results/spec_ngram.json.

    python benchmarks/spec_ngram.py [--batch 1,8,32] [--rounds 2] [--k 4] [--no-llamacpp]

llama.cpp comes from `pip install "llama-cpp-python[server]"` in its own venv (never a project
dependency); pass its python with --llamacpp-python (default /opt/llamacpp-venv/bin/python).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from pikaserve.bench.workloads import _WORDS
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.llm import LLM
from pikaserve.machine import describe_machine
from pikaserve.model.loader import default_model_path

sys.path.insert(0, str(Path(__file__).parent))
from pika_vs_llamacpp import free_port, start, wait_ready

OUT = Path(__file__).parent / "results" / "spec_ngram.json"
GROUNDED = ("copy", "rewrite", "code")
TOPICS = ("the sea", "a robot", "school", "rain", "a red kite", "breakfast", "the moon", "music",
          "a small dog", "trains", "winter", "a garden", "football", "a library", "birds", "a river")
NAMES = ("total", "count", "score", "items", "result", "values", "limit", "name", "size", "step")
MIN_PROMPTS = 8  # per engine and point: batch-1 figures from 2 prompts swing with their length


def paragraph(rng: random.Random) -> str:
    return " ".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 10))).capitalize()
                    + "." for _ in range(5))


def code_snippet(rng: random.Random) -> tuple[str, str]:
    """A small Python function and one of its variable names."""
    fn, var, arg = rng.sample(NAMES, 3)
    lines = [f"def {fn}_of({arg}):", f"    {var} = {rng.randint(0, 9)}", f"    for x in {arg}:"]
    body = rng.choice([f"{var} = {var} + x", f"{var} += x * {rng.randint(2, 9)}",
                       f"if x > {rng.randint(1, 99)}:\n            {var} += 1"])
    lines += [f"        {body}", f"    return {var}"]
    return "\n".join(lines), var


def prompt(workload: str, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    if workload == "copy":
        text = f"Repeat this text exactly, word for word:\n\n{paragraph(rng)}"
    elif workload == "rewrite":
        words = paragraph(rng)
        old = rng.choice([w.strip(".").lower() for w in words.split() if len(w) > 3])
        text = (f"Rewrite this paragraph with the word '{old}' replaced by "
                f"'{rng.choice(_WORDS)}' everywhere:\n\n{words}")
    elif workload == "code":
        code, var = code_snippet(rng)
        text = (f"Rename the variable `{var}` to `{rng.choice(_WORDS)}` in this Python code and "
                f"show the whole code:\n\n```python\n{code}\n```")
    else:
        text = f"Tell me something interesting about {rng.choice(TOPICS)} (idea {seed})."
    return [{"role": "user", "content": text}]


def run(llm: LLM, batch: list[list[dict[str, str]]], max_tokens: int) -> dict:
    engine = llm.engine
    before, passes = engine.stats(), engine.num_forward_passes
    start_time = time.perf_counter()
    out = llm.generate(batch, SamplingParams(max_tokens=max_tokens, temperature=0))
    seconds = time.perf_counter() - start_time
    after = engine.stats()
    return {
        "seconds": seconds,
        "tokens": sum(len(c.token_ids) for c in out),
        "passes": engine.num_forward_passes - passes,
        "draft_tokens": after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens,
        "accepted": after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens,
        "texts": [c.text for c in out],
    }


def run_llamacpp(url: str, batch: list[list[dict[str, str]]], max_tokens: int) -> dict:
    """One prompt (batch 1) through llama.cpp's OpenAI server, greedy."""
    (messages,) = batch
    start_time = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    r.raise_for_status()
    seconds = time.perf_counter() - start_time
    body = r.json()
    return {"seconds": seconds, "tokens": body["usage"]["completion_tokens"], "passes": 0,
            "draft_tokens": 0, "accepted": 0, "texts": [body["choices"][0]["message"]["content"]]}


def start_llamacpp(python: str, stack: ExitStack, log: Path) -> str:
    threads = str(len(os.sched_getaffinity(0)))
    port = free_port()
    proc = start([python, "-m", "llama_cpp.server", "--model", str(default_model_path()),
                  "--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", "2048",
                  "--port", str(port)], log)
    stack.callback(proc.terminate)
    url = f"http://127.0.0.1:{port}"
    print(f"llama.cpp ready in {wait_ready(url, proc):.1f} s", flush=True)
    return url


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="1,4,8,16,32", help="batch sizes (requests generated together)")
    p.add_argument("--workloads", default="copy,rewrite,code,free")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per batch size "
                   f"(more at small batches: at least {MIN_PROMPTS} prompts per point; a multiple of "
                   "the engines compared, so that each goes first as often)")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--llamacpp-python", default="/opt/llamacpp-venv/bin/python")
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp at batch 1")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    results = []
    seed = 0
    with ExitStack() as stack:
        engines = {"off": LLM(), "ngram": LLM(speculative_config=spec)}
        llamacpp = None if args.no_llamacpp else start_llamacpp(
            args.llamacpp_python, stack, args.out.with_name("spec_ngram_llamacpp.log"))
        for workload in args.workloads.split(","):
            for b in (int(x) for x in args.batch.split(",")):
                runners = {name: (lambda batch, llm=llm: run(llm, batch, args.max_tokens))
                           for name, llm in engines.items()}
                if b == 1 and llamacpp is not None:
                    runners["llama.cpp"] = lambda batch: run_llamacpp(llamacpp, batch, args.max_tokens)
                totals = {name: {"seconds": 0.0, "tokens": 0, "passes": 0, "draft_tokens": 0,
                                 "accepted": 0} for name in runners}
                same = True
                rounds = max(args.rounds, math.ceil(MIN_PROMPTS / b))
                rounds = -(-rounds // len(runners)) * len(runners)  # each goes first as often
                for r in range(rounds):
                    batch = [prompt(workload, seed + i) for i in range(b)]
                    seed += b
                    names = list(runners)
                    order = names[r % len(names):] + names[: r % len(names)]
                    texts = {}
                    for name in order:
                        got = runners[name](batch)
                        texts[name] = got.pop("texts")
                        for key, value in got.items():
                            totals[name][key] += value
                    same = same and texts["off"] == texts["ngram"]
                row = {"workload": workload, "batch": b, "same_output": same}
                for name, t in totals.items():
                    row[name] = {
                        "tokens_per_s": t["tokens"] / t["seconds"],
                        "passes_per_token": t["passes"] / t["tokens"] if name != "llama.cpp" else None,
                        "acceptance": t["accepted"] / t["draft_tokens"] if t["draft_tokens"] else None,
                        **t,
                    }
                row["speedup"] = row["ngram"]["tokens_per_s"] / row["off"]["tokens_per_s"]
                line = (f"{workload:7s} batch {b:3d}: off {row['off']['tokens_per_s']:.1f} tok/s, "
                        f"ngram {row['ngram']['tokens_per_s']:.1f} tok/s ({row['speedup']:.2f}x), "
                        f"acceptance {row['ngram']['acceptance'] or 0:.2f}, same output: {same}")
                if "llama.cpp" in row:
                    row["ngram_vs_llamacpp"] = row["ngram"]["tokens_per_s"] / row["llama.cpp"]["tokens_per_s"]
                    row["off_vs_llamacpp"] = row["off"]["tokens_per_s"] / row["llama.cpp"]["tokens_per_s"]
                    line += (f"; llama.cpp {row['llama.cpp']['tokens_per_s']:.1f} tok/s (ngram "
                             f"{row['ngram_vs_llamacpp']:.2f}x, off {row['off_vs_llamacpp']:.2f}x)")
                results.append(row)
                print(line, flush=True)
    args.out.write_text(json.dumps({"machine": describe_machine(), "speculative_config": spec,
                                    "max_tokens": args.max_tokens, "rounds": args.rounds,
                                    "min_prompts": MIN_PROMPTS, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
