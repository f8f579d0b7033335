"""Tokenizers: loaded with mlx-lm (a streaming detokenizer included) and used to turn a
prompt or a chat into token ids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_relay.core.errors import InvalidRequest, ModelError, ModelNotFound
from mlx_relay.model.load import read_config

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper


def load_tokenizer(model_dir: Path) -> TokenizerWrapper:
    """The tokenizer of an mlx-lm model directory, with the config's eos ids added.

    Raises:
        ModelNotFound: The directory or its tokenizer files are missing.
        ModelError: The tokenizer files cannot be read.
    """
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise ModelNotFound(f"{model_dir}: no tokenizer.json or tokenizer.model")
    eos = config.get("eos_token_id")
    try:
        return mlx_lm_load_tokenizer(model_dir, eos_token_ids=eos)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir}: cannot load the tokenizer: {exc}") from None


def encode_prompt(
    tokenizer: Any,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    chat: bool = True,
) -> list[int]:
    """Token ids for a prompt or a conversation.

    Args:
        tokenizer: A tokenizer from :func:`load_tokenizer`.
        prompt: Plain text. With ``chat``, it becomes one user message.
        messages: A conversation (``role``/``content`` dicts), rendered with the model's chat
            template followed by the assistant's turn.
        chat: Whether to apply the chat template to ``prompt``; if the model has none, the
            text is encoded as is.

    Raises:
        InvalidRequest: Neither or both of ``prompt`` and ``messages`` are given, or
            ``messages`` is given for a model without a chat template.
    """
    if (prompt is None) == (messages is None):
        raise InvalidRequest("give exactly one of a prompt or messages")
    if messages is None and (not chat or not tokenizer.has_chat_template):
        assert prompt is not None
        return list(tokenizer.encode(prompt))
    if not tokenizer.has_chat_template:
        raise InvalidRequest("this model has no chat template; send a plain prompt instead")
    conversation = messages if messages is not None else [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict):  # some tokenizer versions return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def eos_token_ids(tokenizer: Any) -> set[int]:
    """Every token id that ends a generation."""
    ids = {int(i) for i in getattr(tokenizer, "eos_token_ids", None) or ()}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


class TextDecoder:
    """Turns generated token ids into text deltas, keeping every character.

    mlx-lm's streaming detokenizers drop the first generated space (right for a chat reply,
    wrong for a completion: "The capital of France is" must continue with " Paris"). This
    decodes a short window of ids instead and releases what the newest token added, holding
    back an incomplete UTF-8 character. ``context`` (the prompt's last ids) gives the first
    token the neighbours that tokenizers need to decode its leading space.

    It offers ``add_token``, ``finalize`` and ``last_segment``, like mlx-lm's detokenizers.
    """

    _CONTEXT = 6

    def __init__(self, tokenizer: Any, context: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(context[-self._CONTEXT :])
        self._prefix = 0
        self._read = len(self._ids)
        self.last_segment = ""

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=False))

    def _advance(self, *, final: bool) -> None:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.last_segment = after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        else:
            self.last_segment = ""

    def add_token(self, token: int) -> None:
        self._ids.append(token)
        self._advance(final=False)

    def finalize(self) -> None:
        self._advance(final=True)
