#!/usr/bin/env bash
# Run HERE (a machine with PyPI access), before benchmarks/gpu/check.sh travels to a GPU machine.
#
# The GPU machine has Python 3.12, torch (CUDA), triton, transformers, numpy, pytest and httpx,
# but no network: this fetches the other packages pikaserve imports as Python 3.12 wheels into
# benchmarks/gpu/wheels/, and saves SmolLM2's tokenizer (from the embedded GGUF) into
# benchmarks/gpu/smollm2/. Both are git-ignored; pass them to the device run as `carry` paths.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf wheels && mkdir -p wheels
# What pikaserve imports that the GPU machine lacks, with their own dependencies.
python -m pip download --quiet --dest wheels --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    "llguidance>=1.7" gguf "pydantic>=2" starlette uvicorn prometheus_client rich jsonschema \
    pyyaml jinja2
# Keep only what the GPU machine's image lacks (device/KINDS.md lists what it has); its own
# copies of the rest (anyio, click, h11, rich, pyyaml, jinja2, ...) stand. typing_extensions
# travels too: pydantic needs a recent one. Versions are the ones resolved together above.
keep='^(llguidance|gguf|pydantic|pydantic_core|annotated_types|typing_inspection|typing_extensions|starlette|uvicorn|jsonschema|jsonschema_specifications|referencing|rpds_py)-'
for f in wheels/*.whl; do
    basename "$f" | grep -Eq "$keep" || rm -f "$f"
done
ls wheels
du -sh wheels

# SmolLM2-135M-Instruct's tokenizer and config, so the check can build a model of its shape
# (random weights: the 98 MB GGUF cannot travel) that tokenizes Pika's prompt as the real one.
cd ../..
python - <<'PY'
import json
from pathlib import Path

from pikaserve.model.gguf_loader import load_gguf_tokenizer
from pikaserve.model.loader import default_model_path, load_checkpoint

out = Path("benchmarks/gpu/smollm2")
out.mkdir(exist_ok=True)
path = default_model_path()
load_gguf_tokenizer(path).save_pretrained(out)
# older transformers read the chat template only from tokenizer_config.json
tok_config = json.loads((out / "tokenizer_config.json").read_text())
template = out / "chat_template.jinja"
if "chat_template" not in tok_config and template.is_file():
    tok_config["chat_template"] = template.read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1))
checkpoint, _ = load_checkpoint(path, __import__("torch").float32)
config = {k: v for k, v in checkpoint.config.items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
(out / "config.json").write_text(json.dumps(config, indent=1))
print("saved", sorted(p.name for p in out.iterdir()))
PY
du -sh benchmarks/gpu/smollm2
