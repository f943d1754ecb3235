"""One request's output as text: incremental detokenization plus OpenAI stop strings.

Stop strings live on text, not tokens (a stop string can span tokens, or end inside one), so the server
matches them on the decoded text. While streaming, the last len(longest stop) - 1 characters are held
back: they could be the start of a stop string, and text once sent cannot be taken back.
"""

from __future__ import annotations

from llmpress.tokenizer import IncrementalDecoder


class CompletionText:
    """Decodes a request's tokens as they arrive and cuts the text at the first stop string."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.stop = [s for s in (stop or []) if s]
        self.hold_chars = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # decoded so far (cut at the stop string once one matched)
        self.released = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string matched; the request should end

    def push(self, token_ids: list[int]) -> str:
        """Take newly generated tokens; return the text that can be sent now."""
        if self.stopped or self.decoder is None:  # tokenizer-less models produce no text
            return ""
        for token_id in token_ids:
            self.text += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """The request ended: return whatever text is still held back."""
        if self.stopped or self.decoder is None:
            return ""
        # The decoder holds back a trailing incomplete UTF-8 sequence; at the end, show what decode gives.
        full = self.tokenizer.decode(self.decoder.ids, skip_special_tokens=True)
        if full.startswith(self.text):
            self.text = full
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        # A match cannot start before `released`: text was released only once no stop string could begin there.
        cut = min((i for i in (self.text.find(s, self.released) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            end = cut
        else:
            end = len(self.text) if final else max(self.released, len(self.text) - self.hold_chars)
        piece, self.released = self.text[self.released:end], end
        return piece
