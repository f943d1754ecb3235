"""Perplexity of the embedded SmolLM2-135M-Instruct with a quantized lm_head (RTN 8 or 4-bit) on 4-bit layers.

The same text and settings as benchmarks/quant_ppl.py (fake-quantized fp32; layers calibrated on the packaged
WikiText-2 test split's `default:calib` articles, perplexity on `default:heldout`, 8 windows of 2048 tokens),
so its float-head rows reproduce that script's numbers. For each layer method: the float head, then the same
quantized layers with the head RTN-quantized to 8 and to 4 bits (`quant.calibration.quantize_lm_head`).

    python benchmarks/lm_head_ppl.py                          # CPU, fp32: the committed table
    python benchmarks/lm_head_ppl.py --data PATH/wiki.test.raw  # a local copy of the whole test split

Writes benchmarks/results/lm_head_ppl_smollm2.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from llmpress.atomic_write import write_json_atomic
from llmpress.eval.data import load_eval_text
from llmpress.eval.perplexity import PerplexityConfig, evaluate_perplexity, tokenize_for_ppl
from llmpress.loading import load_model
from llmpress.quant.calibration import CalibrationConfig, load_calibration_tokens, quantize_lm_head, quantize_model
from llmpress.quant.scheme import QuantScheme

RESULTS = Path(__file__).parent / "results"
SCALE_BYTES = 2  # checkpoints and kernels keep scales in fp16


def head_megabytes(vocab_size: int, hidden_size: int, scheme: QuantScheme | None) -> float:
    """Bytes of lm_head read per decoded token: bf16, or packed levels + fp16 scales + packed zero points."""
    params = vocab_size * hidden_size
    if scheme is None:
        return params * 2 / 1e6
    groups = scheme.groups(hidden_size) * vocab_size
    return (params * scheme.bits / 8 + groups * (SCALE_BYTES + scheme.bits / 8)) / 1e6


def label(method: str | None, scheme: QuantScheme | None, head: QuantScheme | None) -> str:
    layers = "fp32" if scheme is None else f"{method.upper()} w{scheme.bits}g{scheme.group_size}"
    return f"{layers}, head {'fp32' if head is None else f'RTN w{head.bits}g{head.group_size}'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", choices=("rtn", "gptq", "awq"), default=["rtn", "gptq"],
                        help="layer quantizers (the head is always RTN)")
    parser.add_argument("--bits", type=int, default=4, help="layer bits")
    parser.add_argument("--head-bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--group-size", type=int, default=128, help="layers and head")
    parser.add_argument("--sym", action="store_true", help="symmetric quantization (default: asymmetric)")
    parser.add_argument("--calib", default="default", help="calibration source (default: the calib articles)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--data", default="default:heldout", help="perplexity text: default:heldout | PATH | ...")
    parser.add_argument("--seq-len", type=int, default=2048, help="perplexity window")
    parser.add_argument("--max-windows", type=int, default=8, help="perplexity windows; 0 = all of them")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=str(RESULTS / "lm_head_ppl_smollm2.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    loaded = load_model(args.model, dtype="float32", device=args.device)
    config = loaded.config
    calib_config = CalibrationConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    calib_tokens = None
    if any(method != "rtn" for method in args.methods):
        calib_tokens = load_calibration_tokens(loaded.tokenizer, calib_config)
    text, data_description = load_eval_text(args.data)
    eval_ids = tokenize_for_ppl(loaded.tokenizer, text)
    ppl_config = PerplexityConfig(seq_len=args.seq_len, max_windows=args.max_windows or None)
    print(f"model {args.model} fp32 on {args.device}, {torch.get_num_threads()} CPU threads; "
          f"{'tied' if config.tie_word_embeddings else 'untied'} lm_head {config.vocab_size} x {config.hidden_size}")
    print(f"calibration: {args.calib}, {args.nsamples} x {args.seqlen} tokens, seed 0")
    print(f"perplexity: {data_description}; {eval_ids.numel()} tokens, seq_len {args.seq_len}, "
          f"{'all' if not args.max_windows else args.max_windows} windows")

    rows = []

    def measure(model, method, scheme, head, quant_seconds):
        result = evaluate_perplexity(model, eval_ids, ppl_config, progress=False)
        row = dict(label=label(method, scheme, head), layer_method=method or "unquantized",
                   layer_bits=scheme.bits if scheme else 32, head_bits=head.bits if head else 32,
                   group_size=args.group_size, sym=args.sym,
                   head_mb=round(head_megabytes(config.vocab_size, config.hidden_size, head), 1),
                   quant_seconds=round(quant_seconds, 1), ppl=result.ppl, nll_mean=result.nll_mean,
                   num_windows=result.num_windows, num_tokens_scored=result.num_tokens_scored,
                   eval_seconds=round(result.seconds, 1))
        rows.append(row)
        print(f"{row['label']:<34} ppl {row['ppl']:8.3f}   quantize {quant_seconds:6.1f} s   "
              f"eval {result.seconds:6.1f} s", flush=True)

    measure(loaded.model, None, None, None, 0.0)
    scheme = QuantScheme(bits=args.bits, group_size=args.group_size, sym=args.sym)
    for method in args.methods:
        layers = copy.deepcopy(loaded.model)
        t0 = time.perf_counter()
        quantize_model(layers, method, scheme, calib_tokens, progress=False)
        layer_seconds = time.perf_counter() - t0
        measure(layers, method, scheme, None, layer_seconds)
        for head_bits in args.head_bits:
            head = QuantScheme(bits=head_bits, group_size=args.group_size, sym=args.sym)
            model = copy.deepcopy(layers)  # the same quantized layers, only the head differs
            t0 = time.perf_counter()
            quantize_lm_head(model, head)
            measure(model, method, scheme, head, layer_seconds + time.perf_counter() - t0)
            del model
        del layers

    base = rows[0]["ppl"]
    print(f"\n{'layers, head':<34}{'head MB':>9}{'PPL':>10}{'vs fp32':>10}")
    for r in rows:
        print(f"{r['label']:<34}{r['head_mb']:>9.1f}{r['ppl']:>10.3f}{r['ppl'] / base - 1:>+10.1%}")

    record = dict(
        script="benchmarks/lm_head_ppl.py", date=datetime.date.today().isoformat(),
        command=" ".join(["python", "benchmarks/lm_head_ppl.py", *sys.argv[1:]]),
        machine=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                     cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), device=args.device,
                     torch=torch.__version__),
        model=args.model, dtype="float32",
        lm_head=dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                     tied_in_source=config.tie_word_embeddings),
        calibration=dict(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=0),
        perplexity=dict(data=args.data, description=data_description, num_tokens=eval_ids.numel(),
                        seq_len=args.seq_len, max_windows=args.max_windows or None,
                        windows_available=eval_ids.numel() // args.seq_len),
        quantization=dict(layer_bits=args.bits, head_bits=args.head_bits, group_size=args.group_size, sym=args.sym,
                          note="fake quantization: weights quantized then dequantized to fp32; the head is always "
                               "RTN (untied from the embeddings, which stay fp32); head_mb counts bf16 for a float "
                               "head, else packed levels + fp16 scales + packed zero points"),
        results=rows, total_seconds=round(time.perf_counter() - start, 1))
    write_json_atomic(Path(args.out), record)
    print(f"wrote {args.out} ({record['total_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
