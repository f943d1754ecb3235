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
    """Turns a growing list of token ids into newly printable text, never splitting a multi-byte character.

    Each push decodes only a short window (the tokens since the last printed text, plus the ones before
    them as context, as vLLM's detokenizer does), so streaming N tokens costs O(N), not O(N^2).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.printed = ""
        self.prefix_offset = 0  # the window starts here: context whose text was printed already
        self.read_offset = 0  # tokens before this one are printed

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        # The context tokens are decoded with the new ones and their text subtracted: a tokenizer may render
        # a token differently at the start of a text (SentencePiece drops a leading space).
        printed_part = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if text.endswith("\ufffd") or len(text) <= len(printed_part):  # incomplete UTF-8, or nothing visible yet
            return ""
        new = text[len(printed_part):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.printed += new
        return new
