"""Fixtures for the GGUF reader tests: tiny synthetic GGUF files written with gguf.GGUFWriter.

Each file holds random weights (HF layout, then laid out the way llama.cpp's converter does:
Llama q/k rows permuted) in one ggml type, plus a small tokenizer. Alongside the path, the
fixture returns what a correct reader must give back: gguf's own numpy dequantization of the
stored data, un-permuted, under transformers' names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

Q = gguf.GGMLQuantizationType
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
QWEN3_HEAD_DIM = 128  # != HIDDEN // HEADS, so head_dim must come from attention.key_length
# where each K-quant keeps its float16 scales, so random blocks get finite ones
K_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


@dataclass
class TinyGGUF:
    path: Path
    arch: str
    expected: dict[str, np.ndarray]  # HF name -> float32 values a correct reader returns
    head_dim: int


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, for q (n_head) and k (n_kv_head)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama_cpp_rope_factors(
    theta: float, dim: int, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's rope_freqs tensor for a llama3 rope_scaling."""
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes in `qtype`'s block layout (for types gguf-py cannot quantize to)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in K_SCALE_OFFSETS.get(qtype, ()):
        scales = rng.uniform(0.001, 0.02, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block_size * type_size)


def encode(values: np.ndarray, qtype: Q, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(data to write, float32 values gguf's reference dequantizer reads back from it)."""
    if qtype == Q.F32:
        return values, values
    if qtype == Q.F16:
        return values.astype(np.float16), values.astype(np.float16).astype(np.float32)
    try:
        data = gguf.quants.quantize(values, qtype)
    except NotImplementedError:
        data = random_blocks(qtype, *values.shape, rng)
    return data, gguf.quants.dequantize(data, qtype)


def hf_weights(
    arch: str, vocab: int, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], int]:
    head_dim = QWEN3_HEAD_DIM if arch == "qwen3" else HIDDEN // HEADS
    q_out, kv_out = HEADS * head_dim, KV_HEADS * head_dim

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * 0.05

    weights = {"model.embed_tokens.weight": w(vocab, HIDDEN), "model.norm.weight": 1 + w(HIDDEN)}
    if arch == "llama":
        weights["lm_head.weight"] = w(vocab, HIDDEN)  # untied, unlike the qwen files
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": 1 + w(HIDDEN),
            p + "post_attention_layernorm.weight": 1 + w(HIDDEN),
            p + "self_attn.q_proj.weight": w(q_out, HIDDEN),
            p + "self_attn.k_proj.weight": w(kv_out, HIDDEN),
            p + "self_attn.v_proj.weight": w(kv_out, HIDDEN),
            p + "self_attn.o_proj.weight": w(HIDDEN, q_out),
            p + "mlp.gate_proj.weight": w(FFN, HIDDEN),
            p + "mlp.up_proj.weight": w(FFN, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, FFN),
        }
        if arch == "qwen2":
            weights |= {
                p + f"self_attn.{x}_proj.bias": w(n)
                for x, n in (("q", q_out), ("k", kv_out), ("v", kv_out))
            }
        if arch == "qwen3":
            weights |= {
                p + "self_attn.q_norm.weight": 1 + w(head_dim),
                p + "self_attn.k_norm.weight": 1 + w(head_dim),
            }
    return weights, head_dim


def gguf_name(hf_name: str) -> str:
    from pikaserve.model.gguf_loader import _GLOBAL_NAMES, _LAYER_NAMES

    reverse = {v: k for k, v in _GLOBAL_NAMES.items()}
    if hf_name in reverse:
        return reverse[hf_name]
    _, _, i, *leaf, suffix = hf_name.split(".")
    layer = {v: k for k, v in _LAYER_NAMES.items()}[".".join(leaf)]
    return f"blk.{i}.{layer}.{suffix}"


def add_spm_tokenizer(writer: gguf.GGUFWriter) -> int:
    """A small SentencePiece-style ("llama") vocabulary: specials, byte fallback, pieces."""
    pieces = [
        "\u2581",
        "t",
        "h",
        "e",
        "a",
        "n",
        "d",
        "o",
        "\u2581t",
        "he",
        "\u2581the",
        "an",
        "nd",
        "\u2581and",
        "\u2581a",
        "\u2581d",
        "\u2581o",
        "at",
        "\u2581to",
        "\u2581at",
    ]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_space_prefix(True)
    return len(tokens)


def add_bpe_tokenizer(writer: gguf.GGUFWriter) -> int:
    """A small byte-level ("gpt2") vocabulary with Qwen-style control tokens and chat template."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    merges = [
        "\u0120 t",
        "h e",
        "\u0120t he",
        "i n",
        "in g",
        "\u0120 a",
        "a n",
        "an d",
        "\u0120 and",
    ]
    merged = [m.replace(" ", "") for m in merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = alphabet + merged + specials
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(alphabet) + len(merged)) + [3] * len(specials))
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return len(tokens)


def write_tiny_gguf(
    path: Path,
    arch: str,
    qtype: Q,
    seed: int = 0,
    extra: Callable[[gguf.GGUFWriter], None] | None = None,
    drop: frozenset[str] = frozenset(),
) -> TinyGGUF:
    """Write a tiny model; `extra` adds metadata/tensors, `drop` leaves HF-named tensors out."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(4096)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    vocab = add_spm_tokenizer(writer) if arch == "llama" else add_bpe_tokenizer(writer)
    weights, head_dim = hf_weights(arch, vocab, rng)
    if arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    else:
        writer.add_rope_dimension_count(head_dim)
    if extra is not None:
        extra(writer)
    expected = {}
    for name, values in weights.items():
        if name in drop:
            continue
        n_head = (
            {"q_proj": HEADS, "k_proj": KV_HEADS}.get(name.split(".")[-2])
            if arch == "llama"
            else None
        )
        stored = llama_cpp_permute(values, n_head) if n_head else values
        # like llama.cpp: 1-D tensors (norms, biases) always stay F32
        data, readback = encode(stored, qtype if values.ndim == 2 else Q.F32, rng)
        raw_dtype = None if data.dtype != np.uint8 else (qtype if values.ndim == 2 else Q.F32)
        writer.add_tensor(gguf_name(name), data, raw_dtype=raw_dtype)
        expected[name] = reverse_permute(readback, n_head) if n_head else readback
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyGGUF(path, arch, expected, head_dim)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """tiny_gguf(arch, qtype) -> TinyGGUF, written once per session."""
    made: dict[tuple[str, Q], TinyGGUF] = {}

    def get(arch: str, qtype: Q = Q.Q8_0) -> TinyGGUF:
        if (arch, qtype) not in made:
            folder = tmp_path_factory.mktemp(f"gguf_{arch}_{qtype.name}")
            made[arch, qtype] = write_tiny_gguf(
                folder / f"tiny-{arch}-{qtype.name}.gguf", arch, qtype
            )
        return made[arch, qtype]

    return get


@pytest.fixture(scope="session")
def smollm_checkpoint(default_model_path):
    import torch

    from pikaserve.model.gguf_loader import load_gguf

    return load_gguf(default_model_path, torch.float32)


@pytest.fixture(scope="session")
def smollm_tokenizer(default_model_path):
    from pikaserve.model.gguf_loader import load_gguf_tokenizer

    return load_gguf_tokenizer(default_model_path)


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(default_model_path):
    """transformers' own tokenizer conversion of the default GGUF (the reference)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name
    )
