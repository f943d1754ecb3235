"""`llmpress chat`: an interactive conversation with the model, one streamed reply per line of input."""

from __future__ import annotations

import argparse
import sys

from llmpress.commands import common
from llmpress.commands.generate import (add_decode_mode_arg, add_sampling_args, apply_kernel_args, format_stats,
                                        generate_from_ids, sampling_params_from_args)
from llmpress.errors import LlmpressError
from llmpress.generation import GenerationOutput, Generator, SamplingParams
from llmpress.loading import LoadedModel
from llmpress.tokenizer import encode_chat

EXIT, RESET = "/exit", "/reset"

# Chat caches are sized in steps of this many positions, so one cache (and, on CUDA, one compiled and
# captured decode step) serves many turns before a longer conversation needs a bigger one.
CACHE_STEP = 512


def register(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="talk with the model",
                                   description=f"Read a user turn per line from stdin and stream the model's reply. "
                                               f"{EXIT} (or end of input) quits; {RESET} forgets the conversation.")
    common.add_model_args(parser)
    parser.add_argument("--system", default=None, metavar="TEXT", help="system prompt (default: the template's own)")
    add_sampling_args(parser)
    add_decode_mode_arg(parser)
    parser.set_defaults(func=run_chat)


class ChatSession:
    """The conversation so far, re-encoded through the chat template each turn (no prefix cache)."""

    def __init__(self, loaded: LoadedModel, params: SamplingParams, system: str | None = None, mode: str = "auto"):
        if loaded.tokenizer is None:
            raise LlmpressError("this model has no tokenizer; chat needs a checkpoint with tokenizer files.")
        self.loaded, self.params, self.system, self.mode = loaded, params, system, mode
        self.messages: list[dict] = []
        self.generator: Generator | None = None
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, user_text: str, on_text=None) -> tuple[str, GenerationOutput]:
        """Add a user turn, generate the assistant's reply and add it too; a failed turn leaves no trace."""
        messages = self.messages + [{"role": "user", "content": user_text}]
        prompt_ids = encode_chat(self.loaded.tokenizer, messages)
        text, output = generate_from_ids(self.loaded, prompt_ids, self.params, on_text=on_text,
                                         generator=self._generator_for(prompt_ids.shape[1]))
        self.messages = messages + [{"role": "assistant", "content": text}]
        return text, output

    def _generator_for(self, prompt_len: int) -> Generator:
        """Reuse the current cache when the turn fits: the prefill overwrites every position the turn can see."""
        needed = prompt_len + self.params.max_new_tokens
        limit = self.loaded.config.max_position_embeddings
        if needed > limit:
            raise LlmpressError(f"the conversation ({prompt_len} tokens) plus {self.params.max_new_tokens} new tokens "
                                f"exceeds the model's {limit}-token context; {RESET} to start over or lower "
                                "--max-new-tokens.")
        if self.generator is None or self.generator.max_seq_len < needed:
            self.generator = None  # free the old cache before allocating the new one
            size = min(-(-needed // CACHE_STEP) * CACHE_STEP, limit)
            self.generator = Generator(self.loaded.model, size, batch_size=1, mode=self.mode)
        return self.generator


def run_chat(args: argparse.Namespace) -> int:
    apply_kernel_args(args, max_batch=1)
    params = sampling_params_from_args(args)
    loaded = common.load_from_args(args)
    if not getattr(loaded.tokenizer, "chat_template", None):
        print("note: this model's tokenizer has no chat template; turns are joined as plain lines.", file=sys.stderr)
    session = ChatSession(loaded, params, system=args.system, mode=args.decode_mode)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line == EXIT:
            return 0
        if line == RESET:
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line:
            continue
        print("assistant> ", end="", flush=True)
        try:
            _, output = session.reply(line, on_text=lambda piece: print(piece, end="", flush=True))
        except LlmpressError as error:  # e.g. the context is full: say so and keep the session
            print(f"\nerror: {error}", file=sys.stderr)
            continue
        print(flush=True)
        print(format_stats(output), file=sys.stderr, flush=True)
