"""What a quantized KV cache costs in perplexity: the embedded SmolLM2-135M-Instruct (fp32, CPU) on the
held-out WikiText-2 articles, with attention reading keys/values stored as the model dtype, int8 or fp8
(per-token, per-head scales) in the engine's paged cache; plain causal attention beside them.
Prints a table, writes JSON and a PNG.

    python benchmarks/kv_cache_ppl.py --max-windows 8 --out benchmarks/results/kv_cache_ppl_smollm2.json
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import torch

from llmpress.atomic_write import write_json_atomic
from llmpress.bench.roofline import device_name
from llmpress.engine.kv_eval import PagedCacheForward
from llmpress.engine.paged_cache import bytes_per_block
from llmpress.eval.data import load_eval_text
from llmpress.eval.perplexity import PerplexityConfig, evaluate_perplexity, tokenize_for_ppl
from llmpress.loading import load_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="default:heldout")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/kv_cache_ppl_smollm2.json")
    args = parser.parse_args()
    loaded = load_model(args.model, dtype="float32", device="auto")
    text, description = load_eval_text(args.data)
    token_ids = tokenize_for_ppl(loaded.tokenizer, text)
    config = PerplexityConfig(seq_len=args.seq_len, max_windows=args.max_windows)
    rows = {}
    for label, kv in (("plain attention", None), ("paged, fp32 KV", "auto"), ("paged, int8 KV", "int8"),
                      ("paged, fp8 e4m3 KV", "fp8")):
        model = loaded.model if kv is None else PagedCacheForward(loaded.model, kv)
        r = evaluate_perplexity(model, token_ids, config)
        per_token = bytes_per_block(loaded.config, 1, kv or "auto", torch.bfloat16)
        rows[label] = dict(kv_cache_dtype=kv, ppl=r.ppl, tokens_scored=r.num_tokens_scored,
                           kv_bytes_per_token_vs_bf16=per_token / bytes_per_block(loaded.config, 1, "auto", torch.bfloat16))
        print(f"{label:20s} PPL {r.ppl:.4f}", flush=True)
    base = rows["paged, fp32 KV"]["ppl"]
    for row in rows.values():
        row["ppl_change_vs_fp32_kv"] = row["ppl"] / base - 1
    result = dict(script="benchmarks/kv_cache_ppl.py", date=date.today().isoformat(), device=device_name(loaded.model.device),
                  model=loaded.name, data=args.data, data_description=description, seq_len=args.seq_len,
                  max_windows=args.max_windows, rows=rows)
    out = Path(args.out)
    write_json_atomic(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"\n{'KV cache':20s} {'PPL':>8s} {'vs fp32 KV':>11s} {'bytes/token vs bf16':>20s}")
    for label, row in rows.items():
        print(f"{label:20s} {row['ppl']:8.4f} {row['ppl_change_vs_fp32_kv']:+10.2%} {row['kv_bytes_per_token_vs_bf16']:20.3f}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(result["rows"])
    ppl = [result["rows"][k]["ppl"] for k in labels]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(labels, ppl, color=["#888", "#4c72b0", "#dd8452", "#55a868"])
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylim(min(ppl) * 0.98, max(ppl) * 1.01)
    ax.set_ylabel("perplexity")
    ax.set_title(f"{result['model']}: KV-cache storage vs perplexity ({result['data']}, {result['max_windows']}x{result['seq_len']})")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
