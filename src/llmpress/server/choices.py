"""The engine requests behind one API request: one per choice (`n`), each turned into text pieces.

A request with n > 1 is n engine requests (ids `{id}-{i}`), which the prefix cache lets share the prompt's
KV blocks once the first has computed them. Their pieces are merged as they come, each tagged with its
choice index; closing the merge (the client left, a stop string, an error) aborts every engine request
still running, so none is left generating for nobody.
"""

from __future__ import annotations

import asyncio
import dataclasses
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

from llmpress.generation.sampling import SamplingParams
from llmpress.server import protocol as api
from llmpress.server.async_engine import AsyncEngine
from llmpress.server.text_stream import CompletionText

if TYPE_CHECKING:
    from llmpress.engine.logprobs import TokenLogprob


@dataclass
class Piece:
    """What one engine output adds to a choice."""
    text: str  # may be "" (text held back for a possible stop string)
    logprobs: list["TokenLogprob"] | None  # one per token of the output, text held back or not; None: not asked
    finish_reason: str | None  # set on the choice's last piece


class Choice:
    """One engine request in flight: its outputs turned into text pieces, plus the counts `usage` reports."""

    def __init__(self, async_engine: AsyncEngine, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 text: CompletionText):
        self.outputs = async_engine.generate(request_id, prompt_ids, params)
        self.text = text
        self.completion_tokens = self.cached_tokens = 0
        self.finish_reason: str | None = None
        self._first = None

    async def start(self) -> None:
        """Wait for the first output: the engine's refusal (prompt too long, ...) is raised here."""
        self._first = await anext(self.outputs)

    async def close(self) -> None:
        """Abort the engine request if it is still running."""
        await self.outputs.aclose()

    async def pieces(self) -> AsyncIterator[Piece]:
        """Text as it is released; the last piece carries the finish reason."""
        async with aclosing(self.outputs) as outputs:  # closing it aborts the request if it is still running
            if self._first is None:
                await self.start()
            output, self._first = self._first, None
            while True:
                text = self.text.push(output.new_token_ids)
                self.completion_tokens += len(output.new_token_ids)
                self.cached_tokens = output.num_cached_tokens
                if self.text.stopped:  # a stop string: end here; leaving the block aborts the engine request
                    self.finish_reason = "stop"
                elif output.finished:
                    text += self.text.finish()
                    self.finish_reason = output.finish_reason
                yield Piece(text, output.new_logprobs, self.finish_reason)
                if self.finish_reason is not None:
                    return
                output = await anext(outputs)


def make_choices(async_engine: AsyncEngine, request_id: str, prompt_ids: list[int], params: SamplingParams,
                  n: int, tokenizer, stop: list[str]) -> list[Choice]:
    """n choices of one prompt. With a seed s, choice i samples with seed s + i, so the choices differ
    (greedy ones are equal whatever the seed)."""
    def params_of(i: int) -> SamplingParams:
        return params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
    return [Choice(async_engine, f"{request_id}-{i}", prompt_ids, params_of(i), CompletionText(tokenizer, stop))
            for i in range(n)]


async def wait_for_first_outputs(choices: list[Choice]) -> None:
    """Start every choice; if one is refused (or the caller is cancelled), abort them all and raise."""
    started = False
    try:
        # return_exceptions: wait for every choice, so none is still starting when the others are closed
        results = await asyncio.gather(*(c.start() for c in choices), return_exceptions=True)
        error = next((r for r in results if isinstance(r, BaseException)), None)
        if error is not None:
            raise error
        started = True
    finally:
        if not started:
            for choice in choices:
                await choice.close()


_END = object()


async def _next(stream: AsyncIterator):
    try:
        return await anext(stream)
    except StopAsyncIteration:  # a sentinel: a task that raises StopAsyncIteration is an awkward result
        return _END


async def merged_pieces(choices: list[Choice]) -> AsyncIterator[tuple[int, Piece]]:
    """(choice index, piece) as each choice produces them. Closing this closes (aborts) every choice."""
    streams = [c.pieces() for c in choices]
    pending = {asyncio.create_task(_next(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):  # several at once: in choice order
                i = pending.pop(task)
                piece = task.result()  # a choice's error ends the whole request
                if piece is _END:
                    continue
                pending[asyncio.create_task(_next(streams[i]))] = i
                yield i, piece
    finally:
        for task in pending:
            task.cancel()
        # A stream cannot be closed while a task is still inside it: let the cancellations land first.
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


@dataclass
class Collected:
    text: str
    logprobs: list["TokenLogprob"] | None
    finish_reason: str | None


async def collect_choices(choices: list[Choice]) -> list[Collected]:
    """Every choice's whole text, logprob entries (None unless asked) and finish reason."""
    texts: list[list[str]] = [[] for _ in choices]
    logprobs: list[list | None] = [None] * len(choices)
    async with aclosing(merged_pieces(choices)) as pieces:
        async for i, piece in pieces:
            texts[i].append(piece.text)
            if piece.logprobs is not None:
                if logprobs[i] is None:
                    logprobs[i] = []
                logprobs[i].extend(piece.logprobs)
    return [Collected("".join(t), lp, c.finish_reason) for t, lp, c in zip(texts, logprobs, choices)]


def usage_of(choices: list[Choice], prompt_tokens: int) -> api.Usage:
    """The prompt counted once (as OpenAI does), completion tokens summed over the choices."""
    return api.Usage.of(prompt_tokens, sum(c.completion_tokens for c in choices), choices[0].cached_tokens)
