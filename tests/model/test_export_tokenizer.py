"""`pikaserve export-tokenizer` writes a HF tokenizer folder that tokenizes, and renders chats,
exactly as the served tokenizer does (for a .gguf model, whose tokenizer lives in the file)."""

from __future__ import annotations

from transformers import AutoTokenizer

from pikaserve.cli import main
from pikaserve.data import pika_messages
from pikaserve.model.loader import load_tokenizer, resolve_model_path

TEXTS = ["Hello, Pika!", "Cậu giỏi quá! Đúng rồi, con mèo là cat.", "  spaces\tand\nlines  ",
         "1234567 + 89 = ?", "<|im_start|> literal"]


def test_the_exported_tokenizer_matches_the_served_one(tmp_path):
    assert main(["export-tokenizer", str(tmp_path / "tok")]) == 0
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    served = load_tokenizer(resolve_model_path(None))
    for text in TEXTS:
        assert exported.encode(text, add_special_tokens=False) == served.encode(text, False)
    turn = {"previous_question": "Say 'cat'.", "previous_answer": "cat",
            "response_to_check": "That's right!"}
    messages = pika_messages(turn)
    rendered = exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == served.render_chat(messages)


def test_a_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["export-tokenizer", str(tmp_path / "tok"), "--model",
                 str(tmp_path / "nope.gguf")]) == 2
    assert "error" in capsys.readouterr().err
