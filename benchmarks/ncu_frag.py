"""Kernels to look at under Nsight Compute: the tensor-core int4 GEMV (kernels/triton_int4_frag.py) and the split
GEMV at the 3B's gate|up and down shapes, batch 1, a few calls each (ncu flushes the caches before each profiled
launch, so one weight set reads from DRAM as in decoding). The profile is the output, e.g. on the device:

    PYTHONPATH=src:benchmarks ncu --set full -k regex:_frag_gemv -c 4 \\
        python benchmarks/ncu_frag.py > $OUT/ncu_frag.txt
"""

from __future__ import annotations

import sys

import torch

from int4_rows_gpu import GROUP, random_int4  # benchmarks/
from llmpress.kernels.triton_int4_frag import frag_gemv
from llmpress.kernels.triton_int4_rows_split import split_gemv_rows
from llmpress.quant.format import fragment_scales_zeros, rows_to_fragments

SHAPES = {"gate|up": (3072, 16384), "down": (8192, 3072)}


def main() -> int:
    if not torch.cuda.is_available():
        print("this script needs a CUDA GPU", file=sys.stderr)
        return 2
    for name, (K, N) in SHAPES.items():
        weight, _ = random_int4(K, N)
        qw, scales, zeros = weight["rows"]
        fragments = rows_to_fragments(qw, GROUP)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        for _ in range(2):  # first calls compile (and tune the split GEMV); the profiled ones follow
            frag_gemv(x, fragments, *fragment_scales_zeros(scales, zeros), GROUP)
            split_gemv_rows(x, qw, scales, zeros, GROUP, reduce="in_kernel")
        torch.cuda.synchronize()
        print(f"{name}: K={K} N={N}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
