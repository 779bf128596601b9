"""Engine speed on this machine, side by side with transformers' generate, in one run.

Measures, for the default model (SmolLM2-135M-Instruct GGUF) in the same dtype on both sides:
load time, prefill tokens/s (512-token prompt), decode tokens/s at batch 1 and 32 (128 new
tokens), and the Pika seed request (max_tokens 50, as the seed sent it) cold and warm.
Writes benchmarks/results/engine_cpu.json.

    python benchmarks/engine_cpu.py [--dtype bfloat16] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from pikaserve.data import pika_messages, pika_seed_request, pika_turns
from pikaserve.engine.sampling_params import SamplingParams
from pikaserve.llm import LLM
from pikaserve.machine import describe_machine
from pikaserve.model.loader import default_model_path, load_checkpoint

RESULTS = Path(__file__).parent / "results"


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def random_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(n)]


# --- pikaserve ---------------------------------------------------------------------------
def bench_pikaserve(dtype: str) -> dict:
    llm, load = timed(lambda: LLM(None, dtype=dtype, enable_prefix_caching=False))
    greedy = dict(temperature=0, ignore_eos=True)
    llm.generate(random_prompts(1, 64, 0), SamplingParams(max_tokens=4, **greedy))  # warm-up

    prompt = random_prompts(1, 512, 1)
    ttfts = [llm.generate(prompt, SamplingParams(max_tokens=1, **greedy))[0].ttft for _ in range(3)]
    prefill = 512 / statistics.median(ttfts)

    (c,) = llm.generate(random_prompts(1, 32, 2), SamplingParams(max_tokens=128, **greedy))
    decode_1 = 127 / (c.e2e - c.ttft)

    batch = random_prompts(32, 32, 3)
    outs, total = timed(lambda: llm.generate(batch, SamplingParams(max_tokens=128, **greedy)))
    first = max(o.ttft for o in outs)
    decode_32 = sum(len(o.token_ids) - 1 for o in outs) / (total - first)

    # Pika: a fresh engine with prefix caching, as served.
    pika = LLM(None, dtype=dtype)
    seed = pika_seed_request()
    params = SamplingParams(max_tokens=seed["max_tokens"], temperature=0)
    cold = pika.generate([seed["messages"]], params)[0]
    warm = [pika.generate([pika_messages(t)], params)[0] for t in pika_turns()[1:9]]
    return {
        "dtype": str(llm.engine.dtype).removeprefix("torch."),
        "load_s": load,
        "prefill_tok_s": prefill,
        "decode_tok_s_batch1": decode_1,
        "decode_tok_s_batch32": decode_32,
        "pika_cold_ms": cold.e2e * 1e3,
        "pika_warm_ms_median": statistics.median(w.e2e for w in warm) * 1e3,
        "pika_warm_ttft_ms_median": statistics.median(w.ttft for w in warm) * 1e3,
        "pika_warm_cached_tokens": statistics.median(w.num_cached_tokens for w in warm),
        "pika_warm_output_tokens": statistics.median(len(w.token_ids) for w in warm),
    }


# --- transformers ------------------------------------------------------------------------
def bench_transformers(dtype: str) -> dict:
    import transformers

    path = default_model_path()
    torch_dtype = getattr(torch, dtype)
    model, load = timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch_dtype).eval())
    tokenizer = load_checkpoint(path, torch.float32)[1]  # identical prompt ids on both sides

    def generate(ids: list[list[int]], n: int) -> float:
        x = torch.tensor(ids)
        with torch.no_grad():
            _, t = timed(lambda: model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0))
        return t

    generate(random_prompts(1, 64, 0), 4)
    prefill_t = statistics.median(generate(random_prompts(1, 512, 1), 1) for _ in range(3))
    one = random_prompts(1, 32, 2)
    decode_1 = 127 / (generate(one, 128) - generate(one, 1))
    batch = random_prompts(32, 32, 3)
    decode_32 = 32 * 127 / (generate(batch, 128) - generate(batch, 1))

    seed = pika_seed_request()
    cold_ids = [tokenizer.encode_chat(seed["messages"])]
    with torch.no_grad():
        _, cold = timed(lambda: model.generate(torch.tensor(cold_ids), max_new_tokens=50,
                                               do_sample=False, pad_token_id=0))
    warm = [generate([tokenizer.encode_chat(pika_messages(t))], 50) for t in pika_turns()[1:9]]
    return {
        "dtype": dtype,
        "load_s": load,
        "prefill_tok_s": 512 / prefill_t,
        "decode_tok_s_batch1": decode_1,
        "decode_tok_s_batch32": decode_32,
        "pika_cold_ms": cold * 1e3,
        "pika_warm_ms_median": statistics.median(warm) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_cpu.json")
    args = parser.parse_args()
    ours = bench_pikaserve(args.dtype)
    theirs = bench_transformers(args.dtype)
    # > 1 means pikaserve is better: higher throughput, or lower time.
    ratios = {
        k: ours[k] / theirs[k] if "tok_s" in k else theirs[k] / ours[k]
        for k in theirs if k != "dtype"
    }
    result = {
        "benchmark": "engine_cpu",
        "machine": describe_machine(),
        "threads": torch.get_num_threads(),
        "pikaserve": ours,
        "transformers": theirs,
        "speedup_pikaserve_over_transformers": ratios,
        "notes": "speedup > 1 means pikaserve is better (lower time or higher throughput). "
                 "Pika warm: system prompt cached in pikaserve; transformers has no cross-request cache.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
