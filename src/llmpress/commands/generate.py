"""`llmpress generate`: complete one or more prompts, streaming the text as it is produced."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable

import torch

from llmpress.commands import common
from llmpress.commands.output import write_json_atomic
from llmpress.errors import LlmpressError
from llmpress.generation import GenerationOutput, Generator, SamplingParams
from llmpress.generation.generator import DECODE_MODES
from llmpress.loading import LoadedModel
from llmpress.tokenizer import IncrementalDecoder, encode_chat, encode_text

DECODE_MODE_HELP = ("decode step: eager (plain PyTorch), graph (CUDA graph), compile (torch.compile + CUDA graph), "
                    "auto (compile on CUDA, eager on CPU) (default: auto)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="complete prompts, streaming the text",
                                   description="Complete each prompt in turn, streaming the text to stdout and a "
                                               "one-line summary (tokens, TTFT, decode tok/s) to stderr.")
    common.add_model_args(parser)
    parser.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                        help="text to complete; repeat for several prompts, generated one after another")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap each prompt as a user turn in the model's chat template "
                             "(default: when the tokenizer has one)")
    add_sampling_args(parser)
    add_decode_mode_arg(parser)
    add_speculative_args(parser)
    parser.add_argument("--no-stream", action="store_true",
                        help="print each completion only once it is finished")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write prompts, completions and timings to PATH")
    parser.set_defaults(func=run_generate)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """The sampling options shared by `generate` and `chat`; read them back with `sampling_params_from_args`."""
    parser.add_argument("--max-new-tokens", type=int, metavar="N", default=256,
                        help="tokens to generate at most (default: 256)")
    parser.add_argument("--temperature", type=float, metavar="T", default=0.0,
                        help="0 is greedy (argmax) (default: 0)")
    parser.add_argument("--top-k", type=int, metavar="K", default=0,
                        help="sample among the k likeliest tokens; 0 is off (default: 0)")
    parser.add_argument("--top-p", type=float, metavar="P", default=1.0,
                        help="sample among the smallest set of tokens holding this probability; 1 is off (default: 1)")
    parser.add_argument("--repetition-penalty", type=float, metavar="R", default=1.0,
                        help="divide seen tokens' positive logits by this (CTRL); 1 is off (default: 1)")
    parser.add_argument("--seed", type=int, metavar="N", default=None,
                        help="seed for sampling, for reproducible output")


def add_decode_mode_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decode-mode", default="auto", choices=DECODE_MODES, help=DECODE_MODE_HELP)
    add_kernel_args(parser)


# Rows of x up to which the tensor-core GEMV beats the row layout's kernels (kernels/ops.py FRAG_MAX_M): where every
# product of a run stays within them (one sequence, or a few), `auto` turns the tensor cores on.
TENSOR_CORE_MAX_BATCH = 8


def add_kernel_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--int4-tensor-cores", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                        help="4-bit models on a GPU: hold the weights in the tensor-core GEMV's layout and run products "
                             "of 1-8 tokens on it (3B decode 1.45x -> 1.87x bf16 on an H200, same memory; larger "
                             "batches and prompts run slower on it). auto (the default): on for generate, chat and "
                             "bench at batch sizes up to 8, off for the engine and the server")
    parser.add_argument("--int4-accumulate", default="on", choices=("on", "off"),
                        help="with the tensor-core layout, batch-1 decode: products add their partial sums by atomics "
                             "into an fp32 residual stream (3B decode 785 -> 985 tok/s on an H200). The order of those "
                             "additions varies, so the last bits of the logits can differ from run to run; off: the "
                             "same bits every run, slower (default: on)")


def apply_kernel_args(args: argparse.Namespace, max_batch: int | None = None) -> None:
    """The kernel choices of `add_kernel_args`, for this process. `max_batch`: the most sequences a product of
    this run holds (None: the engine's continuous batches, unbounded), which decides `auto`."""
    from llmpress.kernels import ops
    choice = getattr(args, "int4_tensor_cores", "auto")
    if choice == "auto":
        choice = "on" if max_batch is not None and max_batch <= TENSOR_CORE_MAX_BATCH else "off"
    ops.int4_tensor_core_gemv = choice == "on"
    ops.int4_accumulate_decode = getattr(args, "int4_accumulate", "on") == "on"


def add_speculative_args(parser: argparse.ArgumentParser) -> None:
    """--draft / --num-speculative-tokens / --adaptive, shared by `generate` and `bench`."""
    from llmpress.speculative.factory import DRAFT_HELP
    parser.add_argument("--draft", default=None, metavar="MODEL|ngram|self:N|int4:rtn", help=DRAFT_HELP + " (default: none)")
    parser.add_argument("--num-speculative-tokens", type=int, default=5, metavar="K",
                        help="draft tokens verified per target forward with --draft (default: 5)")
    parser.add_argument("--adaptive", action="store_true",
                        help="with --draft: grow k after fully accepted rounds, shrink it after poor ones")


def speculative_config_from_args(args: argparse.Namespace):
    """SpeculativeConfig from `add_speculative_args` options, or None without --draft (checked before loading)."""
    if args.draft is None:
        return None
    from llmpress.speculative import SpeculativeConfig
    return SpeculativeConfig(args.num_speculative_tokens, adaptive=args.adaptive)


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from `add_sampling_args` options; raises LlmpressError on bad values (before any model load)."""
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def run_generate(args: argparse.Namespace) -> int:
    # Options and prompts first: a typo should fail in a second, not after the model load.
    apply_kernel_args(args, max_batch=1)
    params = sampling_params_from_args(args)
    for prompt in args.prompt:
        _check_prompt(prompt)
    spec_config = speculative_config_from_args(args)
    loaded = common.load_from_args(args)
    drafter = None
    if spec_config is not None:
        from llmpress.speculative.factory import build_drafter
        drafter = build_drafter(args.draft, loaded, dtype=args.dtype)
    on_text = None if args.no_stream else _print_now
    results = []
    for prompt in args.prompt:
        generator = None
        if drafter is not None:
            from llmpress.speculative import SpeculativeGenerator
            prompt_len = encode_prompt(loaded, prompt, args.chat).shape[1]
            generator = SpeculativeGenerator(loaded.model, drafter, prompt_len + params.max_new_tokens, spec_config,
                                             mode=args.decode_mode)
        text, output = generate_text(loaded, prompt, params, chat=args.chat, on_text=on_text, mode=args.decode_mode,
                                     generator=generator)
        print(text if args.no_stream else "", flush=True)  # streaming already printed the text; end its line
        print(format_stats(output), file=sys.stderr, flush=True)
        record = {"prompt": prompt, "text": text, **stats_record(output)}
        if drafter is not None:
            print(format_speculative_stats(output.stats, drafter.name, spec_config), file=sys.stderr, flush=True)
            record["speculative"] = dict(output.stats.to_dict(), drafter=drafter.name,
                                         k=spec_config.num_speculative_tokens, adaptive=spec_config.adaptive)
        results.append(record)
    if args.json:
        record = {"model": args.model, "device": str(loaded.model.device),
                  "dtype": str(loaded.model.dtype).removeprefix("torch."), "decode_mode": args.decode_mode,
                  "chat": _use_chat(loaded.tokenizer, args.chat), "sampling": dataclasses.asdict(params),
                  "results": results}
        write_json_atomic(Path(args.json), record)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def generate_text(loaded: LoadedModel, prompt: str, params: SamplingParams, chat: bool | None = None,
                  on_text: Callable[[str], None] | None = None, mode: str = "auto",
                  generator=None) -> tuple[str, GenerationOutput]:
    """Complete `prompt` (as a chat user turn when `chat`, default: if the tokenizer has a template).

    Returns the completion (stop token and special tokens removed) and the generation record;
    `on_text` receives the text piece by piece as it is generated. `generator`: see generate_from_ids.
    """
    return generate_from_ids(loaded, encode_prompt(loaded, prompt, chat), params, on_text=on_text, mode=mode,
                             generator=generator)


def encode_prompt(loaded: LoadedModel, prompt: str, chat: bool | None = None) -> torch.Tensor:
    """[1, T]: `prompt` as a chat user turn when `chat` (default: if the tokenizer has a template), else raw text."""
    _check_prompt(prompt)
    if _use_chat(loaded.tokenizer, chat):
        return encode_chat(loaded.tokenizer, [{"role": "user", "content": prompt}])
    return encode_text(loaded.tokenizer, prompt)


def generate_from_ids(loaded: LoadedModel, prompt_ids: torch.Tensor, params: SamplingParams,
                      on_text: Callable[[str], None] | None = None, mode: str = "auto",
                      generator: Generator | None = None) -> tuple[str, GenerationOutput]:
    """prompt_ids: [1, T]. Generate with `generator` (default: a new one of T + max_new_tokens positions;
    a SpeculativeGenerator works too).

    Returns the reply text (stop token and special tokens removed) and the generation record.
    """
    if loaded.tokenizer is None:
        raise LlmpressError("this model has no tokenizer; pass a checkpoint with tokenizer files.")
    if generator is None:
        generator = Generator(loaded.model, prompt_ids.shape[1] + params.max_new_tokens, batch_size=1, mode=mode)
    stop_ids = loaded.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids
    stop_set = set() if params.ignore_eos else set(stop_ids)
    decoder = IncrementalDecoder(loaded.tokenizer)

    def on_token(token: torch.Tensor) -> None:
        token_id = int(token[0])
        if token_id not in stop_set:  # the stop token ends the reply; it is not part of it
            piece = decoder.push(token_id)
            if piece:
                on_text(piece)

    # Without a listener, skip the per-token host copy and re-decoding.
    output = generator.generate(prompt_ids, params, stop_ids, on_token=on_token if on_text is not None else None)
    reply_ids = output.token_ids[0, :output.num_generated[0]].tolist()
    if output.finish_reasons[0] == "stop":
        reply_ids = reply_ids[:-1]
    text = loaded.tokenizer.decode(reply_ids, skip_special_tokens=True)
    # A reply that ends inside a multi-byte character: the decoder held those bytes back; show them now.
    if on_text is not None and text.startswith(decoder.printed) and len(text) > len(decoder.printed):
        on_text(text[len(decoder.printed):])
    return text, output


def format_speculative_stats(stats, drafter_name: str, config) -> str:
    """One line: acceptance rate, tokens per target step, draft and verify time per step."""
    k = f"adaptive k from {config.num_speculative_tokens}" if config.adaptive else f"k={config.num_speculative_tokens}"
    d = stats.to_dict()
    if not stats.rounds:
        return f"[speculative {drafter_name}, {k}: no verify step ran]"
    return (f"[speculative {drafter_name}, {k}: acceptance {d['acceptance_rate']:.1%} of {stats.proposed} drafts, "
            f"{d['tokens_per_round']:.2f} tokens per target step, draft {d['draft_ms_per_round']:.1f} ms + "
            f"verify {d['verify_ms_per_round']:.1f} ms per step]")


def format_stats(output: GenerationOutput) -> str:
    """One line: prompt and new tokens, time to first token, decode rate, why generation ended."""
    stats = stats_record(output)
    rate = "n/a" if stats["decode_tokens_per_s"] is None else f"{stats['decode_tokens_per_s']:.1f}"
    return (f"[{stats['prompt_tokens']} prompt + {stats['new_tokens']} new tokens, TTFT {stats['ttft_ms']:.0f} ms, "
            f"decode {rate} tok/s, finish: {stats['finish_reason']}]")


def stats_record(output: GenerationOutput) -> dict:
    """Batch-1 generation record as JSON-able numbers (no NaN: one new token has no decode rate)."""
    rate = output.decode_tokens_per_s
    return {"prompt_tokens": output.prompt_len, "new_tokens": output.num_generated[0],
            "finish_reason": output.finish_reasons[0], "ttft_ms": output.prefill_s * 1e3,
            "decode_tokens_per_s": None if math.isnan(rate) else rate,
            "token_ids": output.token_ids[0, :output.num_generated[0]].tolist()}


def _check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise LlmpressError("the prompt is empty; pass some text with --prompt.")


def _use_chat(tokenizer, chat: bool | None) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise LlmpressError("this model's tokenizer has no chat template; drop --chat to complete the raw text.")
    return has_template if chat is None else chat


def _print_now(text: str) -> None:
    print(text, end="", flush=True)
