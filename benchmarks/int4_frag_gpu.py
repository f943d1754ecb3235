"""The tensor-core batch-1 int4 GEMV (kernels/triton_int4_frag.py) against the split GEMV the model runs now.

For each linear shape of a Llama-3.2-3B decode step (q|k|v, o, gate|up, down, lm_head), int4 g128 random
weights: first each kernel's result against exact float64 dequantization, then the time per call as
CUDA-graph replays over rotating weight sets (so L2 cannot hold them; benchmarks/kernels_gpu.py), every tile
of the new kernel and the tuned split GEMV, then the linears of one token (28 layers + lm_head). With
--rows 1,6,16,512: also M rows of x (6: a speculative verify step at k = 5; 9..16: an engine batch; more: a
prefill), a fragments-only layer's product (ops.int4_matmul_fragments: one call up to 8 rows, one or two up to 16,
the fragment dequantizer + cuBLAS above) against what the row layout runs ("rows M=": its default dispatch,
the tensor-core path up to 16 rows, dequantize + cuBLAS above). Beside each shape: a copy moving the same bytes,
timed the same way (what the memory system gives a kernel of that size). Prints a table and writes JSON.

    PYTHONPATH=src python benchmarks/int4_frag_gpu.py --out benchmarks/results/int4_frag_h200.json
"""

from __future__ import annotations

import argparse
import sys

import torch

from int4_rows_gpu import GROUP, LAYERS, SHAPES, int4_bytes, random_int4, rel_error  # benchmarks/
from kernels_gpu import time_per_call_us  # benchmarks/
from results_out import save_results, start_gpu_report  # benchmarks/
from llmpress.kernels import ops  # noqa: F401 - registers torch.ops.llmpress.int4_matmul_fragments
from llmpress.kernels.triton_int4_frag import FRAG_CONFIGS, FRAG_KERNEL_MAX_M, FRAG_MAX_M, frag_fits, frag_gemv
from llmpress.kernels.triton_int4_rows import int4_matmul_rows_triton
from llmpress.kernels.triton_int4_rows_split import split_gemv_rows
from llmpress.quant.format import fragment_scales_zeros, rows_to_fragments

SETS = 16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1", help="comma-separated rows of x, e.g. 1,6,16,512")
    parser.add_argument("--tiles-at-rows", action="store_true",
                        help="also every tile configuration at each M <= 16 of --rows (default: only M = 1)")
    parser.add_argument("--norm", action="store_true",
                        help="also both kernels with the RMSNorm folded in (M = 1), and the tensor-core GEMV's fold at "
                             "each M <= 8 of --rows")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    row_counts = [int(m) for m in args.rows.split(",")]
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    report = start_gpu_report("benchmarks/int4_frag_gpu.py", group_size=GROUP, rows=[], errors={}, per_token_us={})
    bandwidth = report["copy_bandwidth_bytes_per_s"]
    print(f"\n{'shape':8s} {'K':>5s} {'N':>6s} {'kernel':22s} {'rel err':>8s} {'us':>8s} {'% copy bw':>9s}", flush=True)
    best = {"frag": 0.0, "split": 0.0, "frag best tile": 0.0, "copy, same bytes": 0.0,
            **{f"{kind} M={m}": 0.0 for m in row_counts if m > 1 for kind in ("frag", "rows")}}
    for name, K, N, per_layer in SHAPES:
        sets = SETS if N < 100000 else 4
        torch.manual_seed(K + N)
        first, dense = random_int4(K, N)  # dense [K, N]: the exact weights of the first set
        weights = [first["rows"]] + [random_int4(K, N)[0]["rows"] for _ in range(sets - 1)]
        fragments = [(rows_to_fragments(qw, GROUP), *fragment_scales_zeros(s, z)) for qw, s, z in weights]
        xs = [torch.randn(1, K, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        nbytes = int4_bytes(K, N)
        reference = xs[0].double() @ dense.double()
        G = K // GROUP
        variants = {f"frag w{w} g{g} t{t}": (lambda x, qw, fr, s, z, c=(w, g, t): frag_gemv(x, *fr, GROUP, c))
                    for w, g, t in FRAG_CONFIGS if frag_fits(N, G, w, g, t)}
        variants["frag default"] = lambda x, qw, fr, s, z: frag_gemv(x, *fr, GROUP)
        variants["split tuned"] = lambda x, qw, fr, s, z: split_gemv_rows(x, qw, s, z, GROUP, reduce="in_kernel")
        arg_sets = [(xs[i], *weights[i][:1], fragments[i], *weights[i][1:]) for i in range(sets)]
        cases = [(label, fn, arg_sets, reference) for label, fn in variants.items()]
        for m in [m for m in row_counts if m > 1]:
            xm = [torch.randn(m, K, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
            sets_m = [(xm[i], *weights[i][:1], fragments[i], *weights[i][1:]) for i in range(sets)]
            ref_m = xm[0].double() @ dense.double()
            # up to 8 rows one call; 9..16 one call or two (ops.FRAG_ONE_CALL_MAX_N); more dequantizer + cuBLAS
            cases += [(f"frag M={m}", lambda x, qw, fr, s, z: torch.ops.llmpress.int4_matmul_fragments(x, *fr, GROUP),
                       sets_m, ref_m),
                      (f"rows M={m}", lambda x, qw, fr, s, z: int4_matmul_rows_triton(x, qw, s, z, GROUP), sets_m, ref_m)]
            if FRAG_MAX_M < m <= FRAG_KERNEL_MAX_M:  # 9..16 rows in one call (two column blocks)
                cases.append((f"frag one call M={m}", lambda x, qw, fr, s, z: frag_gemv(x, *fr, GROUP), sets_m, ref_m))
            if args.tiles_at_rows and m <= FRAG_KERNEL_MAX_M:  # every tile at this M, to pick its default
                cases += [(f"frag w{w} g{g} t{t} M={m}", lambda x, qw, fr, s, z, c=(w, g, t): frag_gemv(x, *fr, GROUP, c),
                           sets_m, ref_m) for w, g, t in FRAG_CONFIGS if frag_fits(N, G, w, g, t, M=m)]
        if args.norm:
            weight = (torch.rand(K, device="cuda") + 0.5).to(torch.bfloat16)
            h64 = xs[0].double()
            ref_norm = (h64 * torch.rsqrt(h64.pow(2).mean() + 1e-5) * weight.double()) @ dense.double()
            cases += [("frag norm", lambda x, qw, fr, s, z: frag_gemv(x, *fr, GROUP, norm_weight=weight, eps=1e-5),
                       arg_sets, ref_norm),
                      ("split norm", lambda x, qw, fr, s, z: split_gemv_rows(x, qw, s, z, GROUP, reduce="in_kernel",
                                                                             prologue="rmsnorm", norm_weight=weight,
                                                                             eps=1e-5), arg_sets, ref_norm)]
            for m in [m for m in row_counts if 1 < m <= FRAG_MAX_M]:  # a verify step's rows, each normalized
                xm = [torch.randn(m, K, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
                sets_m = [(xm[i], *weights[i][:1], fragments[i], *weights[i][1:]) for i in range(sets)]
                hm = xm[0].double()
                ref_m = (hm * torch.rsqrt(hm.pow(2).mean(dim=1, keepdim=True) + 1e-5) * weight.double()) @ dense.double()
                cases.append((f"frag norm M={m}", lambda x, qw, fr, s, z: frag_gemv(x, *fr, GROUP, norm_weight=weight,
                                                                                    eps=1e-5), sets_m, ref_m))
        if name == "gate|up":  # silu(gate) * up in the GEMV's last step (ops.int4_tensor_core_swiglu)
            half = N // 2
            ref_swiglu = torch.nn.functional.silu(reference[:, :half]) * reference[:, half:]
            cases.append(("frag swiglu", lambda x, qw, fr, s, z: frag_gemv(x, *fr, GROUP, swiglu=True), arg_sets,
                          ref_swiglu))
        fastest_tile = float("inf")
        for label, fn, arg_sets, reference in cases:
            try:
                error = rel_error(fn(*arg_sets[0]), reference)
                us = time_per_call_us(fn, arg_sets)
            except Exception as exc:  # noqa: BLE001 - recorded and reported
                report["errors"][f"{name} {label}"] = f"{type(exc).__name__}: {exc}"
                print(f"{name:8s} {K:5d} {N:6d} {label:22s} FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            fraction = nbytes / (us * 1e-6) / bandwidth
            report["rows"].append(dict(shape=name, K=K, N=N, kernel=label, rel_error=error, us=us, bytes=nbytes,
                                       fraction_of_copy_bandwidth=fraction))
            print(f"{name:8s} {K:5d} {N:6d} {label:22s} {error:8.1e} {us:8.1f} {fraction:9.1%}", flush=True)
            if label.startswith("frag w") and "M=" not in label:  # one row: the batch-1 tiles
                fastest_tile = min(fastest_tile, us)
            if label in ("frag default", "split tuned"):
                best[label.split()[0]] += us * (LAYERS if per_layer else 1)
            elif label in best:
                best[label] += us * (LAYERS if per_layer else 1)
        # What the memory system gives a kernel of this size: a copy moving the same bytes (reads + writes, as the
        # copy bandwidth counts them) over rotating buffers in the same CUDA graph timing, so L2 holds none of them.
        copies = [(torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda"),
                   torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")) for _ in range(sets)]
        copy_us = time_per_call_us(lambda src, dst: dst.copy_(src), copies)
        fraction = nbytes / (copy_us * 1e-6) / bandwidth
        report["rows"].append(dict(shape=name, K=K, N=N, kernel="copy, same bytes", rel_error=None, us=copy_us,
                                   bytes=nbytes, fraction_of_copy_bandwidth=fraction))
        print(f"{name:8s} {K:5d} {N:6d} {'copy, same bytes':22s} {'-':>8s} {copy_us:8.1f} {fraction:9.1%}", flush=True)
        del copies
        best["copy, same bytes"] += copy_us * (LAYERS if per_layer else 1)
        best["frag best tile"] += fastest_tile * (LAYERS if per_layer else 1)
        save_results(report, args.out, "int4_frag_gpu.json")
    report["per_token_us"] = best
    print(f"\nlinears of one 3B token (28 layers + lm_head), batch 1: tensor-core GEMV {best['frag'] / 1e3:.3f} ms, "
          f"split GEMV {best['split'] / 1e3:.3f} ms; tensor-core GEMV on each shape's fastest tile "
          f"{best['frag best tile'] / 1e3:.3f} ms; copies of the same bytes {best['copy, same bytes'] / 1e3:.3f} ms",
          flush=True)
    for m in [m for m in row_counts if m > 1]:
        print(f"same at M = {m}: fragments {best[f'frag M={m}'] / 1e3:.3f} ms, row layout "
              f"{best[f'rows M={m}'] / 1e3:.3f} ms", flush=True)
    save_results(report, args.out, "int4_frag_gpu.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
