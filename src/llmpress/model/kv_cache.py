"""A static, preallocated KV cache (gpt-fast style): fixed shapes, so decode steps can be graph-captured."""

from __future__ import annotations

from typing import Protocol

import torch

from llmpress.config import LlamaConfig
from llmpress.kernels import ops


class KVCache(Protocol):
    """What an attention layer needs from a cache: store this step's k/v, attend over everything stored."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        """q: [B, H, T, D]; k, v: [B, Hkv, T, D] at `positions`. Returns attention output [B, H, T, D]."""
        ...


class StaticKVCache:
    """Per layer, k and v buffers of shape [batch, kv_heads, max_seq_len, head_dim].

    All sequences in the batch share positions (same-length prompts); the variable-length,
    paged cache belongs to the serving engine.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v ([B, Hkv, T, D]) at `positions` ([T]); return the layer's full k, v buffers."""
        self.keys[layer].index_copy_(2, positions, k)
        self.values[layer].index_copy_(2, positions, v)
        return self.keys[layer], self.values[layer]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        k_all, v_all = self.update(layer, positions, k, v)
        return ops.cached_attention(q, k_all, v_all, positions)

    def attend_rope(self, layer: int, qkv: torch.Tensor, num_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                    inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """`attend` for one new token given as the fused projection's output qkv ([B, 1, (H + 2 Hkv) * D], not
        rotated yet), when one kernel can rotate, store and attend (ops.rope_attention_applies); None: the
        caller rotates and attends."""
        if not ops.rope_attention_applies(qkv, cos, self.keys[layer].shape[-1]):
            return None
        return ops.cached_attention_rope(qkv, num_heads, cos, sin, inv_freq, self.keys[layer], self.values[layer],
                                         positions)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
