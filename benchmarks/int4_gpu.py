"""int4 on the GPU: batch-1 decode of bf16 vs int4 g128 in one run, and the time to GPTQ-quantize.

Random bf16 weights in the Llama-3.2 architectures (no download). For each architecture:
  1. bf16 decode (torch.compile + CUDA graph, the generator's default on CUDA);
  2. the same weights RTN-quantized to int4 g128 (QuantLinear layers), decoded with the GPTQ-layout
     Triton kernels ("int4-gptq-layout", kernels/triton_int4.py), then re-laid for the row-layout kernels
     ("int4", kernels/triton_int4_rows.py, what the generator uses on CUDA), then with lm_head RTN-quantized
     to int4 g128 too ("int4+head"); before each row-layout variant, its prefill logits vs the
     dequantize-then-matmul reference on the same int4 weights. ("int4-inductor", on request: the
     dequantization written as plain PyTorch for Inductor to fuse, kernels.reference.int4_matmul_grouped);
  3. the roofline of each: bytes that one decode token reads (weights as stored + KV) / copy bandwidth;
  4. (--gptq-arch) GPTQ 4-bit g128 of a fresh copy, timed end to end (calibration forward passes,
     Hessians, Cholesky, quantization, layer by layer). A random model has no tokenizer, so its
     calibration set is random token ids of the paper's shape (128 x 2048); the work per layer does
     not depend on which tokens they are.
Prints a table and writes JSON.

    python benchmarks/int4_gpu.py --out benchmarks/results/int4_h100.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from datetime import date

import torch

from results_out import save_results  # benchmarks/
from llmpress.bench.roofline import device_name, measure_copy_bandwidth
from llmpress.bench.throughput import benchmark_decode, prompt_token_ids
from llmpress.config import KNOWN_ARCHITECTURES
from llmpress.kernels import ops
from llmpress.kernels.reference import int4_matmul_grouped
from llmpress.loading.loader import random_model
from llmpress.quant.calibration import quantize_model
from llmpress.quant.linear import QuantLinear, replace_linears, use_fragment_layouts, use_row_layouts
from llmpress.quant.rtn import quantize_rtn
import llmpress.quant.linear as linear_module
import llmpress.kernels.pdl as pdl_module
import llmpress.kernels.triton_attention as attention_module
import llmpress.kernels.triton_int4_accumulate as accumulate_module
import llmpress.kernels.triton_int4_frag as frag_module
import llmpress.kernels.triton_int4_rows_split as split_module
import llmpress.generation.cuda_graph as cuda_graph_module
import llmpress.generation.generator as generator_module
from llmpress.model import StaticKVCache
from llmpress.model.fusion import fuse_projections
from llmpress.quant.scheme import QuantScheme


def decode_bytes(model, context_len: int) -> int:
    """Bytes one batch-1 decode token reads: every stored weight once (the embedding table only when it
    doubles as lm_head), plus K and V at `context_len` positions. Counted per storage, because fused
    q|k|v and gate|up buffers share their storage with the per-projection parameters (model.fusion)."""
    config = model.config
    head_is_embedding = getattr(model.lm_head, "weight", None) is model.model.embed_tokens.weight
    skip = set() if head_is_embedding else {model.model.embed_tokens.weight.untyped_storage().data_ptr()}
    skip |= {b.untyped_storage().data_ptr() for b in model.model.rotary_emb.buffers()}
    storages = {}
    held_apart = [t for m in model.modules() if getattr(m, "fragments_only", False)  # quant.linear: not buffers
                  for t in (m.fragments, m.fragment_scales, m.fragment_zeros)]
    for t in list(model.parameters()) + list(model.buffers()) + held_apart:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * context_len * 2
    return sum(storages.values()) + kv


def prefill_rel_error(model, prompt) -> float:
    with torch.inference_mode():
        with ops.use_backend("triton"):
            fast = model(prompt).float()
        with ops.use_backend("torch"):
            ref = model(prompt).float()
    return ((fast - ref).norm() / ref.norm()).item()


def decode_step_rel_error(model, prompt) -> float:
    """The logits of one decode step after the prompt (the batch-1 path: split GEMVs with the layer's steps
    folded in, RoPE inside attention, as this variant sets them) vs the reference ops (eager, no compile)."""
    T = prompt.shape[1]
    outs = []
    with torch.inference_mode():
        for backend in ("auto", "torch"):
            cache = StaticKVCache(model.config, 1, T + 1, model.dtype, prompt.device)
            with ops.use_backend(backend):
                model(prompt, torch.arange(T, device=prompt.device), cache)
                outs.append(model(prompt[:, -1:], torch.tensor([T], device=prompt.device), cache).float())
    return ((outs[0] - outs[1]).norm() / outs[1].norm()).item()


# label -> the batch-1 decode settings it changes from the defaults: "rope" (RoPE + cache write inside attention,
# ops.fuse_rope_into_attention), "steps" (the layer steps int4 GEMVs take in, ops.int4_fused_steps), "spread"
# (the prologue made on a spread tile: triton_int4_rows_split.spread_prologue), "pdl" (programmatic dependent
# launch, kernels/pdl.py), "combine" (who combines decode attention's splits, triton_attention.combine)
SETTINGS = {"rope": (ops, "fuse_rope_into_attention"), "steps": (ops, "int4_fused_steps"),
            "spread": (split_module, "spread_prologue"), "pdl": (pdl_module, "mode"),
            "combine": (attention_module, "combine"), "tc": (ops, "int4_tensor_core_gemv"),
            "tc_norm": (ops, "int4_tensor_core_norm"), "frag_only": (ops, "int4_fragments_only"),
            "tc_swiglu": (ops, "int4_tensor_core_swiglu"), "chain": (ops, "int4_layer_chain"),
            "accumulate": (ops, "int4_accumulate_decode"), "acc_attention": (ops, "int4_accumulate_into_attention"),
            "acc_configs": (accumulate_module, "CONFIGS"), "combine_o": (ops, "int4_combine_in_o"),
            "acc_head": (ops, "int4_accumulate_head"), "xf32_first": (frag_module, "x_f32_loads_first"),
            "norm_waits": (frag_module, "norm_waits_for_loads"), "loads_first": (attention_module, "loads_first"),
            "finish_first": (accumulate_module, "FINISH_LOADS_FIRST"), "swiglu_down": (ops, "int4_swiglu_in_down"),
            "device_greedy": (generator_module, "greedy_steps_on_device"), "triton_argmax": (ops, "triton_greedy_tokens"),
            "greedy_graph": (generator_module, "greedy_steps_per_graph"),
            "advance_rows": (ops, "GREEDY_ADVANCE_MAX_ROWS"), "attention_warps": (attention_module, "decode_warps"),
            "register_caps": (accumulate_module, "REGISTER_CAPS"),
            "compile_options": (cuda_graph_module, "STEP_COMPILE_OPTIONS")}
DEFAULTS = {name: getattr(module, attr) for name, (module, attr) in SETTINGS.items()}
NORM_RES = frozenset({"residual", "norm"})
STEP_VARIANTS = {"int4-apart": dict(rope="never", steps=frozenset(), pdl="off", combine="kernel"),
                 "int4-rope": dict(steps=frozenset(), pdl="off", combine="kernel"),
                 "int4-rope+res": dict(steps=frozenset({"residual"}), pdl="off", combine="kernel"),
                 "int4-rope+res+norm": dict(steps=NORM_RES, pdl="off", combine="kernel"),
                 "int4-rope+all": dict(steps=ops.INT4_LAYER_STEPS, pdl="off", combine="kernel"),
                 "int4-combine": dict(steps=NORM_RES, pdl="off"),
                 "int4-pdl-late": dict(steps=NORM_RES, pdl="late"),
                 "int4-spread": dict(steps=NORM_RES, spread=True),
                 "int4-spread+all": dict(steps=ops.INT4_LAYER_STEPS, spread=True),
                 "int4-spread+all+head": dict(steps=ops.INT4_LAYER_STEPS, spread=True),
                 # the tensor-core GEMV with the row layout kept beside its fragments, so that later variants run
                 "int4-tc": dict(tc=True, frag_only=False), "int4-tc+head": dict(tc=True, frag_only=False),
                 "int4-tc-norm": dict(tc=True, tc_norm=True, frag_only=False),
                 "int4-tc-norm+head": dict(tc=True, tc_norm=True, frag_only=False),
                 # the fragments as the only copy: they replace the row layout in place, so these come last
                 # (these without PDL, as they ran before it became the default)
                 "int4-tc-only": dict(tc=True, frag_only=True, tc_swiglu=False, pdl="off", accumulate=False),
                 "int4-tc-only+head": dict(tc=True, frag_only=True, tc_swiglu=False, pdl="off", accumulate=False),
                 # and silu(gate) * up in the gate|up GEMV's last step
                 "int4-tc-only-swiglu": dict(tc=True, frag_only=True, tc_swiglu=True, pdl="off", accumulate=False),
                 "int4-tc-only-swiglu+head": dict(tc=True, frag_only=True, tc_swiglu=True, pdl="off", accumulate=False),
                 # and programmatic dependent launch (kernels/pdl.py) of the GEMVs and attention: early / late trigger
                 "int4-tc-only-pdl+head": dict(tc=True, frag_only=True, tc_swiglu=True, pdl="early", accumulate=False),
                 "int4-tc-only-pdl-late+head": dict(tc=True, frag_only=True, tc_swiglu=True, pdl="late", accumulate=False),
                 # and each layer's o, gate|up, down and the next q|k|v (or the head) in one persistent kernel
                 # (kernels/triton_int4_chain.py, model/decode_chain.py)
                 "int4-tc-only-chain": dict(tc=True, frag_only=True, tc_swiglu=True, pdl="early", chain=True, accumulate=False),
                 "int4-tc-only-chain+head": dict(tc=True, frag_only=True, tc_swiglu=True, pdl="early", chain=True, accumulate=False),
                 # or an fp32 residual stream that every product adds its split-K sums into by atomics
                 # (kernels/triton_int4_accumulate.py, model/decode_accumulate.py; the default since session 10:
                 # the variants above run without it, as they ran before)
                 "int4-tc-only-acc": dict(tc=True, frag_only=True, tc_swiglu=True, pdl="early", accumulate=True),
                 "int4-tc-only-acc+head": dict(tc=True, frag_only=True, tc_swiglu=True, pdl="early", accumulate=True),
                 # the same on the tiles of --accumulate-configs (filled in by main; the file measured in
                 # session 10 is what triton_int4_accumulate.CONFIGS now holds, so -acc+head runs them too)
                 "int4-tc-only-acc-tuned+head": dict(tc=True, frag_only=True, tc_swiglu=True, pdl="early",
                                                     accumulate=True),
                 # the same with q|k|v finished by a kernel of its own before attention (as first measured)
                 "int4-tc-only-acc-apart+head": dict(tc=True, frag_only=True, tc_swiglu=True, pdl="early",
                                                     accumulate=True, acc_attention=False),
                 "bf16-before": dict(pdl="off", combine="kernel"),
                 # bf16 with the host picking each token by torch.argmax, as before session 17
                 "bf16-host": dict(device_greedy=False, triton_argmax=False)}
# session 11's defaults, off in every variant above (they ran before them): fp32 x's loads all before the first mma
# (triton_int4_frag.x_f32_loads_first), attention's splits combined inside the o product (ops.int4_combine_in_o),
# the int4 head accumulated with its norm folded (ops.int4_accumulate_head). (results/int4_h200_s11*.json also hold
# two attention variants since removed as slower, triton_attention.py says which: "-preload" and the "s11" of
# int4_h200_s11_early_kv; "-nopre" there is the s11 here.)
# Then (not timed yet) the sum(h^2) mma made to wait for every load (triton_int4_frag.norm_waits_for_loads; the
# 1B's q|k|v tile is one it changes): on in -s11b, -s11c, -s11d, off in -s11 (as timed in session 11). Off by
# default since session 12: the GPU tests failed with it on (cause not isolated, results/pytest_gpu_s12.log).
# Session 16's silu(gate) * up in the down product (ops.int4_swiglu_in_down) is off in every variant but -sd.
# Session 17's greedy step on the device (generation/greedy_step.py) and Triton argmax (kernels/triton_argmax.py) are
# off in every variant but -dg and -argmax.
# (and session 18's attention loads first, triton_attention.loads_first: on only in the -lf variants below)
BEFORE_S17 = dict(device_greedy=False, triton_argmax=False, greedy_graph=1, advance_rows=0, loads_first=False)
SESSION_11 = dict(xf32_first=False, combine_o=False, acc_head=False, norm_waits=False, swiglu_down=False, **BEFORE_S17)
STEP_VARIANTS = {label: {**SESSION_11, **settings} for label, settings in STEP_VARIANTS.items()}
# Today's bf16 decode with one change. (Until session 17's last commit bf16-g4 and bf16-g1 sat above and took
# SESSION_11's settings too, so in results/int4_h200_s17{b,d,e}.* they ran the host loop of bf16-host, not the
# greedy step on the device.)
STEP_VARIANTS.update({"bf16-g4": dict(greedy_graph=4), "bf16-g1": dict(greedy_graph=1),
                      # without Inductor's coordinate-descent tuning (is it bf16's spread between compilations?)
                      "bf16-nocd": dict(compile_options={**cuda_graph_module.STEP_COMPILE_OPTIONS,
                                                         "coordinate_descent_tuning": False})})
ACCUMULATING = dict(tc=True, frag_only=True, tc_swiglu=True, pdl="early", accumulate=True, swiglu_down=False,
                    **BEFORE_S17)
STEP_VARIANTS.update({"int4-tc-only-acc-xf32+head": {**ACCUMULATING, **SESSION_11, "xf32_first": True},
                      "int4-tc-only-acc-combine-o+head": dict(ACCUMULATING, acc_head=False),
                      "int4-tc-only-acc-s11+head": dict(ACCUMULATING, norm_waits=False),  # all three
                      "int4-tc-only-acc-s11b+head": dict(ACCUMULATING, norm_waits=True),
                      # the same on the tiles of --accumulate-configs too (the 1B's, say), beside CONFIGS
                      "int4-tc-only-acc-s11b-tuned+head": dict(ACCUMULATING, norm_waits=True),
                      # the default decode (norm_waits off since session 12) on --accumulate-configs' tiles too
                      "int4-tc-only-acc-s11-tuned+head": dict(ACCUMULATING, norm_waits=False),
                      # and attention's small loads before its arithmetic (triton_attention.loads_first; not timed)
                      "int4-tc-only-acc-s11c+head": dict(ACCUMULATING, norm_waits=True, loads_first=True),
                      # and the gate|up finishing kernel's loads together (FINISH_LOADS_FIRST; not timed)
                      "int4-tc-only-acc-s11d+head": dict(ACCUMULATING, norm_waits=True, loads_first=True,
                                                         finish_first=True),
                      # without PDL: each kernel's profiled time is then its own (--profile)
                      "int4-tc-only-acc-s11-nopdl+head": dict(ACCUMULATING, pdl="off", norm_waits=False),
                      "int4-tc-only-acc-s11": dict(ACCUMULATING),
                      # the default decode with silu(gate) * up made by the down product (ops.int4_swiglu_in_down):
                      # no finishing kernel between gate|up and down
                      "int4-tc-only-acc-sd+head": dict(ACCUMULATING, norm_waits=False, swiglu_down=True),
                      "int4-tc-only-acc-sd-tuned+head": dict(ACCUMULATING, norm_waits=False, swiglu_down=True),
                      # and the greedy token picked by the Triton argmax, the host still queueing it (-argmax), or
                      # inside the step with its next inputs, one graph replay a token (-dg: the default)
                      "int4-tc-only-acc-argmax+head": dict(ACCUMULATING, norm_waits=False, swiglu_down=True,
                                                           triton_argmax=True),
                      "int4-tc-only-acc-dg+head": dict(ACCUMULATING, norm_waits=False, swiglu_down=True,
                                                       device_greedy=True, triton_argmax=True),
                      # and 4 of those steps a CUDA graph (generator.greedy_steps_per_graph)
                      "int4-tc-only-acc-dg4+head": dict(ACCUMULATING, norm_waits=False, swiglu_down=True,
                                                        device_greedy=True, triton_argmax=True, greedy_graph=4),
                      # and the step's ending (token, produced, position) written by the argmax's second kernel
                      # (ops.greedy_advance), 1 or 4 steps a graph (-dgf: the default decode since session 17)
                      "int4-tc-only-acc-dgf+head": dict(ACCUMULATING, norm_waits=False, swiglu_down=True,
                                                        device_greedy=True, triton_argmax=True, advance_rows=8),
                      "int4-tc-only-acc-dgf4+head": dict(ACCUMULATING, norm_waits=False, swiglu_down=True,
                                                         device_greedy=True, triton_argmax=True, advance_rows=8,
                                                         greedy_graph=4)})
# Session 18: session 17's decode with attention's small loads first (-lf: triton_attention.loads_first, written in
# session 11, the default since session 18), or its one-token programs on 2 or 8 warps (triton_attention.decode_warps).
# results/int4_h200_s18c.* also hold -opf8/16/32 (and -lf-opf16): the o product asking the L2 for the first 8/16 MB
# or all of the layer's gate|up weights before its PDL wait (commit e4cc20d, reverted: 1086.8, 1075.0 / 1072.0, 1053.2
# tok/s against 1094.3 / 1091.4; attention took 6.8-7.5 us instead of 5.5 and gate|up gained 0.3).
DGF = dict(ACCUMULATING, norm_waits=False, swiglu_down=True, device_greedy=True, triton_argmax=True, advance_rows=8,
           loads_first=False)
HEAD = (128256, 24)  # the 3B's head (N, G), whose tile head_tiles_gpu.py times: -h218, -h424 run it on those tiles
STEP_VARIANTS.update({"int4-tc-only-acc-dgf-lf+head": dict(DGF, loads_first=True),
                      **{f"int4-tc-only-acc-dgf-lf-h{''.join(map(str, tile))}+head":
                         dict(DGF, loads_first=True, acc_configs={**accumulate_module.CONFIGS, HEAD: tile},
                              register_caps={HEAD: None}) for tile in ((2, 1, 8), (4, 2, 4))},
                      "int4-tc-only-acc-dgf-aw2+head": dict(DGF, attention_warps=2),
                      "int4-tc-only-acc-dgf-aw8+head": dict(DGF, attention_warps=8),
                      "int4-tc-only-acc-dgf-lf-aw2+head": dict(DGF, loads_first=True, attention_warps=2)})


def best_bf16_rate(entry: dict, variants: list[str]) -> float | None:
    """The ratios' denominator: the fastest of the run's bf16 decodes ("bf16", "bf16#2", and every bf16 variant:
    "bf16-g1", "bf16-host", ...), so that neither a slow first run nor a variant's setting can flatter int4."""
    rates = [entry[v]["decode_tokens_per_s"] for v in variants
             if v.startswith("bf16") and "decode_tokens_per_s" in entry.get(v, {})]
    return max(rates) if rates else None


def product_label(layers: int):
    """Names each call of the accumulating product kernel in a decode step's timeline by its product: a layer runs it
    for q|k|v, o and gate|up in that order (down has a kernel of its own), then the head once."""
    products = ("q|k|v", "o", "gate|up")

    def label(name: str, i: int) -> str:
        if name != "_frag_accumulate":
            return name
        return f"{name} [{products[i % 3] if i < 3 * layers else 'lm_head'}]"
    return label


def base_label(label: str) -> str:
    """A variant's settings name: "int4#2" is int4 again (run twice in one run to see the spread between runs)."""
    return label.split("#")[0]


def apply_settings(label: str) -> None:
    for name, value in {**DEFAULTS, **STEP_VARIANTS.get(base_label(label), {})}.items():
        module, attr = SETTINGS[name]
        setattr(module, attr, value)


_triton_int4_matmul = ops.int4_matmul


def inductor_int4_matmul(x, qweight, scales, qzeros, g_idx, group_size, bits):
    """ops.int4_matmul with the grouped case left to torch.compile (installed by the int4-inductor variant)."""
    if g_idx is None and bits == 4 and x.shape[-1] % group_size == 0:
        return int4_matmul_grouped(x, qweight, scales, qzeros, group_size, bits)
    return _triton_int4_matmul(x, qweight, scales, qzeros, g_idx, group_size, bits)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="llama-3.2-3b,llama-3.2-1b")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gptq-arch", default="llama-3.2-3b", help="architecture to GPTQ-quantize and time ('' to skip)")
    parser.add_argument("--gptq-nsamples", type=int, default=128)
    parser.add_argument("--gptq-seqlen", type=int, default=2048)
    parser.add_argument("--variants", default="bf16,int4-gptq-layout,int4,int4+head",
                        help="bf16; int4-gptq-layout (the GPTQ-layout kernels); int4 (row-layout kernels); int4+head "
                             "(also lm_head in int4 g128); int4-partials (int4, the batch-1 GEMV's partial sums added by "
                             "PyTorch for Inductor to fuse); int4-inductor (dequantization left to torch.compile); "
                             "int4 with some of the decoder layer's steps in kernels of their own (RoPE + cache write, "
                             "RMSNorm, silu * up, residual add): int4-apart (all of them), int4-rope (only RoPE fused "
                             "into attention), int4-rope+res, int4-rope+res+norm, int4-rope+all (those steps fused; "
                             "all five without PDL, attention's splits combined by a kernel of their own); "
                             "int4-combine (norm + residual, splits combined in the attention kernel, no PDL; int4 adds "
                             "PDL); bf16-before (bf16 without PDL, the splits combined apart); int4-spread, int4-spread+all (norm + residual, or all three, with the prologue "
                             "made on a spread tile; int4-spread+all+head with lm_head in int4 too); int4-tc, int4-tc+head (every int4 "
                             "layer on the tensor-core GEMV, kernels/triton_int4_frag.py, RMSNorm folded in; -norm: "
                             "that fold named explicitly); int4-tc-only, int4-tc-only+head (the same with the fragments "
                             "as the only copy of the weights; list them last); bf16#2, int4#2, ...: a variant again")
    parser.add_argument("--profile", default="", help="comma-separated variants whose decode step's kernels are printed")
    parser.add_argument("--timeline", default="", help="comma-separated variants whose decode steps' busy time and idle "
                        "gaps are printed (benchmarks/decode_gpu.py timeline_decode)")
    parser.add_argument("--accumulate-configs", default=None, metavar="JSON",
                        help="the tiles of variants int4-tc-only-acc-tuned+head, int4-tc-only-acc-s11b-tuned+head and "
                             "int4-tc-only-acc-s11-tuned+head (the last two beside triton_int4_accumulate.CONFIGS): "
                             "latency_floor_gpu.py --sweep-configs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.accumulate_configs:
        from latency_floor_gpu import read_sweep_configs  # benchmarks/
        tuned = read_sweep_configs(args.accumulate_configs)
        STEP_VARIANTS["int4-tc-only-acc-tuned+head"]["acc_configs"] = tuned
        for label in ("int4-tc-only-acc-s11b-tuned+head", "int4-tc-only-acc-s11-tuned+head",
                      "int4-tc-only-acc-sd-tuned+head"):
            STEP_VARIANTS[label]["acc_configs"] = {**accumulate_module.CONFIGS, **tuned}
        print(f"accumulate tiles from {args.accumulate_configs}: {tuned}", flush=True)
    bandwidth = measure_copy_bandwidth("cuda")
    results = {"script": "benchmarks/int4_gpu.py", "command": " ".join(sys.argv), "date": date.today().isoformat(), "gpu": device_name("cuda"),
               "torch": torch.__version__, "copy_bandwidth_bytes_per_s": bandwidth, "new_tokens": args.new_tokens,
               "prompt_len": args.prompt_len, "batch_size": 1, "scheme": "int4 g128 asym (RTN)", "architectures": {}}
    print(f"{results['gpu']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    scheme = QuantScheme(bits=4, group_size=128)
    mean_context = args.prompt_len + args.new_tokens // 2
    variants = [v for v in args.variants.split(",") if v]
    first_int4 = next((i for i, v in enumerate(variants) if not v.startswith("bf16")), len(variants))
    if any(v.startswith("bf16") for v in variants[first_int4:]):
        parser.error("list the bf16 variants first: the int4 variants quantize the model in place")
    first_only = next((i for i, v in enumerate(variants) if base_label(v).startswith("int4-tc-only")), len(variants))
    if any(not base_label(v).startswith("int4-tc-only") for v in variants[first_only:]):
        parser.error("list the int4-tc-only variants last: they drop the row layout the others run on")
    for arch in [a for a in args.archs.split(",") if a]:
        config = KNOWN_ARCHITECTURES[arch]
        entry = results["architectures"][arch] = {}
        model = random_model(config, torch.device("cuda"), torch.bfloat16, seed=0)
        prompt = prompt_token_ids(None, args.prompt_len, config.vocab_size).cuda()
        for label in variants:
            if not label.startswith("bf16") and not any(isinstance(m, QuantLinear) for m in model.modules()):
                replace_linears(model, quantize_model(model, "rtn", scheme, progress=False))
                gc.collect()
                torch.cuda.empty_cache()
            if base_label(label).endswith("+head") and not isinstance(model.lm_head, QuantLinear):
                replace_linears(model, {"lm_head": quantize_rtn(model.lm_head.weight.detach(), scheme)})
                gc.collect()
                torch.cuda.empty_cache()
            rows = base_label(label) in ("int4", "int4+head", "int4-partials") or base_label(label) in STEP_VARIANTS
            ops.int4_batch1_reduce = "partials" if base_label(label) == "int4-partials" else "in_kernel"
            try:  # one variant failing (a kernel that does not compile here, say) leaves the others' numbers
                apply_settings(label)
                if rows:
                    use_row_layouts(model)
                    fuse_projections(model)  # int4 q|k|v and gate|up as one layer each, as the generator does
                    if ops.int4_tensor_core_gemv:
                        print(f"{arch} {label}: {use_fragment_layouts(model)} layers hold tensor-core fragments"
                              f"{' only' if ops.int4_fragments_only else ''}", flush=True)
                    key = f"{label}_prefill_logits_rel_error_triton_vs_reference"
                    entry[key] = prefill_rel_error(model, prompt)
                    print(f"{arch} {label} prefill logits, Triton vs reference: relative error {entry[key]:.2e}", flush=True)
                    key = f"{label}_decode_step_logits_rel_error_triton_vs_reference"
                    entry[key] = decode_step_rel_error(model, prompt)
                    print(f"{arch} {label} decode-step logits (batch-1 kernels, fused steps), Triton vs reference: "
                          f"relative error {entry[key]:.2e}", flush=True)
                # The generator re-lays int4 weights for the row kernels on CUDA; the GPTQ-layout variants keep theirs.
                linear_module.use_row_layouts = use_row_layouts if rows else (lambda model: 0)
                ops.int4_matmul = inductor_int4_matmul if base_label(label) == "int4-inductor" else _triton_int4_matmul
                torch._dynamo.reset()
                nbytes = decode_bytes(model, mean_context)  # before the generator allocates anything
                gc.collect()
                torch.cuda.empty_cache()
                allocated = torch.cuda.memory_allocated()  # the model's weights, every copy of them
                start = time.perf_counter()
                r = benchmark_decode(model, prompt, 1, args.new_tokens, mode="compile", repeats=3)
                roofline = bandwidth / nbytes
                entry[label] = dict(r.to_dict(), bytes_per_token=nbytes, roofline_tokens_per_s=roofline,
                                    memory_allocated_before_decode_gb=allocated / 1e9,
                                    fraction_of_roofline=r.decode_tokens_per_s / roofline,
                                    setup_and_runs_s=time.perf_counter() - start)
                print(f"{arch} {label}: decode {r.decode_tokens_per_s:7.1f} tok/s, {nbytes / 1e9:.2f} GB/token, roofline "
                      f"{roofline:.0f} tok/s ({r.decode_tokens_per_s / roofline:.1%}), {allocated / 1e9:.2f} GB allocated; "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
                if label in args.profile.split(","):
                    from decode_gpu import profile_decode  # benchmarks/
                    print(f"{arch} {label}: kernels of one decode step", flush=True)
                    profile_decode(model, prompt, "compile", fuse=True)
                if label in args.timeline.split(","):
                    from decode_gpu import timeline_decode  # benchmarks/
                    print(f"{arch} {label}: timeline of greedy decode steps", flush=True)
                    end = "_block_argmax" if ops.triton_greedy_tokens else "ArgMax"  # torch's reduce_kernel<ArgMaxOps>
                    entry[label]["timeline"] = timeline_decode(model, prompt, "compile", fuse=True, step_end=end,
                                                               label=product_label(config.num_hidden_layers))
            except Exception as error:  # noqa: BLE001 - recorded and reported, not swallowed
                entry[label] = {"error": f"{type(error).__name__}: {error}"}
                print(f"{arch} {label}: FAILED {entry[label]['error']}", flush=True)
                torch._dynamo.reset()
            save_results(results, args.out, "int4_gpu.json")
        ops.int4_matmul = _triton_int4_matmul
        linear_module.use_row_layouts = use_row_layouts
        bf16_rate = best_bf16_rate(entry, variants)
        if bf16_rate:
            entry["bf16_reference_tokens_per_s"] = bf16_rate
            for label in [v for v in variants if "decode_tokens_per_s" in entry[v]]:
                entry[f"{label}_over_bf16"] = entry[label]["decode_tokens_per_s"] / bf16_rate
        del model
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    if args.gptq_arch:
        config = KNOWN_ARCHITECTURES[args.gptq_arch]
        model = random_model(config, torch.device("cuda"), torch.bfloat16, seed=0)
        tokens = torch.randint(0, config.vocab_size, (args.gptq_nsamples, args.gptq_seqlen),
                               generator=torch.Generator().manual_seed(0))
        torch.cuda.synchronize()
        start = time.perf_counter()
        quantize_model(model, "gptq", scheme, tokens)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        results["gptq"] = dict(arch=args.gptq_arch, nsamples=args.gptq_nsamples, seqlen=args.gptq_seqlen,
                               seconds=seconds, peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9)
        print(f"GPTQ {args.gptq_arch} 4-bit g128, {args.gptq_nsamples} x {args.gptq_seqlen} calibration tokens: "
              f"{seconds:.1f} s", flush=True)
        save_results(results, args.out, "int4_gpu.json")
    print(f"\nBatch-1 decode, {results['gpu']}, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(f"{'model':14s} {'variant':14s} {'tok/s':>8s} {'roofline':>9s} {'% roof':>7s} {'x bf16':>7s}")
    for arch, e in results["architectures"].items():
        for label in [v for v in variants if "decode_tokens_per_s" in e.get(v, {})]:
            v = e[label]
            print(f"{arch:14s} {label:14s} {v['decode_tokens_per_s']:8.1f} {v['roofline_tokens_per_s']:9.0f} "
                  f"{v['fraction_of_roofline']:7.1%} {v['decode_tokens_per_s'] / (best_bf16_rate(e, variants) or float('nan')):6.2f}x")
    print("x bf16: over the fastest bf16 decode of the same run (any bf16 variant; the same settings vary 340-441 tok/s "
          "between runs on the lent H200)")
    save_results(results, args.out, "int4_gpu.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
