"""Speculative decode throughput at batch 1, measured like bench/throughput.py measures plain decoding."""

from __future__ import annotations

import statistics

import torch

from llmpress.generation import SamplingParams
from llmpress.model import LlamaForCausalLM
from llmpress.speculative.decoder import SpeculativeConfig, SpeculativeGenerator, SpeculativeStats
from llmpress.speculative.drafters import Drafter


def benchmark_speculative(model: LlamaForCausalLM, drafter: Drafter, prompt_ids: torch.Tensor, new_tokens: int,
                          config: SpeculativeConfig, mode: str = "auto", repeats: int = 3) -> dict:
    """Generate `new_tokens` (EOS ignored) from prompt_ids [1, T]; medians of `repeats` timed runs after a
    warm-up (compile, capture). decode_tokens_per_s counts tokens after the first, as plain bench does."""
    gen = SpeculativeGenerator(model, drafter, prompt_ids.shape[1] + new_tokens, config, mode=mode)
    gen.warmup()
    gen.generate(prompt_ids, SamplingParams(max_new_tokens=min(8, new_tokens), ignore_eos=True))
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    runs = [gen.generate(prompt_ids, params) for _ in range(repeats)]
    stats = SpeculativeStats()
    for run in runs:
        stats.merge(run.stats)
    decode_s = statistics.median(r.decode_s for r in runs)
    e2e_s = statistics.median(r.prefill_s + r.decode_s for r in runs)
    return {"drafter": drafter.name, "k": config.num_speculative_tokens, "adaptive": config.adaptive,
            "mode": gen.mode, "prompt_len": prompt_ids.shape[1], "new_tokens": new_tokens, "repeats": repeats,
            "ttft_ms": 1e3 * statistics.median(r.prefill_s for r in runs),
            "decode_tokens_per_s": (new_tokens - 1) / decode_s, "e2e_tokens_per_s": new_tokens / e2e_s,
            "lossless": True, **stats.to_dict()}


def format_speculative(result: dict, plain_tokens_per_s: float | None = None) -> str:
    """One line: drafter, acceptance, tokens per target step, per-step times, throughput (and speedup)."""
    k = f"adaptive k from {result['k']}" if result["adaptive"] else f"k={result['k']}"
    line = (f"speculative ({result['drafter']}, {k}): acceptance {result['acceptance_rate']:.1%}, "
            f"{result['tokens_per_round']:.2f} tokens per target step, draft {result['draft_ms_per_round']:.2f} ms + "
            f"verify {result['verify_ms_per_round']:.2f} ms per step, decode {result['decode_tokens_per_s']:.1f} tok/s")
    if plain_tokens_per_s:
        line += f" ({result['decode_tokens_per_s'] / plain_tokens_per_s:.2f}x plain)"
    return line
