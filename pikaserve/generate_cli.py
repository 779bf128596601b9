"""`pikaserve generate`: run one chat request offline and show the answer and its timings.

By default it runs the Pika seed request (the flagship workload) twice: once cold, once with
the system prompt already in the prefix cache.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pikaserve.data import pika_seed_request
from pikaserve.engine.sampling_params import SamplingParams

DESCRIPTION = ("Run one chat request offline and print the answer and its timings. By default "
               "it runs the Pika seed request twice: once cold, once with the system prompt "
               "already in the prefix cache.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="run a chat request offline and print answer + timings",
                       description=DESCRIPTION)
    p.add_argument("--model", default=None,
                   help="HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto",
                   help="auto | bfloat16 | float16 | float32 (default auto: the fastest this "
                   "machine runs correctly)")
    p.add_argument("--request", type=Path, default=None,
                   help="an OpenAI chat-completions JSON body (default: the Pika seed request)")
    p.add_argument("--prompt", default=None, help="a user message instead of --request")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens to generate at most (default: the request's, else 256)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 for greedy (default: the request's, else 1)")
    p.add_argument("--repeat", type=int, default=2,
                   help="runs (default 2); later runs hit the prefix cache")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pikaserve.llm import LLM

    body = json.loads(args.request.read_text()) if args.request else pika_seed_request()
    if args.prompt is not None:
        body["messages"] = [{"role": "user", "content": args.prompt}]
    params = SamplingParams(
        max_tokens=args.max_tokens or body.get("max_tokens") or 256,
        temperature=args.temperature if args.temperature is not None else body.get("temperature", 1.0),
        top_p=body.get("top_p", 1.0),
        seed=body.get("seed"),
    )
    llm = LLM(args.model, dtype=args.dtype)
    print(f"model: {llm.engine.model_path} ({llm.engine.dtype}, loaded in "
          f"{llm.engine.load_seconds:.2f}s)")
    for i in range(args.repeat):
        (c,) = llm.generate([body["messages"]], params)
        n, ttft, e2e = len(c.token_ids), c.ttft, c.e2e
        if ttft is None or e2e is None:  # generate() runs every request to its last token
            raise RuntimeError("the request finished without its timings")
        per_token = (e2e - ttft) / (n - 1) * 1e3 if n > 1 else 0.0
        print(f"\nrun {i + 1}: {c.text!r}")
        print(f"  finish_reason={c.finish_reason} prompt_tokens={len(c.prompt_token_ids)} "
              f"cached_prompt_tokens={c.num_cached_tokens} output_tokens={n}")
        print(f"  TTFT {ttft * 1e3:.1f} ms, per output token {per_token:.2f} ms, "
              f"total {e2e * 1e3:.1f} ms")
    return 0
