"""Piece-by-piece cached encoding and the raw decode give exactly transformers' ids and text."""

from __future__ import annotations

import random

import pytest

from pikaserve.bench.workloads import pika_workload
from pikaserve.model.loader import load_tokenizer
from pikaserve.model.segment_encoder import SegmentEncoder
from pikaserve.model.tokenizer import Tokenizer

EDGE_TEXTS = [
    "",
    "<|im_start|>",
    "<|im_start|><|im_end|>",
    "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n  two  spaces <|im_end|>",
    "no control tokens at all, just text. Xin chào! Tớ buồn quá 😢",
    "<|im_end|>trailing text",
    "leading text<|im_start|>",
    "<|endoftext|>a<|im_start|>b<|im_end|>c",
    "\n\n\t  <|im_start|>\n\n",
    "<|im_start<|im_start|>|>",  # a partial control token is text
]


@pytest.fixture(scope="module", params=["default", "tiny"])
def tokenizer(request, default_model_path, tiny_model_dir) -> Tokenizer:
    path = default_model_path if request.param == "default" else tiny_model_dir("qwen3")
    return load_tokenizer(path)


def chat_texts(tok: Tokenizer) -> list[str]:
    return [tok.render_chat(list(r.messages)) for r in pika_workload().requests]


def test_pieces_are_cut_where_the_tokenizer_cuts(tokenizer):
    assert tokenizer._segments is not None  # both tokenizers qualify
    rng = random.Random(0)
    texts = EDGE_TEXTS + chat_texts(tokenizer)
    shuffled = ["".join(rng.sample(t, len(t))) for t in texts[-5:]]
    for text in texts + shuffled + texts:  # the second pass reads the cache
        want = tokenizer.hf.encode(text, add_special_tokens=False)
        assert tokenizer.encode(text, add_special_tokens=False) == want, text


def test_raw_decode_gives_transformers_text(tokenizer):
    rng = random.Random(1)
    chat = tokenizer.hf.encode(chat_texts(tokenizer)[0], add_special_tokens=False)
    samples = [chat, chat[:1], chat[-7:], [],
               [rng.randrange(tokenizer.vocab_size) for _ in range(50)]]  # split characters too
    for ids in samples:
        for skip in (True, False):
            want = tokenizer.hf.decode(ids, skip_special_tokens=skip)
            assert tokenizer.decode(ids, skip_special_tokens=skip) == want


def test_added_tokens_with_matching_rules_keep_whole_text_encoding(tiny_model_dir):
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    hf.add_tokens([AddedToken("<tool>", lstrip=True)])  # eats the spaces before it
    assert SegmentEncoder.for_tokenizer(hf) is None
    tok = Tokenizer(hf, set())
    text = "call   <tool> now"
    assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


def test_a_pre_tokenizer_that_marks_only_the_first_word_keeps_whole_text_encoding():
    """Metaspace with prepend_scheme "first" (SentencePiece style) marks the input's first word
    only, so a piece after a control token encodes differently alone: the probes find it."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rust = RustTokenizer(models.BPE(unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    rust.decoder = decoders.Metaspace(prepend_scheme="first")
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    rust.train_from_iterator(["Hello world, hello there."] * 50,
                             trainers.BpeTrainer(vocab_size=120, special_tokens=specials))
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="<unk>",
                                 additional_special_tokens=specials[1:])
    text = "<|im_start|>Hello world"
    assert rust.encode(text).ids[1:] != rust.encode("Hello world").ids  # the trap is real
    assert SegmentEncoder.for_tokenizer(hf) is None
    tok = Tokenizer(hf, set())
    assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
