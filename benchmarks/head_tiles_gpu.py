"""The int4 head's accumulating product (Llama-3.2-3B: 128256 x 3072, RMSNorm folded, x in fp32) on several tiles.

In the decode step the head takes ~71 us for its 206 MB (69% of the copy bandwidth on the H200), where a read-only
kernel reads the same bytes at ~105% (read_ceiling_gpu.py), so its tile may be what holds it. Each tile (warps,
groups per warp, row tiles per warp) with the register cap it fits in (None: uncapped, where the cap of 128 would
spill), timed as 16 calls a CUDA graph over 4 distinct random heads; each tile's output is checked against the
default tile's (the same sums in another order: fp32 atomics). Prints a table, writes JSON.

    PYTHONPATH=src:benchmarks python benchmarks/head_tiles_gpu.py --out benchmarks/results/head_tiles_h200.json
"""

from __future__ import annotations

import argparse
import sys

import torch

from int4_chain_gpu import GROUP, random_product  # benchmarks/
from int4_rows_gpu import int4_bytes  # benchmarks/
from kernels_gpu import time_per_call_us  # benchmarks/
from results_out import save_results, start_gpu_report  # benchmarks/
import llmpress.kernels.triton_int4_accumulate as accumulate

K, N, DISTINCT, CALLS = 3072, 128256, 4, 16
# (tile, register cap): the default, and the tiles whose block of rows divides 128256 (2^8 x 501) with a cap that
# spills nothing for sm_90 (compiled on the CPU machine: (2, 1, 8) 194 registers, (4, 2, 4) 231)
TILES = [((4, 1, 4), 128), ((2, 1, 8), None), ((4, 2, 4), None), ((2, 1, 4), 128), ((4, 1, 2), 128),
         ((8, 1, 2), 128)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    report = start_gpu_report("benchmarks/head_tiles_gpu.py", rows=[])
    bandwidth = report["copy_bandwidth_bytes_per_s"]
    G = K // GROUP
    nbytes = int4_bytes(K, N)
    heads = [random_product(K, N, True) for _ in range(DISTINCT)]
    x = torch.randn(1, K, device="cuda", dtype=torch.float32)
    out = torch.zeros(1, N, device="cuda", dtype=torch.float32)
    squares = torch.zeros(G, device="cuda", dtype=torch.float32)

    def call(p):
        accumulate.frag_accumulate(x, p.fragments, p.scales, p.zeros, GROUP, out, p.norm_weight, squares)

    reference = None
    print(f"{'tile':12s} {'cap':>5s} {'us':>8s} {'% copy bw':>9s} {'rel diff':>9s}", flush=True)
    for tile, cap in TILES:
        accumulate.CONFIGS[(N, G)] = tile
        accumulate.REGISTER_CAPS[(N, G)] = cap
        try:
            out.zero_()
            call(heads[0])
            result = out.clone()
            reference = result if reference is None else reference
            diff = ((result - reference).norm() / reference.norm()).item()
            us = time_per_call_us(call, [(heads[i % DISTINCT],) for i in range(CALLS)])
        except Exception as error:  # a tile that does not compile here: skipped, and said so
            print(f"{str(tile):12s} {str(cap):>5s} {type(error).__name__}: {str(error).splitlines()[0][:100]}",
                  flush=True)
            continue
        fraction = nbytes / (us * 1e-6) / bandwidth
        report["rows"].append(dict(tile=list(tile), register_cap=cap, us=us, fraction_of_copy_bandwidth=fraction,
                                   rel_diff_from_default_tile=diff))
        print(f"{str(tile):12s} {str(cap):>5s} {us:8.2f} {fraction:9.1%} {diff:9.1e}", flush=True)
        save_results(report, args.out, "head_tiles_gpu.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
