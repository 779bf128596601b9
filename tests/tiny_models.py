"""Tiny random Llama / Qwen2 / Qwen3 checkpoints in Hugging Face format, made on the fly.

They share a small byte-level BPE tokenizer trained here, with a ChatML chat template, so the
engine and transformers see exactly the same files.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Hello world! How are you today? I am fine, thank you.",
    "Previous Question: Previous Answer: Response to check: emotion learn_score true false",
    '{"emotion":"happy","learn_score":true} [1, 2, 3] {"a": {"b": null}}',
    "Xin chào! Tớ buồn quá. Cậu giỏi quá! Nghe vui quá!",
] * 20


def make_tokenizer(path: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return tok


def make_tiny_model(kind: str, path: Path, seed: int = 0) -> Path:
    """Writes a random tiny model of `kind` (llama | qwen2 | qwen3) to `path`."""
    import torch
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(path)
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=kind != "llama",
    )
    if kind == "llama":
        config = transformers.LlamaConfig(
            **common,
            rope_theta=10000.0,
            rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            },
        )
        cls = transformers.LlamaForCausalLM
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**common, rope_theta=1000000.0)
        cls = transformers.Qwen2ForCausalLM
    elif kind == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=32, rope_theta=1000000.0)
        cls = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    # Random init gives near-uniform logits; sharpen them so greedy choices are well separated.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
            elif kind == "qwen2" and p.dim() == 1 and p.shape[0] != config.hidden_size:
                p.normal_(0.0, 0.1)  # qkv biases
    model.save_pretrained(path, safe_serialization=True)
    return path
