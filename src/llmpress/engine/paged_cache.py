"""The paged KV cache tensors, and the view of them one engine step hands to the model.

Per layer, k and v live in blocks of `block_size` tokens: [num_blocks + 1, block_size, Hkv, D]. The
extra last block is scratch: padding rows of a CUDA-graphed batch write there, so the store never
needs a data-dependent mask. With --kv-cache-dtype fp8/int8 the blocks hold 1-byte values plus one
float16 scale per token and kv head (per-token scales track outliers that a per-tensor scale would
clip), which is (2D) / (D + 2) = 1.97x the tokens of bf16 at head_dim 128.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.config import LlamaConfig
from llmpress.kernels import ops

QUANTIZED_KV_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
SCALE_DTYPE = torch.float16


def kv_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    return QUANTIZED_KV_DTYPES.get(kv_cache_dtype, model_dtype)


def bytes_per_block(config: LlamaConfig, block_size: int, kv_cache_dtype: str, model_dtype: torch.dtype) -> int:
    """KV bytes of one block over all layers (k and v, scales included)."""
    per_token_head = config.head_dim * kv_storage_dtype(kv_cache_dtype, model_dtype).itemsize
    if kv_cache_dtype in QUANTIZED_KV_DTYPES:
        per_token_head += SCALE_DTYPE.itemsize
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * per_token_head


@dataclass
class PagedAttentionMetadata:
    """Where this step's tokens go and what each sequence attends to. N tokens of S sequences."""

    slot_mapping: torch.Tensor  # int64 [N]: cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # int32 [S, max_blocks]
    seq_lens: torch.Tensor  # int32 [S]: tokens in the cache per sequence after this step
    query_start_loc: torch.Tensor  # int32 [S + 1]: sequence s owns tokens query_start_loc[s]:[s+1]
    max_query_len: int
    max_seq_len: int


def full_prefill_metadata(batch: int, seq_len: int, block_size: int,
                          device: torch.device | str) -> tuple[PagedAttentionMetadata, int]:
    """`batch` whole sequences of `seq_len` tokens prefilled in one step, in fresh consecutive blocks (the
    memory-profiling step, perplexity through the cache). Returns the metadata and the blocks it uses."""
    blocks = -(-seq_len // block_size)
    tables = torch.arange(blocks * batch, dtype=torch.int32, device=device).view(batch, blocks)
    positions = torch.arange(seq_len, device=device)
    slots = (tables.long()[:, positions // block_size] * block_size + positions % block_size).flatten()
    meta = PagedAttentionMetadata(
        slot_mapping=slots, block_tables=tables,
        seq_lens=torch.full((batch,), seq_len, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device),
        max_query_len=seq_len, max_seq_len=seq_len)
    return meta, blocks * batch


class PagedKVCache:
    def __init__(self, config: LlamaConfig, num_blocks: int, block_size: int, model_dtype: torch.dtype,
                 kv_cache_dtype: str, device: torch.device | str):
        self.num_blocks, self.block_size, self.kv_cache_dtype = num_blocks, block_size, kv_cache_dtype
        storage = kv_storage_dtype(kv_cache_dtype, model_dtype)
        shape = (num_blocks + 1, block_size, config.num_key_value_heads, config.head_dim)
        layers = range(config.num_hidden_layers)
        self.keys = [torch.zeros(shape, dtype=storage, device=device) for _ in layers]
        self.values = [torch.zeros(shape, dtype=storage, device=device) for _ in layers]
        self.key_scales = self.value_scales = None
        if kv_cache_dtype in QUANTIZED_KV_DTYPES:
            self.key_scales = [torch.zeros(shape[:-1], dtype=SCALE_DTYPE, device=device) for _ in layers]
            self.value_scales = [torch.zeros(shape[:-1], dtype=SCALE_DTYPE, device=device) for _ in layers]

    @property
    def scratch_block(self) -> int:
        return self.num_blocks

    @property
    def nbytes(self) -> int:
        tensors = self.keys + self.values + (self.key_scales or []) + (self.value_scales or [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def bind(self, meta: PagedAttentionMetadata) -> "PagedAttention":
        return PagedAttention(self, meta)


class PagedAttention:
    """The `kv_cache` argument of the model for one engine step (model.kv_cache.KVCache protocol).

    The engine packs every sequence of the step into one row: q is [1, H, N, D] and `positions` [N].
    """

    def __init__(self, cache: PagedKVCache, meta: PagedAttentionMetadata):
        self.cache, self.meta = cache, meta

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        c, m = self.cache, self.meta
        k_scale = c.key_scales[layer] if c.key_scales is not None else None
        v_scale = c.value_scales[layer] if c.value_scales is not None else None
        ops.store_kv_paged(k[0].transpose(0, 1), v[0].transpose(0, 1), c.keys[layer], c.values[layer],
                           k_scale, v_scale, m.slot_mapping)
        out = ops.paged_attention(q[0].transpose(0, 1).contiguous(), c.keys[layer], c.values[layer], k_scale, v_scale,
                                  m.block_tables, m.seq_lens, m.query_start_loc, m.max_query_len, m.max_seq_len)
        return out.transpose(0, 1)[None]
