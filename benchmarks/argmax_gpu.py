"""Greedy tokens on the GPU: torch.argmax vs kernels/triton_argmax.py over a Llama-3.2 vocabulary, in CUDA graphs.

Checks that both give the same tokens, then times each as 20 calls in one graph (the per-call cost inside a
captured decode step, launch gaps included), for 1 row (batch-1 decode) and 6 rows (a verify step at k = 5).
Prints a table and writes JSON.

    python benchmarks/argmax_gpu.py --out benchmarks/results/argmax_h200.json
"""

from __future__ import annotations

import argparse
import sys
from datetime import date

import torch

from kernels_gpu import time_per_call_us  # benchmarks/
from results_out import save_results  # benchmarks/
from llmpress.bench.roofline import device_name
from llmpress.kernels import ops

CALLS = 20  # per graph


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ways = {"torch.argmax": lambda x: x.argmax(dim=-1),
            "float() then torch.argmax (the old greedy path)": lambda x: x.float().argmax(dim=-1),
            "ops.greedy_tokens (Triton)": ops.greedy_tokens}
    results = {"script": "benchmarks/argmax_gpu.py", "command": " ".join(sys.argv), "date": date.today().isoformat(),
               "gpu": device_name("cuda"), "torch": torch.__version__, "vocab": args.vocab, "cases": {}}
    torch.manual_seed(0)
    for rows in (1, 6):
        for dtype in (torch.bfloat16, torch.float32):
            logits = torch.randn(rows, args.vocab, device="cuda").to(dtype)
            expected = logits.float().argmax(dim=-1)
            case = results["cases"][f"{rows} x {args.vocab} {str(dtype).removeprefix('torch.')}"] = {}
            for name, fn in ways.items():
                same = torch.equal(fn(logits), expected)
                case[name] = {"same_tokens": same,
                              "us_per_call": time_per_call_us(fn, [(logits,)] * CALLS, replays=50)}
    print(f"{results['gpu']}, {CALLS} calls per CUDA graph")
    print(f"{'logits':24s} {'way':48s} {'us/call':>8s} same")
    for label, case in results["cases"].items():
        for name, r in case.items():
            print(f"{label:24s} {name:48s} {r['us_per_call']:8.2f} {r['same_tokens']}")
    save_results(results, args.out, "argmax_gpu.json")
    return 0 if all(r["same_tokens"] for case in results["cases"].values() for r in case.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
