"""How fast can any kernel read a 3B linear's packed int4 weights? The ceiling under the GEMV bandwidth target.

The quantization issue asks the batch-1 GEMV to read its packed weights at >= 70% of the copy bandwidth. A GEMV
must at least read those bytes, so a kernel that does nothing else bounds it: here each program loads one block
of 32-bit words (16-byte loads, all in flight at once, no loop) and stores one word, the XOR of its block. Each
3B shape's bytes (packed words, bf16 scales, uint8 zeros, as int4_frag_gpu.py counts them) are read by every
block size x warp count below, standalone and under PDL (the next call's loads issued before it waits for the one
before, as the decode's products do), timed as CUDA-graph replays over rotating buffers (L2 holds none of them),
beside a copy of the same bytes and an empty kernel (the per-call floor of a graph of launches). The XOR of
every block is checked against torch's. Prints a table and writes JSON.

    PYTHONPATH=src:benchmarks python benchmarks/read_ceiling_gpu.py --out benchmarks/results/read_ceiling_h200.json
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import triton
import triton.language as tl

from int4_rows_gpu import GROUP, SHAPES, int4_bytes  # benchmarks/
from kernels_gpu import time_per_call_us  # benchmarks/
from results_out import save_results, start_gpu_report  # benchmarks/
from llmpress.kernels.pdl import pdl_start, pdl_wait

BLOCKS = (1024, 2048, 4096, 8192)  # 32-bit words a program reads
WARPS = (2, 4, 8)
SETS = 16


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _read_block(words_ptr, out_ptr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    block = tl.program_id(0)
    words = tl.load(words_ptr + block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK))
    pdl_wait(PDL)  # as a product waits for its input after its weight loads
    tl.store(out_ptr + block, tl.reduce(words, 0, _xor))


@triton.jit
def _empty(out_ptr, PDL: tl.constexpr):
    pdl_start(PDL)
    pdl_wait(PDL)
    if tl.program_id(0) == 0:
        tl.store(out_ptr, 1)


def read_blocks(words: torch.Tensor, out: torch.Tensor, block: int, warps: int, pdl: int) -> None:
    _read_block[(words.numel() // block,)](words, out, BLOCK=block, PDL=pdl, num_warps=warps, launch_pdl=bool(pdl))


def block_xor_reference(words: torch.Tensor, block: int) -> torch.Tensor:
    """torch has no XOR reduction; numpy's ufunc reduce is one."""
    return torch.from_numpy(np.bitwise_xor.reduce(words.view(-1, block).cpu().numpy(), axis=1)).to(words.device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    report = start_gpu_report("benchmarks/read_ceiling_gpu.py", group_size=GROUP, rows=[])
    bandwidth = report["copy_bandwidth_bytes_per_s"]
    out = torch.empty(1 << 20, dtype=torch.int32, device="cuda")
    for pdl in (0, 1):
        empty_us = time_per_call_us(lambda: _empty[(132,)](out, PDL=pdl, num_warps=4, launch_pdl=bool(pdl)), [()] * 64)
        report["rows"].append(dict(shape="-", kernel=f"empty kernel{' pdl' if pdl else ''}", us=empty_us))
        print(f"empty kernel (132 programs){', PDL' if pdl else ''}: {empty_us:.2f} us a call", flush=True)
    check = torch.randint(-2**31, 2**31 - 1, (8 * max(BLOCKS),), dtype=torch.int32, device="cuda")
    for block in BLOCKS:
        read_blocks(check, out, block, 4, 0)
        assert torch.equal(out[:check.numel() // block], block_xor_reference(check, block)), block
    print(f"\n{'shape':8s} {'MB':>6s} {'kernel':28s} {'us':>7s} {'% copy bw':>9s}", flush=True)
    for name, K, N, _ in SHAPES:
        n_words = triton.cdiv(int4_bytes(K, N) // 4, max(BLOCKS)) * max(BLOCKS)
        sets = SETS if N < 100000 else 4
        buffers = [torch.randint(-2**31, 2**31 - 1, (n_words,), dtype=torch.int32, device="cuda") for _ in range(sets)]

        def record(kernel: str, us: float) -> float:
            fraction = n_words * 4 / (us * 1e-6) / bandwidth
            report["rows"].append(dict(shape=name, K=K, N=N, kernel=kernel, us=us, bytes=n_words * 4,
                                       fraction_of_copy_bandwidth=fraction))
            print(f"{name:8s} {n_words * 4 / 1e6:6.1f} {kernel:28s} {us:7.2f} {fraction:9.1%}", flush=True)
            return fraction

        best = {0: 0.0, 1: 0.0}
        for pdl in (0, 1):
            for block in BLOCKS:
                for warps in [w for w in WARPS if block // (32 * w) >= 4]:  # at least one 16-byte load a thread
                    us = time_per_call_us(lambda words: read_blocks(words, out, block, warps, pdl),
                                          [(words,) for words in buffers])
                    best[pdl] = max(best[pdl], record(f"read {block} words, {warps} warps{', pdl' if pdl else ''}", us))
        copies = [(words[:n_words // 2], torch.empty(n_words // 2, dtype=torch.int32, device="cuda"))
                  for words in buffers]
        copy_us = time_per_call_us(lambda src, dst: dst.copy_(src), copies)
        record("copy, same bytes", copy_us)
        report["rows"].append(dict(shape=name, kernel="best read", fraction_of_copy_bandwidth=best[0],
                                   fraction_of_copy_bandwidth_pdl=best[1]))
        print(f"{name:8s} best read-only kernel: {best[0]:.1%} of the copy bandwidth alone, {best[1]:.1%} under PDL",
              flush=True)
        del buffers, copies
        save_results(report, args.out, "read_ceiling_gpu.json")
    save_results(report, args.out, "read_ceiling_gpu.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
