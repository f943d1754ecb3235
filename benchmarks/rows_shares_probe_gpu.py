"""Session 12 probe (ran as written; output in results/rows_shares_probe_h200.log): the sum(h^2) shares that the
accumulating product writes at 1..8 rows, into a tensor of its own and into the workspace frag_accumulated_norm
uses, against PyTorch. Prints only the wrong cases, then "done"."""
import torch
from llmpress.kernels import ops
import llmpress.kernels.triton_int4_accumulate as A
from llmpress.model.decode_chain import chain_plan
from tests.test_decode_chain import int4_model
ops.int4_tensor_core_norm = ops.int4_tensor_core_swiglu = True
model = int4_model(True, "cuda", torch.bfloat16, hidden_size=256, intermediate_size=512)
plan = chain_plan(model); gs = plan[0]["group_size"]
torch.manual_seed(1)
for trial in range(3):
  for M in (1, 2, 5, 6, 8):
    for name in ("qkv", "gate_up"):
        p = plan[0][name]; h = torch.randn(M, 256, device="cuda") * 2
        exp = h.to(torch.bfloat16).float().pow(2).sum(1)
        acc = torch.zeros(M, p.scales.shape[1], device="cuda"); sq = torch.full((64,), float("nan"), device="cuda")
        split = A.frag_accumulate(h, p.fragments, p.scales, p.zeros, gs, acc, p.norm_weight, sq)
        got = sq[:split * M].view(split, M).sum(0)
        ok = torch.allclose(got, exp, rtol=1e-4)
        A.frag_accumulated_norm(h, p.fragments, p.scales, p.zeros, gs, p.norm_weight, p.eps, swiglu=name == "gate_up")
        ws = A._zeroed._buffers[(h.device, "gate_up" if name == "gate_up" else "rows")][1]
        got2 = ws[:split * M].view(split, M).sum(0)
        ok2 = torch.allclose(got2, exp, rtol=1e-4)
        if not (ok and ok2): print(trial, M, name, split, "own", ok, "workspace", ok2, (got2 / exp).tolist())
print("done")
