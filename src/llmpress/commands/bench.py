"""`llmpress bench`: decode throughput per batch size (TTFT, TPOT, tokens/s, memory) against the bandwidth roofline."""

from __future__ import annotations

import argparse
import platform
from datetime import date
from pathlib import Path

import torch

from llmpress.bench.roofline import decode_roofline, device_name, measure_copy_bandwidth
from llmpress.bench.throughput import DEFAULT_CHAT_PROMPT, benchmark_decode, prompt_token_ids
from llmpress.commands import common
from llmpress.commands.engine_args import add_engine_args, engine_config_from_args
from llmpress.commands.generate import (add_decode_mode_arg, add_speculative_args, apply_kernel_args,
                                       speculative_config_from_args)
from llmpress.commands.output import format_rows, write_json_atomic
from llmpress.errors import LlmpressError
from llmpress.loading import LoadedModel

TABLE_HEADER = ["batch", "prompt tok", "new tok", "TTFT ms", "TPOT ms", "decode tok/s", "e2e tok/s", "peak GB",
                "% roofline"]


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="decode throughput per batch size, against the roofline",
                                   description="Decode throughput per batch size (TTFT, TPOT, tokens/s, peak memory) "
                                               "against the bandwidth roofline, from a copy bandwidth measured in the "
                                               "same run.")
    common.add_model_args(parser)
    parser.add_argument("--batch-sizes", default="1", metavar="N,N,...",
                        help="comma-separated batch sizes, each run on copies of the prompt (default: 1)")
    parser.add_argument("--prompt-len", type=int, default=None, metavar="N",
                        help="N seeded random prompt tokens (default: a fixed chat prompt when the model has a "
                             "tokenizer, else 64 random tokens)")
    parser.add_argument("--new-tokens", type=int, metavar="N", default=256,
                        help="tokens generated per sequence, EOS ignored (default: 256)")
    add_decode_mode_arg(parser)
    parser.add_argument("--repeats", type=int, metavar="N", default=3,
                        help="timed runs per batch size; medians are reported (default: 3)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    add_speculative_args(parser)  # with --draft: also batch-1 speculative decoding, and its speedup
    e = parser.add_argument_group("serving engine (--engine)")
    e.add_argument("--engine", choices=("offline", "online"), default=None,
                   help="offline: N prompts through the engine at once (as vLLM's benchmark_throughput); "
                        "online: requests against a running `llmpress serve` (as benchmark_serving)")
    e.add_argument("--num-prompts", type=int, default=256, metavar="N", help="requests (default 256)")
    e.add_argument("--input-len", default="128,1024", metavar="MIN,MAX", help="prompt tokens, uniform (default 128,1024)")
    e.add_argument("--output-len", default="128,512", metavar="MIN,MAX", help="output tokens, uniform (default 128,512)")
    e.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    e.add_argument("--url", default="http://127.0.0.1:8000", help="online: the server's base URL")
    e.add_argument("--request-rate", type=float, default=float("inf"),
                   help="online: Poisson arrivals per second (default inf: all at once)")
    e.add_argument("--max-concurrency", type=int, default=None, help="online: requests in flight at most")
    add_engine_args(parser)
    parser.set_defaults(func=run_bench_command)


def parse_range(text: str, name: str) -> tuple[int, int]:
    """'128,1024' -> (128, 1024); one number means a fixed length."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or values[0] < 1 or values[1] < values[0]:
        raise LlmpressError(f"--{name} must be MIN,MAX with 1 <= MIN <= MAX (e.g. 128,1024), got {text!r}.")
    return values[0], values[1]


def run_engine_bench_command(args: argparse.Namespace) -> int:
    input_len, output_len = parse_range(args.input_len, "input-len"), parse_range(args.output_len, "output-len")
    if args.num_prompts < 1:
        raise LlmpressError(f"--num-prompts must be at least 1, got {args.num_prompts}.")
    if args.engine == "online":
        from llmpress.bench.serving import format_serving_table, run_serving_benchmark
        result = run_serving_benchmark(args.url, args.num_prompts, args.request_rate, args.max_concurrency,
                                       input_len, output_len, args.seed)
        print(format_serving_table(result))
        record = result.to_dict()
    else:
        from llmpress.bench.engine_throughput import format_offline, random_workload, run_offline
        from llmpress.engine import LLMEngine
        config = engine_config_from_args(args)  # --draft ngram drafts inside the batch; other drafters are refused
        if config.max_model_len is None:
            config.max_model_len = input_len[1] + output_len[1]
        loaded = common.load_from_args(args)
        engine = LLMEngine(loaded, config)
        workload = random_workload(args.num_prompts, input_len, output_len, loaded.config.vocab_size, args.seed)
        result = run_offline(engine, workload)
        print(format_offline(result, loaded.name, device_name(loaded.model.device)))
        if config.speculative:
            print(f"  speculative ({config.speculative}, k={config.num_speculative_tokens}): "
                  f"{engine.stats.accepted_draft_tokens} of {engine.stats.draft_tokens} draft tokens accepted")
        record = dict(result.to_dict(), model=loaded.name, device=device_name(loaded.model.device),
                      input_len=input_len, output_len=output_len, seed=args.seed, date=date.today().isoformat())
    if args.json:
        write_json_atomic(Path(args.json), record)
        print(f"wrote {args.json}")
    return 0


def parse_batch_sizes(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; raises LlmpressError unless every item is a positive integer."""
    try:
        sizes = [int(item) for item in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise LlmpressError(f"--batch-sizes must be positive integers separated by commas (e.g. 1,8,32), got {text!r}.")
    return sizes


def run_bench_command(args: argparse.Namespace) -> int:
    if args.engine is not None:
        apply_kernel_args(args)
        return run_engine_bench_command(args)
    # Every option is checked before the model load, so a typo fails at once.
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    apply_kernel_args(args, max_batch=max(batch_sizes))
    for name in ("prompt_len", "new_tokens", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise LlmpressError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    spec_config = speculative_config_from_args(args)
    loaded = common.load_from_args(args)
    result = run_bench(loaded, batch_sizes, args.new_tokens, prompt_len=args.prompt_len, mode=args.decode_mode,
                       repeats=args.repeats)
    print(format_bench(result))
    if spec_config is not None:
        from llmpress.speculative.benchmark import benchmark_speculative, format_speculative
        from llmpress.speculative.factory import build_drafter
        drafter = build_drafter(args.draft, loaded, dtype=args.dtype)
        prompt_ids = prompt_token_ids(loaded.tokenizer, args.prompt_len, loaded.config.vocab_size)
        spec = benchmark_speculative(loaded.model, drafter, prompt_ids.to(loaded.model.device), args.new_tokens,
                                     spec_config, mode=args.decode_mode, repeats=args.repeats)
        plain = next((r for r in result["rows"] if r["batch_size"] == 1), None)
        plain_rate = plain["decode_tokens_per_s"] if plain else None
        spec["speedup_over_plain"] = spec["decode_tokens_per_s"] / plain_rate if plain_rate else None
        result["speculative"] = spec
        print(format_speculative(spec, plain_rate))
    if args.json:
        write_json_atomic(Path(args.json), result)
        print(f"wrote {args.json}")
    return 0


def run_bench(loaded: LoadedModel, batch_sizes: list[int], new_tokens: int, prompt_len: int | None = None,
              mode: str = "auto", repeats: int = 3) -> dict:
    """Decode benchmark at each batch size, with the roofline from a copy bandwidth measured once; JSON-able."""
    if not batch_sizes or min(batch_sizes) < 1:
        raise LlmpressError(f"batch sizes must be positive integers, got {batch_sizes}.")
    model, config = loaded.model, loaded.config
    prompt_ids = prompt_token_ids(loaded.tokenizer, prompt_len, config.vocab_size)
    bandwidth = measure_copy_bandwidth(model.device)
    # K/V reads grow during decode: price them at the mean context of a run (as benchmarks/decode_gpu.py does).
    mean_context = prompt_ids.shape[1] + new_tokens // 2
    device = device_name(model.device)
    roofline_b1 = decode_roofline(config, model.dtype, device, bandwidth, context_len=mean_context)
    rows = []
    for batch_size in batch_sizes:
        # The bandwidth roofline at this batch: weights read once per step, K/V once per sequence. Beyond
        # batch 1 compute starts to matter, so it stays an upper bound that loosens as the batch grows.
        roofline = roofline_b1 if batch_size == 1 else decode_roofline(
            config, model.dtype, device, bandwidth, context_len=mean_context, batch_size=batch_size)
        as_loaded = roofline.rows[0]  # the model's own dtype; the other rows are int4 estimates
        r = benchmark_decode(model, prompt_ids, batch_size, new_tokens, mode=mode, repeats=repeats)
        rows.append(dict(r.to_dict(), roofline_bytes_per_step=as_loaded.bytes_per_token,
                         roofline_tokens_per_s=as_loaded.tokens_per_s,
                         roofline_fraction=r.decode_tokens_per_s / as_loaded.tokens_per_s))
    return {"model": loaded.name, "device": device, "dtype": str(model.dtype).removeprefix("torch."),
            "mode": rows[0]["mode"],
            "prompt": "random" if prompt_len is not None or loaded.tokenizer is None else DEFAULT_CHAT_PROMPT,
            "prompt_len": prompt_ids.shape[1], "new_tokens": new_tokens, "repeats": repeats,
            "copy_bandwidth_bytes_per_s": bandwidth, "roofline_context_len": mean_context,
            "roofline": roofline_b1.to_dict(), "rows": rows, "date": date.today().isoformat(),
            "torch": torch.__version__, "python": platform.python_version()}


def format_bench(result: dict) -> str:
    """A heading (model, device, bandwidth) and one table row per batch size."""
    roofline_b1 = result["roofline"]["rows"][0]["tokens_per_s"]
    heading = (f"{result['model']} ({result['dtype']}, {result['mode']} decode) on {result['device']}\n"
               f"copy bandwidth {result['copy_bandwidth_bytes_per_s'] / 1e9:,.1f} GB/s -> batch-1 roofline "
               f"{roofline_b1:,.0f} tok/s (at context {result['roofline_context_len']}); "
               "% roofline: decode tok/s over the bandwidth bound at that batch")
    rows = [[r["batch_size"], r["prompt_len"], r["new_tokens"], f"{r['ttft_ms']:.1f}", f"{r['tpot_ms']:.2f}",
             f"{r['decode_tokens_per_s']:.1f}", f"{r['e2e_tokens_per_s']:.1f}", f"{r['peak_memory_gb']:.2f}",
             f"{r['roofline_fraction']:.1%}"] for r in result["rows"]]
    return heading + "\n" + format_rows(TABLE_HEADER, rows)
