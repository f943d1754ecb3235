"""Session 12 probe (ran as written; output in results/rows_compose_probe_h200.log): gate|up's SwiGLU output at 1..8
rows through frag_accumulated_norm (its workspace), and through frag_accumulate into fresh zeros followed by the
finishing kernel (and the same with a host synchronize between the two: "synced"; its output in
results/rows_compose_probe_h200_sync.log), each against float (rows_probe_gpu.swiglu_float); per row where either is off."""
import torch, triton
from llmpress.kernels import ops
import llmpress.kernels.triton_int4_accumulate as A
from llmpress.model.decode_chain import chain_plan
from tests.test_decode_chain import int4_model
from rows_probe_gpu import swiglu_float, rel
ops.int4_tensor_core_norm = ops.int4_tensor_core_swiglu = True
model = int4_model(True, "cuda", torch.bfloat16, hidden_size=256, intermediate_size=512)
plan = chain_plan(model); gs = plan[0]["group_size"]; p = plan[0]["gate_up"]
torch.manual_seed(2); bad = 0
for trial in range(4):
  for M in (1, 2, 3, 5, 6, 7, 8):
    h = torch.randn(M, 256, device="cuda") * 2; ref = swiglu_float(h, p, gs)
    y = A.frag_accumulated_norm(h, p.fragments, p.scales, p.zeros, gs, p.norm_weight, p.eps, swiglu=True)
    acc = torch.zeros(M, 1024, device="cuda"); sq = torch.zeros(64, device="cuda")
    split = A.frag_accumulate(h, p.fragments, p.scales, p.zeros, gs, acc, p.norm_weight, sq)
    y2 = torch.empty(M, 512, dtype=torch.bfloat16, device="cuda")
    A._finish_accumulated[(1, M)](acc, sq, y2, 1024, 256, p.eps, split, acc, 0, SPLIT_P2=triton.next_power_of_2(split), BLOCK=1024, SWIGLU=True, PDL=0, ROWS=M, num_warps=4)
    acc3 = torch.zeros(M, 1024, device="cuda"); sq3 = torch.zeros(64, device="cuda")
    A.frag_accumulate(h, p.fragments, p.scales, p.zeros, gs, acc3, p.norm_weight, sq3)
    torch.cuda.synchronize()  # the same two kernels with the host waiting between them
    y3 = torch.empty(M, 512, dtype=torch.bfloat16, device="cuda")
    A._finish_accumulated[(1, M)](acc3, sq3, y3, 1024, 256, p.eps, split, acc3, 0, SPLIT_P2=triton.next_power_of_2(split), BLOCK=1024, SWIGLU=True, PDL=0, ROWS=M, num_warps=4)
    e3 = rel(y3, ref)
    e1, e2 = rel(y, ref), rel(y2, ref)
    rowerr = [round(rel(y[m], ref[m]), 3) for m in range(M)]
    if e1 > 0.01 or e2 > 0.01 or e3 > 0.01: bad += 1; print(trial, M, f"workspace {e1:.3f} own {e2:.3f} synced {e3:.3f}", rowerr, "eps", p.eps)
print("bad", bad)
