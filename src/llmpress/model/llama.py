"""The Llama decoder in plain PyTorch, with Hugging Face parameter names.

Covers Llama-2, Llama-3.x (grouped-query attention, llama3 rope scaling, tied embeddings) and
SmolLM/SmolLM2. Reads like the paper: x = x + attn(norm(x)); x = x + mlp(norm(x)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmpress.config import LlamaConfig
from llmpress.kernels import ops
from llmpress.kernels.reference import rms_norm_reference
from llmpress.model import decode_accumulate, decode_chain
from llmpress.model.kv_cache import KVCache
from llmpress.model.rope import RotaryEmbedding, apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_reference(x, self.weight, self.eps)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's silu(gate) * up over the fused gate|up output [..., 2I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def project(linear: nn.Module, x: torch.Tensor, norm: nn.Module | None = None, silu_mul: bool = False,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """(residual +) linear(prologue(x)), prologue: `norm`, or silu(gate) * up over x = gate|up. Layers with a
    `forward_fused` (int4's QuantLinear) may do it in one kernel; for the rest these are the plain steps."""
    fused = getattr(linear, "forward_fused", None)
    if fused is not None:
        return fused(x, norm=norm, silu_mul=silu_mul, residual=residual)
    if norm is not None:
        x = norm(x)
    if silu_mul:
        x = swiglu(x)
    y = linear(x)
    return y if residual is None else residual + y


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)
        self.register_buffer("qkv_weight", None, persistent=False)  # set by model.fusion.fuse_projections
        self.register_buffer("qkv_bias", None, persistent=False)
        self.qkv_packed: tuple = ()  # (fused int4 QuantLinear,), set by model.fusion.fuse_projections
        self.qkv_sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        self.rotary: tuple = ()  # (the model's RotaryEmbedding,): its inv_freq for the fused decode kernel

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                kv_cache: KVCache | None, norm: nn.Module | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """(residual +) attention(norm(x)): the decoder layer's norm and residual add are passed in so that
        layers able to fuse them into their products (int4 at batch 1) can."""
        if self.qkv_weight is not None:
            out = self.attend_qkv(F.linear(x if norm is None else norm(x), self.qkv_weight, self.qkv_bias), cos, sin,
                                  positions, kv_cache)
        elif self.qkv_packed:
            out = self.attend_qkv(project(self.qkv_packed[0], x, norm=norm), cos, sin, positions, kv_cache)
        else:
            x = x if norm is None else norm(x)
            out = self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, positions, kv_cache)
        return project(self.o_proj, out, residual=residual)

    def attend_qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   kv_cache: KVCache | None) -> torch.Tensor:
        """`attend` for the fused projection's output qkv [B, T, (H + 2 Hkv) * D]: at decode (or a verify step's
        few tokens, with ops.triton_verify_attention) one kernel rotates, stores and attends where the mode and
        the cache allow it."""
        B, T, _ = qkv.shape
        rope_fusion = ops.fuse_rope_into_attention == "always" or (
            ops.fuse_rope_into_attention == "int4" and self.qkv_weight is None)
        if rope_fusion and self.rotary and hasattr(kv_cache, "attend_rope") and (T == 1 or ops.triton_verify_attention):
            out = kv_cache.attend_rope(self.layer_index, qkv, self.num_heads, cos, sin, self.rotary[0].inv_freq,
                                       positions)
            if out is not None:
                return out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.attend(*qkv.split(self.qkv_sizes, dim=-1), cos, sin, positions, kv_cache)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               positions: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """Attention's output [B, T, H * D] for projected q [B, T, H * D], k and v [B, T, Hkv * D]: RoPE, then
        causal attention over the sequence or, with a cache, the cache's own store-and-attend."""
        B, T, _ = q.shape
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is None:  # a whole sequence at once (perplexity, training)
            out = ops.attention(q, k, v, causal=True)
        else:  # a static cache (generation) or the engine's paged cache: each stores k/v and attends its own way
            out = kv_cache.attend(self.layer_index, q, k, v, positions)
        return out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.register_buffer("gate_up_weight", None, persistent=False)  # set by model.fusion.fuse_projections
        self.register_buffer("gate_up_bias", None, persistent=False)
        self.gate_up_packed: tuple = ()  # (fused int4 QuantLinear,), set by model.fusion.fuse_projections

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(residual +) mlp(norm(x)), for the same reason as Attention.forward's."""
        if self.gate_up_weight is not None:
            gate_up = F.linear(x if norm is None else norm(x), self.gate_up_weight, self.gate_up_bias)
        elif self.gate_up_packed:
            gate_up_layer = self.gate_up_packed[0]
            swiglu_fused = getattr(gate_up_layer, "forward_swiglu", None)
            activation = None if swiglu_fused is None else swiglu_fused(x, norm=norm)
            if activation is not None:  # silu(gate) * up came out of the gate|up kernel itself
                return project(self.down_proj, activation, residual=residual)
            gate_up = project(gate_up_layer, x, norm=norm)
        else:
            x = x if norm is None else norm(x)
            return project(self.down_proj, F.silu(self.gate_proj(x)) * self.up_proj(x), residual=residual)
        return project(self.down_proj, gate_up, silu_mul=True, residual=residual)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, positions, kv_cache):
        # x + attn(norm(x)), then h + mlp(norm(h)), with the norms and adds handed to the sublayers (see project)
        h = self.self_attn(x, cos, sin, positions, kv_cache, norm=self.input_layernorm, residual=x)
        return self.mlp(h, norm=self.post_attention_layernorm, residual=h)


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        for layer in self.layers:  # a tuple, not a submodule: one RotaryEmbedding in the module tree
            layer.self_attn.rotary = (self.rotary_emb,)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, last_only: bool = False,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [B, T]; positions: [T] absolute positions (default 0..T-1).

        With `kv_cache`, k/v are written at `positions` and attention reads the cache; without it,
        the T tokens attend causally among themselves. `last_only` computes logits for the final
        token only (generation never needs the others); `logits_indices` [M] for the tokens at those
        indices (the engine packs many sequences into one row and needs each one's last token).
        Returns logits [B, T (or 1, or M), vocab].
        """
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        chain = decode_chain.plan_for_step(self, input_ids, kv_cache, logits_indices)
        if chain is not None:  # batch-1 decode with each layer's products after attention in one kernel
            return decode_chain.forward(self, chain, input_ids, positions, kv_cache)
        accumulating = decode_accumulate.plan_for_step(self, input_ids, kv_cache, logits_indices)
        if accumulating is not None:  # batch-1 decode over an fp32 residual stream, split-K sums by atomics
            return decode_accumulate.forward(self, accumulating, input_ids, positions, kv_cache, last_only)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, positions, kv_cache)
        if last_only:
            x = x[:, -1:]
        elif logits_indices is not None:
            x = x[:, logits_indices]
        return self.lm_head(self.model.norm(x))

    def materialize_buffers(self, device: torch.device | str) -> None:
        """Create non-persistent buffers on `device` after loading weights into a meta-built model."""
        self.model.rotary_emb.materialize(device)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype
