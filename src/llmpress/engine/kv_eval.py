"""A model whose every forward pass goes through the paged KV cache, for measuring what a quantized
KV cache costs in perplexity: each window is one prefill whose attention reads the stored (fp8/int8)
keys and values of every token, its own included, as decode steps will."""

from __future__ import annotations

import torch

from llmpress.engine.paged_cache import PagedAttentionMetadata, PagedKVCache


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
        device = input_ids.device
        blocks = -(-T // self.block_size)
        cache = PagedKVCache(self.config, blocks * B, self.block_size, self.model.dtype, self.kv_cache_dtype, device)
        tables = torch.arange(blocks * B, dtype=torch.int32, device=device).view(B, blocks)
        positions = torch.arange(T, device=device)
        slots = (tables.long()[:, positions // self.block_size] * self.block_size + positions % self.block_size).flatten()
        meta = PagedAttentionMetadata(
            slot_mapping=slots, block_tables=tables,
            seq_lens=torch.full((B,), T, dtype=torch.int32, device=device),
            query_start_loc=torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=device),
            max_query_len=T, max_seq_len=T)
        logits = self.model(input_ids.reshape(1, B * T), positions.repeat(B), cache.bind(meta))
        return logits.view(B, T, -1)
