"""Batch-1 decode with each layer's products after attention in one kernel (ops.layer_chain).

The decoder layer written as modules (model/llama.py) ends at its own residual add, but the persistent kernel of
kernels/triton_int4_chain.py runs across that boundary: o, gate|up, down of layer i, then the q|k|v of layer i + 1
(with its RMSNorm), so a layer costs attention's kernel and one more. This walks the same layers in that order:

    qkv = q|k|v(norm(embed))                        # layer 0's, as the plain path computes it
    for each layer i:
        a = attention(rope(qkv))                    # RoPE, cache write and attention in one kernel
        h, qkv = chain_i(a, h)                      # h + o(a), then the MLP, then layer i + 1's q|k|v
    logits = lm_head(norm(h))                       # the last chain's "next" product where the head is int4

It applies where every layer can take it (`chain_plan`, `plan_for_step`): int4 layers held as tensor-core fragments
with the projections fused (q|k|v and gate|up), no biases, and a static KV cache. Elsewhere the model runs as written.
"""

from __future__ import annotations

import torch
from torch import nn

from llmpress.kernels import ops
from llmpress.kernels.ops import ChainProduct
from llmpress.model.kv_cache import StaticKVCache


def _product(linear: nn.Module, norm: nn.Module | None = None) -> ChainProduct | None:
    """The chain's view of an int4 layer held as fragments (None if it is not one)."""
    from llmpress.quant.linear import QuantLinear
    if not (isinstance(linear, QuantLinear) and linear.fragments is not None and linear.bias is None):
        return None
    if norm is None:
        return ChainProduct(linear.fragments, linear.fragment_scales, linear.fragment_zeros)
    if not hasattr(norm, "eps"):
        return None
    return ChainProduct(linear.fragments, linear.fragment_scales, linear.fragment_zeros, norm.weight, norm.eps)


def chain_plan(model: nn.Module) -> list[dict] | None:
    """Per layer its chain's products (o, gate_up, down, next) and q|k|v, or None where some layer cannot chain.
    `next` is the following layer's q|k|v, and after the last layer the head (None if it is not int4)."""
    layers = model.model.layers
    plan = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _product(attn.qkv_packed[0], layer.input_layernorm) if attn.qkv_packed else None
        gate_up = _product(mlp.gate_up_packed[0], layer.post_attention_layernorm) if mlp.gate_up_packed else None
        o, down = _product(attn.o_proj), _product(mlp.down_proj)
        if None in (qkv, gate_up, o, down) or attn.qkv_weight is not None or not attn.rotary:
            return None
        plan.append(dict(qkv=qkv, o=o, gate_up=gate_up, down=down))
    group_sizes = {m.group_size for layer in layers
                   for m in (layer.self_attn.o_proj, layer.mlp.down_proj, layer.self_attn.qkv_packed[0],
                             layer.mlp.gate_up_packed[0])}
    if len(group_sizes) != 1:
        return None
    (group_size,) = group_sizes
    for here, after in zip(plan, plan[1:]):
        here["next"] = after["qkv"]
    head = _product(model.lm_head, model.model.norm)
    plan[-1]["next"] = head if head is not None and model.lm_head.group_size == group_size else None
    products = [p for entry in plan for p in entry.values()]
    if ops.HAS_TRITON and not all(_kernel_fits(p, group_size) for p in products if p is not None):
        return None
    for entry in plan:
        entry["group_size"] = group_size
    return plan


def _kernel_fits(product: ChainProduct, group_size: int) -> bool:
    from llmpress.kernels.triton_int4_frag import default_config
    G, N = product.scales.shape
    config = default_config(N, G, 1)
    return group_size % 64 == 0 and config is not None and config[0] == 4  # the chain's programs have 4 warps


def one_token_over_static_cache(input_ids: torch.Tensor, kv_cache, logits_indices) -> bool:
    """Whether a step is batch-1 decode: one new token of one sequence over a static cache, every logit wanted."""
    return input_ids.shape == (1, 1) and logits_indices is None and isinstance(kv_cache, StaticKVCache)


def plan_for_step(model: nn.Module, input_ids: torch.Tensor, kv_cache, logits_indices) -> list[dict] | None:
    """The chain plan if `forward` runs this step: one new token of one sequence, a static cache, the chain
    switched on and possible for the model. Built on every call from the modules (only reads, so torch.compile
    traces it once), so that it always follows the layers' current tensors."""
    if not (ops.int4_layer_chain and one_token_over_static_cache(input_ids, kv_cache, logits_indices)):
        return None
    return chain_plan(model)


def forward(model: nn.Module, plan: list[dict], input_ids: torch.Tensor, positions: torch.Tensor,
            kv_cache: StaticKVCache) -> torch.Tensor:
    """Logits [1, 1, vocab] of one new token at `positions` [1], as LlamaForCausalLM.forward computes them."""
    layers = model.model.layers
    h = model.model.embed_tokens(input_ids).view(1, -1)
    cos, sin = model.model.rotary_emb(positions, h.dtype)
    first = layers[0]
    qkv = first.self_attn.qkv_packed[0].forward_fused(h, norm=first.input_layernorm)
    for i, (layer, products) in enumerate(zip(layers, plan)):
        attn = layer.self_attn
        out = ops.cached_attention_rope(qkv.view(1, 1, -1), attn.num_heads, cos, sin, attn.rotary[0].inv_freq,
                                        kv_cache.keys[i], kv_cache.values[i], positions)
        h, qkv = ops.layer_chain(out.reshape(1, -1), h, products["o"], products["gate_up"], products["down"],
                                 products["next"], products["group_size"], i)
    if plan[-1]["next"] is not None:
        return qkv.view(1, 1, -1)
    return model.lm_head(model.model.norm(h)).view(1, 1, -1)
