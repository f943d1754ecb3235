"""EngineConfig: every knob of the serving engine in one dataclass (vLLM's names where vLLM has one)."""

from __future__ import annotations

from dataclasses import dataclass

from llmpress.errors import LlmpressError

KV_CACHE_DTYPES = ("auto", "fp8", "int8")


@dataclass
class EngineConfig:
    max_num_seqs: int = 256  # sequences running at once (decode batch size at most this)
    max_num_batched_tokens: int = 2048  # tokens per step: decodes first, then prefill chunks fill the rest
    block_size: int = 16  # tokens per KV block
    gpu_memory_utilization: float = 0.90  # fraction of GPU memory the engine may use (weights + activations + KV)
    num_gpu_blocks: int | None = None  # KV blocks; None sizes the cache from free GPU memory (CPU: see cpu_kv_tokens)
    cpu_kv_tokens: int = 16384  # on CPU, with num_gpu_blocks unset: a KV cache of this many tokens
    kv_cache_dtype: str = "auto"  # auto (the model dtype), fp8 (e4m3) or int8, with per-token per-head scales
    max_model_len: int | None = None  # prompt + output limit per sequence; None: the model's context (capped at 8192)
    enable_prefix_caching: bool = True  # share full KV blocks between requests with the same prefix
    enforce_eager: bool = False  # no CUDA graphs for decode (they are used on CUDA otherwise)
    async_scheduling: bool = True  # plan and launch step n+1 before step n's tokens are read (hides host work)
    compile: bool = False  # torch.compile the decode step (symbolic batch) before capturing its CUDA graphs
    cuda_graph_max_batch: int | None = None  # largest captured decode batch (default max_num_seqs)
    seed: int = 0  # for requests that sample without a seed of their own
    speculative: str | None = None  # "ngram": prompt-lookup drafts for greedy requests, verified in the batch
    num_speculative_tokens: int = 4  # draft tokens per sequence and step, at most

    def __post_init__(self):
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise LlmpressError(f"unknown --kv-cache-dtype {self.kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}.")
        positive = dict(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                        block_size=self.block_size)
        for name, value in positive.items():
            if value < 1:
                raise LlmpressError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise LlmpressError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.speculative not in (None, "ngram"):
            raise LlmpressError(f"the engine drafts with 'ngram' only, got {self.speculative!r}; a draft model "
                                "works in `llmpress generate --draft` (batch 1).")
        if self.num_speculative_tokens < 1:
            raise LlmpressError(f"--num-speculative-tokens must be at least 1, got {self.num_speculative_tokens}.")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise LlmpressError(f"--num-gpu-blocks must be at least 1, got {self.num_gpu_blocks}.")
