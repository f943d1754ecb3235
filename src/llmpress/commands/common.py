"""Options shared by several subcommands."""

from __future__ import annotations

import argparse

from llmpress.loading.resolve import DEFAULT_MODEL


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model alias, local HF directory, .gguf file or hub id (default: {DEFAULT_MODEL})")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                        help="weights and activations dtype (auto: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default: auto)")


def load_from_args(args: argparse.Namespace):
    from llmpress.loading import load_model
    return load_model(args.model, dtype=args.dtype, device=args.device)
