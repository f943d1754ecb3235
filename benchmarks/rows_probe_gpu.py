"""Which accumulating product goes wrong at several rows on the GPU (session 12: the verify step's logits were far
from the layers', its kernel-level tests passed): each product of the test model's first layer and its int4 head,
through the accumulating ops at 1 and 6 rows, against the tensor-core GEMV at the same rows. Prints a table of
relative errors and writes results/rows_probe_<device>.json."""

import argparse
import json

import torch

from llmpress.kernels import ops
from llmpress.kernels.triton_int4_frag import frag_gemv
from llmpress.model.decode_chain import chain_plan
from tests.test_decode_chain import int4_model


def rel(got, ref):
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def gate_up_float(h, p, gs):
    """gate|up's product (w * h) before the norm's rsqrt, and silu(gate) * up of rmsnorm(h), in float, rounded
    where the kernels round."""
    from llmpress.kernels.triton_int4_frag import dequantize_fragments_triton
    w = dequantize_fragments_triton(p.fragments, p.scales, p.zeros, gs, torch.float32)
    half = w.shape[0] // 2
    raw = (h.to(torch.bfloat16) * p.norm_weight).float() @ w.t()
    r = torch.rsqrt(h.to(torch.bfloat16).float().pow(2).mean(1, keepdim=True) + p.eps)
    g, u = (raw[:, :half] * r).to(torch.bfloat16).float(), (raw[:, half:] * r).to(torch.bfloat16).float()
    return raw, torch.nn.functional.silu(g).to(torch.bfloat16).float() * u


def swiglu_float(h, p, gs):
    """silu(gate) * up of rmsnorm(h) in float (`gate_up_float`)."""
    return gate_up_float(h, p, gs)[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/rows_probe_h200.json")
    args = parser.parse_args()
    ops.int4_tensor_core_norm = ops.int4_tensor_core_swiglu = True
    model = int4_model(True, "cuda", torch.bfloat16, hidden_size=256, intermediate_size=512)
    plan = chain_plan(model)
    gs = plan[0]["group_size"]
    rows = []
    torch.manual_seed(0)
    for M in (1, 2, 6, 8):
        h = torch.randn(M, 256, device="cuda") * 2
        for name in ("qkv", "gate_up", "head"):
            p = plan[0][name] if name != "head" else plan[-1]["next"]
            swiglu = name == "gate_up"
            got = ops.int4_accumulated_norm(h, p, gs, torch.bfloat16, swiglu=swiglu)
            ref = frag_gemv(h.to(torch.bfloat16), p.fragments, p.scales, p.zeros, gs, norm_weight=p.norm_weight,
                            eps=p.eps, swiglu=swiglu)
            got2 = ops.int4_accumulated_norm(h, p, gs, torch.bfloat16, swiglu=swiglu)  # workspace zeroed again?
            row = dict(product=name, rows=M, error=rel(got, ref), second_call=rel(got2, ref))
            if swiglu:  # which of the two is off: each against float
                exact = swiglu_float(h, p, gs)
                row["gemv"], row["config"] = rel(ref, exact), f"acc vs float {rel(got, exact):.2e}"
            rows.append(row)
        for name, k in (("o", 256), ("down", 512)):
            p = plan[0][name]
            x = torch.randn(M, k, device="cuda").to(torch.bfloat16)
            h2 = h.clone()
            ops.int4_accumulate(h2, x, p, gs)
            ref = frag_gemv(x, p.fragments, p.scales, p.zeros, gs)
            rows.append(dict(product=name, rows=M, error=rel(h2 - h, ref), second_call=float("nan")))
    # gate|up alone, against float: the accumulator before its finishing kernel, then the finished act, and the
    # tensor-core GEMV's own SwiGLU ending
    import llmpress.kernels.triton_int4_accumulate as accumulate
    p = plan[0]["gate_up"]
    N = p.scales.shape[1]
    for M in (1, 5, 6, 7, 8):
        h = torch.randn(M, 256, device="cuda") * 2
        raw, act = gate_up_float(h, p, gs)
        acc = torch.zeros(M, N, device="cuda")
        squares = torch.zeros(64, device="cuda")
        accumulate.frag_accumulate(h, p.fragments, p.scales, p.zeros, gs, acc, p.norm_weight, squares)
        fin = ops.int4_accumulated_norm(h, p, gs, torch.bfloat16, swiglu=True)
        gemv = frag_gemv(h.to(torch.bfloat16), p.fragments, p.scales, p.zeros, gs, norm_weight=p.norm_weight,
                         eps=p.eps, swiglu=True)
        rows.append(dict(product="gate_up vs float", rows=M, error=rel(acc, raw), second_call=rel(fin, act),
                         gemv=rel(gemv, act), config=str(accumulate.tile_config(N, 4, M))))
    # the verify step itself (6 tokens) on the GPU, each way, against the same model's layers as written on the CPU
    from tests.test_decode_accumulate import verify_step_logits
    cpu = verify_step_logits(int4_model(True, "cpu", torch.bfloat16, hidden_size=256, intermediate_size=512),
                             False, False).float()
    for label, rows_switch, accumulating in (("rows accumulating", True, True), ("rows plain", False, True),
                                             ("rows plain, no accumulate", False, False)):
        gpu = verify_step_logits(model, rows_switch, accumulating, device="cuda", slots=64).float().cpu()
        per_token = ((gpu - cpu).abs().amax(-1) / cpu.abs().amax(-1)).squeeze(0).tolist()
        rows.append(dict(product=f"verify: {label}", rows=6, error=max(per_token), second_call=float("nan"),
                         per_token=per_token))
    print("product | rows | rel error | second call (vs float: the finished act) | gemv vs float")
    for r in rows:
        print(f"{r['product']} | {r['rows']} | {r['error']:.2e} | {r['second_call']:.2e} | {r.get('gemv', 0):.2e} "
              f"{r.get('config', '')} {['%.3g' % e for e in r.get('per_token', [])]}")
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
