"""`llmpress finetune`: LoRA or QLoRA (LoRA over a frozen int4 base) fine-tuning with a PEFT-format adapter.

Writes into --out: adapter/ (adapter_config.json + adapter_model.safetensors, loadable by
peft.PeftModel.from_pretrained), merged/ with --merge (a plain Hugging Face checkpoint every llmpress
command and transformers load), train_log.json, training_curve.png, and, while the run is unfinished, checkpoints/ for --resume.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from llmpress.commands.common import add_model_args
from llmpress.errors import LlmpressError

ADAPTER_DIR, MERGED_DIR = "adapter", "merged"
SAVE_DTYPES = ("float16", "bfloat16", "float32")


def register(subparsers) -> None:
    from llmpress.finetune.lora import LORA_TARGETS
    from llmpress.finetune.trainer import OPTIMIZERS, SCHEDULES
    parser = subparsers.add_parser("finetune", help="LoRA / QLoRA fine-tuning with a PEFT-format adapter",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--data", default="default",
                        help="training text: default (the packaged WikiText-2 calibration articles; perplexity is "
                             "reported on default:heldout) | wikitext2 (train split, needs datasets + network) | PATH")
    parser.add_argument("--method", choices=("lora", "qlora"), default="lora",
                        help="qlora: LoRA over a frozen int4 base (the model's own if it is a GPTQ/AWQ checkpoint)")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=32.0, help="LoRA scale numerator (update scaled by alpha/r)")
    parser.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapter's input")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj", help=f"comma-separated, from {','.join(LORA_TARGETS)}")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence")
    parser.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    parser.add_argument("--warmup-ratio", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                        help="adamw (fused on CUDA) or adamw8bit (needs bitsandbytes)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between validation perplexity checks")
    parser.add_argument("--eval-windows", type=int, default=4, help="validation windows of --seq-len tokens")
    parser.add_argument("--patience", type=int, default=3,
                        help="stop after this many evaluations without a better validation perplexity (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--qlora-quantizer", choices=("rtn", "gptq"), default="rtn",
                        help="how --method qlora makes the int4 base of a float model")
    parser.add_argument("--qlora-group-size", type=int, default=128)
    parser.add_argument("--out", required=True, help="output directory (new or empty; or this run's own with --resume)")
    parser.add_argument("--merge", action="store_true", help="also write merged/, a full checkpoint with the adapter folded in")
    parser.add_argument("--save-dtype", choices=SAVE_DTYPES, default="float16", help="dtype of merged/ (default float16)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from llmpress.finetune.data import training_text
    from llmpress.finetune.lora import LoRAConfig
    from llmpress.finetune.peft_format import save_adapter
    from llmpress.finetune.report import write_training_report
    from llmpress.finetune.run import finetune, merge_adapters, qlora_base
    from llmpress.finetune.trainer import TrainConfig

    lora_config = LoRAConfig(r=args.r, alpha=args.alpha, dropout=args.dropout,
                             targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()))
    train_config = TrainConfig(lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                               grad_accum=args.grad_accum, seq_len=args.seq_len, warmup_ratio=args.warmup_ratio,
                               schedule=args.schedule, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                               optimizer=args.optimizer, gradient_checkpointing=args.gradient_checkpointing,
                               eval_every=args.eval_every, eval_windows=args.eval_windows,
                               patience=args.patience or None, seed=args.seed)
    if args.optimizer == "adamw8bit":
        from llmpress.finetune.trainer import make_optimizer
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], train_config, torch.device("cpu"))  # fail before loading
    out = Path(args.out)
    check_out_dir(out, args.resume)
    training_text(args.data)  # a missing file or bad source fails before the model loads

    from llmpress.commands.common import load_from_args
    loaded = load_from_args(args)
    if args.method == "qlora":
        loaded = qlora_base(loaded, args.qlora_quantizer, args.qlora_group_size)
    result = finetune(loaded, lora_config, train_config, args.data, out_dir=out, resume=args.resume,
                      copy_model=False)
    state = result.train.state
    print(f"{state.step} steps in {result.train.seconds:.0f} s; best validation perplexity "
          f"{state.best_val_ppl:.3f} at step {state.best_step}" + (" (stopped early)" if state.stopped_early else ""))
    save_adapter(result.adapters, lora_config, out / ADAPTER_DIR, base_model_name=args.model)
    settings = dict(model=args.model, method=args.method, data=args.data, data_description=result.data_description,
                    lora=asdict(lora_config), train=asdict(train_config), device=str(loaded.model.device),
                    dtype=str(loaded.model.dtype).removeprefix("torch."), date=datetime.now().isoformat(timespec="seconds"))
    paths = write_training_report(out, result.train, settings)
    written = [out / ADAPTER_DIR, *paths]
    if args.merge:
        from llmpress.loading.save import save_hf_checkpoint
        merged = merge_adapters(result)
        note = {"llmpress_lora_merged": dict(base_model=args.model, method=args.method, r=args.r, alpha=args.alpha,
                                             targets=list(lora_config.targets))}
        written.append(save_hf_checkpoint(merged.model, merged.tokenizer, out / MERGED_DIR,
                                          getattr(torch, args.save_dtype), merged.generation_defaults or None, note))
    import shutil
    from llmpress.finetune.trainer import CHECKPOINTS_DIR
    shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)  # the run finished: nothing left to resume
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def check_out_dir(out: Path, resume: bool) -> None:
    """A new run needs a new or empty --out; --resume needs this run's own unfinished directory."""
    from llmpress.finetune.trainer import latest_checkpoint
    if resume:
        if not out.is_dir() or latest_checkpoint(out) is None:
            raise LlmpressError(f"--resume: {out} holds no checkpoint of an earlier run; "
                                "pass the --out of an interrupted run, or drop --resume.")
        if (out / ADAPTER_DIR).exists():
            raise LlmpressError(f"--resume: the run in {out} already finished ({ADAPTER_DIR}/ exists); "
                                "start a new run with a new --out.")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LlmpressError(f"{out} already exists and is not empty; choose a new --out, or pass --resume to "
                            "continue an interrupted run there (llmpress never overwrites files).")
