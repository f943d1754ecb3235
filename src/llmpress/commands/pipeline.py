"""`llmpress pipeline`: the main job (analyze -> [finetune] -> quantize -> eval ppl -> bench [-> speculative] [-> engine]) with a report in reports/<run>/."""

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
    parser.add_argument("--data", default="default:heldout",
                        help="perplexity text: default:heldout (articles not used for calibration) | default | wikitext2 | PATH")
    parser.add_argument("--ppl-seq-len", type=int, default=2048)
    parser.add_argument("--ppl-max-windows", type=int, default=4, help="0 for the whole text (default: 4)")
    parser.add_argument("--quant-methods", default="rtn,gptq,awq", help="methods of the quantize stage")
    parser.add_argument("--quant-bits", type=int, default=4)
    parser.add_argument("--quant-group-size", type=int, default=128)
    parser.add_argument("--calib", default="default", help="calibration text for gptq/awq (default: the articles held out of --data)")
    parser.add_argument("--calib-nsamples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--finetune-steps", type=int, default=20, help="finetune stage: LoRA optimizer steps")
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--finetune-targets", default="q_proj,k_proj,v_proj")
    parser.add_argument("--finetune-batch-size", type=int, default=2)
    parser.add_argument("--finetune-seq-len", type=int, default=512)
    parser.add_argument("--finetune-quant-method", default="gptq", choices=("rtn", "gptq", "awq"),
                        help="how the quantize stage quantizes the fine-tuned model")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 256 on CUDA, 32 on CPU")
    parser.add_argument("--batch-sizes", default="1", help="comma-separated (default: 1)")
    parser.add_argument("--decode-mode", default="auto", choices=("auto", "eager", "graph", "compile"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="report directory (default: reports/<timestamp>-<model>)")
    parser.add_argument("--draft", default="ngram", help="the speculative stage's draft: ngram | self:N | int4:rtn | MODEL")
    parser.add_argument("--num-speculative-tokens", type=int, default=5, help="the speculative stage's k (default: 5)")
    parser.add_argument("--engine-num-prompts", type=int, default=None,
                        help="the engine stage's requests served at once (default: 256 on CUDA, 8 on CPU)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = PipelineConfig(
        model=args.model, dtype=args.dtype, device=args.device,
        stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()), data=args.data,
        ppl_seq_len=args.ppl_seq_len, ppl_max_windows=args.ppl_max_windows or None, new_tokens=args.new_tokens,
        quant_methods=tuple(m.strip() for m in args.quant_methods.split(",") if m.strip()), quant_bits=args.quant_bits,
        quant_group_size=args.quant_group_size, calib=args.calib, calib_nsamples=args.calib_nsamples,
        calib_seqlen=args.calib_seqlen, finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
        finetune_targets=tuple(t.strip() for t in args.finetune_targets.split(",") if t.strip()),
        finetune_batch_size=args.finetune_batch_size, finetune_seq_len=args.finetune_seq_len,
        finetune_quant_method=args.finetune_quant_method,
        batch_sizes=parse_batch_sizes(args.batch_sizes), decode_mode=args.decode_mode, repeats=args.repeats, out_dir=args.out,
        speculative_draft=args.draft, num_speculative_tokens=args.num_speculative_tokens,
        engine_num_prompts=args.engine_num_prompts)
    run_pipeline(config, command=command_line())
    return 0
