"""LoRA fine-tuning of the embedded SmolLM2-135M-Instruct, then GPTQ: held-out perplexity at each step.

Trains on the calibration articles of the packaged WikiText-2 test split (`--data default`; the last 10%
of their tokens are the validation text for early stopping) and reports perplexity on the first windows
of the held-out articles (`default:heldout`), which neither training, early stopping nor GPTQ
calibration reads. Rows: base fp32, LoRA merged, GPTQ 4-bit of the base, GPTQ 4-bit of the merged LoRA
model (same calibration windows for both).

    python benchmarks/lora_smollm2.py                          # CPU: the committed result
    python benchmarks/lora_smollm2.py --max-steps 2 --ppl-windows 1 --ppl-seq-len 256 --no-gptq   # smoke test

Writes benchmarks/results/lora_smollm2.json and .png.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from llmpress.atomic_write import write_atomic, write_json_atomic
from llmpress.eval.data import load_eval_text
from llmpress.eval.perplexity import PerplexityConfig, evaluate_perplexity, tokenize_for_ppl
from llmpress.finetune.lora import LoRAConfig
from llmpress.finetune.report import plot_training_curve
from llmpress.finetune.run import finetune, merge_adapters
from llmpress.finetune.trainer import TrainConfig
from llmpress.loading import load_model
from llmpress.quant.calibration import CalibrationConfig, load_calibration_tokens, quantize_model
from llmpress.quant.scheme import QuantScheme

RESULTS = Path(__file__).parent / "results"


def plot(record: dict, path: Path) -> None:
    """Left: training loss and validation perplexity; right: held-out perplexity per model."""
    fig = Figure(figsize=(12, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    plot_training_curve(ax, record["training"]["history"], record["training"]["evals"])
    t = record["training"]
    ax.set_title(f"LoRA r{record['lora']['r']} alpha {record['lora']['alpha']:g}, lr {record['train']['lr']:g}, "
                 f"{t['steps_done']} steps x {record['train']['batch_size'] * record['train']['grad_accum']} x "
                 f"{record['train']['seq_len']} tokens", fontsize=9)
    ax = fig.add_subplot(1, 2, 2)
    rows = record["results"]
    bars = ax.bar([r["label"] for r in rows], [r["ppl"] for r in rows],
                  color=["#8C8C8C", "#55A868", "#4C72B0", "#8172B2"][:len(rows)])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_ylim(0, max(r["ppl"] for r in rows) * 1.12)
    ppl = record["perplexity"]
    ax.set_title(f"held-out perplexity ({ppl['data']}, {rows[0]['num_windows']} x {ppl['seq_len']} tokens)", fontsize=9)
    ax.set_ylabel("perplexity (lower is better)", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{record['model']} fp32 on {record['machine']['device']}: fine-tuned on default:calib, "
                 f"measured on default:heldout", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ppl-seq-len", type=int, default=1024)
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--nsamples", type=int, default=16, help="GPTQ calibration windows")
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--no-gptq", action="store_true", help="skip the two GPTQ rows")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=str(RESULTS / "lora_smollm2.json"))
    parser.add_argument("--png", default=str(RESULTS / "lora_smollm2.png"))
    parser.add_argument("--replot", action="store_true", help="only redraw --png from the existing --out JSON")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(Path(args.out).read_text()), Path(args.png))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    loaded = load_model(args.model, dtype="float32", device=args.device)
    text, data_description = load_eval_text("default:heldout")
    eval_ids = tokenize_for_ppl(loaded.tokenizer, text)
    ppl_config = PerplexityConfig(seq_len=args.ppl_seq_len, max_windows=args.ppl_windows)
    print(f"model {args.model} fp32 on {args.device}, {torch.get_num_threads()} CPU threads")
    print(f"perplexity: {data_description}; first {args.ppl_windows} windows of {args.ppl_seq_len} tokens")
    rows = []

    def measure(label: str, model, **extra) -> None:
        result = evaluate_perplexity(model, eval_ids, ppl_config)
        rows.append(dict(label=label, ppl=result.ppl, nll_mean=result.nll_mean, num_windows=result.num_windows,
                         num_tokens_scored=result.num_tokens_scored, eval_seconds=round(result.seconds, 1), **extra))
        print(f"{label:<20} held-out ppl {result.ppl:8.3f}   ({result.seconds:.0f} s)", flush=True)

    measure("base fp32", loaded.model)
    lora_config = LoRAConfig(r=args.r, alpha=args.alpha, dropout=args.dropout,
                             targets=tuple(t for t in args.targets.split(",") if t))
    train_config = TrainConfig(lr=args.lr, max_steps=args.max_steps, batch_size=args.batch_size,
                               grad_accum=args.grad_accum, seq_len=args.seq_len, eval_every=args.eval_every,
                               eval_windows=args.eval_windows, patience=args.patience or None, seed=args.seed)
    tuned = finetune(loaded, lora_config, train_config, "default")
    state = tuned.train.state
    print(f"trained {state.step} steps in {tuned.train.seconds:.0f} s; best validation ppl {state.best_val_ppl:.3f} "
          f"at step {state.best_step}")
    merged = merge_adapters(tuned)
    measure("LoRA (merged)", merged.model, train_seconds=round(tuned.train.seconds, 1))

    calib = CalibrationConfig(source="default", nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=0)
    if not args.no_gptq:
        calib_tokens = load_calibration_tokens(loaded.tokenizer, calib)
        scheme = QuantScheme(bits=4, group_size=128)
        for label, model in (("GPTQ w4g128", loaded.model), ("LoRA + GPTQ w4g128", merged.model)):
            model = copy.deepcopy(model)
            t0 = time.perf_counter()
            quantize_model(model, "gptq", scheme, calib_tokens)
            measure(label, model, quant_seconds=round(time.perf_counter() - t0, 1))
            del model

    by = {r["label"]: r["ppl"] for r in rows}
    checks = {"lora_beats_base": by["LoRA (merged)"] < by["base fp32"]}
    if not args.no_gptq:
        checks["lora_gptq_beats_gptq"] = by["LoRA + GPTQ w4g128"] < by["GPTQ w4g128"]
    print(f"\n{'model':<22}{'held-out PPL':>14}")
    for r in rows:
        print(f"{r['label']:<22}{r['ppl']:>14.3f}")
    print("checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items()))

    record = dict(
        script="benchmarks/lora_smollm2.py", date=datetime.date.today().isoformat(),
        command=" ".join(["python", "benchmarks/lora_smollm2.py", *sys.argv[1:]]),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        machine=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                     cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), device=args.device,
                     torch=torch.__version__),
        model=args.model, dtype="float32", lora=asdict(lora_config), train=asdict(train_config),
        training_data=tuned.data_description,
        training=dict(steps_done=state.step, best_step=state.best_step, best_val_ppl=state.best_val_ppl,
                      stopped_early=state.stopped_early, seconds=round(tuned.train.seconds, 1),
                      history=state.history, evals=state.evals),
        perplexity=dict(data="default:heldout", description=data_description, seq_len=args.ppl_seq_len,
                        windows=args.ppl_windows),
        calibration=None if args.no_gptq else asdict(calib),
        results=rows, checks=checks, total_seconds=round(time.perf_counter() - start, 1))
    write_json_atomic(Path(args.out), record)
    plot(record, Path(args.png))
    print(f"wrote {args.out} and {args.png} ({record['total_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
