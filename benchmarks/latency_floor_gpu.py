"""What a separate int4 GEMV costs beyond its bytes: each 3B decode product called 112 times in a row from one CUDA
graph (as a token's 28 layers call it, under PDL where kernels/pdl.py says so), over 28 distinct random weights
(read from DRAM, as in decode) and over one weight reused (it stays in the 50 MB L2, so the DRAM transfer is gone and
what is left is the kernel's latency chain: launch or PDL wait, x from L2, mmas, split-K partials and counter, the
last program's reduction, the store). A tiny product (64 rows, 256 inputs: one program) gives the floor of a kernel
boundary alone. `--reductions` also times each product without its cross-program reduction ("none": every program
stores its partials and ends, an upper bound on what a cheaper reduction could save) and with the partials added
by `red.global.add.f32` into one fp32 output ("atomic": no program waits for an answer; norm, SwiGLU and residual
are then left undone, so it is a measurement, not a kernel the model runs). Prints a table, writes JSON.

    PYTHONPATH=src:benchmarks python benchmarks/latency_floor_gpu.py --out benchmarks/results/latency_floor_h200.json
"""

from __future__ import annotations

import argparse
import sys
from datetime import date

import torch

from int4_chain_gpu import GROUP, random_product  # benchmarks/
from kernels_gpu import time_per_call_us  # benchmarks/
from results_out import save_results  # benchmarks/
from llmpress.bench.roofline import device_name, measure_copy_bandwidth
from llmpress.kernels.triton_int4_frag import frag_gemv

# name: (inputs K, outputs N, RMSNorm folded, SwiGLU ending, residual add): as decode runs each 3B product
SHAPES = {"q|k|v": (3072, 5120, True, False, False), "o": (3072, 3072, False, False, True),
          "gate|up": (3072, 16384, True, True, False), "down": (8192, 3072, False, False, True),
          "tiny": (256, 64, False, False, False)}


def shapes_of(arch: str) -> dict:
    """SHAPES for another architecture of llmpress.config.KNOWN_ARCHITECTURES (--arch)."""
    from llmpress.config import KNOWN_ARCHITECTURES
    c = KNOWN_ARCHITECTURES[arch]
    h, i, d = c.hidden_size, c.intermediate_size, c.head_dim
    return {"q|k|v": (h, (c.num_attention_heads + 2 * c.num_key_value_heads) * d, True, False, False),
            "o": (c.num_attention_heads * d, h, False, False, True), "gate|up": (h, 2 * i, True, True, False),
            "down": (i, h, False, False, True), "tiny": SHAPES["tiny"]}
CALLS, DISTINCT = 112, 28


def product_call(K: int, N: int, norm: bool, swiglu: bool, residual: bool, reduction: str = "last"):
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(1, N, device="cuda", dtype=torch.bfloat16) if residual else None

    def call(p):
        return frag_gemv(x, p.fragments, p.scales, p.zeros, GROUP, residual=res, norm_weight=p.norm_weight,
                         eps=p.eps, swiglu=swiglu, reduction=reduction)
    return call


def check_reductions(K: int, N: int) -> dict:
    """The plain product (no norm, residual or SwiGLU) three ways: relative differences from the model's path."""
    p = random_product(K, N, False)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    last = frag_gemv(x, p.fragments, p.scales, p.zeros, GROUP).double()
    summed = frag_gemv(x, p.fragments, p.scales, p.zeros, GROUP, reduction="none").double().sum(0)
    atomic = frag_gemv(x, p.fragments, p.scales, p.zeros, GROUP, reduction="atomic")
    atomic.zero_()
    atomic = frag_gemv(x, p.fragments, p.scales, p.zeros, GROUP, reduction="atomic").double()
    rel = lambda a: ((a - last).norm() / last.norm()).item()  # noqa: E731
    return {"none_summed_rel_diff": rel(summed), "atomic_rel_diff": rel(atomic)}


def sweep_configs(report: dict, args) -> int:
    """Each layer product's accumulating kernel on every tile (from DRAM, 112 calls a graph); the fastest per
    product to args.sweep_configs as {"N,G": [warps, groups, tiles]}."""
    import json
    import llmpress.kernels.triton_int4_accumulate as accumulate
    from llmpress.kernels.triton_int4_frag import FRAG_CONFIGS, frag_fits
    if args.no_register_cap:
        accumulate.X_F32_MAX_REGISTERS = None
    report["x_f32_max_registers"] = accumulate.X_F32_MAX_REGISTERS
    report["sweep_us_dram"], best = {}, {}
    for name, (K, N, norm, _swiglu, _residual) in SHAPES.items():
        if name == "tiny":
            continue
        weights = [random_product(K, N, norm) for _ in range(DISTINCT)]
        G = K // GROUP
        x = torch.randn(1, K, device="cuda", dtype=torch.float32 if norm else torch.bfloat16)
        out = torch.zeros(1, N, device="cuda", dtype=torch.float32)
        squares = torch.zeros(G, device="cuda", dtype=torch.float32)
        times, saved = {}, dict(accumulate.CONFIGS)
        for config in (c for c in FRAG_CONFIGS if frag_fits(N, G, *c)):
            accumulate.CONFIGS[(N, G)] = config
            call = lambda p: accumulate.frag_accumulate(x, p.fragments, p.scales, p.zeros, GROUP, out,  # noqa: E731
                                                        p.norm_weight, squares)
            try:
                times[str(config)] = time_per_call_us(call, [(weights[i % DISTINCT],) for i in range(CALLS)])
            except Exception as error:  # a tile that does not compile for this product: skipped, and said so
                print(f"{name} {config}: {type(error).__name__}: {str(error).splitlines()[0][:120]}", flush=True)
            accumulate.CONFIGS.clear()
            accumulate.CONFIGS.update(saved)
        fastest = min(times, key=times.get)
        best[f"{N},{G}"] = list(eval(fastest))  # noqa: S307 (our own tuple's repr)
        report["sweep_us_dram"][name] = times
        print(f"{name:8s} " + " ".join(f"{c}: {t:.2f}" for c, t in times.items()) + f"  -> {fastest}", flush=True)
        save_results(report, args.out, "latency_floor.json")
        del weights
    report["best_accumulate_configs"] = best
    save_results(report, args.out, "latency_floor.json")
    with open(args.sweep_configs, "w") as f:
        json.dump(best, f)
    return 0


def read_sweep_configs(path: str) -> dict[tuple[int, int], tuple[int, int, int]]:
    """The tiles sweep_configs wrote to `path`, keyed as triton_int4_accumulate.CONFIGS is: (N, G) -> tile."""
    import json
    with open(path) as f:
        return {tuple(int(v) for v in key.split(",")): tuple(tile) for key, tile in json.load(f).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--reductions", default="last", help="comma list of last, none, atomic (see above)")
    parser.add_argument("--sweep-configs", default=None, metavar="JSON",
                        help="only time the accumulating decode's products (triton_int4_accumulate.frag_accumulate, "
                             "x in fp32 where the norm is folded, as decode runs them) on every tile that fits, and "
                             "write each product's fastest to JSON (int4_gpu.py --accumulate-configs reads it)")
    parser.add_argument("--arch", default="llama-3.2-3b", help="whose layer products (llmpress.config.KNOWN_ARCHITECTURES)")
    parser.add_argument("--no-register-cap", action="store_true",
                        help="with --sweep-configs: fp32 x without triton_int4_accumulate.X_F32_MAX_REGISTERS")
    args = parser.parse_args()
    if args.arch != "llama-3.2-3b":
        shapes = shapes_of(args.arch)
        SHAPES.clear()
        SHAPES.update(shapes)
    reductions = args.reductions.split(",")
    assert "last" in reductions and set(reductions) <= {"last", "none", "atomic"}, reductions
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    bandwidth = measure_copy_bandwidth("cuda")
    report = {"script": "benchmarks/latency_floor_gpu.py", "command": " ".join(sys.argv), "arch": args.arch,
              "date": date.today().isoformat(), "gpu": device_name("cuda"), "torch": torch.__version__,
              "copy_bandwidth_bytes_per_s": bandwidth, "calls_per_graph": CALLS, "products": {}}
    print(f"{report['gpu']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    if args.sweep_configs:
        return sweep_configs(report, args)
    if len(reductions) > 1:
        report["checks"] = {"o": check_reductions(3072, 3072), "down": check_reductions(8192, 3072)}
        print(f"reductions vs the model's path (plain products): {report['checks']}", flush=True)
    columns = [f"{r} {where}" for r in reductions for where in ("DRAM", "L2")]
    print(f"{'product':8s} {'MB':>6s} " + " ".join(f"{c:>12s}" for c in columns) + f" {'bytes at copy bw':>17s}  (us)",
          flush=True)
    for name, (K, N, norm, swiglu, residual) in SHAPES.items():
        weights = [random_product(K, N, norm) for _ in range(DISTINCT)]
        nbytes = sum(t.numel() * t.element_size() for t in (weights[0].fragments, weights[0].scales, weights[0].zeros))
        entry = {"K": K, "N": N, "norm": norm, "swiglu": swiglu, "residual": residual, "weight_bytes": nbytes,
                 "us_bytes_at_copy_bandwidth": nbytes / bandwidth * 1e6}
        for reduction in reductions:
            call = product_call(K, N, norm, swiglu, residual, reduction)
            suffix = "" if reduction == "last" else f"_{reduction}"
            entry[f"us_dram{suffix}"] = time_per_call_us(call, [(weights[i % DISTINCT],) for i in range(CALLS)])
            entry[f"us_l2_resident{suffix}"] = time_per_call_us(call, [(weights[0],)] * CALLS)
        report["products"][name] = entry
        times = [entry[f"us_{where}{'' if r == 'last' else '_' + r}"] for r in reductions for where in ("dram", "l2_resident")]
        print(f"{name:8s} {nbytes / 1e6:6.2f} " + " ".join(f"{t:12.2f}" for t in times)
              + f" {entry['us_bytes_at_copy_bandwidth']:17.2f}", flush=True)
        save_results(report, args.out, "latency_floor.json")
        del weights
    layer = [report["products"][n] for n in ("q|k|v", "o", "gate|up", "down")]
    report["layer_us_dram"] = sum(p["us_dram"] for p in layer)
    report["layer_us_l2_resident"] = sum(p["us_l2_resident"] for p in layer)
    report["layer_us_bytes_at_copy_bandwidth"] = sum(p["us_bytes_at_copy_bandwidth"] for p in layer)
    for reduction in reductions[1:]:
        report[f"layer_us_dram_{reduction}"] = sum(p[f"us_dram_{reduction}"] for p in layer)
        print(f"a layer's four products, reduction {reduction}: {report[f'layer_us_dram_{reduction}']:.1f} us from DRAM")
    print(f"a layer's four products: {report['layer_us_dram']:.1f} us from DRAM, "
          f"{report['layer_us_l2_resident']:.1f} us with the weights in L2, "
          f"{report['layer_us_bytes_at_copy_bandwidth']:.1f} us for their bytes at the copy bandwidth")
    save_results(report, args.out, "latency_floor.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
