"""Linear-layer kernels on the GPU at the Llama-3.2-3B shapes: correctness, then bandwidth.

For each weight shape: bf16 (cuBLAS through F.linear, Inductor's generated kernel through
torch.compile, our Triton GEMV) and int4 g128 (our Triton W4A16 kernels through the autotuned
dispatch, the whole op) at batch 1, 4, 16, plus a 512-token prefill; `--sweep` also times every
batch-1 GEMV configuration by itself. Times are CUDA-graph replays
over 16 different weight sets per shape (so the 50 MB L2 cannot serve repeats), divided per call.
Bandwidth = bytes of weights (packed weights + scales + zeros for int4) / time; compared with the
copy bandwidth measured in the same run.

    python benchmarks/kernels_gpu.py --out benchmarks/results/kernels_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date

import torch
import torch.nn.functional as F

from llmpress.bench.roofline import device_name, measure_copy_bandwidth
from llmpress.kernels.triton_gemv import gemv_triton
from llmpress.kernels.triton_int4 import GEMV_CONFIGS, GEMM_CONFIGS, int4_matmul_triton, kernel_family
from llmpress.kernels.reference import int4_matmul_grouped
from llmpress.quant.format import pack_columns, pack_rows

# (name, in_features K, out_features N) of the 3B's linears (q|k|v and gate|up fused as in model.fusion)
SHAPES_3B = [("qkv", 3072, 5120), ("q/o", 3072, 3072), ("k/v", 3072, 1024), ("gate_up", 3072, 16384),
             ("down", 8192, 3072)]
GROUP = 128
SETS = 16


def random_int4(K: int, N: int, act_order: bool = False):
    """Runtime-layout int4 weights and their exact fp32 dequantization [K, N]."""
    levels = torch.randint(0, 16, (K, N), device="cuda")
    G = K // GROUP
    zeros = torch.randint(0, 16, (G, N), device="cuda")
    scales = (torch.rand(G, N, device="cuda") * 0.01 + 0.002).to(torch.bfloat16)
    g_idx = (torch.randperm(K, device="cuda") // GROUP).int() if act_order else None
    g = g_idx.long() if act_order else torch.arange(K, device="cuda") // GROUP
    dense = (levels - zeros[g]).float() * scales.float()[g]
    return (pack_rows(levels, 4), scales, pack_columns(zeros, 4), g_idx), dense


def rel_error(got, ref) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


compiled_int4 = torch.compile(lambda x, qw, s, qz: int4_matmul_grouped(x, qw, s, qz, GROUP, 4), dynamic=False,
                              options={"coordinate_descent_tuning": True})


def check_correctness() -> dict:
    """Every kernel family through the autotuned dispatch, then forced split-K configurations called
    repeatedly (their arrival counters must reset), against exact dequantization."""
    results = {}
    torch.manual_seed(0)
    for (name, K, N) in SHAPES_3B[:3] + [("down", 8192, 3072)]:
        for act_order in (False, True):
            (qw, s, qz, g_idx), dense = random_int4(K, N, act_order)
            for M in (1, 2, 3, 4, 5, 16, 100, 512):
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                err = rel_error(int4_matmul_triton(x, qw, s, qz, g_idx, GROUP), x.float() @ dense)
                results[f"int4 {kernel_family(M, K, GROUP, act_order)} {name} M={M} act_order={act_order}"] = err
                assert err < 1e-2, (name, M, act_order, err)
        (qw, s, qz, g_idx), dense = random_int4(K, N)
        for M in (1, 4):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            err = rel_error(compiled_int4(x, qw, s, qz), x.float() @ dense)
            results[f"int4 inductor {name} M={M}"] = err
            assert err < 1e-2, (name, M, err)
        forced = [dict(family="gemv", BLOCK_N=64, BLOCK_K=128, SPLIT_K=8, num_warps=4, num_stages=3),
                  dict(family="gemm", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=3),
                  dict(family="general", BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=4, num_warps=4, num_stages=3)]
        for config in forced:
            for M in (1, 3) if config["family"] == "gemv" else (1, 16):
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ dense
                worst = max(rel_error(int4_matmul_triton(x, qw, s, qz, None, GROUP, config=config), ref) for _ in range(20))
                results[f"int4 forced {config['family']} split-k {config['SPLIT_K']} {name} M={M} x20"] = worst
                assert worst < 1e-2, (name, config, M, worst)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        for M in (1, 2, 4):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            err = rel_error(gemv_triton(x, w), x.float() @ w.float().T)
            results[f"gemv {name} M={M}"] = err
            assert err < 1e-2, (name, M, err)
    print(f"correctness: {len(results)} checks, worst relative error {max(results.values()):.2e}", flush=True)
    return results


def time_per_call_us(fn, arg_sets, replays: int = 20) -> float:
    """Mean time of fn(*args) over a CUDA graph that calls it once per argument set."""
    for args in arg_sets[:2]:
        fn(*args)  # autotune / compile outside the graph
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in arg_sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in arg_sets:
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(arg_sets))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--int4-only", action="store_true", help="skip the bf16 comparisons (a short run)")
    parser.add_argument("--sweep", action="store_true", help="also time each int4 GEMV (M=1) and GEMM (M=16) configuration")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    bandwidth = measure_copy_bandwidth("cuda")
    report = {"script": "benchmarks/kernels_gpu.py", "date": date.today().isoformat(), "gpu": device_name("cuda"),
              "torch": torch.__version__, "copy_bandwidth_bytes_per_s": bandwidth, "group_size": GROUP}
    print(f"{report['gpu']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    report["correctness_rel_error"] = check_correctness()
    compiled_linear = torch.compile(lambda x, w: F.linear(x, w), dynamic=False,
                                    options={"coordinate_descent_tuning": True})

    rows = []
    print(f"\n{'shape':8s} {'K':>5s} {'N':>6s} {'variant':22s} {'M':>4s} {'us':>8s} {'GB/s':>7s} {'% copy bw':>9s}", flush=True)
    for name, K, N in SHAPES_3B:
        dense_sets = [(None, torch.randn(N, K, device="cuda", dtype=torch.bfloat16)) for _ in range(0 if args.int4_only else SETS)]
        int4_sets = [random_int4(K, N)[0] for _ in range(SETS)]
        G = K // GROUP
        bytes_bf16 = N * K * 2
        bytes_int4 = N * K // 2 + G * N * 2 + G * N // 2
        def record(variant, M, us, nbytes):
            row = dict(shape=name, K=K, N=N, variant=variant, M=M, us=us, gb_per_s=nbytes / us / 1e3,
                       fraction_of_copy_bandwidth=nbytes / (us * 1e-6) / bandwidth)
            rows.append(row)
            print(f"{name:8s} {K:5d} {N:6d} {variant:22s} {M:4d} {us:8.1f} {row['gb_per_s']:7.0f} "
                  f"{row['fraction_of_copy_bandwidth']:9.1%}", flush=True)
        x1 = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        if dense_sets:
            record("bf16 cuBLAS", 1, time_per_call_us(lambda w: F.linear(x1, w), [(w,) for _, w in dense_sets]), bytes_bf16)
            record("bf16 inductor", 1, time_per_call_us(lambda w: compiled_linear(x1, w), [(w,) for _, w in dense_sets]), bytes_bf16)
            record("bf16 triton gemv", 1, time_per_call_us(lambda w: gemv_triton(x1, w), [(w,) for _, w in dense_sets]), bytes_bf16)
        for M in (1, 4, 16):
            xm = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            us = time_per_call_us(lambda qw, s, qz, g: int4_matmul_triton(xm, qw, s, qz, g, GROUP), int4_sets)
            record(f"int4 triton {kernel_family(M, K, GROUP, False)}", M, us, bytes_int4)
            us = time_per_call_us(lambda qw, s, qz, g: compiled_int4(xm, qw, s, qz), int4_sets)
            record("int4 inductor", M, us, bytes_int4)
        if args.sweep:
            for M, family, table in ((1, "gemv", GEMV_CONFIGS), (16, "gemm", GEMM_CONFIGS[:5])):
                xm = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                for bm, bn, bk, sk, warps, stages in table:
                    if K < bk * sk:
                        continue
                    config = dict(family=family, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=warps, num_stages=stages,
                                  **({"BLOCK_M": bm} if bm else {}))
                    us = time_per_call_us(lambda qw, s, qz, g: int4_matmul_triton(xm, qw, s, qz, g, GROUP, config=config),
                                          int4_sets)
                    record(f"{family} n{bn} k{bk} s{sk} w{warps} st{stages}", M, us, bytes_int4)
        xp = torch.randn(512, K, device="cuda", dtype=torch.bfloat16)
        sets4 = int4_sets[:4]
        if dense_sets:
            record("bf16 cuBLAS prefill", 512, time_per_call_us(lambda w: F.linear(xp, w), [(w,) for _, w in dense_sets[:4]]), bytes_bf16)
        record("int4 triton gemm prefill", 512, time_per_call_us(
            lambda qw, s, qz, g: int4_matmul_triton(xp, qw, s, qz, g, GROUP), sets4), bytes_int4)
        del dense_sets, int4_sets
        torch.cuda.empty_cache()
    report["rows"] = rows
    if args.out or os.environ.get("OUT"):
        path = args.out or os.path.join(os.environ["OUT"], "kernels_gpu.json")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
