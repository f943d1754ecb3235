"""Draw the engine's GPU results (benchmarks/engine_gpu.py JSON): throughput against transformers, the
full-batch decode step against its roofline, and sequences that fit per KV-cache dtype.

    python benchmarks/plot_engine.py benchmarks/results/engine_h200_run3.json benchmarks/results/engine_h200_run1.json \
        --out benchmarks/results/engine_h200.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("throughput_json", help="run whose throughput and roofline panels are drawn")
    parser.add_argument("capacity_json", help="run with the fp8/int8 KV-cache variants")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run, capacity = (json.loads(Path(p).read_text()) for p in (args.throughput_json, args.capacity_json))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    labels = ["transformers\n(eager, batch 256)"] + [f"llmpress\n{v}" for v in run["engine"]]
    values = [run["transformers"]["generated_tokens_per_s"]] + [r["output_tokens_per_s"] for r in run["engine"].values()]
    bars = axes[0].bar(labels, values, color=["#888"] + ["#4c72b0", "#55a868", "#dd8452"][:len(run["engine"])])
    axes[0].bar_label(bars, labels=[f"{v:,.0f}" + ("" if i == 0 else f"\n{v / values[0]:.1f}x") for i, v in enumerate(values)])
    axes[0].set_ylabel("output tokens/s")
    axes[0].set_ylim(0, max(values) * 1.25)
    axes[0].set_title(f"{run['num_prompts']} prompts, {run['input_len'][0]}-{run['input_len'][1]} in, "
                      f"{run['output_len'][0]}-{run['output_len'][1]} out")

    names = list(run["engine"])
    measured = [run["engine"][v]["full_batch_decode_tokens_per_s"] for v in names]
    roofline = [run["engine"][v]["roofline"]["tokens_per_s"] for v in names]
    x = range(len(names))
    axes[1].bar([i - 0.2 for i in x], roofline, width=0.4, color="#ccc", label="roofline (bytes / copy bw)")
    bars = axes[1].bar([i + 0.2 for i in x], measured, width=0.4, color="#4c72b0", label="measured")
    axes[1].bar_label(bars, labels=[f"{m / r:.1%}" for m, r in zip(measured, roofline)])
    axes[1].set_ylim(0, max(roofline) * 1.3)
    axes[1].set_xticks(list(x), names)
    axes[1].set_ylabel("decode tokens/s, 256 sequences running")
    axes[1].set_title(f"full-batch decode step (mean context {run['engine'][names[0]]['full_batch_mean_context']:.0f})")
    axes[1].legend(loc="upper right", fontsize=8)

    kv = {v: r for v, r in capacity["engine"].items() if v in ("bf16", "fp8-kv", "int8-kv")}
    bars = axes[2].bar(list(kv), [r["max_concurrent_at_max_len"] for r in kv.values()], color=["#4c72b0", "#55a868", "#dd8452"])
    axes[2].bar_label(bars, labels=[f"{r['max_concurrent_at_max_len']} ({r['concurrency_vs_bf16']:.2f}x)" for r in kv.values()])
    axes[2].set_ylim(0, max(r["max_concurrent_at_max_len"] for r in kv.values()) * 1.2)
    axes[2].set_ylabel(f"sequences of {capacity['input_len'][1] + capacity['output_len'][1]} tokens that fit")
    axes[2].set_title("KV-cache dtype at equal memory")
    fig.suptitle(f"llmpress engine, {run['arch']} (random bf16 weights), {run['gpu']}, {run['date']}")
    fig.tight_layout()
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
