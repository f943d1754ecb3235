"""A model whose every forward pass goes through the paged KV cache, for measuring what a quantized
KV cache costs in perplexity: each window is one prefill whose attention reads the stored (fp8/int8)
keys and values of every token, its own included, as decode steps will."""

from __future__ import annotations

import torch

from llmpress.engine.paged_cache import PagedKVCache, full_prefill_metadata


class PagedCacheForward:
    """Callable like the model for `evaluate_perplexity`: input_ids [B, T] -> logits [B, T, vocab]."""

    def __init__(self, model, kv_cache_dtype: str, block_size: int = 16):
        self.model, self.kv_cache_dtype, self.block_size = model, kv_cache_dtype, block_size
        self.config = model.config

    def parameters(self):
        return self.model.parameters()

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        meta, num_blocks = full_prefill_metadata(B, T, self.block_size, input_ids.device)
        cache = PagedKVCache(self.config, num_blocks, self.block_size, self.model.dtype, self.kv_cache_dtype,
                             input_ids.device)
        positions = torch.arange(T, device=input_ids.device)
        logits = self.model(input_ids.reshape(1, B * T), positions.repeat(B), cache.bind(meta))
        return logits.view(B, T, -1)
