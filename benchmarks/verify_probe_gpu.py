"""Session 13 probe of the accumulating verify step (ops.int4_accumulate_rows) on the GPU, in parts (--parts;
default swiglu,logits,timing):

  1. gate|up's SwiGLU at 2..8 rows through frag_accumulated_norm, the finishing kernel's inputs (the accumulator
     and the sum(h^2) shares) read back just before it runs, each against float, then the finishing kernel rerun
     on those copies: which piece is wrong where session 12's compose probe found rows off (test model, gs 64);
  2. a 3B-shaped int4 model (--layers of Llama-3.2-3B, random weights, RTN g128): one 6-token verify step's
     logits, accumulating against the layers as written;
  3. the full 3B int4 (CUDA graphs, --mode graph or compile as in speculative_gpu.py): the 1-token step, the plain
     6-token verify step and the accumulating one (with SDPA, or the Triton decode kernel reading q|k|v's
     accumulator: ops.int4_accumulate_rows_into_attention), timed (median of replays), and each one's kernels by GPU
     time (torch.profiler over graph replays);
  4. (--parts speculative) the alpha = 1 oracle's speculative decode with each verify; (--parts determinism) replays
     of each step on one input, how far apart their logits land.

    PYTHONPATH=src:.:benchmarks python benchmarks/verify_probe_gpu.py --out benchmarks/results/verify_probe_h200.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics

import torch

from llmpress.kernels import ops

DEFAULTS = (ops.int4_accumulate_rows, ops.triton_verify_attention, ops.int4_accumulate_rows_into_attention)


def switches(rows: bool, triton_verify: bool, into_attention: bool) -> None:
    """The verify step's switches: the accumulating decode at several rows, every model's verify attention through
    the Triton kernel, and the accumulating verify's attention reading q|k|v's accumulator."""
    ops.int4_accumulate_rows, ops.triton_verify_attention, ops.int4_accumulate_rows_into_attention = (
        rows, triton_verify, into_attention)


def fresh_step(runner, m: int, rows: bool, triton_attention: bool):
    """`runner`'s m-token step built again under these switches (read when the step is traced and captured)."""
    switches(rows, triton_attention, triton_attention)
    torch._dynamo.reset()
    runner._steps.pop(m, None)
    runner._compiled = None
    return runner.step_fn(m)


def rel(got, ref):
    return ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def part_swiglu(trials: int) -> list[dict]:
    import llmpress.kernels.triton_int4_accumulate as A
    from llmpress.model.decode_chain import chain_plan
    from rows_probe_gpu import gate_up_float
    from tests.test_decode_chain import int4_model
    ops.int4_tensor_core_norm = ops.int4_tensor_core_swiglu = True
    model = int4_model(True, "cuda", torch.bfloat16, hidden_size=256, intermediate_size=512)
    plan = chain_plan(model)
    gs, p = plan[0]["group_size"], plan[0]["gate_up"]
    real = A._finish_accumulated
    seen = {}

    class Intercept:  # A._finish_accumulated[grid](...) with its inputs copied first
        def __getitem__(self, grid):
            def launch(acc, squares, y, N, K, eps, split, *rest, **kw):
                torch.cuda.synchronize()
                M = kw["ROWS"]
                seen.update(acc=acc[:M * N].clone().view(M, N), squares=squares[:split * M].clone().view(split, M),
                            launch=(grid, N, K, eps, split, rest, kw))
                real[grid](acc, squares, y, N, K, eps, split, *rest, **kw)
                torch.cuda.synchronize()
            return launch

    results = []
    torch.manual_seed(2)
    A._finish_accumulated = Intercept()
    try:
        for trial in range(trials):
            for M in (2, 3, 5, 6, 7, 8):
                h = torch.randn(M, 256, device="cuda") * 2
                raw, act = gate_up_float(h, p, gs)
                squares_ref = h.to(torch.bfloat16).float().pow(2).sum(1)
                y = A.frag_accumulated_norm(h, p.fragments, p.scales, p.zeros, gs, p.norm_weight, p.eps, swiglu=True)
                grid, N, K, eps, split, rest, kw = seen["launch"]
                acc, squares = seen["acc"].clone(), seen["squares"].clone()
                y2 = torch.empty_like(y)
                real[grid](acc, squares, y2, N, K, eps, split, acc, 0, **kw)
                torch.cuda.synchronize()
                row = dict(trial=trial, M=M, split=split, y=[round(rel(y[m], act[m]), 4) for m in range(M)],
                           acc=[round(rel(seen["acc"][m], raw[m]), 6) for m in range(M)],
                           squares=[round(v, 6) for v in (seen["squares"].sum(0) / squares_ref - 1).tolist()],
                           squares_by_share=seen["squares"].tolist(),
                           rerun=[round(rel(y2[m], act[m]), 4) for m in range(M)])
                results.append(row)
                if max(row["y"]) > 0.01 or max(row["rerun"]) > 0.01:
                    print("swiglu", {k: v for k, v in row.items() if k != "squares_by_share"}, flush=True)
    finally:
        A._finish_accumulated = real
    print(f"swiglu: {sum(max(r['y']) > 0.01 for r in results)} of {len(results)} cases wrong", flush=True)
    return results


def int4_target(layers: int | None):
    from llmpress.config import KNOWN_ARCHITECTURES
    from llmpress.loading.loader import random_model
    from speculative_gpu import int4_copy
    import dataclasses
    cfg = KNOWN_ARCHITECTURES["llama-3.2-3b"]
    if layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    model = random_model(cfg, torch.device("cuda"), torch.bfloat16, seed=0)
    return int4_copy(model, "target")


def set_flags():
    ops.int4_tensor_core_gemv = True
    ops.int4_tensor_core_swiglu = True
    ops.int4_tensor_core_max_rows = ops.FRAG_MAX_M


def part_verify_logits(layers: int, mode: str) -> dict:
    """One 6-token verify step's logits after a 5-token prefill, each variant against the plain layers (eager):
    eager calls of the step with the accumulating decode, with SDPA or the Triton decode kernel as attention, and
    the same steps as `mode` runs them (a CUDA graph, compiled first in compile mode)."""
    from llmpress.speculative.steps import CachedModel
    set_flags()
    model = int4_target(layers)
    runner = CachedModel(model, 64, mode=mode)
    ids = torch.randint(0, 1000, (1, 11), generator=torch.Generator().manual_seed(1)).cuda()
    out = {}
    variants = [("plain", False, False, False), ("accumulating", True, False, False),
                ("accumulating, Triton attention", True, True, False), ("plain, Triton attention", False, True, False),
                (f"plain, {mode}", False, False, True), (f"accumulating, {mode}", True, False, True),
                (f"accumulating, Triton attention, {mode}", True, True, True)]
    with torch.inference_mode():
        runner.prefill(ids[:, :5])
        positions = torch.arange(5, 11, device="cuda")
        for name, rows, triton_attention, graphed in variants:
            if graphed:
                out[name] = fresh_step(runner, 6, rows, triton_attention)(ids[:, 5:], positions).float()[0].clone()
            else:
                switches(rows, triton_attention, triton_attention)
                out[name] = runner._forward_all(ids[:, 5:], positions).float()[0]
        switches(*DEFAULTS)
    ref = out["plain"]
    res = {name: dict(per_token=[round(rel(v[t], ref[t]), 4) for t in range(6)],
                      argmax_same=(v.argmax(-1) == ref.argmax(-1)).tolist()) for name, v in out.items()}
    for name, r in res.items():
        print(f"verify logits ({layers} layers of the 3B), {name}: {r}", flush=True)
    del runner, model
    torch.cuda.empty_cache()
    return res


def part_speculative(layers: int, mode: str) -> dict:
    """Speculative greedy decoding of --layers of the 3B (int4) with the alpha = 1 oracle (every draft right):
    how much of the plain int4 continuation each verify reproduces, with the int4 1B draft model running beside
    it (sharing the accumulating decode's workspaces) or without it."""
    import dataclasses
    from llmpress.config import KNOWN_ARCHITECTURES
    from llmpress.loading.loader import random_model
    from llmpress.speculative import ModelDrafter, OracleDrafter
    from speculative_gpu import common_prefix, int4_copy, run_speculative, time_plain
    set_flags()
    target = int4_target(layers)
    cfg = KNOWN_ARCHITECTURES["llama-3.2-1b"]
    draft = int4_copy(random_model(dataclasses.replace(cfg, num_hidden_layers=layers) if layers else cfg,
                                   torch.device("cuda"), torch.bfloat16, seed=1), "draft", head=True)
    vocab = cfg.vocab_size
    prompt = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
    new = 48
    reference, _ = time_plain(target, prompt, new + 6, mode, 1)
    res = {}
    for name, rows, with_draft in (("plain verify", False, True), ("accumulating verify", True, True),
                                   ("accumulating verify, no draft model", True, False)):
        switches(rows, True, True)
        torch._dynamo.reset()
        oracle = OracleDrafter(reference, 1.0, vocab, draft=ModelDrafter(draft) if with_draft else None)
        tokens, _, stats = run_speculative(target, oracle, prompt, new, 5, mode)
        res[name] = dict(matching_tokens=common_prefix(tokens, reference), acceptance=stats.acceptance_rate)
        print(f"speculative ({layers or 'all'} layers), {name}: {res[name]}", flush=True)
    switches(*DEFAULTS)
    return res


def part_determinism(mode: str, replays: int = 6) -> dict:
    """The full 3B int4's steps replayed on the same input and cache: how far apart the logits of replays land
    (the accumulating products add by atomics in whatever order they land) and how often their argmax differs."""
    from llmpress.speculative.steps import CachedModel
    set_flags()
    model = int4_target(None)
    runner = CachedModel(model, 256, mode=mode, scratch=16)
    ids = torch.randint(0, 1000, (1, 70), generator=torch.Generator().manual_seed(1)).cuda()
    res = {}
    with torch.inference_mode():
        runner.prefill(ids[:, :64])
        for name, m, rows, triton_attention in (("one token", 1, False, False), ("verify 6, plain", 6, False, True),
                                                ("verify 6, accumulating", 6, True, True)):
            step = fresh_step(runner, m, rows, triton_attention)
            positions = torch.arange(64, 64 + m, device="cuda")
            outs = [step(ids[:, 64:64 + m], positions).float()[0].clone() for _ in range(replays)]
            spread = max((o - outs[0]).abs().max().item() for o in outs) / outs[0].abs().max().item()
            argmax_same = [int((o.argmax(-1) == outs[0].argmax(-1)).sum()) for o in outs[1:]]
            top2 = outs[0].topk(2, dim=-1).values
            res[name] = dict(spread=spread, argmax_same_of_rows=argmax_same, rows=m,
                             top2_gap=(top2[:, 0] - top2[:, 1]).tolist(), largest=outs[0].abs().max().item())
            print(f"determinism, {name}: {res[name]}", flush=True)
    switches(*DEFAULTS)
    return res


def kernel_table(fn, replays: int = 5, top: int = 14) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            fn()
        torch.cuda.synchronize()
    totals, counts = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name[:60]
            totals[name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            counts[name] += 1
    rows = [dict(kernel=n, us_per_step=round(t / replays, 1), launches_per_step=counts[n] / replays)
            for n, t in totals.most_common(top)]
    rows.append(dict(kernel="(all)", us_per_step=round(sum(totals.values()) / replays, 1),
                     launches_per_step=sum(counts.values()) / replays))
    return rows


def time_replays(fn, n: int = 60) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def part_timing(profile_too: bool, mode: str, pdl_rows: int | None = None) -> dict:
    """The steps' times; with pdl_rows, the accumulating verify steps again with the products of up to that many
    rows launched under PDL (triton_int4_frag.PDL_MAX_ROWS, 1 by default)."""
    import llmpress.kernels.triton_int4_frag as frag
    from llmpress.speculative.steps import CachedModel
    set_flags()
    model = int4_target(None)
    runner = CachedModel(model, 512, mode=mode, scratch=16)
    ids = torch.randint(0, 1000, (1, 200), generator=torch.Generator().manual_seed(1)).cuda()
    res = {}
    with torch.inference_mode():
        runner.prefill(ids)
        variants = [("one token", 1, False, False, 1), ("verify 6, plain", 6, False, False, 1),
                    ("verify 6, accumulating", 6, True, False, 1),
                    ("verify 6, accumulating, Triton attention", 6, True, True, 1),
                    ("verify 3, accumulating, Triton attention", 3, True, True, 1)]
        if pdl_rows:
            variants += [(f"verify {m}, accumulating, Triton attention, PDL to {pdl_rows} rows", m, True, True,
                          pdl_rows) for m in (3, 6)]
        for name, m, rows, triton_attention, pdl in variants:
            frag.PDL_MAX_ROWS = pdl
            step = fresh_step(runner, m, rows, triton_attention)
            tokens, positions = ids[:, 100:100 + m], torch.arange(200, 200 + m, device="cuda")
            fn = lambda: step(tokens, positions)  # noqa: E731
            res[name] = dict(ms=time_replays(fn))
            print(f"{name}: {res[name]['ms']:.3f} ms", flush=True)
            if profile_too:
                res[name]["kernels"] = kernel_table(fn)
                for r in res[name]["kernels"]:
                    print(f"   {r['us_per_step']:8.1f} us  {r['launches_per_step']:6.1f}x  {r['kernel']}")
        switches(*DEFAULTS)
        frag.PDL_MAX_ROWS = 1
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="swiglu,logits,timing")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--mode", default="graph", help="the timed steps' mode: graph or compile")
    parser.add_argument("--pdl-rows", type=int, default=None,
                        help="timing: the accumulating verify steps also under PDL up to this many rows; logits: all "
                             "steps with it (triton_int4_frag.PDL_MAX_ROWS)")
    parser.add_argument("--out", default="benchmarks/results/verify_probe_h200.json")
    args = parser.parse_args()
    parts = args.parts.split(",")
    result = {"device": torch.cuda.get_device_name()}
    if "swiglu" in parts:
        result["swiglu"] = part_swiglu(args.trials)
    if "logits" in parts:
        import llmpress.kernels.triton_int4_frag as frag
        frag.PDL_MAX_ROWS = args.pdl_rows or 1
        result["verify_logits"] = part_verify_logits(args.layers, args.mode)
        result["verify_logits_pdl_max_rows"] = frag.PDL_MAX_ROWS
        frag.PDL_MAX_ROWS = 1
    if "determinism" in parts:
        result["determinism"] = part_determinism(args.mode)
    if "speculative" in parts:
        result["speculative"] = part_speculative(args.layers, args.mode)
    if "timing" in parts:
        result["timing"] = part_timing(not args.no_profile, args.mode, args.pdl_rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
