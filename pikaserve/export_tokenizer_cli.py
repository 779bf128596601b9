"""`pikaserve export-tokenizer`: write a model's tokenizer as a Hugging Face tokenizer folder.

Benchmark clients that count tokens themselves (GuideLLM, vLLM's bench) need a tokenizer
folder, and a .gguf model carries its tokenizer inside the file: this writes it out
(tokenizer.json, tokenizer_config.json with the chat template, special tokens), exactly the
tokenizer pikaserve serves with. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = ("Write the tokenizer of a model (a HF folder or a .gguf file; default: the "
               "embedded SmolLM2) as a Hugging Face tokenizer folder, for benchmark clients "
               "that need one.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-tokenizer", help="write a model's tokenizer as a HF folder",
                       description=DESCRIPTION)
    p.add_argument("out", type=Path, help="the folder to write")
    p.add_argument("--model", default=None,
                   help="HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pikaserve.model.checkpoint import ModelLoadError
    from pikaserve.model.loader import load_tokenizer, resolve_model_path

    try:
        tokenizer = load_tokenizer(resolve_model_path(args.model))
    except ModelLoadError as exc:
        print(f"pikaserve export-tokenizer: error: {exc}", file=sys.stderr)
        return 2
    written = tokenizer.hf.save_pretrained(str(args.out))
    print(f"wrote {', '.join(sorted(Path(p).name for p in written))} to {args.out}")
    return 0
