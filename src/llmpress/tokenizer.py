"""Tokenizer helpers over transformers tokenizers: chat templates and incremental decoding."""

from __future__ import annotations

import torch

from llmpress.errors import LlmpressError


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> torch.Tensor:
    """Messages through the model's chat template (plain concatenation if it has none). Returns [1, T]."""
    if tokenizer is None:
        raise LlmpressError("this model has no tokenizer; pass a checkpoint with tokenizer files.")
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                return_tensors="pt", return_dict=True)
        return encoded["input_ids"]
    text = "\n".join(m["content"] for m in messages)
    return encode_text(tokenizer, text)


def encode_text(tokenizer, text: str) -> torch.Tensor:
    """Plain text (with the tokenizer's BOS if it adds one). Returns [1, T]."""
    if tokenizer is None:
        raise LlmpressError("this model has no tokenizer; pass a checkpoint with tokenizer files.")
    return tokenizer(text, return_tensors="pt").input_ids


class IncrementalDecoder:
    """Turns a growing list of token ids into newly printable text, never splitting a multi-byte character."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.printed = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        new, self.printed = text[len(self.printed):], text
        return new
