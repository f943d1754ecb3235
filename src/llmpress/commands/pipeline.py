"""`llmpress pipeline`: the main job (analyze -> eval ppl -> bench) with a report in reports/<run>/."""

from __future__ import annotations

import argparse

from llmpress.commands.bench import parse_batch_sizes
from llmpress.commands.common import add_model_args
from llmpress.pipeline.runner import PipelineConfig, command_line, run_pipeline
from llmpress.pipeline.stages import DEFAULT_STAGES, STAGES


def register(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="run the whole workflow and write a report",
                                   description=__doc__)
    add_model_args(parser)
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                        help=f"comma-separated, in order (available: {', '.join(STAGES)})")
    parser.add_argument("--data", default="default", help="perplexity text: default | wikitext2 | PATH")
    parser.add_argument("--ppl-seq-len", type=int, default=2048)
    parser.add_argument("--ppl-max-windows", type=int, default=8, help="0 for the whole text (default: 8)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", default="1", help="comma-separated (default: 1)")
    parser.add_argument("--decode-mode", default="auto", choices=("auto", "eager", "graph", "compile"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="report directory (default: reports/<timestamp>-<model>)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = PipelineConfig(
        model=args.model, dtype=args.dtype, device=args.device,
        stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()), data=args.data,
        ppl_seq_len=args.ppl_seq_len, ppl_max_windows=args.ppl_max_windows or None, new_tokens=args.new_tokens,
        batch_sizes=parse_batch_sizes(args.batch_sizes), decode_mode=args.decode_mode, repeats=args.repeats, out_dir=args.out)
    run_pipeline(config, command=command_line())
    return 0
