"""int4 linear kernels at the Llama-3.2-3B's shapes, batch 1/4/16: the row layout's three paths (tensor-core
GEMV, CUDA-core GEMV, dequantize + cuBLAS) against the GPTQ layout, PyTorch's own int4 kernel (tinygemm,
`torch._weight_int4pack_mm`, as gpt-fast uses) and bf16 cuBLAS.

Per shape (the 3B's projections as the model runs them, q|k|v and gate|up fused, and its 128k-vocab
lm_head): correctness of each int4 kernel
against exact dequantization, then the time per call as CUDA-graph replays over 16 weight sets (so L2
cannot serve repeats). Bandwidth = bytes of the weight as each kernel stores it / time, against the copy
bandwidth measured in the same run. The per-token line adds up one decoder layer's seven projections x
the layer count, plus lm_head. Each row-layout path is timed at every M it takes, whichever the dispatch
picks ("int4 rows" is the dispatch), and the batch-1 split-tile and half2 GEMVs at M = 1. `--sweep` also
times every split, half2 and tensor-core configuration at M = 1, lm_head included, and a read-only kernel
with the split GEMV's tiles (loads the words, scales and zeros, stores one int per row and tile): the
bandwidth that tiling reaches with no arithmetic, the ceiling of any GEMV built on it.

    python benchmarks/int4_rows_gpu.py --out benchmarks/results/int4_rows_h200.json
"""

from __future__ import annotations

import argparse
import sys
from datetime import date

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from results_out import save_results  # benchmarks/
from llmpress.bench.roofline import device_name, measure_copy_bandwidth
from llmpress.kernels.triton_int4 import int4_matmul_triton
from llmpress.kernels.triton_int4_rows import default_family, int4_matmul_rows_triton
from llmpress.kernels.triton_int4_rows_half2 import HALF2_CONFIGS, half2_fits
from llmpress.kernels.triton_int4_rows_mma import MMA_MAX_M, mma_candidates, mma_fits
from llmpress.kernels.triton_int4_rows_split import SPLIT_CONFIGS, split_fits, split_gemv_rows
from llmpress.quant.format import RuntimeQuantWeight, pack_columns, pack_rows, runtime_to_rows

from kernels_gpu import time_per_call_us  # CUDA-graph replays over rotating weight sets (benchmarks/)

GROUP = 128
SETS = 16
LAYERS = 28
# (name, K, N, how many per decoder layer; 0: once per token)
SHAPES = [("q|k|v", 3072, 5120, 1), ("o", 3072, 3072, 1), ("gate|up", 3072, 16384, 1), ("down", 8192, 3072, 1),
          ("lm_head", 3072, 128256, 0)]
def int4_bytes(K: int, N: int) -> int:
    """Bytes a product reads of an int4 weight [N, K] at GROUP: packed words, bf16 scales, uint8 zeros (the row and
    fragment layouts alike)."""
    return N * K // 2 + (K // GROUP) * N * 3


SWEEPS = ("read-only", "split", "split_plain", "split_in_kernel", "half2", "mma")
ROW_PATHS = {"mma": MMA_MAX_M, "gemv": 4, "split": 1, "split_partials": 1, "half2": 1, "dequant": 1 << 30}  # path -> largest M it takes


@triton.jit
def _read_tiles(qw_ptr, s_ptr, z_ptr, out_ptr, N, G, words_per_row, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                WPG: tl.constexpr):
    """The split GEMV's loads with no arithmetic: out[pid_k, n] = sum of row n's words + scales + zeros in the tile."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = pid_k * GROUPS + tl.arange(0, GROUPS)
    words = tl.load(qw_ptr + offs_n[:, None, None] * words_per_row + offs_g[None, :, None] * WPG
                    + tl.arange(0, WPG)[None, None, :], eviction_policy="evict_first")
    meta = tl.load(s_ptr + offs_n[:, None] * G + offs_g[None, :]).to(tl.int32)  # scales viewed as int16
    meta += tl.load(z_ptr + offs_n[:, None] * G + offs_g[None, :]).to(tl.int32)
    tl.store(out_ptr + pid_k * N + offs_n, tl.sum(tl.sum(words, axis=2) + meta, axis=1))


def read_tiles(qweight, scales, zeros, block_n: int, groups: int, warps: int) -> torch.Tensor:
    N, G = scales.shape
    out = torch.empty(G // groups, N, dtype=torch.int32, device=qweight.device)
    _read_tiles[(N // block_n, G // groups)](qweight, scales.view(torch.int16), zeros, out, N, G, qweight.shape[1],
                                             BLOCK_N=block_n, GROUPS=groups, WPG=GROUP // 8, num_warps=warps)
    return out


def random_int4(K: int, N: int):
    levels = torch.randint(0, 16, (K, N), device="cuda", dtype=torch.int32)
    zeros = torch.randint(0, 16, (K // GROUP, N), device="cuda", dtype=torch.int32)
    scales = (torch.rand(K // GROUP, N, device="cuda") * 0.01 + 0.002).to(torch.bfloat16)
    g = torch.arange(K, device="cuda") // GROUP
    dense = ((levels - zeros[g]).float() * scales.float()[g])  # [K, N]
    gptq = (pack_rows(levels, 4), scales, pack_columns(zeros, 4))
    rows = runtime_to_rows(RuntimeQuantWeight(*gptq, None, GROUP, 4))
    return dict(gptq=gptq, rows=rows, levels=levels, zeros=zeros, scales=scales), dense


def tinygemm_pack(w: dict):
    """PyTorch's tinygemm layout: uint8 [N, K/2] packed, then its tiled int4pack; scales_and_zeros [G, N, 2]
    with w = (q - 8) * scale + zero, so zero = (8 - z) * scale for our (q - z) * scale."""
    levels = w["levels"].T.contiguous()  # [N, K]
    packed = (levels[:, ::2] << 4 | levels[:, 1::2]).to(torch.uint8)
    tiled = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
    scales = w["scales"].float()
    zero = (8 - w["zeros"]).float() * scales
    scales_and_zeros = torch.stack([scales, zero], dim=-1).to(torch.bfloat16).contiguous()  # [G, N, 2]
    return tiled, scales_and_zeros


def rel_error(got, ref) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,2,4,16")
    parser.add_argument("--sweep", default="", help=f"comma list of {', '.join(SWEEPS)}, or 'all': time every "
                                                    "configuration of these at M = 1")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sweeps = SWEEPS if args.sweep == "all" else [f for f in args.sweep.split(",") if f]
    if unknown := set(sweeps) - set(SWEEPS):
        parser.error(f"unknown --sweep {', '.join(sorted(unknown))}; choose from {', '.join(SWEEPS)} or 'all'")
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    bandwidth = measure_copy_bandwidth("cuda")
    report = {"script": "benchmarks/int4_rows_gpu.py", "date": date.today().isoformat(), "gpu": device_name("cuda"),
              "torch": torch.__version__, "copy_bandwidth_bytes_per_s": bandwidth, "group_size": GROUP, "rows": [],
              "correctness_rel_error": {}, "errors": {}}
    print(f"{report['gpu']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"\n{'shape':8s} {'K':>5s} {'N':>6s} {'variant':26s} {'M':>3s} {'us':>8s} {'GB/s':>7s} {'% copy bw':>9s}", flush=True)

    def record(name, K, N, variant, M, us, nbytes):
        row = dict(shape=name, K=K, N=N, variant=variant, M=M, us=us, bytes=nbytes, gb_per_s=nbytes / us / 1e3,
                   fraction_of_copy_bandwidth=nbytes / (us * 1e-6) / bandwidth)
        report["rows"].append(row)
        print(f"{name:8s} {K:5d} {N:6d} {variant:26s} {M:3d} {us:8.1f} {row['gb_per_s']:7.0f} "
              f"{row['fraction_of_copy_bandwidth']:9.1%}", flush=True)

    for name, K, N, _ in SHAPES:
        sets = SETS if N < 100000 else 4
        weights = [random_int4(K, N) for _ in range(sets)]
        dense = weights[0][1]
        G = K // GROUP
        bytes_bf16, bytes_gptq, bytes_rows = N * K * 2, N * K // 2 + G * N * 2 + G * N // 2, int4_bytes(K, N)
        bytes_tiny = N * K // 2 + G * N * 4
        tiny = None
        try:
            tiny = [tinygemm_pack(w) for w, _ in weights]
        except Exception as error:  # the op's signature moves between PyTorch releases
            report["errors"][f"tinygemm {name}"] = repr(error)
            print(f"tinygemm unavailable: {error!r}", flush=True)
        for M in batch_sizes + [512]:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ dense
            w = weights[0][0]
            paths = [p for p, max_m in ROW_PATHS.items() if M <= max_m]
            checks = {"gptq": int4_matmul_triton(x, *w["gptq"], None, GROUP),
                      "rows": int4_matmul_rows_triton(x, *w["rows"], GROUP)}
            for path in paths:
                checks[f"rows {path}"] = int4_matmul_rows_triton(x, *w["rows"], GROUP, {"family": path})
            if tiny and M <= 16:
                try:
                    checks["tinygemm"] = torch.ops.aten._weight_int4pack_mm(x, tiny[0][0], GROUP, tiny[0][1])
                except Exception as error:
                    report["errors"][f"tinygemm {name} M={M}"] = repr(error)
                    tiny = None
            for kernel, out in checks.items():
                report["correctness_rel_error"][f"{name} M={M} {kernel}"] = rel_error(out, ref)
            print(f"{name} M={M}: relative error " + ", ".join(f"{k} {rel_error(v, ref):.1e}" for k, v in checks.items()), flush=True)
            n_sets = 4 if M == 512 else sets
            row_sets = [w["rows"] for w, _ in weights[:n_sets]]
            dense_sets = [(torch.randn(N, K, device="cuda", dtype=torch.bfloat16),) for _ in range(min(n_sets, 8))]
            record(name, K, N, "bf16 cuBLAS", M, time_per_call_us(lambda wt: F.linear(x, wt), dense_sets), bytes_bf16)
            del dense_sets
            record(name, K, N, "int4 gptq layout", M, time_per_call_us(
                lambda qw, s, qz: int4_matmul_triton(x, qw, s, qz, None, GROUP), [w["gptq"] for w, _ in weights[:n_sets]]),
                bytes_gptq)
            timed = {}
            for path in paths:
                timed[path] = time_per_call_us(
                    lambda qw, s, z: int4_matmul_rows_triton(x, qw, s, z, GROUP, {"family": path}), row_sets)
                record(name, K, N, f"int4 rows {path}", M, timed[path], bytes_rows)
            record(name, K, N, "int4 rows", M, timed[default_family(M, GROUP)], bytes_rows)  # what the model runs
            if tiny and M <= 16:
                record(name, K, N, "int4 tinygemm", M, time_per_call_us(
                    lambda t, sz: torch.ops.aten._weight_int4pack_mm(x, t, GROUP, sz), tiny), bytes_tiny)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        if "read-only" in sweeps:
            for bn, groups, warps in SPLIT_CONFIGS:
                if N % bn or not split_fits(N, K // GROUP, bn, groups, in_kernel=False):
                    continue
                us = time_per_call_us(lambda qw, s, z: read_tiles(qw, s, z, bn, groups, warps),
                                      [w["rows"] for w, _ in weights])
                record(name, K, N, f"read-only n{bn} g{groups} w{warps}", 1, us, bytes_rows)
        for family in [f for f in ("split", "split_plain", "split_in_kernel") if f in sweeps]:
            for bn, groups, warps in SPLIT_CONFIGS:
                if not split_fits(N, K // GROUP, bn, groups, in_kernel=family == "split_in_kernel"):
                    continue
                # the kernel alone: "split" leaves its fp32 partials for the consumer to add (fused there);
                # "split_plain" is the same without the inline-PTX word dot
                config = dict(BLOCK_N=bn, GROUPS=groups, num_warps=warps, USE_ASM=family != "split_plain")
                reduce = "in_kernel" if family == "split_in_kernel" else "partials"
                us = time_per_call_us(lambda qw, s, z: split_gemv_rows(x, qw, s, z, GROUP, config, reduce),
                                      [w["rows"] for w, _ in weights])
                record(name, K, N, f"rows {family} n{bn} g{groups} w{warps}", 1, us, bytes_rows)
        if "half2" in sweeps:
            for bn, groups, warps in HALF2_CONFIGS:
                if not half2_fits(N, K // GROUP, bn, groups):
                    continue
                config = dict(family="half2", BLOCK_N=bn, GROUPS=groups, num_warps=warps)
                us = time_per_call_us(lambda qw, s, z: int4_matmul_rows_triton(x, qw, s, z, GROUP, config),
                                      [w["rows"] for w, _ in weights])
                record(name, K, N, f"rows half2 n{bn} g{groups} w{warps}", 1, us, bytes_rows)
        if "mma" in sweeps:
            for bn, groups, warps in mma_candidates(K // GROUP):
                if not mma_fits(N, K // GROUP, 1, bn, groups):
                    continue
                config = dict(family="mma", BLOCK_N=bn, GROUPS=groups, num_warps=warps)
                us = time_per_call_us(lambda qw, s, z: int4_matmul_rows_triton(x, qw, s, z, GROUP, config),
                                      [w["rows"] for w, _ in weights])
                record(name, K, N, f"rows mma n{bn} g{groups} w{warps}", 1, us, bytes_rows)
        del weights, tiny
        torch.cuda.empty_cache()
    summarize(report, batch_sizes)
    save_results(report, args.out, "int4_rows_gpu.json")
    return 0


def summarize(report: dict, batch_sizes: list[int]) -> None:
    """Linear time per decoded token: 28 layers x (q, k, v, o, gate, up, down) + lm_head, per variant and M."""
    per_layer = {name: count for name, _, _, count in SHAPES}
    report["per_token"] = {}
    print(f"\nlinear layers per decoded token ({LAYERS} layers + lm_head), {report['gpu']}")
    for M in batch_sizes + [512]:
        for variant in ("bf16 cuBLAS", "int4 gptq layout", "int4 rows", "int4 rows mma", "int4 rows gemv",
                        "int4 rows split", "int4 rows split_partials", "int4 rows half2", "int4 rows dequant", "int4 tinygemm"):
            rows = {r["shape"]: r for r in report["rows"] if r["variant"] == variant and r["M"] == M}
            if len(rows) < len(SHAPES):
                continue
            body_us = sum(rows[s]["us"] * per_layer[s] * LAYERS for s in per_layer if per_layer[s])
            body_bytes = sum(rows[s]["bytes"] * per_layer[s] * LAYERS for s in per_layer if per_layer[s])
            total_us, total_bytes = body_us + rows["lm_head"]["us"], body_bytes + rows["lm_head"]["bytes"]
            entry = dict(M=M, variant=variant, layers_us=body_us, lm_head_us=rows["lm_head"]["us"], total_us=total_us,
                         layers_fraction_of_copy_bandwidth=body_bytes / (body_us * 1e-6) / report["copy_bandwidth_bytes_per_s"],
                         total_fraction_of_copy_bandwidth=total_bytes / (total_us * 1e-6) / report["copy_bandwidth_bytes_per_s"])
            report["per_token"][f"{variant} M={M}"] = entry
            print(f"M={M:3d} {variant:18s}: layers {body_us / 1e3:6.3f} ms ({entry['layers_fraction_of_copy_bandwidth']:.1%} "
                  f"of copy bw), lm_head {rows['lm_head']['us']:6.1f} us, total {total_us / 1e3:6.3f} ms", flush=True)

    best_of_sweep(report)


def best_of_sweep(report: dict) -> None:
    """Per token at M = 1 with each swept family's fastest configuration per shape (--sweep)."""
    per_layer = {name: count for name, _, _, count in SHAPES}
    for family in ("read-only", "rows split", "rows split_plain", "rows split_in_kernel", "rows half2", "rows mma"):
        best = {}
        for r in report["rows"]:
            if r["M"] == 1 and r["variant"].startswith(family + " n") and (
                    r["shape"] not in best or r["us"] < best[r["shape"]]["us"]):
                best[r["shape"]] = r
        if len(best) < len(SHAPES):
            continue
        total_us = sum(best[s]["us"] * (per_layer[s] * LAYERS or 1) for s in per_layer)
        total_bytes = sum(best[s]["bytes"] * (per_layer[s] * LAYERS or 1) for s in per_layer)
        entry = dict(total_us=total_us, configs={s: best[s]["variant"] for s in best},
                     total_fraction_of_copy_bandwidth=total_bytes / (total_us * 1e-6) / report["copy_bandwidth_bytes_per_s"])
        report["per_token"][f"best {family} M=1"] = entry
        print(f"M=  1 best {family:20s}: total {total_us / 1e3:6.3f} ms ({entry['total_fraction_of_copy_bandwidth']:.1%} "
              f"of copy bw); " + ", ".join(f"{s} {best[s]['variant'].split(' n', 1)[1]}" for s in per_layer), flush=True)


if __name__ == "__main__":
    sys.exit(main())
