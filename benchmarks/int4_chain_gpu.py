"""A decoder layer's products after attention as one persistent kernel (kernels/triton_int4_chain.py) against the
four tensor-core GEMVs it replaces (o + residual, gate|up with norm and SwiGLU, down + residual, next q|k|v with norm).

Llama-3.2-3B shapes, int4 g128, random weights for 28 layers (1.4 GB: L2 holds none of it between uses). First the
chain's outputs against the GEMVs' (the same bits expected) and against float64 dequantized products, then the time
per layer of 28 layers in a row captured in one CUDA graph (each layer's input is the one before's output, as in
decode): the GEMVs as the model runs them now (with PDL where kernels/pdl.py says so), the chain on its default
grid, on smaller ones and with 128 registers a thread (4 programs per SM), and copies of the same bytes (one per
tensor: launches included, so a floor only for the kernels' count, not for the bytes). Prints a table, writes JSON.

    PYTHONPATH=src:benchmarks python benchmarks/int4_chain_gpu.py --out benchmarks/results/int4_chain_h200.json
"""

from __future__ import annotations

import argparse
import sys
from datetime import date

import torch

from kernels_gpu import time_per_call_us  # benchmarks/
from results_out import save_results  # benchmarks/
from llmpress.bench.roofline import device_name, measure_copy_bandwidth
from llmpress.kernels.ops import ChainProduct
from llmpress.kernels.triton_int4_chain import chain_grid, frag_chain
from llmpress.kernels.triton_int4_frag import dequantize_fragments_triton, frag_gemv

GROUP, H, INNER, QKV, LAYERS = 128, 3072, 8192, 5120, 28


def random_product(K: int, N: int, norm: bool) -> ChainProduct:
    """Any int32 words are valid fragments (8 nibbles each); scales and zeros as a real g128 weight has them."""
    G = K // GROUP
    fragments = torch.randint(-2**31, 2**31 - 1, (N // 16, G, GROUP // 64, 32, 4), dtype=torch.int32, device="cuda")
    scales = (torch.rand(G, N, device="cuda") * 0.004 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (G, N), dtype=torch.uint8, device="cuda")
    weight = (torch.rand(K, device="cuda") + 0.5).to(torch.bfloat16) if norm else None
    return ChainProduct(fragments, scales, zeros, weight, 1e-5 if norm else 0.0)


def layer_weights() -> dict[str, ChainProduct]:
    return dict(o=random_product(H, H, False), gate_up=random_product(H, 2 * INNER, True),
                down=random_product(INNER, H, False), next=random_product(H, QKV, True))


def gemvs(a, h, w):
    h1 = frag_gemv(a, w["o"].fragments, w["o"].scales, w["o"].zeros, GROUP, residual=h)
    gu = w["gate_up"]
    act = frag_gemv(h1, gu.fragments, gu.scales, gu.zeros, GROUP, norm_weight=gu.norm_weight, eps=gu.eps, swiglu=True)
    h2 = frag_gemv(act, w["down"].fragments, w["down"].scales, w["down"].zeros, GROUP, residual=h1)
    n = w["next"]
    return h2, frag_gemv(h2, n.fragments, n.scales, n.zeros, GROUP, norm_weight=n.norm_weight, eps=n.eps)


def chain(a, h, w, programs=None, layer=0):
    return frag_chain(a, h, w["o"], w["gate_up"], w["down"], w["next"], GROUP, layer=layer, programs=programs)


def float64_reference(a, h, w):
    def product(p, x):
        if p.norm_weight is not None:
            x64 = x.double()
            x = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + p.eps)) * p.norm_weight.double()
        dense = dequantize_fragments_triton(p.fragments, p.scales, p.zeros, GROUP, torch.float32).double()
        return x.double() @ dense.T
    h1 = h.double() + product(w["o"], a)
    gate, up = product(w["gate_up"], h1).chunk(2, dim=-1)
    h2 = h1 + product(w["down"], torch.nn.functional.silu(gate) * up)
    return h2, product(w["next"], h2)


def time_layers_us(step, weights, a, h, replays: int = 20) -> float:
    """Mean time per layer of `LAYERS` dependent layers (each one's next output feeds the next one's x), replayed
    from one CUDA graph."""
    def run():
        x, stream = a, h
        for i, w in enumerate(weights):
            stream, nxt = step(x, stream, w, i)
            x = nxt[:, :H]
        return stream
    return time_per_call_us(run, [()], replays) / len(weights)


def capped(step, registers: int = 128):
    """`step` with the chain's kernel built under a register cap (while it is compiled, captured and replayed)."""
    import llmpress.kernels.triton_int4_chain as chain_module

    def run(*args):
        saved, chain_module.max_registers = chain_module.max_registers, registers
        try:
            return step(*args)
        finally:
            chain_module.max_registers = saved
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--grids", default="1,2,3", help="also the chain on this many programs per SM (comma list)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    bandwidth = measure_copy_bandwidth("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    report = {"script": "benchmarks/int4_chain_gpu.py", "command": " ".join(sys.argv), "date": date.today().isoformat(),
              "gpu": device_name("cuda"), "torch": torch.__version__, "copy_bandwidth_bytes_per_s": bandwidth,
              "shapes": dict(hidden=H, intermediate=INNER, next=QKV, layers=LAYERS, group_size=GROUP)}
    print(f"{report['gpu']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s, {sms} SMs", flush=True)
    weights = [layer_weights() for _ in range(LAYERS)]
    a = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)

    plain_h2, plain_next = gemvs(a, h, weights[0])
    chain_h2, chain_next = chain(a, h, weights[0])
    ref_h2, ref_next = float64_reference(a, h, weights[0])
    rel = lambda got, ref: ((got.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    same = torch.equal(plain_h2, chain_h2) and torch.equal(plain_next, chain_next)
    report["check"] = {"same_bits_as_gemvs": bool(same),
                       "chain_rel_err_h2": rel(chain_h2, ref_h2), "chain_rel_err_next": rel(chain_next, ref_next),
                       "gemvs_rel_err_next": rel(plain_next, ref_next)}
    print(f"check: same bits as the GEMVs: {report['check']['same_bits_as_gemvs']}; rel err vs float64: "
          f"h2 {report['check']['chain_rel_err_h2']:.2e}, next {report['check']['chain_rel_err_next']:.2e} "
          f"(GEMVs {report['check']['gemvs_rel_err_next']:.2e})", flush=True)
    if not report["check"]["same_bits_as_gemvs"]:
        save_results(report, args.out, "int4_chain.json")
        print("the chain differs from the GEMVs: not timing it", file=sys.stderr)
        return 1

    layer_bytes = sum(t.numel() * t.element_size() for w in weights[:1] for p in w.values()
                      for t in (p.fragments, p.scales, p.zeros))
    copies = [[(torch.empty_like(t), t) for p in w.values() for t in (p.fragments, p.scales, p.zeros)] for w in weights]

    no_next = torch.zeros(1, QKV, device="cuda", dtype=torch.bfloat16)

    def copy_step(x, stream, w, i):
        for dst, src in copies[i]:
            dst.copy_(src)
        return stream, no_next

    w0 = weights[0]
    resident = chain_grid(a, h, w0["o"], w0["gate_up"], w0["down"], w0["next"], GROUP)
    variants = [("4 GEMVs", lambda x, s, w, i: gemvs(x, s, w)), ("chain", lambda x, s, w, i: chain(x, s, w, layer=i))]
    variants += [(f"chain, {k}/SM", lambda x, s, w, i, k=k: chain(x, s, w, programs=k * sms, layer=i))
                 for k in (int(v) for v in args.grids.split(",")) if k * sms < resident]
    variants.append(("chain, 128 registers", capped(lambda x, s, w, i: chain(x, s, w, layer=i))))
    variants.append(("copies, same bytes", copy_step))
    report["default_grid_programs"] = resident
    report["layer_bytes"] = layer_bytes
    report["us_per_layer"] = {}
    print(f"\nweights per layer {layer_bytes / 1e6:.1f} MB; default grid {resident} programs "
          f"({resident // sms} per SM)\n{'variant':22s} {'us/layer':>9s} {'GB/s':>7s} {'% copy bw':>9s}", flush=True)
    for label, step in variants:
        us = time_layers_us(step, weights, a, h)
        report["us_per_layer"][label] = us
        rate = layer_bytes / (us * 1e-6)
        print(f"{label:22s} {us:9.2f} {rate / 1e9:7.0f} {100 * rate / bandwidth:8.0f}%", flush=True)
        save_results(report, args.out, "int4_chain.json")
    base = report["us_per_layer"]["4 GEMVs"]
    print(f"\nchain / GEMVs: {report['us_per_layer']['chain'] / base:.3f} "
          f"({(base - report['us_per_layer']['chain']) * LAYERS / 1e3:.3f} ms less per 28-layer token)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
