"""`llmpress` console entry point: one command, a subcommand per stage of the workflow."""

from __future__ import annotations

import argparse
import importlib
import sys

from llmpress.errors import LlmpressError

# Each module in llmpress.commands exposes `register(subparsers)`, which adds its parser and
# sets `func` to the function that runs it.
COMMANDS = ("generate", "chat", "eval", "bench", "analyze", "quantize", "pipeline", "finetune", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpress", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"llmpress.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except LlmpressError as error:
        print(f"llmpress: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
