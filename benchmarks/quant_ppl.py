"""Perplexity of the embedded SmolLM2-135M-Instruct quantized with RTN, GPTQ and AWQ (fake-quantized fp32).

Calibrates on the packaged WikiText-2 test split's calibration articles (`default:calib`) and measures
perplexity on the other articles (`default:heldout`), so no method is scored on text it calibrated on.

    python benchmarks/quant_ppl.py                       # CPU, fp32: the committed table
    python benchmarks/quant_ppl.py --max-windows 0       # every window of the held-out text

Writes benchmarks/results/quant_ppl_smollm2.json and .png.
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
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from llmpress.atomic_write import write_atomic, write_json_atomic
from llmpress.eval.data import load_eval_text
from llmpress.eval.perplexity import PerplexityConfig, evaluate_perplexity, tokenize_for_ppl
from llmpress.loading import load_model
from llmpress.quant.calibration import CalibrationConfig, load_calibration_tokens, quantize_model
from llmpress.quant.scheme import QuantScheme

RESULTS = Path(__file__).parent / "results"


def runs(bits_list: list[int], group_size: int, sym: bool) -> list[tuple[str, QuantScheme | None]]:
    """(label, scheme) in table order: the float model, then per bit width RTN, GPTQ (+act-order at 4), AWQ."""
    plan = [("unquantized", None)]
    for bits in bits_list:
        scheme = QuantScheme(bits=bits, group_size=group_size, sym=sym)
        plan += [("rtn", scheme), ("gptq", scheme)]
        if bits == 4:
            plan.append(("gptq", QuantScheme(bits=bits, group_size=group_size, sym=sym, act_order=True)))
        plan.append(("awq", scheme))
    return plan


def label(method: str, scheme: QuantScheme | None) -> str:
    if scheme is None:
        return "fp32"
    g = "pc" if scheme.group_size == -1 else f"g{scheme.group_size}"
    return f"{method.upper()}{' act-order' if scheme.act_order else ''} w{scheme.bits}{g}"


def plot(record: dict, path: Path) -> None:
    """One panel per bit width (3-bit RTN is off the 4-bit scale), the fp32 perplexity as a dashed line."""
    rows = record["results"]
    base = next(r["ppl"] for r in rows if r["method"] == "unquantized")
    bit_widths = sorted({r["bits"] for r in rows if r["method"] != "unquantized"}, reverse=True)
    fig = Figure(figsize=(4.2 * len(bit_widths) + 1, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    colors = {"rtn": "#8C8C8C", "gptq": "#4C72B0", "awq": "#55A868"}
    for i, bits in enumerate(bit_widths):
        ax = fig.add_subplot(1, len(bit_widths), i + 1)
        panel = [r for r in rows if r["bits"] == bits]
        bars = ax.bar([r["label"].replace(" w", "\nw") for r in panel], [r["ppl"] for r in panel],
                      color=["#8172B2" if r["act_order"] else colors[r["method"]] for r in panel])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(base, color="#C44E52", linestyle="--", label=f"unquantized fp32: {base:.2f}")
        ax.set_ylim(0, max(r["ppl"] for r in panel) * 1.12)
        ax.set_title(f"{bits}-bit", fontsize=9)
        ax.set_ylabel("perplexity (lower is better)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7, loc="lower right")
    calib, ppl, quant = record["calibration"], record["perplexity"], record["quantization"]
    fig.suptitle(f"{record['model']} fp32 weights fake-quantized, group {quant['group_size']}, "
                 f"{'sym' if quant['sym'] else 'asym'}; perplexity on {ppl['data']} "
                 f"({rows[0]['num_windows']} x {ppl['seq_len']} tokens), calibrated on {calib['source']} "
                 f"({calib['nsamples']} x {calib['seqlen']})", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--sym", action="store_true", help="symmetric quantization (default: asymmetric)")
    parser.add_argument("--calib", default="default", help="calibration source (default: the calib articles)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--data", default="default:heldout", help="perplexity text")
    parser.add_argument("--seq-len", type=int, default=2048, help="perplexity window")
    parser.add_argument("--max-windows", type=int, default=8, help="perplexity windows; 0 = all of them")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=str(RESULTS / "quant_ppl_smollm2.json"))
    parser.add_argument("--png", default=str(RESULTS / "quant_ppl_smollm2.png"))
    parser.add_argument("--replot", action="store_true", help="only redraw --png from the existing --out JSON")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(Path(args.out).read_text()), Path(args.png))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    loaded = load_model(args.model, dtype="float32", device=args.device)
    calib_config = CalibrationConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    calib_tokens = load_calibration_tokens(loaded.tokenizer, calib_config)
    text, data_description = load_eval_text(args.data)
    eval_ids = tokenize_for_ppl(loaded.tokenizer, text)
    ppl_config = PerplexityConfig(seq_len=args.seq_len, max_windows=args.max_windows or None)
    print(f"model {args.model} fp32 on {args.device}, {torch.get_num_threads()} CPU threads")
    print(f"calibration: {args.calib}, {args.nsamples} x {args.seqlen} tokens, seed 0")
    print(f"perplexity: {data_description}; {eval_ids.numel()} tokens, seq_len {args.seq_len}, "
          f"{'all' if not args.max_windows else args.max_windows} windows")

    rows = []
    for method, scheme in runs(args.bits, args.group_size, args.sym):
        model = loaded.model
        quant_seconds = 0.0
        if scheme is not None:
            model = copy.deepcopy(loaded.model)
            t0 = time.perf_counter()
            quantize_model(model, method, scheme, calib_tokens)
            quant_seconds = time.perf_counter() - t0
        result = evaluate_perplexity(model, eval_ids, ppl_config)
        row = dict(label=label(method, scheme), method=method, bits=scheme.bits if scheme else 32,
                   group_size=scheme.group_size if scheme else None, sym=scheme.sym if scheme else None,
                   act_order=bool(scheme and scheme.act_order), quant_seconds=round(quant_seconds, 1),
                   ppl=result.ppl, nll_mean=result.nll_mean, num_windows=result.num_windows,
                   num_tokens_scored=result.num_tokens_scored, eval_seconds=round(result.seconds, 1))
        rows.append(row)
        print(f"{row['label']:<24} ppl {row['ppl']:8.3f}   quantize {quant_seconds:6.1f} s   "
              f"eval {result.seconds:6.1f} s", flush=True)
        del model

    print(f"\n{'method':<24}{'bits':>5}{'PPL':>10}{'quantize s':>12}")
    for r in rows:
        print(f"{r['label']:<24}{r['bits']:>5}{r['ppl']:>10.3f}{r['quant_seconds']:>12.1f}")
    checks = {}
    for bits in args.bits:
        by = {r["method"]: r["ppl"] for r in rows if r["bits"] == bits and not r["act_order"]}
        for method in ("gptq", "awq"):
            checks[f"{method}_beats_rtn_w{bits}"] = by[method] < by["rtn"]
    print("acceptance: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items()))

    record = dict(
        script="benchmarks/quant_ppl.py", date=datetime.date.today().isoformat(),
        command=" ".join(["python", "benchmarks/quant_ppl.py", *sys.argv[1:]]),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        machine=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                     cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), device=args.device,
                     torch=torch.__version__),
        model=args.model, dtype="float32",
        calibration=dict(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=0),
        perplexity=dict(data=args.data, description=data_description, num_tokens=eval_ids.numel(),
                        seq_len=args.seq_len, max_windows=args.max_windows or None,
                        windows_available=eval_ids.numel() // args.seq_len),
        quantization=dict(group_size=args.group_size, sym=args.sym, gptq_damp_percent=0.01, gptq_block_size=128,
                          awq_scale_grid=20, awq_clip_grid=20, awq_max_shrink=0.5,
                          note="fake quantization: weights quantized then dequantized to fp32; "
                               "embeddings and lm_head unquantized"),
        results=rows, acceptance=checks, total_seconds=round(time.perf_counter() - start, 1))
    write_json_atomic(Path(args.out), record)
    plot(record, Path(args.png))
    print(f"wrote {args.out} and {args.png} ({record['total_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
