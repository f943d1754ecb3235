"""Batch-1 decode with the residual stream in fp32 and every int4 product adding its split-K sums by atomics
(kernels/triton_int4_accumulate.py says why: 22.1 against 34.1 us of GEMVs a 3B layer on the H200).

The layers written as modules (model/llama.py) hand a bf16 residual stream from one fused step to the next; here
the same steps run over an fp32 one that o and down add into in place:

    h = embed(token) in fp32
    for each layer:
        a = attention(rope(q|k|v(norm(h))))        # the q|k|v kernel, then attention reading its accumulator
        h += o(a)                                   # atomics into h (o combining attention's splits, where it can)
        h += down(silu(gate) * up)(norm(h))         # gate|up and its finishing kernel, then down into h
    logits = lm_head(norm(h))                       # an int4 head accumulated too, its norm folded

It applies where the layer chain's plan does (model/decode_chain.py `chain_plan`: int4 layers held as tensor-core
fragments, q|k|v and gate|up fused, no biases, a static KV cache), with `ops.int4_accumulate_decode` switched on.
"""

from __future__ import annotations

import torch
from torch import nn

from llmpress.kernels import ops
from llmpress.model.decode_chain import chain_plan, one_token_over_static_cache
from llmpress.model.kv_cache import StaticKVCache


def plan_for_step(model: nn.Module, input_ids: torch.Tensor, kv_cache, logits_indices) -> list[dict] | None:
    """The layers' products if `forward` runs this step: one new token of one sequence, a static cache, the switch
    on, and a model the plan covers. Built from the modules on every call, as decode_chain.plan_for_step is."""
    if not (ops.int4_accumulate_decode and one_token_over_static_cache(input_ids, kv_cache, logits_indices)):
        return None
    return chain_plan(model)


def forward(model: nn.Module, plan: list[dict], input_ids: torch.Tensor, positions: torch.Tensor,
            kv_cache: StaticKVCache) -> torch.Tensor:
    """Logits [1, 1, vocab] of one new token at `positions` [1], as LlamaForCausalLM.forward computes them."""
    dtype = model.dtype
    h = model.model.embed_tokens(input_ids).view(1, -1).float()
    cos, sin = model.model.rotary_emb(positions, dtype)
    # where attention reads the q|k|v accumulator itself, the gate|up finishing kernel zeroes it after
    folded = ops.accumulate_into_attention_applies(h, cos, kv_cache.keys[0])
    for i, (layer, products) in enumerate(zip(model.model.layers, plan)):
        attn, group_size = layer.self_attn, products["group_size"]
        h = ops.int4_accumulated_attention_o(h, products["qkv"], products["o"], group_size, dtype, attn.num_heads,
                                             cos, sin, attn.rotary[0].inv_freq, kv_cache.keys[i], kv_cache.values[i],
                                             positions)
        act = ops.int4_accumulated_norm(h, products["gate_up"], group_size, dtype, swiglu=True,
                                        zero_qkv=products["qkv"].scales.shape[1] if folded else 0)
        h = ops.int4_accumulate(h, act, products["down"], group_size)
    head = plan[-1].get("next")  # the int4 head with the final norm (decode_chain.chain_plan), or None
    if head is not None and ops.int4_accumulate_head:
        return ops.int4_accumulated_norm(h, head, plan[-1]["group_size"], dtype).view(1, 1, -1)
    return model.lm_head(model.model.norm(h.to(dtype))).view(1, 1, -1)
