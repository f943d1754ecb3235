"""Paged attention on the GPU: the Triton kernel against the reference, then decode and prefill timings.

Correctness: Triton vs `paged_attention_reference` (float64) on batches mixing decode, prefill and chunked
prefill, for each kv dtype; exits 1 if any relative error is over its bound. Decode: the Llama-3.2-3B
attention shape (H=24, Hkv=8, D=128, block_size 16), every sequence 1024 tokens of context in randomly
placed blocks, batch 1 / 32 / 256, kv bf16 / fp8 / int8. Times are CUDA-graph replays (the engine's decode
path, no launch overhead) over enough layers' caches that the 60 MB L2 cannot serve repeats; median of
many replays, per call. Bandwidth = bytes of K/V (+ scales) read / time, beside the copy bandwidth measured
in the same run. Prefill: one 1024-token prompt, beside SDPA's causal attention on dense K/V.

    PYTHONPATH=src python benchmarks/paged_attention_gpu.py --out benchmarks/results/paged_attention_h200.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from datetime import date

import torch
import torch.nn.functional as F

from results_out import save_results  # benchmarks/
from llmpress.bench.roofline import device_name, measure_copy_bandwidth
from llmpress.kernels import ops
from llmpress.kernels.reference import paged_attention_reference

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 24, 8, 128, 16  # Llama-3.2-3B attention
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}
L2_BYTES_TO_BEAT = 512 << 20  # caches of several layers per timed replay: far past the 60 MB L2


def paged_inputs(batch: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, kv_dtype: torch.dtype,
                 q_dtype: torch.dtype = torch.bfloat16, fill: str = "store"):
    """paged_attention's arguments for (prefix, q_len) pairs: blocks in random order, one spare table entry.
    fill="store" writes random K/V through ops.store_kv_paged (for checks); "random" writes random bytes
    straight into the cache (for timing: much faster at batch 256)."""
    seq_lens = [p + n for p, n in batch]
    needed = [math.ceil(n / BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(needed) + 1
    tables = torch.randint(0, num_blocks, (len(batch), max(needed) + 1), dtype=torch.int32, device="cuda")
    order = torch.randperm(num_blocks, device="cuda").int()
    starts = [0] + torch.tensor(needed).cumsum(0).tolist()
    for s, n in enumerate(needed):
        tables[s, :n] = order[starts[s]:starts[s] + n]
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    quantized = kv_dtype in (torch.int8, torch.float8_e4m3fn)
    if fill == "random":
        if kv_dtype == torch.int8:
            k_cache, v_cache = (torch.randint(-127, 128, shape, dtype=torch.int8, device="cuda") for _ in range(2))
        else:
            k_cache, v_cache = (torch.randn(shape, device="cuda", dtype=torch.bfloat16).to(kv_dtype) for _ in range(2))
        k_scale, v_scale = ((torch.rand(shape[:3], device="cuda") * 0.01 + 0.005).half() for _ in range(2)) \
            if quantized else (None, None)
    else:
        k_cache, v_cache = (torch.full(shape, float("nan"), device="cuda").to(kv_dtype) if kv_dtype != torch.int8
                            else torch.zeros(shape, dtype=torch.int8, device="cuda") for _ in range(2))
        k_scale, v_scale = ((torch.full(shape[:3], float("nan"), dtype=torch.float16, device="cuda") for _ in range(2))
                            if quantized else (None, None))
        t = [torch.arange(n, device="cuda") for n in seq_lens]
        slots = torch.cat([tables[s].long()[ts // BLOCK_SIZE] * BLOCK_SIZE + ts % BLOCK_SIZE for s, ts in enumerate(t)])
        k, v = torch.randn(2, len(slots), kv_heads, head_dim, device="cuda").to(q_dtype)
        ops.store_kv_paged(k, v, k_cache, v_cache, k_scale, v_scale, slots)
    q_lens = torch.tensor([n for _, n in batch])
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)]).int().cuda()
    q = torch.randn(int(q_lens.sum()), heads, head_dim, device="cuda").to(q_dtype)
    return (q, k_cache, v_cache, k_scale, v_scale, tables, torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
            query_start_loc, max(n for _, n in batch), max(seq_lens))


def rel_error(got, ref) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def check_correctness() -> tuple[dict, bool]:
    """Worst relative error of Triton vs the float64 reference per case; ok is False if any is over its bound."""
    torch.manual_seed(0)
    mixed = [(700, 1), (0, 1), (33, 1), (0, 257), (512, 100), (1000, 1), (64, 1), (15, 17)]
    cases = [(24, 8, 128), (32, 8, 64), (9, 3, 128), (8, 8, 64)]
    results, ok = {}, True
    for heads, kv_heads, head_dim in cases:
        for kv_name, kv_dtype in (("model", None), ("fp8", torch.float8_e4m3fn), ("int8", torch.int8)):
            for q_dtype, bound in ((torch.bfloat16, 2e-2), (torch.float16, 1e-2)):
                args = paged_inputs(mixed, heads, kv_heads, head_dim, kv_dtype or q_dtype, q_dtype)
                with ops.use_backend("triton"):
                    got = ops.paged_attention(*args)
                err = rel_error(got, paged_attention_reference(args[0].double(), *args[1:]))
                if not (err < bound and torch.isfinite(got).all()):
                    ok = False
                    print(f"FAILED: H={heads} Hkv={kv_heads} D={head_dim} kv={kv_name} q={q_dtype}: {err:.2e}")
                results[f"H={heads} Hkv={kv_heads} D={head_dim} kv={kv_name} q={str(q_dtype)[6:]}"] = err
    print(f"correctness: {len(results)} checks, worst relative error {max(results.values()):.2e}"
          f"{'' if ok else ' (FAILED)'}", flush=True)
    return results, ok


def time_per_call_us(fn, arg_sets, replays: int = 50) -> float:
    """Median over replays of one CUDA graph that calls fn once per argument set, divided per call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in arg_sets:
            fn(*args)  # compile outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in arg_sets:
            fn(*args)
    for _ in range(3):
        graph.replay()  # warm-up, excluded
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) * 1e3 / len(arg_sets)


def kv_bytes(num_tokens: int, kv_dtype: torch.dtype) -> int:
    """Bytes of K and V (and their float16 scales) that attention over num_tokens cached tokens reads."""
    elem = torch.empty((), dtype=kv_dtype).element_size()
    scale = 2 if kv_dtype in (torch.int8, torch.float8_e4m3fn) else 0
    return 2 * num_tokens * KV_HEADS * (HEAD_DIM * elem + scale)


def triton_call(config):
    from llmpress.kernels.triton_paged_attention import paged_attention_triton
    return lambda *args: paged_attention_triton(*args, config=config)


def same_as_default(config, args, label: str) -> bool:
    """A swept configuration must compute what the default one does (catches tile-size bugs)."""
    if config is None:
        return True
    err = rel_error(triton_call(config)(*args), triton_call(None)(*args))
    if not err < 1e-2:
        print(f"FAILED: {label} differs from the default configuration by {err:.2e}", flush=True)
    return err < 1e-2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON results path (also $OUT/paged_attention_gpu.json if set)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--context", type=int, default=1024, help="cached tokens per sequence at decode")
    parser.add_argument("--prefill-len", type=int, default=1024)
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="also time other tile configurations")
    args = parser.parse_args()
    if not ops.triton_available():
        print("this benchmark needs a CUDA GPU and Triton", file=sys.stderr)
        return 2
    bandwidth = measure_copy_bandwidth("cuda")
    report = {"script": "benchmarks/paged_attention_gpu.py", "date": date.today().isoformat(),
              "gpu": device_name("cuda"), "torch": torch.__version__, "copy_bandwidth_bytes_per_s": bandwidth,
              "shape": dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, block_size=BLOCK_SIZE)}
    print(f"{report['gpu']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    report["correctness_rel_error"], ok = check_correctness()
    save_results(report, args.out, "paged_attention_gpu.json")

    decode_configs = {"default": None}
    if args.sweep:
        decode_configs |= {f"n{n} w{w} st{st}": dict(BLOCK_M=16, BLOCK_N=n, num_warps=w, num_stages=st)
                           for n, w in ((32, 4), (64, 4), (64, 8), (128, 8)) for st in (1, 2, 3)}
    rows = []
    print(f"\n{'decode':8s} {'kv':5s} {'batch':>5s} {'config':14s} {'us':>8s} {'GB/s':>7s} {'% copy bw':>9s}",
          flush=True)
    for kv_name, kv_dtype in KV_DTYPES.items():
        for batch in args.batches:
            layer_bytes = kv_bytes(batch * args.context, kv_dtype)
            layers = max(1, min(128, math.ceil(L2_BYTES_TO_BEAT / layer_bytes)))
            sets = [paged_inputs([(args.context - 1, 1)] * batch, HEADS, KV_HEADS, HEAD_DIM, kv_dtype, fill="random")
                    for _ in range(layers)]
            for name, config in decode_configs.items():
                ok &= same_as_default(config, sets[0], f"decode {kv_name} batch {batch} {name}")
                us = time_per_call_us(triton_call(config), sets, args.replays)
                row = dict(phase="decode", kv=kv_name, batch=batch, context=args.context, config=name,
                           layers=layers, us=us, gb_per_s=layer_bytes / us / 1e3,
                           fraction_of_copy_bandwidth=layer_bytes / (us * 1e-6) / bandwidth)
                rows.append(row)
                print(f"{'decode':8s} {kv_name:5s} {batch:5d} {name:14s} {us:8.1f} {row['gb_per_s']:7.0f} "
                      f"{row['fraction_of_copy_bandwidth']:9.1%}", flush=True)
            del sets
            torch.cuda.empty_cache()
    report["rows"] = rows
    save_results(report, args.out, "paged_attention_gpu.json")

    L = args.prefill_len
    flops = 4 * HEADS * HEAD_DIM * L * (L + 1) / 2  # q·k and p·v over the causal triangle
    prefill_configs = {"default": None}
    if args.sweep:
        prefill_configs |= {f"m{m} n{n} w{w} st{st}": dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)
                            for m, w in ((16, 4), (32, 4), (64, 4), (64, 8), (128, 8)) for n in (32, 64)
                            for st in (2, 3)}
    print(f"\n{'prefill':8s} {'kv':5s} {'tokens':>6s} {'config':18s} {'us':>8s} {'TFLOP/s':>8s}", flush=True)
    for kv_name, kv_dtype in KV_DTYPES.items():
        inputs = [paged_inputs([(0, L)], HEADS, KV_HEADS, HEAD_DIM, kv_dtype, fill="random")]
        for name, config in prefill_configs.items() if kv_name == "bf16" else [("default", None)]:
            ok &= same_as_default(config, inputs[0], f"prefill {kv_name} {name}")
            us = time_per_call_us(triton_call(config), inputs, args.replays)
            rows.append(dict(phase="prefill", kv=kv_name, tokens=L, config=name, us=us, tflop_per_s=flops / us / 1e6))
            print(f"{'prefill':8s} {kv_name:5s} {L:6d} {name:18s} {us:8.1f} {flops / us / 1e6:8.1f}", flush=True)
    q = torch.randn(1, HEADS, L, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, KV_HEADS, L, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    us = time_per_call_us(sdpa, [()], args.replays)
    rows.append(dict(phase="prefill", kv="bf16 dense", tokens=L, config="sdpa", us=us, tflop_per_s=flops / us / 1e6))
    print(f"{'prefill':8s} {'bf16':5s} {L:6d} {'sdpa (dense)':18s} {us:8.1f} {flops / us / 1e6:8.1f}", flush=True)
    save_results(report, args.out, "paged_attention_gpu.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
