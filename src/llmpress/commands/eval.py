"""`llmpress eval ppl`: WikiText-2 perplexity of a model, as a table and optionally JSON."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from llmpress.commands import common
from llmpress.commands.output import format_table, write_json_atomic

DATA_HELP = ("evaluation text: wikitext2 (Hugging Face datasets, needs the network), default (the WikiText-2 "
             "test split packaged with llmpress, non-empty rows only), or PATH (a text file such as wiki.test.raw, "
             "a .parquet file with a 'text' column, or a directory holding either) (default: default)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="measure model quality",
                                   description="Measure model quality.")
    tasks = parser.add_subparsers(dest="eval_task", required=True, metavar="TASK")
    ppl = tasks.add_parser("ppl", help="WikiText-2 perplexity (GPTQ/AWQ protocol)",
                           description="Perplexity over non-overlapping windows of the tokenized text "
                                       "(GPTQ/AWQ protocol), or sliding windows with --stride.")
    common.add_model_args(ppl)
    ppl.add_argument("--data", default="default", help=DATA_HELP)
    ppl.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default: 2048)")
    ppl.add_argument("--stride", type=int, default=None,
                     help="advance between windows; less than --seq-len gives Hugging Face's sliding-window "
                          "protocol (default: --seq-len, non-overlapping)")
    ppl.add_argument("--max-windows", type=int, default=None, metavar="N",
                     help="evaluate only the first N windows (default: all)")
    ppl.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    ppl.add_argument("--kv-cache-dtype", default=None, choices=("auto", "fp8", "int8"),
                     help="run every window through the serving engine's paged KV cache in this storage dtype, "
                          "so attention reads stored (quantized) keys and values (default: plain causal attention)")
    ppl.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON to PATH")
    ppl.set_defaults(func=run_ppl)


def run_ppl(args: argparse.Namespace) -> int:
    from llmpress.eval.data import load_eval_text
    from llmpress.eval.perplexity import PerplexityConfig, evaluate_perplexity, tokenize_for_ppl
    # Options and text first: a typo should fail in a second, not after a model load of minutes.
    config = PerplexityConfig(seq_len=args.seq_len, stride=args.stride, max_windows=args.max_windows,
                              batch_size=args.batch_size)
    text, description = load_eval_text(args.data)
    loaded = common.load_from_args(args)
    token_ids = tokenize_for_ppl(loaded.tokenizer, text)
    model = loaded.model
    if args.kv_cache_dtype is not None:
        from llmpress.engine.kv_eval import PagedCacheForward
        model = PagedCacheForward(loaded.model, args.kv_cache_dtype)
    result = evaluate_perplexity(model, token_ids, config)
    print(f"data: {description}")
    print(format_table(["model", "data", "seq_len", "windows", "tokens", "PPL", "tok/s"],
                       [args.model, args.data, result.seq_len, result.num_windows, result.num_tokens_scored,
                        f"{result.ppl:.4f}", f"{result.tokens_per_s:.0f}"]))
    if args.json:
        record = {"task": "ppl", "model": args.model, "data": args.data, "data_description": description,
                  "text_tokens": token_ids.numel(), "device": str(loaded.model.device),
                  "dtype": str(loaded.model.dtype).removeprefix("torch."), "batch_size": config.batch_size,
                  "kv_cache_dtype": args.kv_cache_dtype,
                  **dataclasses.asdict(result)}
        write_json_atomic(Path(args.json), record)
        print(f"wrote {args.json}")
    return 0

