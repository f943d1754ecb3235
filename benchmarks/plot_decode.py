"""Draw the batch-1 decode comparison from decode_gpu.py's JSON files (one panel per architecture).

    python benchmarks/plot_decode.py benchmarks/results/decode_h100_3b.json benchmarks/results/decode_h100_1b.json \
        --out benchmarks/results/decode_h100.png
"""

from __future__ import annotations

import argparse
import json

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    entries = []
    for path in args.results:
        run = json.load(open(path))
        entries += [(arch, e, run["gpu"]) for arch, e in run["architectures"].items()]
    fig = Figure(figsize=(5 * len(entries), 4), dpi=120)
    FigureCanvasAgg(fig)
    for i, (arch, e, gpu) in enumerate(entries):
        ax = fig.add_subplot(1, len(entries), i + 1)
        bars = {f"transformers\n{peer}": r["e2e_tokens_per_s"] for peer, r in e["transformers"].items()}
        bars.update({f"llmpress\n{mode}": r["e2e_tokens_per_s"] for mode, r in e["llmpress"].items()})
        drawn = ax.bar(list(bars), list(bars.values()),
                       color=["#8C8C8C" if name.startswith("transformers") else "#4C72B0" for name in bars])
        ax.bar_label(drawn, fmt="%.0f", fontsize=8)
        ax.axhline(e["roofline_tokens_per_s"], color="#C44E52", linestyle="--",
                   label=f"bandwidth roofline {e['roofline_tokens_per_s']:.0f}")
        ax.set_title(f"{arch}, bf16, batch 1 ({gpu})", fontsize=9)
        ax.set_ylabel("tokens/s (end to end, 256 new tokens)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
