"""Load a GGUF checkpoint (llama.cpp's format) as Hugging Face-named tensors and config.

The model code consumes transformers' naming and config.json keys, so this reader converts:
GGUF tensor names -> HF parameter names, GGUF metadata -> an HF config dict, and undoes the
rows permutation llama.cpp applies to Llama q/k projections. Quantized tensors are
dequantized by `gguf_dequant` (vectorised torch for the common block types).
The tokenizer (vocabulary, merges, special tokens, chat template) is rebuilt from the
file's metadata as well, so a single .gguf file is all a model needs.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from pikaserve.model.checkpoint import Checkpoint, ModelLoadError
from pikaserve.model.gguf_dequant import dequantize
from pikaserve.model.int4_weights import INT4_TYPES, Int4Groups, int4_groups

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# GGUF leaf name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_EMBEDDINGS = "model.embed_tokens.weight"  # looked up by row, never multiplied
_ROPE_FREQS = "rope_freqs.weight"  # llama3-style rope scaling, stored as per-dim factors

# llama.cpp pre-tokenizers that isolate every digit before the GPT-2 split (llama-vocab.cpp).
# transformers' GGUF converter does not know them and would group digit runs with spaces.
_DIGIT_SPLIT_PRE = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
)
_GPT2_SPLIT_PRE = frozenset({"default", "gpt-2", "gpt2", "mpt", "olmo", "jais"})


class _GGUFReader(gguf.GGUFReader):
    """gguf.GGUFReader over a plain ndarray view of the file mapping.

    The stock reader slices an np.memmap once per metadata item; memmap's Python-level
    __getitem__/__array_finalize__ made parsing a 49k-token vocabulary take ~2.5 s. A base
    ndarray view of the same mapping parses in well under half that, and still reads lazily.
    """

    @property  # type: ignore[override]  # the base's memmap, as a plain ndarray
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain_data = np.asarray(value)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """Open a GGUF file, turning every way it can fail into a ModelLoadError."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    stat = path.stat()
    return _open_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


# Model loading calls load_gguf and load_gguf_tokenizer on the same file, and parsing its
# metadata (a 49k-token vocabulary) costs ~1 s; mtime and size in the key catch rewrites.
@functools.lru_cache(maxsize=1)
def _open_cached(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
    try:
        reader = _GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/IndexError/... on bad bytes
        raise ModelLoadError(f"{path} is not a valid GGUF file: {exc}") from exc
    if "general.architecture" not in reader.fields:
        raise ModelLoadError(f"{path} has no general.architecture in its GGUF metadata")
    if reader.byte_order != "I":  # the torch dequantizers read little-endian blocks
        raise ModelLoadError(f"{path} is a big-endian GGUF file, which is not supported")
    return reader


def _value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _architecture(reader: gguf.GGUFReader) -> str:
    arch = _value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _as_f32_decimal(value: float) -> float:
    """GGUF stores floats as f32: give back config.json's short decimal (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))  # str: the shortest decimal that round-trips


def _single(value: Any, key: str) -> Any:
    """Per-layer arrays (e.g. head_count_kv) are accepted when every layer agrees."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ModelLoadError(f"{key} differs between layers ({value}); not supported")
        return value[0]
    return value


def _llama3_rope_scaling(
    factors: torch.Tensor, theta: float, head_dim: int
) -> dict[str, Any] | None:
    """Recover HF's llama3 rope_scaling from llama.cpp's per-dimension rope factors.

    llama.cpp divides frequency i by factors[i]: 1 for high frequencies, `factor` for low
    ones, and 1/((1-s)/factor + s) in between, with s linear in the frequency. Only that line
    matters, so fix original_max_position_embeddings at Llama 3's 8192 and solve for
    low/high_freq_factor from two smooth points (Llama 3's 1 and 4 when there are none).
    """
    factors = factors.double()
    factor = float(factors.max())
    if abs(factor - 1) < 1e-6:  # all ones: plain rope
        return None
    original = 8192
    low, high = 1.0, 4.0
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    smooth = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    if factor > 1 and int(smooth.sum()) >= 2:
        s = (1 / factors[smooth] - 1 / factor) / (1 - 1 / factor)
        x = original * inv_freq[smooth] / (2 * math.pi)  # = original / wavelen
        slope = float((s[-1] - s[0]) / (x[-1] - x[0]))  # s = (x - low) / (high - low)
        low = float(x[0] - s[0] / slope)
        high = low + 1 / slope
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def _rope_scaling(reader: gguf.GGUFReader, arch: str) -> dict[str, Any] | None:
    kind = _value(reader, f"{arch}.rope.scaling.type", "none")
    factor = _value(reader, f"{arch}.rope.scaling.factor")
    if kind in ("none", None) or factor is None:
        return None
    if kind not in ("linear", "yarn"):
        raise ModelLoadError(f"unsupported rope scaling type {kind!r} in GGUF metadata")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": _as_f32_decimal(factor)}
    original = _value(reader, f"{arch}.rope.scaling.original_context_length")
    if kind == "yarn" and original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _config(reader: gguf.GGUFReader, arch: str, names: set[str]) -> dict[str, Any]:
    def key(name: str, default: Any = None) -> Any:
        return _value(reader, f"{arch}.{name}", default)

    hidden = key("embedding_length")
    heads = _single(key("attention.head_count"), "head_count")
    if hidden is None or heads is None or key("block_count") is None:
        raise ModelLoadError("GGUF metadata lacks embedding_length/head_count/block_count")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens.data) if tokens is not None else None)
    eos = _value(reader, "tokenizer.ggml.eos_token_id")
    eot = _value(reader, "tokenizer.ggml.eot_token_id")
    return {
        "model_type": arch,
        "architectures": [SUPPORTED_ARCHITECTURES[arch]],
        "hidden_size": hidden,
        "intermediate_size": _single(key("feed_forward_length"), "feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _single(key("attention.head_count_kv", heads), "head_count_kv"),
        "head_dim": key("attention.key_length") or key("rope.dimension_count") or hidden // heads,
        "hidden_act": "silu",
        "rms_norm_eps": _as_f32_decimal(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _as_f32_decimal(key("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(reader, arch),
        "max_position_embeddings": key("context_length", 2048),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _value(reader, "tokenizer.ggml.bos_token_id"),
        # chat models end a turn with EOT (e.g. <|im_end|>) while EOS may be <|endoftext|>
        "eos_token_id": eos if eot is None or eot == eos else [eos, eot],
        "attention_bias": "blk.0.attn_q.bias" in names,
    }


def hf_tensor_name(gguf_name: str) -> str:
    """Map a GGUF tensor name to its transformers name, or raise for ones we do not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ModelLoadError(
        f"unexpected tensor {gguf_name!r} in GGUF file (a model variant "
        "this loader does not support, e.g. MoE or fused QKV)"
    )


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert permute() of Llama q/k rows (as transformers' GGUF loader does).

    llama.cpp interleaves each head's two rotary halves so its rope can rotate adjacent
    pairs; HF's rotate_half expects the halves contiguous.
    """
    rows = weight.shape[0]
    per_head = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return per_head.transpose(1, 2).reshape(weight.shape).contiguous()


def _shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ggml lists ne0 first


def load_gguf(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, keep_int4: bool = False
) -> Checkpoint:
    """Read a GGUF file into a Checkpoint (HF config + HF-named, dequantized `dtype` tensors).

    keep_int4: also return the 4-bit codes of Q4_0/Q4_1/Q4_K matrices (`Checkpoint.int4`).
    """
    reader = open_gguf(path)
    arch = _architecture(reader)
    names = {t.name for t in reader.tensors}
    config = _config(reader, arch, names)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors: dict[str, torch.Tensor] = {}
    int4: dict[str, Int4Groups] = {}
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            factors = dequantize(tensor.data, tensor.tensor_type, _shape(tensor), torch.float32)
            config["rope_scaling"] = _llama3_rope_scaling(
                factors, config["rope_theta"], config["head_dim"]
            )
            continue
        name = hf_tensor_name(tensor.name)
        value = dequantize(tensor.data, tensor.tensor_type, _shape(tensor), dtype)
        leaf = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
        unpermute = arch == "llama" and leaf in heads  # qwen2/qwen3 converters do not permute
        if unpermute:
            value = unpermute_rope_rows(value, heads[leaf])
        tensors[name] = value
        if keep_int4 and tensor.tensor_type in INT4_TYPES and name != _EMBEDDINGS:
            n, k = value.shape
            groups = int4_groups(tensor.data, tensor.tensor_type, (n, k))
            if unpermute:
                rows = functools.partial(unpermute_rope_rows, n_heads=heads[leaf])
                groups = groups.map_rows(rows)
            int4[name] = groups
    _check_complete(config, tensors)
    return Checkpoint(config=config, tensors=tensors, int4=int4)


def _check_complete(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Fail at load time, with names, rather than with a KeyError deep in the model code."""
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(config["num_hidden_layers"]):
        required += [
            f"model.layers.{i}.{leaf}.weight"
            for leaf in _LAYER_NAMES.values()
            if not leaf.endswith(("q_norm", "k_norm"))
        ]
        if config["model_type"] == "qwen3":
            required += [f"model.layers.{i}.self_attn.{n}.weight" for n in ("q_norm", "k_norm")]
    if not config["tie_word_embeddings"]:
        required.append("lm_head.weight")
    missing = [name for name in required if name not in tensors]
    if missing:
        raise ModelLoadError(f"GGUF file lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _tokenizer_dict(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The tokenizer metadata under the names transformers' GGUF converter expects."""
    keys = {
        "model": "tokenizer_type",
        "pre": "pre_tokenizer_type",
        "tokens": "tokens",
        "scores": "scores",
        "token_type": "token_type",
        "merges": "merges",
        "bos_token_id": "bos_token_id",
        "eos_token_id": "eos_token_id",
        "unknown_token_id": "unk_token_id",
        "padding_token_id": "pad_token_id",
        "add_space_prefix": "add_prefix_space",
    }
    found = {name: _value(reader, f"tokenizer.ggml.{key}") for key, name in keys.items()}
    return {name: value for name, value in found.items() if value is not None}


def _tokenizer_config(reader: gguf.GGUFReader, info: dict[str, Any]) -> dict[str, Any]:
    """Special tokens, BOS/EOS policy and chat template, as transformers' GGUF path sets them."""
    config: dict[str, Any] = {"chat_template": _value(reader, "tokenizer.chat_template")}
    for flag in ("add_bos_token", "add_eos_token"):
        value = _value(reader, f"tokenizer.ggml.{flag}")
        if value is not None:
            config[flag] = bool(value)
    if info.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to SPM vocabs by default
        config.setdefault("add_bos_token", True)
    tokens = info["tokens"]
    for name in ("bos", "eos", "unk", "pad"):
        token_id = info.get(f"{name}_token_id")
        config[f"{name}_token"] = tokens[token_id] if token_id is not None else None
    return {key: value for key, value in config.items() if value is not None}


def _fix_pre_tokenizer(backend: Any, pre: str | None) -> None:
    """Split text the way llama.cpp (and the original tokenizer.json) does for `pre`."""
    from tokenizers import pre_tokenizers

    if pre in _DIGIT_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
        return
    known = set(_gpt2_like_splits()) | _GPT2_SPLIT_PRE
    if pre is not None and pre not in known:
        logger.warning("GGUF pre-tokenizer %r is not known; using GPT-2's split", pre)


def _gpt2_like_splits() -> dict[str, str]:
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
        )
    except ImportError:  # older transformers: no table, the GPT-2 split everywhere
        return {}
    return GGUF_PRE_TOKENIZER_SPLITS


def load_gguf_tokenizer(path: str | os.PathLike) -> Any:
    """Build a transformers PreTrainedTokenizerFast from a GGUF file's tokenizer metadata."""
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer
    except ImportError:  # transformers 4.x
        # not in the transformers 5 that mypy checks against
        from transformers.integrations.ggml import (  # type: ignore[attr-defined, no-redef]
            convert_gguf_tokenizer,
        )
    from transformers import PreTrainedTokenizerFast

    reader = open_gguf(path)
    info = _tokenizer_dict(reader)
    if "tokens" not in info or info.get("tokenizer_type") not in ("gpt2", "llama"):
        raise ModelLoadError(
            f"{path}: unsupported GGUF tokenizer "
            f"{info.get('tokenizer_type')!r} (supported: gpt2, llama)"
        )
    backend, extra = convert_gguf_tokenizer(_value(reader, "general.architecture"), info)
    if info["tokenizer_type"] == "gpt2":
        _fix_pre_tokenizer(backend, info.get("pre_tokenizer_type"))
    kwargs = _tokenizer_config(reader, info) | dict(extra)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
