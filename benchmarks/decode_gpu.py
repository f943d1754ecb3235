"""Batch-1 decode on the GPU: llmpress vs the bandwidth roofline vs Hugging Face transformers, one run.

Random bf16 weights in the Llama-3.2-1B/3B architectures (no download). For each architecture:
  1. correctness: our prefill logits vs transformers' on the same weights (bf16 relative error);
  2. llmpress decode in three modes: eager, CUDA graph, torch.compile + CUDA graph;
  3. transformers `generate`: eager (dynamic cache) and static cache + automatic torch.compile;
  4. the roofline: bytes per decode token / copy bandwidth measured in this run.
Prints a table and writes JSON (default benchmarks/results/decode_<gpu>.json).

    python benchmarks/decode_gpu.py --archs llama-3.2-3b,llama-3.2-1b --out benchmarks/results/decode_h100.json
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from datetime import date

import torch

from results_out import save_results  # benchmarks/
from llmpress.bench.roofline import decode_bytes_per_token, device_name, measure_copy_bandwidth
from llmpress.bench.throughput import benchmark_decode, prompt_token_ids
from llmpress.config import KNOWN_ARCHITECTURES
from llmpress.generation import Generator, SamplingParams
from llmpress.kernels import ops
from llmpress.loading.loader import random_model
from llmpress.model.fusion import unfuse_projections

# variant -> (decode mode, fuse q|k|v and gate|up, attention backend, ops.fuse_rope_into_attention)
VARIANTS = {
    "eager": ("eager", False, "auto", "int4"),
    "graph": ("graph", True, "auto", "int4"),
    "compile-unfused-sdpa": ("compile", False, "sdpa", "int4"),
    "compile-sdpa": ("compile", True, "sdpa", "int4"),
    "compile": ("compile", True, "auto", "int4"),  # bf16: RoPE and the cache write in kernels of their own
    "compile-unfused": ("compile", False, "auto", "int4"),
    "compile-rope-fused": ("compile", True, "auto", "always"),  # RoPE and the cache write inside attention
}


def transformers_twin(ours, config):
    """A transformers LlamaForCausalLM holding a copy of our weights (bf16, on the same GPU)."""
    import transformers
    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    with torch.device("cuda"):
        hf = transformers.LlamaForCausalLM._from_config(hf_config, dtype=torch.bfloat16)
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf.tie_weights()
    hf.generation_config.eos_token_id = None  # random weights: never stop early, always 256 tokens
    hf.generation_config.pad_token_id = 0
    return hf.eval()


@torch.inference_mode()
def logits_relative_error(ours, hf, prompt) -> float:
    ref = hf(prompt).logits.float()
    got = ours(prompt).float()
    return ((got - ref).norm() / ref.norm()).item()


@torch.inference_mode()
def time_transformers_generate(hf, prompt, new_tokens: int, cache_implementation: str | None, runs: int) -> dict:
    """Wall time of whole generate() calls; the first call (compilation for the static cache) is reported apart."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if cache_implementation:
        kwargs["cache_implementation"] = cache_implementation
    timings = []
    for _ in range(runs + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = hf.generate(prompt, **kwargs)
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
        assert out.shape[1] == prompt.shape[1] + new_tokens, out.shape
    steady = sorted(timings[1:])[len(timings[1:]) // 2]
    return {"first_call_s": timings[0], "e2e_tokens_per_s": new_tokens / steady, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="llama-3.2-3b,llama-3.2-1b")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--modes", default="eager,graph,compile", help=f"variants: {', '.join(VARIANTS)}")
    parser.add_argument("--profile", action="store_true", help="print the kernels of one decode step (last variant)")
    parser.add_argument("--peers", default="eager,static", help="transformers variants: eager, static (static cache + compile)")
    parser.add_argument("--hf-runs", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers
    gpu = device_name("cuda")
    bandwidth = measure_copy_bandwidth("cuda")
    print(f"{gpu}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); torch {torch.__version__}, "
          f"transformers {transformers.__version__}", flush=True)
    results = {"script": "benchmarks/decode_gpu.py", "command": " ".join(sys.argv), "date": date.today().isoformat(), "gpu": gpu,
               "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
               "copy_bandwidth_bytes_per_s": bandwidth, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
               "batch_size": 1, "architectures": {}}
    for arch in args.archs.split(","):
        config = KNOWN_ARCHITECTURES[arch]
        model = random_model(config, torch.device("cuda"), torch.bfloat16, seed=0)
        prompt = prompt_token_ids(None, args.prompt_len, config.vocab_size).cuda()
        mean_context = args.prompt_len + args.new_tokens // 2
        bytes_per_token = decode_bytes_per_token(config, 2.0, context_len=mean_context)
        entry = {"params": config.num_params, "bytes_per_token": bytes_per_token,
                 "roofline_tokens_per_s": bandwidth / bytes_per_token, "llmpress": {}, "transformers": {}}
        results["architectures"][arch] = entry
        print(f"\n== {arch}: {config.num_params / 1e9:.2f} B params, {bytes_per_token / 1e9:.2f} GB per token, "
              f"roofline {entry['roofline_tokens_per_s']:.0f} tok/s", flush=True)
        hf = transformers_twin(model, config)
        entry["prefill_logits_rel_error_vs_transformers"] = logits_relative_error(model, hf, prompt)
        print(f"prefill logits vs transformers: relative error {entry['prefill_logits_rel_error_vs_transformers']:.2e}", flush=True)
        for mode in args.modes.split(","):
            start = time.perf_counter()
            new_tokens = args.new_tokens if mode != "eager" else min(args.new_tokens, 64)
            decode_mode, fuse, backend, fuse_rope = VARIANTS[mode]
            if not fuse:
                unfuse_projections(model)
            torch._dynamo.reset()
            ops.fuse_rope_into_attention = fuse_rope
            with ops.use_backend(backend):
                r = benchmark_decode(model, prompt, 1, new_tokens, mode=decode_mode, repeats=3, fuse=fuse)
                if args.profile and mode == args.modes.split(",")[-1]:
                    profile_decode(model, prompt, decode_mode, fuse)
            entry["llmpress"][mode] = dict(r.to_dict(), setup_and_runs_s=time.perf_counter() - start,
                                           fraction_of_roofline=r.decode_tokens_per_s / entry["roofline_tokens_per_s"])
            print(f"llmpress {mode:8s} decode {r.decode_tokens_per_s:7.1f} tok/s  e2e {r.e2e_tokens_per_s:7.1f} tok/s  "
                  f"ttft {r.ttft_ms:6.1f} ms  {entry['llmpress'][mode]['fraction_of_roofline']:.1%} of roofline  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            save_results(results, args.out, "decode_gpu.json")
        for peer in args.peers.split(","):
            if not peer:
                continue
            start = time.perf_counter()
            entry["transformers"][peer] = time_transformers_generate(
                hf, prompt, args.new_tokens, "static" if peer == "static" else None, args.hf_runs)
            print(f"transformers {peer:8s} e2e {entry['transformers'][peer]['e2e_tokens_per_s']:7.1f} tok/s "
                  f"(first call {entry['transformers'][peer]['first_call_s']:.1f} s; {time.perf_counter() - start:.0f} s)", flush=True)
            save_results(results, args.out, "decode_gpu.json")
        del hf, model
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    print_table(results)
    save_results(results, args.out, "decode_gpu.json")
    return 0


def profile_decode(model, prompt, mode: str, fuse: bool, steps: int = 16) -> None:
    """The GPU kernels behind `steps` decode steps, heaviest first (kernels inside graph replays included)."""
    from torch.profiler import ProfilerActivity, profile
    generator = Generator(model, max_seq_len=512, mode=mode, fuse=fuse)
    generator.generate(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generator.generate(prompt, SamplingParams(max_new_tokens=steps + 1, ignore_eos=True))
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0]
    total_us = sum(e.self_device_time_total for e in events)
    print(f"profile: {sum(e.count for e in events) / steps:.0f} kernels and {total_us / steps:.0f} us of kernel time per "
          f"step (includes the prefill once)", flush=True)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60), flush=True)


def timeline_decode(model, prompt, mode: str, fuse: bool, steps: int = 32, step_end: str = "_block_argmax",
                    label=None) -> dict:
    """Busy time and idle gaps of `steps` greedy decode steps (llmpress.bench.timeline), printed and returned.
    `step_end` names the kernel that ends a step: the Triton argmax's first, or "ArgMax" for torch.argmax (the host
    loop: its float cast and the other reductions also run `reduce_kernel`, which broke int4_h200_s17d.log's);
    `label`: see step_timelines."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from llmpress.bench.timeline import KernelSpan, print_timeline, step_timelines
    generator = Generator(model, max_seq_len=512, mode=mode, fuse=fuse)
    generator.generate(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generator.generate(prompt, SamplingParams(max_new_tokens=steps + 2, ignore_eos=True))
    kernels = [KernelSpan(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type == DeviceType.CUDA]
    summary = step_timelines(kernels, step_end, label=label)
    print_timeline(summary)
    return summary


def print_table(results: dict) -> None:
    print(f"\nBatch-1 decode, bf16, {results['gpu']}, prompt {results['prompt_len']}, {results['new_tokens']} new tokens")
    print(f"{'model':14s} {'best variant':>16s} {'roofline':>9s} {'ours':>8s} {'% roof':>7s} {'ours e2e':>9s} {'HF eager':>9s} {'HF static':>10s} {'x eager':>8s} {'x static':>9s}")
    for arch, e in results["architectures"].items():
        best = max(e["llmpress"], key=lambda v: e["llmpress"][v]["decode_tokens_per_s"], default=None)
        ours = e["llmpress"].get(best, {})
        hf_e = e["transformers"].get("eager", {}).get("e2e_tokens_per_s", float("nan"))
        hf_s = e["transformers"].get("static", {}).get("e2e_tokens_per_s", float("nan"))
        d, e2e = ours.get("decode_tokens_per_s", float("nan")), ours.get("e2e_tokens_per_s", float("nan"))
        print(f"{arch:14s} {best:>16s} {e['roofline_tokens_per_s']:9.0f} {d:8.1f} {d / e['roofline_tokens_per_s']:7.1%} {e2e:9.1f} "
              f"{hf_e:9.1f} {hf_s:10.1f} {e2e / hf_e:8.1f} {e2e / hf_s:9.2f}")


if __name__ == "__main__":
    sys.exit(main())
