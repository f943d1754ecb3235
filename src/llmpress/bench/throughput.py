"""Decode throughput: time to first token, time per output token, tokens/s and peak memory.

Warm-up (compilation, graph capture, first-touch allocations) is excluded; CUDA work is
synchronized before every host clock read (inside `Generator.generate`).
"""

from __future__ import annotations

import resource
import statistics
from dataclasses import asdict, dataclass

import torch

from llmpress.generation import Generator, SamplingParams
from llmpress.model import LlamaForCausalLM

DEFAULT_CHAT_PROMPT = "Explain in a few paragraphs how a CPU cache works and why it makes programs faster."


@dataclass
class DecodeBenchResult:
    mode: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    ttft_ms: float  # prefill + first token, median over repeats
    tpot_ms: float  # time per output token after the first, median
    decode_tokens_per_s: float  # batch_size / tpot: output tokens per second over the whole batch
    e2e_tokens_per_s: float  # batch_size * new_tokens / (ttft + decode time): what a caller of generate sees
    peak_memory_gb: float  # CUDA: max allocated during the runs; CPU: process peak RSS
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_token_ids(tokenizer, prompt_len: int | None, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """[1, T]: the fixed chat prompt through the chat template, or `prompt_len` seeded random ids
    (random-weight models have no tokenizer)."""
    if tokenizer is not None and prompt_len is None:
        from llmpress.tokenizer import encode_chat
        return encode_chat(tokenizer, [{"role": "user", "content": DEFAULT_CHAT_PROMPT}])
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, prompt_len or 64), generator=generator)


def benchmark_decode(model: LlamaForCausalLM, prompt_ids: torch.Tensor, batch_size: int, new_tokens: int,
                     mode: str = "auto", repeats: int = 3, fuse: bool | None = None) -> DecodeBenchResult:
    """Generate `new_tokens` (EOS ignored) for `batch_size` copies of prompt_ids [1, T]; median of `repeats`."""
    device = model.device
    prompt = prompt_ids.to(device).expand(batch_size, -1).contiguous()
    generator = Generator(model, max_seq_len=_round_up(prompt.shape[1] + new_tokens, 64), batch_size=batch_size, mode=mode,
                          fuse=fuse)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    generator.warmup()
    generator.generate(prompt, SamplingParams(max_new_tokens=min(8, new_tokens), ignore_eos=True))  # warm caches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [generator.generate(prompt, params) for _ in range(repeats)]
    ttft = statistics.median(r.prefill_s for r in runs)
    tpot = statistics.median(r.decode_s / max(new_tokens - 1, 1) for r in runs)
    e2e_s = statistics.median(r.prefill_s + r.decode_s for r in runs)
    if device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated(device) / 1e9
    else:  # ru_maxrss is in KiB on Linux
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return DecodeBenchResult(generator.mode, batch_size, prompt.shape[1], new_tokens, ttft * 1e3, tpot * 1e3,
                             batch_size / tpot, batch_size * new_tokens / e2e_s, peak_gb, repeats)


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
