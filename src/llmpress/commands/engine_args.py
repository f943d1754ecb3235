"""Serving-engine options shared by `serve` and `bench --engine` (vLLM's flag names)."""

from __future__ import annotations

import argparse

from llmpress.engine.config import KV_CACHE_DTYPES, EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    g = parser.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help=f"sequences running at once (default {d.max_num_seqs})")
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help=f"tokens per step; longer prompts are prefilled in chunks (default {d.max_num_batched_tokens})")
    g.add_argument("--block-size", type=int, default=d.block_size, help=f"tokens per KV block (default {d.block_size})")
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help=f"fraction of GPU memory for weights, activations and KV cache (default {d.gpu_memory_utilization})")
    g.add_argument("--num-gpu-blocks", type=int, default=None, help="KV blocks (default: as many as fit)")
    g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=KV_CACHE_DTYPES,
                   help="KV cache storage: auto (model dtype), fp8 (e4m3) or int8, per-token scales (default auto)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output tokens per request (default: the model's context, at most 8192)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=d.enable_prefix_caching,
                   help="share KV blocks of common prompt prefixes (default on)")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=d.async_scheduling,
                   help="plan and launch each step before the previous one's tokens are read back (default on)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step before capturing its CUDA graphs (CUDA; a minute or two at start)")


def add_engine_draft_args(parser: argparse.ArgumentParser) -> None:
    """--draft ngram / --num-speculative-tokens for `serve` (`bench` has them already, from `generate`)."""
    parser.add_argument("--draft", default=None, choices=("ngram",),
                        help="speculative decoding inside the batch: prompt-lookup drafts for greedy requests")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                        help="draft tokens per sequence and step with --draft (default 4)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                        num_gpu_blocks=args.num_gpu_blocks, kv_cache_dtype=args.kv_cache_dtype,
                        max_model_len=args.max_model_len, enable_prefix_caching=args.enable_prefix_caching,
                        enforce_eager=args.enforce_eager, compile=args.compile, async_scheduling=args.async_scheduling,
                        speculative=getattr(args, "draft", None),
                        num_speculative_tokens=getattr(args, "num_speculative_tokens", 4))
