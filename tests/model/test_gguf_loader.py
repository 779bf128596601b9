"""The GGUF reader: weights, config and tokenizer against transformers and gguf's references."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from pikaserve.model.checkpoint import ModelLoadError
from pikaserve.model.gguf_dequant import TORCH_VECTORISED_TYPES, dequantize
from pikaserve.model.gguf_loader import load_gguf, load_gguf_tokenizer, unpermute_rope_rows

from .conftest import HEADS, KV_HEADS, Q, llama_cpp_permute, llama_cpp_rope_factors, write_tiny_gguf

SEED_REQUEST = Path("/work/shared/pika/seed_request.json")
ALL_TYPES = [Q[n] for n in "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K".split()]
# Text on which transformers' GGUF tokenizer and the original SmolLM2 tokenizer agree.
AGREED_TEXTS = [
    "Hello world!",
    "Xin chào, tớ là Pika. Con mèo đang ngủ trên ghế.",
    "Tớ buồn quá. Nghe vui quá! Bể Hả, cậu có muốn chơi trò kể tên các loại trái cây không?",
    "12345 + 67890 = 80235, pi is 3.14159, year 2024",
    "a    b\n\n\tc   d\t\t e\r\n",
    "  leading and trailing  ",
    "price: $19.99!!! <|im_end|> after",
    "I'm sure they'll say it's fine",
]


def _seed_messages() -> list[dict]:
    return json.loads(SEED_REQUEST.read_text())["messages"]


def _adding(name: str, values: np.ndarray):
    """An `extra` hook for write_tiny_gguf that writes one more tensor."""
    return lambda writer: writer.add_tensor(name, values)


def _as_torch(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


# --- the default SmolLM2 GGUF against transformers' own GGUF loading -----------------------


@pytest.mark.slow
def test_smollm_tensors_equal_transformers(smollm_checkpoint, hf_default_model):
    reference = hf_default_model.state_dict()
    assert set(smollm_checkpoint.tensors) == set(reference) - {"lm_head.weight"}  # tied
    for name, tensor in smollm_checkpoint.tensors.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.slow
def test_smollm_config_matches_transformers(smollm_checkpoint, hf_default_model):
    config, reference = smollm_checkpoint.config, hf_default_model.config
    keys = "hidden_size intermediate_size num_hidden_layers num_attention_heads model_type "
    keys += "num_key_value_heads head_dim max_position_embeddings vocab_size tie_word_embeddings"
    for key in [*keys.split(), "bos_token_id", "eos_token_id"]:
        assert config[key] == getattr(reference, key), key
    assert config["rms_norm_eps"] == pytest.approx(reference.rms_norm_eps, rel=1e-6)
    rope_theta = getattr(reference, "rope_theta", None) or reference.rope_parameters["rope_theta"]
    assert config["rope_theta"] == rope_theta


def test_smollm_config(smollm_checkpoint):
    """The values of SmolLM2-135M-Instruct's own config.json."""
    assert smollm_checkpoint.config == {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_bias": False,
    }
    assert "lm_head.weight" not in smollm_checkpoint.tensors


# --- tokenizer --------------------------------------------------------------------------------


def _original_smollm2_tokenizer(hf_tokenizer):
    """SmolLM2's tokenizer.json as published: this vocabulary, Digits -> ByteLevel pre-tokenizer."""
    from tokenizers import Tokenizer

    spec = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": True,
            },
        ],
    }
    return Tokenizer.from_str(json.dumps(spec))


@pytest.mark.slow  # transformers' conversion takes ~6-10 s
@pytest.mark.parametrize("text", AGREED_TEXTS)
def test_smollm_tokenizer_ids_equal_transformers(smollm_tokenizer, hf_smollm_tokenizer, text):
    assert smollm_tokenizer.encode(text) == hf_smollm_tokenizer.encode(text)


def test_smollm_tokenizer_matches_original_on_chat_prompt(smollm_tokenizer):
    original = _original_smollm2_tokenizer(smollm_tokenizer)
    prompt = smollm_tokenizer.apply_chat_template(
        _seed_messages(), tokenize=False, add_generation_prompt=True
    )
    for text in [prompt, "a  1", "x   42  ", "\n\n 7\t8", *AGREED_TEXTS]:
        assert smollm_tokenizer.encode(text) == original.encode(text).ids, text


def test_smollm_tokenizer_splits_digits_like_llama_cpp(smollm_tokenizer):
    """llama.cpp's "smollm" pre-tokenizer isolates digits before the GPT-2 split, so a whitespace
    run before a digit stays one token. transformers' GGUF converter misses this and gives
    ['Ċ', 'Ċ', '1'] here, changing the Pika system prompt's "\\n\\n1." and "\\n\\n2."."""
    tokens = smollm_tokenizer.convert_ids_to_tokens
    assert tokens(smollm_tokenizer.encode("check:\n\n1. x")) == ["check", ":", "ĊĊ", "1", ".", "Ġx"]
    assert tokens(smollm_tokenizer.encode("a  12345")) == ["a", "ĠĠ", "1", "2", "3", "4", "5"]


def test_smollm_tokenizer_special_tokens(smollm_tokenizer):
    tok = smollm_tokenizer
    specials = (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token)
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert len(tok) == 49152
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # add_bos_token false
    assert tok.encode("<|im_start|>user") == [1, tok.convert_tokens_to_ids("user")]
    text = "Xin chào, tớ là Pika! 123"
    assert tok.decode(tok.encode(text)) == text


def test_smollm_chat_template_renders_seed_request(smollm_tokenizer):
    messages = _seed_messages()
    rendered = smollm_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert rendered.startswith("<|im_start|>system\n" + messages[0]["content"] + "<|im_end|>\n")
    assert f"<|im_start|>user\n{messages[1]['content']}<|im_end|>\n" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm_chat_template_equals_transformers(smollm_tokenizer, hf_smollm_tokenizer):
    messages = _seed_messages()
    mine = smollm_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert mine == hf_smollm_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_tokenizers_equal_transformers(tiny_gguf, arch):
    from transformers import AutoTokenizer

    made = tiny_gguf(arch)
    mine = load_gguf_tokenizer(made.path)
    reference = AutoTokenizer.from_pretrained(made.path.parent, gguf_file=made.path.name)
    for text in ["the and to at", " the  thing 123 ändern", "Xin chào <|im_end|> x", ""]:
        assert mine.encode(text) == reference.encode(text), text
    for special in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(mine, special) == getattr(reference, special)
    if arch == "llama":  # SentencePiece vocabularies get BOS, as llama.cpp does
        assert mine.encode("the")[0] == mine.bos_token_id
    else:
        messages = [{"role": "user", "content": "hi 1"}]
        assert mine.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
            "<|im_start|>user\nhi 1<|im_end|>\n<|im_start|>assistant\n"
        )


# --- synthetic GGUF files: every type, every architecture ---------------------------------

ROUND_TRIPS = [("llama", t) for t in ALL_TYPES]
ROUND_TRIPS += [("qwen2", Q.Q8_0), ("qwen2", Q.Q4_K), ("qwen3", Q.BF16), ("qwen3", Q.Q5_0)]


@pytest.mark.parametrize(("arch", "qtype"), ROUND_TRIPS, ids=lambda v: getattr(v, "name", v))
def test_round_trip_equals_gguf_reference(tiny_gguf, arch, qtype):
    made = tiny_gguf(arch, qtype)
    checkpoint = load_gguf(made.path, torch.float32)
    assert set(checkpoint.tensors) == set(made.expected)
    for name, expected in made.expected.items():
        assert torch.equal(checkpoint.tensors[name], _as_torch(expected)), name
    config = checkpoint.config
    assert config["model_type"] == arch and config["head_dim"] == made.head_dim
    assert config["num_attention_heads"] == HEADS and config["num_key_value_heads"] == KV_HEADS
    assert config["attention_bias"] == (arch == "qwen2")
    assert config["tie_word_embeddings"] == (arch != "llama")
    assert config["vocab_size"] == checkpoint.tensors["model.embed_tokens.weight"].shape[0]


def test_load_in_half_precision(tiny_gguf):
    made = tiny_gguf("llama", Q.Q4_1)
    full = load_gguf(made.path, torch.float32).tensors
    for dtype in (torch.bfloat16, torch.float16):
        half = load_gguf(made.path, dtype).tensors
        for name, tensor in half.items():
            assert tensor.dtype == dtype and torch.equal(tensor, full[name].to(dtype)), name


def test_unpermute_inverts_llama_cpp_permute():
    w = torch.randn(HEADS * 16, 8)
    assert torch.equal(
        unpermute_rope_rows(torch.from_numpy(llama_cpp_permute(w.numpy(), HEADS)), HEADS), w
    )


def test_common_types_are_torch_vectorised():
    common = "F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K"
    assert {Q[name] for name in common.split()} <= TORCH_VECTORISED_TYPES


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the NaN/inf scales
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_numpy_on_any_bytes(qtype):
    """Arbitrary bytes (so NaN/inf scales too), spanning several of the torch kernels' chunks."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 37, 40
    raw = np.random.default_rng(1).integers(
        0, 256, (rows, blocks_per_row * type_size), dtype=np.uint8
    )
    ours = dequantize(raw, qtype, (rows, blocks_per_row * block_size), torch.float32)
    reference = _as_torch(gguf.quants.dequantize(raw, qtype))
    torch.testing.assert_close(ours, reference, rtol=0, atol=0, equal_nan=True)


# --- rope scaling from metadata --------------------------------------------------------------


def _transformers_llama3_factors(scaling: dict, theta: float, dim: int) -> np.ndarray:
    """How much transformers' own llama3 rope, given our rope_scaling, slows each frequency."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    size = {"hidden_size": HEADS * dim, "num_attention_heads": HEADS, "head_dim": dim}
    config = LlamaConfig(**size, rope_theta=theta, rope_scaling=scaling)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return (plain / scaled.double()).numpy()


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_rope_freqs_become_rope_scaling(tmp_path, factor):
    freqs = llama_cpp_rope_factors(500000.0, 64, factor, 1.0, 4.0, 8192)
    made = write_tiny_gguf(
        tmp_path / "l3.gguf", "llama", Q.F32, extra=_adding("rope_freqs.weight", freqs)
    )
    checkpoint = load_gguf(made.path)
    scaling = checkpoint.config["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == factor
    assert scaling["low_freq_factor"] == pytest.approx(1.0)
    assert scaling["high_freq_factor"] == pytest.approx(4.0)
    np.testing.assert_allclose(
        _transformers_llama3_factors(scaling, 500000.0, 64), freqs, rtol=1e-5
    )
    assert "rope_freqs.weight" not in checkpoint.tensors


def test_linear_and_yarn_rope_scaling(tmp_path):
    def linear(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)

    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(32768)

    made = write_tiny_gguf(tmp_path / "lin.gguf", "qwen2", Q.F16, extra=linear)
    assert load_gguf(made.path).config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    made = write_tiny_gguf(tmp_path / "yarn.gguf", "qwen2", Q.F16, extra=yarn)
    assert load_gguf(made.path).config["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }


# --- errors ------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="not found"):
        load_gguf_tokenizer(tmp_path / "nope.gguf")


@pytest.mark.parametrize(
    "content", [b"", b"hello, I am not a model\n" * 50, b"GGUF\x03\x00\x00\x00" + b"\xff" * 64]
)
def test_garbage_file(tmp_path, content):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        load_gguf(path)


def test_truncated_file(tiny_gguf, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_gguf("llama").path.read_bytes()[:3000])
    with pytest.raises(ModelLoadError):
        load_gguf(path)


def test_unsupported_architecture(tmp_path):
    made = write_tiny_gguf(tmp_path / "phi.gguf", "phi3", Q.F32)
    with pytest.raises(ValueError, match=r"'phi3'.*llama, qwen2, qwen3"):
        load_gguf(made.path)


def test_unsupported_tensor_type(tmp_path):
    int_norm = _adding("output_norm.weight", np.zeros(256, np.int32))
    made = write_tiny_gguf(
        tmp_path / "i32.gguf", "llama", Q.F32, extra=int_norm, drop=frozenset({"model.norm.weight"})
    )
    with pytest.raises(ModelLoadError, match="I32 cannot be dequantized"):
        load_gguf(made.path)


def test_unexpected_and_missing_tensors(tmp_path):
    experts = _adding("blk.0.ffn_gate_exps.weight", np.zeros((2, 4, 32), np.float32))
    moe = write_tiny_gguf(tmp_path / "moe.gguf", "llama", Q.F32, extra=experts)
    with pytest.raises(ModelLoadError, match="ffn_gate_exps"):
        load_gguf(moe.path)
    no_up = frozenset({"model.layers.1.mlp.up_proj.weight"})
    partial = write_tiny_gguf(tmp_path / "partial.gguf", "llama", Q.F32, drop=no_up)
    with pytest.raises(ModelLoadError, match="up_proj"):
        load_gguf(partial.path)


def test_file_without_tokenizer(tmp_path):
    path = tmp_path / "notok.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_gguf_tokenizer(path)
