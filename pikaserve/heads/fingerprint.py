"""A short, stable fingerprint of the weights and tokenizer a head was trained on.

A head's features mean something only for the exact weights and tokenizer they came from, so a
head file records this and the server refuses a head whose fingerprint differs. It hashes the
checkpoint files (size plus 64 KiB samples spread over each, so a multi-GB model costs
milliseconds, not a full read) and the tokenizer's vocabulary and chat template; it does not
depend on the dtype or device the model runs in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pikaserve.model.tokenizer import Tokenizer

SAMPLE_BYTES = 64 * 1024
NUM_SAMPLES = 64
WEIGHT_SUFFIXES = (".gguf", ".safetensors")


def weights_fingerprint(model_path: Path) -> str:
    files = [model_path] if model_path.is_file() else sorted(
        p for p in model_path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            for k in range(NUM_SAMPLES):
                f.seek(max(0, size - SAMPLE_BYTES) * k // (NUM_SAMPLES - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    vocab = sorted(tokenizer.hf.get_vocab().items())
    template = getattr(tokenizer.hf, "chat_template", None) or ""
    blob = json.dumps([vocab, template], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
