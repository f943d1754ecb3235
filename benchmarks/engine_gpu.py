"""The serving engine on the GPU: offline throughput vs transformers batched generate, the decode
roofline at full batch, int4 weights, and fp8/int8 KV-cache capacity, in one run.

Random bf16 weights in the Llama-3.2-3B architecture (no download). Steps:
  1. correctness: engine greedy vs the static-cache generator on a few prompts (tokens agreeing, bf16);
  2. transformers `generate` on the same workload in one left-padded batch (eager, dynamic cache);
  3. llmpress engine, bf16 weights and KV: the whole workload, plus the steady-state decode step at the
     largest concurrent batch beside its roofline (weights + KV bytes at the copy bandwidth, FLOPs at the
     matmul peak, both measured in this run);
  4. the same with fp8 and int8 KV caches (capacity at equal memory) and with int4 RTN g128 weights.
Prints a table and writes JSON.

    python benchmarks/engine_gpu.py --out benchmarks/results/engine_h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
import traceback
from datetime import date

import torch

from results_out import save_results  # benchmarks/
from llmpress.bench.engine_throughput import decode_step_roofline, random_workload, run_offline
from llmpress.bench.roofline import device_name, measure_copy_bandwidth
from llmpress.config import KNOWN_ARCHITECTURES
from llmpress.engine import EngineConfig, LLMEngine
from llmpress.engine.paged_cache import bytes_per_block
from llmpress.generation import Generator, SamplingParams
from llmpress.loading.loader import LoadedModel, random_model
from llmpress.loading.resolve import ModelSource


def measure_matmul_flops(n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (start.elapsed_time(end) / 1e3)


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "cuda" or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return total


def correctness(loaded, prompts, new_tokens: int) -> dict:
    """The engine's prefill logits (one step over all prompts, Triton paged attention) vs the plain model
    forward of each prompt alone, and greedy tokens vs the static-cache generator (graph mode)."""
    config = EngineConfig(max_num_seqs=len(prompts), max_num_batched_tokens=8192, gpu_memory_utilization=0.3)
    engine = LLMEngine(loaded, config)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_new_tokens=1))
    with torch.inference_mode():
        ours = engine.runner.execute(engine.scheduler.schedule()).float()
        ref = torch.stack([loaded.model(torch.tensor([p], device="cuda"), last_only=True)[0, -1] for p in prompts]).float()
    rel_error = ((ours - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()
    del engine
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    outputs = {}
    for overlap in (True, False):  # overlapped scheduling must not change a single token
        engine = LLMEngine(loaded, dataclasses.replace(config, async_scheduling=overlap))
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        done = outputs[overlap] = {}
        engine.run_to_completion(lambda o: done.__setitem__(o.request_id, o.output_token_ids) if o.finished else None)
        del engine
    done = outputs[True]
    agree = []
    for i, p in enumerate(prompts):
        gen = Generator(loaded.model, max_seq_len=len(p) + new_tokens, mode="graph")
        ref_tokens = gen.generate(torch.tensor([p]), params).token_ids[0].tolist()
        agree.append(next((j for j, (a, b) in enumerate(zip(done[str(i)], ref_tokens)) if a != b), len(ref_tokens)))
        del gen
    free_cuda()
    return dict(prefill_logits_rel_error_vs_plain_forward=rel_error, new_tokens=new_tokens,
                agreeing_prefix_per_prompt=agree, overlapped_equals_synchronous=outputs[True] == outputs[False])


def run_transformers(model, config, workload) -> dict:
    """One left-padded batch through transformers' generate; every generated token is credited."""
    from decode_gpu import transformers_twin
    hf = transformers_twin(model, config)
    longest = max(map(len, workload.prompts))
    ids = torch.zeros(len(workload.prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(workload.prompts):
        ids[row, longest - len(p):], mask[row, longest - len(p):] = torch.tensor(p), 1
    ids, mask = ids.cuda(), mask.cuda()
    new_tokens = max(workload.output_lens)
    with torch.inference_mode():
        hf.generate(input_ids=ids[:2, -16:], attention_mask=mask[:2, -16:], max_new_tokens=4, do_sample=False)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = (out.shape[1] - longest) * out.shape[0]
    del hf, out
    free_cuda()
    return dict(seconds=seconds, generated_tokens=generated, generated_tokens_per_s=generated / seconds,
                requested_tokens_per_s=workload.output_tokens / seconds, batch=len(workload.prompts),
                padded_prompt_len=longest, new_tokens=new_tokens)


def run_engine(loaded, workload, engine_config: EngineConfig, bandwidth: float, flops: float) -> dict:
    start = time.perf_counter()
    engine = LLMEngine(loaded, engine_config)
    setup_s = time.perf_counter() - start
    result = run_offline(engine, workload, progress=False).to_dict()
    config = loaded.config
    kv_per_token = bytes_per_block(config, 1, engine_config.kv_cache_dtype, loaded.model.dtype)
    roof = decode_step_roofline(config, weight_bytes(loaded.model), result["max_concurrent_seqs"],
                                result["full_batch_mean_context"], kv_per_token, bandwidth, flops)
    result.update(setup_s=setup_s, roofline=roof,
                  fraction_of_roofline=result["full_batch_decode_tokens_per_s"] / roof["tokens_per_s"],
                  max_concurrent_at_max_len=engine.runner.num_blocks // engine.block_manager.blocks_needed(
                      max(map(len, workload.prompts)) + max(workload.output_lens)),
                  kv_bytes_per_token=kv_per_token)
    del engine
    free_cuda()
    return result


def free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama-3.2-3b")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", default="128,1024")
    parser.add_argument("--output-len", default="128,512")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="bf16,fp8-kv,int8-kv,int4",
                        help="engine runs: bf16, bf16-compile (torch.compile'd decode), fp8-kv, int8-kv, int4 (RTN g128 weights, "
                             "bf16 KV); a -sync suffix turns overlapped scheduling off (bf16-sync, bf16-compile-sync)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    config = KNOWN_ARCHITECTURES[args.arch]
    input_len = tuple(int(x) for x in args.input_len.split(","))
    output_len = tuple(int(x) for x in args.output_len.split(","))
    workload = random_workload(args.num_prompts, input_len, output_len, config.vocab_size, args.seed)
    bandwidth, flops = measure_copy_bandwidth("cuda"), measure_matmul_flops()
    results = {"script": "benchmarks/engine_gpu.py", "date": date.today().isoformat(), "gpu": device_name("cuda"),
               "torch": torch.__version__, "arch": args.arch, "copy_bandwidth_bytes_per_s": bandwidth,
               "bf16_matmul_flops_per_s": flops, "num_prompts": args.num_prompts, "input_len": input_len,
               "output_len": output_len, "seed": args.seed, "prompt_tokens": workload.prompt_tokens,
               "output_tokens": workload.output_tokens, "engine": {}}
    print(f"{results['gpu']}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s; "
          f"{args.num_prompts} prompts, {workload.prompt_tokens} prompt + {workload.output_tokens} output tokens", flush=True)
    model = random_model(config, torch.device("cuda"), torch.bfloat16, seed=0)
    loaded = LoadedModel(model, None, config, f"random:{args.arch}", ModelSource("random", args.arch))
    if not args.skip_correctness:
        results["correctness"] = correctness(loaded, workload.prompts[:4], 32)
        c = results["correctness"]
        print(f"correctness: prefill logits vs plain forward, relative error "
              f"{', '.join(f'{e:.1e}' for e in c['prefill_logits_rel_error_vs_plain_forward'])}; greedy tokens agreeing "
              f"with the static-cache generator: {c['agreeing_prefix_per_prompt']} of {c['new_tokens']}; overlapped "
              f"scheduling gives the synchronous loop's tokens: {c['overlapped_equals_synchronous']}", flush=True)
        save_results(results, args.out, "engine_gpu.json")
    kv_dtypes = {"bf16": "auto", "fp8-kv": "fp8", "int8-kv": "int8", "int4": "auto"}
    variants = [v for v in args.variants.split(",") if v]
    # int4 quantizes the model in place, so it runs last, after transformers has copied the bf16 weights.
    ordered = [v for v in variants if v != "int4"] + ["transformers"] + [v for v in variants if v == "int4"]
    for variant in ordered:
        if variant == "transformers":
            if not args.skip_transformers:
                results["transformers"] = run_transformers(model, config, workload)
                t = results["transformers"]
                print(f"transformers generate (batch {t['batch']}, eager): {t['generated_tokens_per_s']:.0f} generated "
                      f"tok/s ({t['requested_tokens_per_s']:.0f} requested tok/s), {t['seconds']:.1f} s", flush=True)
                save_results(results, args.out, "engine_gpu.json")
            continue
        if variant == "int4":
            from llmpress.quant.calibration import quantize_model
            from llmpress.quant.linear import replace_linears
            from llmpress.model.fusion import unfuse_projections
            from llmpress.quant.scheme import QuantScheme
            unfuse_projections(model)
            replace_linears(model, quantize_model(model, "rtn", QuantScheme(bits=4, group_size=128), progress=False))
            free_cuda()
        engine_config = EngineConfig(max_num_seqs=args.num_prompts, max_num_batched_tokens=args.max_num_batched_tokens,
                                     gpu_memory_utilization=args.gpu_memory_utilization,
                                     kv_cache_dtype=kv_dtypes[variant.split("-compile")[0].removesuffix("-sync")],
                                     max_model_len=input_len[1] + output_len[1], compile="-compile" in variant,
                                     async_scheduling=not variant.endswith("-sync"))
        try:
            r = results["engine"][variant] = run_engine(loaded, workload, engine_config, bandwidth, flops)
        except Exception as error:  # one variant failing must not lose the others' numbers
            traceback.print_exc()
            results.setdefault("errors", {})[variant] = repr(error)
            free_cuda()
            continue
        print(f"engine {variant}: {r['output_tokens_per_s']:.0f} output tok/s ({r['seconds']:.1f} s, setup "
              f"{r['setup_s']:.0f} s, {r['num_preemptions']} preemptions); decode at {r['max_concurrent_seqs']} seqs: "
              f"{r['full_batch_decode_tokens_per_s']:.0f} tok/s = {r['fraction_of_roofline']:.1%} of "
              f"{r['roofline']['tokens_per_s']:.0f} ({r['roofline']['bound']}-bound); KV {r['kv_blocks']} blocks, "
              f"{r['max_concurrent_at_max_len']} seqs of max length", flush=True)
        save_results(results, args.out, "engine_gpu.json")
    summarize(results)
    save_results(results, args.out, "engine_gpu.json")
    return 0


def summarize(results: dict) -> None:
    e, hf = results["engine"], results.get("transformers")
    base = e.get("bf16")
    if base:
        for variant, r in e.items():
            r["concurrency_vs_bf16"] = r["max_concurrent_at_max_len"] / base["max_concurrent_at_max_len"]
            if hf:
                r["over_transformers"] = r["output_tokens_per_s"] / hf["generated_tokens_per_s"]
    print(f"\n{results['gpu']}, {results['arch']}, {results['num_prompts']} prompts "
          f"({results['input_len']} in, {results['output_len']} out, seed {results['seed']})")
    print(f"{'system':22s} {'out tok/s':>10s} {'x HF':>6s} {'full-batch tok/s':>17s} {'% roofline':>10s} {'max seqs':>9s} {'x bf16':>7s}")
    if hf:
        print(f"{'transformers (eager)':22s} {hf['generated_tokens_per_s']:10.0f} {1:6.2f} {'-':>17s} {'-':>10s} {hf['batch']:9d} {'-':>7s}")
    for variant, r in e.items():
        r.setdefault("concurrency_vs_bf16", float("nan"))
        ratio = f"{r['over_transformers']:6.2f}" if hf and "over_transformers" in r else f"{'-':>6s}"
        print(f"{'llmpress ' + variant:22s} {r['output_tokens_per_s']:10.0f} {ratio} {r['full_batch_decode_tokens_per_s']:17.0f} "
              f"{r['fraction_of_roofline']:10.1%} {r['max_concurrent_at_max_len']:9d} {r.get('concurrency_vs_bf16', float('nan')):7.2f}")


if __name__ == "__main__":
    sys.exit(main())
