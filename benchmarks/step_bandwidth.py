"""Each int4 product's share of a decode step, as bandwidth: its packed bytes over the time it adds to the step.

Reads an int4_gpu.py results file with a --timeline of the accumulating decode (kernels credited by product,
llmpress.bench.timeline) and prints, per product of the architecture, the bytes of its packed weights (words, bf16
scales, uint8 zeros at g128), the microseconds it adds to a step, and those as TB/s and as a share of the copy
bandwidth measured in the same run. The GEMV bandwidth target of the quantization issue, read inside the step.

    PYTHONPATH=src:benchmarks python benchmarks/step_bandwidth.py benchmarks/results/int4_h200_s18d.json \
        int4-tc-only-acc-dgf-lf+head
"""

from __future__ import annotations

import argparse
import json
import sys

from int4_rows_gpu import int4_bytes  # benchmarks/
from latency_floor_gpu import shapes_of  # benchmarks/
from llmpress.config import KNOWN_ARCHITECTURES


def product_bytes(arch: str) -> dict[str, int]:
    """Each layer product's int4 bytes, and the head's."""
    sizes = {name: int4_bytes(K, N) for name, (K, N, *_) in shapes_of(arch).items() if name != "tiny"}
    config = KNOWN_ARCHITECTURES[arch]
    return {**sizes, "lm_head": int4_bytes(config.hidden_size, config.vocab_size)}


def product_of(kernel: str) -> str | None:
    """timeline names: "_frag_accumulate [o]" and the like; the down product has a kernel of its own."""
    if "[" in kernel:
        return kernel[kernel.index("[") + 1:kernel.index("]")]
    return "down" if kernel.startswith("_frag_accumulate_swiglu") else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="an int4_gpu.py JSON")
    parser.add_argument("variant", help="a variant of it that ran with --timeline")
    args = parser.parse_args()
    with open(args.results) as f:
        results = json.load(f)
    bandwidth = results["copy_bandwidth_bytes_per_s"]
    for arch, entry in results["architectures"].items():
        timeline = entry.get(args.variant, {}).get("timeline")
        if not timeline:
            continue
        sizes = product_bytes(arch)
        print(f"{arch} {args.variant}: step {timeline['step_us']:.1f} us, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
        print(f"{'product':8s} {'MB':>7s} {'us/call':>8s} {'TB/s':>6s} {'% copy bw':>9s}")
        for kernel in timeline["kernels"]:
            name = product_of(kernel["name"])
            if name in sizes:
                us = kernel["us_per_step"] / kernel["per_step"]
                rate = sizes[name] / (us * 1e-6)
                print(f"{name:8s} {sizes[name] / 1e6:7.2f} {us:8.2f} {rate / 1e12:6.2f} {rate / bandwidth:9.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
