"""The accumulating decode's finishing kernel (triton_int4_accumulate._finish_accumulated) over several rows on the
GPU, against PyTorch, many times: session 12's probe (rows_probe_gpu.py) found the gate|up accumulator right at 1-8
rows and the finished SwiGLU output wrong at some row counts, varying between runs. Each case: random acc [M, N]
and shares [SPLIT, M], the kernel as the rows path launches it (a grid column a row), and one launch a row with
ROWS = 1 (the one-token kernel) on host-offset pointers. Prints the failures; writes results/finish_rows_*.json."""

import argparse
import json

import torch
import triton

from llmpress.kernels.triton_int4_accumulate import FINISH_BLOCK, _finish_accumulated


def expected(acc, shares, K, eps, swiglu):
    r = torch.rsqrt(shares.sum(0) / K + eps)[:, None]  # [M, 1]
    if not swiglu:
        return (acc * r).to(torch.bfloat16)
    half = acc.shape[1] // 2
    g, u = (acc[:, :half] * r).to(torch.bfloat16).float(), (acc[:, half:] * r).to(torch.bfloat16).float()
    return (torch.nn.functional.silu(g).to(torch.bfloat16).float() * u).to(torch.bfloat16)


def run(acc, shares, K, eps, swiglu, per_row):
    M, N = acc.shape
    split = shares.shape[0]
    width = N // 2 if swiglu else N
    y = torch.empty(M, width, dtype=torch.bfloat16, device="cuda")
    if per_row:
        for m in range(M):
            row_shares = shares[:, m].contiguous()
            _finish_accumulated[(triton.cdiv(width, FINISH_BLOCK),)](
                acc[m], row_shares, y[m], N, K, eps, split, acc[m], 0, SPLIT_P2=triton.next_power_of_2(split),
                BLOCK=FINISH_BLOCK, SWIGLU=swiglu, PDL=0, num_warps=4)
    else:
        flat = shares.contiguous()  # share s of row m at s * M + m
        _finish_accumulated[(triton.cdiv(width, FINISH_BLOCK), M)](
            acc, flat, y, N, K, eps, split, acc, 0, SPLIT_P2=triton.next_power_of_2(split), BLOCK=FINISH_BLOCK,
            SWIGLU=swiglu, PDL=0, ROWS=M, num_warps=4)
    return y


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/finish_rows_h200.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for trial in range(3):
        for swiglu in (True, False):
            for N, split, K in ((1024, 2, 256), (16384, 12, 3072), (4096, 8, 1024)):
                for M in (1, 2, 5, 6, 8):
                    for per_row in (False, True):
                        acc = torch.randn(M, N, device="cuda") * 30
                        shares = torch.rand(split, M, device="cuda") * K / split
                        ref = expected(acc.clone(), shares, K, 1e-5, swiglu)
                        y = run(acc, shares, K, 1e-5, swiglu, per_row)
                        err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                        zeroed = acc.abs().sum().item() == 0
                        results.append(dict(trial=trial, swiglu=swiglu, N=N, split=split, M=M, per_row=per_row,
                                            error=err, zeroed=zeroed))
    bad = [r for r in results if r["error"] > 0.02 or not r["zeroed"]]
    print(f"{len(results)} cases, {len(bad)} wrong")
    for r in bad[:40]:
        print(r)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), results=results), f, indent=1)


if __name__ == "__main__":
    main()
