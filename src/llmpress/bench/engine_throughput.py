"""Offline engine throughput, as vLLM's `benchmark_throughput`: N prompts of varied lengths at once.

Every request ignores EOS and produces exactly its output length, so the work is fixed by the seed.
Besides the totals, the steps where every running sequence decoded together are timed on their own:
that is the steady-state decode throughput at that batch size, which the roofline is computed for.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from llmpress.config import LlamaConfig
from llmpress.generation.generator import synchronize
from llmpress.generation.sampling import SamplingParams


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def random_workload(num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
                    seed: int = 0) -> Workload:
    """Prompts of random token ids with lengths uniform in input_len (inclusive), outputs in output_len."""
    g = torch.Generator().manual_seed(seed)
    in_lens = torch.randint(input_len[0], input_len[1] + 1, (num_prompts,), generator=g).tolist()
    out_lens = torch.randint(output_len[0], output_len[1] + 1, (num_prompts,), generator=g).tolist()
    # Ids from the upper half of the vocabulary: no special tokens (BOS/EOS sit low in Llama vocabularies).
    prompts = [torch.randint(vocab_size // 2, vocab_size - 1, (n,), generator=g).tolist() for n in in_lens]
    return Workload(prompts, out_lens)


@dataclass
class OfflineResult:
    num_prompts: int
    prompt_tokens: int
    output_tokens: int
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    steps: int
    num_preemptions: int
    max_concurrent_seqs: int
    full_batch_decode_steps: int  # decode-only steps at max_concurrent_seqs
    full_batch_step_ms: float  # their median wall time
    full_batch_decode_tokens_per_s: float  # max_concurrent_seqs / that time
    full_batch_mean_context: float  # mean cache length per sequence in those steps
    kv_blocks: int
    kv_cache_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def run_offline(engine, workload: Workload, progress: bool = True) -> OfflineResult:
    """Submit the whole workload, step to completion, and time it (the engine is already built and warm)."""
    for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens)):
        engine.add_request(f"bench-{i}", prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
    engine.step_records = []
    bar = tqdm(total=workload.output_tokens, desc="engine", unit="tok", disable=not progress)
    synchronize(engine.runner.device)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        bar.update(len(engine.step()))
    synchronize(engine.runner.device)
    seconds = time.perf_counter() - start
    bar.close()
    records, engine.step_records = engine.step_records, None
    widest = max(r.num_seqs for r in records)
    full = [r for r in records if r.decode_only and r.num_seqs == widest]
    step_s = statistics.median(r.seconds for r in full) if full else float("nan")
    return OfflineResult(
        num_prompts=len(workload.prompts), prompt_tokens=workload.prompt_tokens, output_tokens=workload.output_tokens,
        seconds=seconds, requests_per_s=len(workload.prompts) / seconds,
        output_tokens_per_s=workload.output_tokens / seconds,
        total_tokens_per_s=(workload.prompt_tokens + workload.output_tokens) / seconds,
        steps=len(records), num_preemptions=engine.stats.num_preemptions, max_concurrent_seqs=widest,
        full_batch_decode_steps=len(full), full_batch_step_ms=step_s * 1e3, full_batch_decode_tokens_per_s=widest / step_s,
        full_batch_mean_context=statistics.mean(r.context_tokens / r.num_seqs for r in full) if full else float("nan"),
        kv_blocks=engine.runner.num_blocks, kv_cache_bytes=engine.runner.cache.nbytes)


def format_offline(r: OfflineResult, model: str, device: str) -> str:
    return "\n".join([
        f"{model} on {device}: {r.num_prompts} requests, {r.prompt_tokens} prompt + {r.output_tokens} output tokens",
        f"  {r.seconds:.2f} s: {r.requests_per_s:.2f} req/s, {r.output_tokens_per_s:,.0f} output tok/s, "
        f"{r.total_tokens_per_s:,.0f} total tok/s ({r.steps} steps, {r.num_preemptions} preemptions)",
        f"  decode with {r.max_concurrent_seqs} sequences running: {r.full_batch_step_ms:.2f} ms/step = "
        f"{r.full_batch_decode_tokens_per_s:,.0f} tok/s over {r.full_batch_decode_steps} steps "
        f"(mean context {r.full_batch_mean_context:.0f}); KV cache {r.kv_blocks} blocks, {r.kv_cache_bytes / 2**30:.2f} GiB"])


def decode_step_roofline(config: LlamaConfig, weight_bytes: int, batch_size: int, mean_context: float,
                         kv_bytes_per_token: float, bandwidth_bytes_per_s: float, flops_per_s: float) -> dict:
    """Best-case time of one decode step of `batch_size` sequences: every weight read once, every cached
    token's k/v read once, and the matmul + attention FLOPs at the measured peak; the slower bound wins."""
    kv_bytes = batch_size * mean_context * kv_bytes_per_token
    linear_params = config.num_params - config.vocab_size * config.hidden_size * (0 if config.tie_word_embeddings else 1)
    attention_flops = 4 * batch_size * mean_context * config.num_attention_heads * config.head_dim * config.num_hidden_layers
    flops = 2 * batch_size * linear_params + attention_flops
    memory_s, compute_s = (weight_bytes + kv_bytes) / bandwidth_bytes_per_s, flops / flops_per_s
    step_s = max(memory_s, compute_s)
    return dict(batch_size=batch_size, mean_context=mean_context, weight_bytes=weight_bytes, kv_bytes=kv_bytes,
                flops=flops, memory_bound_ms=memory_s * 1e3, compute_bound_ms=compute_s * 1e3,
                bound="memory" if memory_s >= compute_s else "compute", step_ms=step_s * 1e3,
                tokens_per_s=batch_size / step_s)
