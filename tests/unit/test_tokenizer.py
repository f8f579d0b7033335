"""Tokenizers: prompts and chats become the right ids, text survives a round trip, and the
end-of-sequence ids come from the tokenizer and the config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from mlx_relay.core.errors import InvalidRequest, ModelNotFound
from mlx_relay.model.tokenizer import TextDecoder, encode_prompt, eos_token_ids, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


def test_chat_prompt_uses_the_template_with_a_generation_prompt(tokenizer: Any) -> None:
    ids = encode_prompt(tokenizer, "What is the capital of France?")
    text = tokenizer.decode(ids)
    assert text == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start
    assert ids.count(start) == 2


def test_messages_render_every_turn(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
    ]
    text = tokenizer.decode(encode_prompt(tokenizer, messages=messages))
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_raw_prompt_is_encoded_as_is(tokenizer: Any) -> None:
    text = "héllo wörld — 東京 🚀 <|im_start|>"
    ids = encode_prompt(tokenizer, text, chat=False)
    assert tokenizer.decode(ids) == text
    # The special token in the text is one token, and nothing was added around it.
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids[:-1]) == "héllo wörld — 東京 🚀 "


def test_streaming_detokenizer_rebuilds_the_text(tokenizer: Any) -> None:
    text = "The capital of France is Paris. 東京 🚀 naïve"
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    pieces = []
    for token in tokenizer.encode(text):
        detokenizer.add_token(token)
        pieces.append(detokenizer.last_segment)
    detokenizer.finalize()
    pieces.append(detokenizer.last_segment)
    assert "".join(pieces) == text


def decode_in_steps(decoder: TextDecoder, ids: list[int]) -> list[str]:
    pieces = []
    for token in ids:
        decoder.add_token(token)
        pieces.append(decoder.last_segment)
    decoder.finalize()
    pieces.append(decoder.last_segment)
    return pieces


def test_text_decoder_keeps_the_leading_space_of_a_continuation(tokenizer: Any) -> None:
    prompt = tokenizer.encode("The capital of France is")
    generated = tokenizer.encode(" Paris. 東京 🚀 naïve")
    pieces = decode_in_steps(TextDecoder(tokenizer, prompt), generated)
    assert "".join(pieces) == " Paris. 東京 🚀 naïve"
    assert pieces[0].startswith(" ")
    # No piece ever carries half a character.
    assert all("\ufffd" not in piece for piece in pieces)


def test_text_decoder_holds_an_incomplete_character(tokenizer: Any) -> None:
    ids = tokenizer.encode("🚀")
    assert len(ids) > 1  # the tiny vocabulary spells the emoji in several byte tokens
    pieces = decode_in_steps(TextDecoder(tokenizer), ids)
    assert "".join(pieces) == "🚀" and all(p in ("", "🚀") for p in pieces)


def test_eos_ids(tokenizer: Any) -> None:
    assert eos_token_ids(tokenizer) == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_config_eos_ids_are_added(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((copy / "config.json").read_text())
    config["eos_token_id"] = [0, 2]
    (copy / "config.json").write_text(json.dumps(config))
    assert eos_token_ids(load_tokenizer(copy)) == {0, 2}


def test_prompt_or_messages_exactly_one(tokenizer: Any) -> None:
    with pytest.raises(InvalidRequest, match="exactly one"):
        encode_prompt(tokenizer)
    with pytest.raises(InvalidRequest, match="exactly one"):
        encode_prompt(tokenizer, "hi", messages=[{"role": "user", "content": "hi"}])


def test_model_without_chat_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((copy / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    plain = load_tokenizer(copy)
    # A plain prompt falls back to the raw text; a conversation cannot be rendered.
    assert encode_prompt(plain, "hello world") == plain.encode("hello world")
    with pytest.raises(InvalidRequest, match="no chat template"):
        encode_prompt(plain, messages=[{"role": "user", "content": "hi"}])


def test_missing_tokenizer_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ModelNotFound, match=r"no tokenizer.json"):
        load_tokenizer(copy)
    with pytest.raises(ModelNotFound, match=r"no config.json"):
        load_tokenizer(tmp_path / "nowhere")
