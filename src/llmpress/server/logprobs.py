"""The engine's TokenLogprob entries in OpenAI's two shapes: completions' legacy parallel lists and chat's
per-token objects.

A token's text is `tokenizer.decode([id])`, what OpenAI shows (" Paris"), not the vocabulary piece that
`convert_ids_to_tokens` gives ("ĠParis"). A token holding part of a multi-byte character decodes to
U+FFFD on its own, so its `bytes` are those of U+FFFD, not the raw byte it stands for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmpress.server import protocol as api

if TYPE_CHECKING:
    from llmpress.engine.logprobs import TokenLogprob

# JSON has no -inf (a token the model rules out entirely); vLLM reports such logprobs as -9999.0 too.
MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


class TokenText:
    """Token id -> its text as OpenAI shows it, cached: top-N lists decode the same tokens over and over."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            # A model served without a tokenizer still gets a readable, unique name per token (vLLM's form).
            text = f"token_id:{token_id}" if self.tokenizer is None else self.tokenizer.decode([token_id])
            self._texts[token_id] = text
        return text


class CompletionLogprobs:
    """One choice's entries in the legacy shape; text offsets run on across the chunks of a stream."""

    def __init__(self, token_text: TokenText):
        self.token_text = token_text
        self.offset = 0  # characters of token text so far

    def __call__(self, entries: list["TokenLogprob"]) -> api.CompletionLogprobs:
        tokens, offsets, tops = [], [], []
        for entry in entries:
            text = self.token_text(entry.token_id)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            # OpenAI: the top N and, always, the sampled token, so up to N + 1 of them; first spelling wins
            top: dict[str, float] = {}
            for token_id, logprob in [*entry.top, (entry.token_id, entry.logprob)]:
                top.setdefault(self.token_text(token_id), _finite(logprob))
            tops.append(top)
        return api.CompletionLogprobs(tokens=tokens, token_logprobs=[_finite(e.logprob) for e in entries],
                                      top_logprobs=tops, text_offset=offsets)


def chat_logprobs(entries: list["TokenLogprob"], token_text: TokenText) -> api.ChatLogprobs:
    """Chat's shape: per token its text, logprob, UTF-8 bytes and the top_logprobs most likely tokens."""
    def top(token_id: int, logprob: float) -> api.TopLogprob:
        text = token_text(token_id)
        return api.TopLogprob(token=text, logprob=_finite(logprob), bytes=list(text.encode("utf-8")))

    content = []
    for entry in entries:
        first = top(entry.token_id, entry.logprob)
        content.append(api.ChatTokenLogprob(token=first.token, logprob=first.logprob, bytes=first.bytes,
                                            top_logprobs=[top(t, lp) for t, lp in entry.top]))
    return api.ChatLogprobs(content=content)
