"""Batch-1 decode with the residual stream in fp32 and every int4 product adding its split-K sums by atomics
(kernels/triton_int4_accumulate.py says why: 22.1 against 34.1 us of GEMVs a 3B layer on the H200).

The layers written as modules (model/llama.py) hand a bf16 residual stream from one fused step to the next; here
the same steps run over an fp32 one that o and down add into in place:

    h = embed(token) in fp32
    for each layer:
        a = attention(rope(q|k|v(norm(h))))        # the q|k|v kernel, then attention reading its accumulator
        h += o(a)                                   # atomics into h (o combining attention's splits, where it can)
        h += down(silu(gate) * up)(norm(h))         # gate|up and its finishing kernel, then down into h (or
                                                    # down making silu(gate) * up itself: ops.int4_swiglu_in_down)
    logits = lm_head(norm(h))                       # an int4 head accumulated too, its norm folded

It applies where the layer chain's plan does (model/decode_chain.py `chain_plan`: int4 layers held as tensor-core
fragments, q|k|v and gate|up fused, no biases, a static KV cache), with `ops.int4_accumulate_decode` switched on.
With `ops.int4_accumulate_rows` also to steps of 2..8 new tokens of one sequence (a speculative verify step): h is
then [T, H], and attention the Triton decode kernel's over T queries reading the accumulator itself
(`ops.int4_accumulate_rows_into_attention`, on), or that of the static cache (`ops.cached_attention_rope`, q|k|v
finished by a kernel of its own).
"""

from __future__ import annotations

import torch
from torch import nn

from llmpress.kernels import ops
from llmpress.model.decode_chain import chain_plan, one_token_over_static_cache
from llmpress.model.kv_cache import StaticKVCache

MAX_ROWS = 8  # new tokens of a step: the columns of the products' mma


def plan_for_step(model: nn.Module, input_ids: torch.Tensor, kv_cache, logits_indices) -> list[dict] | None:
    """The layers' products if `forward` runs this step: one new token of one sequence (or 2..MAX_ROWS of them
    with `ops.int4_accumulate_rows`), a static cache, the switch on, and a model the plan covers. Built from the
    modules on every call, as decode_chain.plan_for_step is."""
    if not ops.int4_accumulate_decode:
        return None
    rows_step = (ops.int4_accumulate_rows and input_ids.shape[0] == 1 and 2 <= input_ids.shape[1] <= MAX_ROWS
                 and logits_indices is None and isinstance(kv_cache, StaticKVCache))
    if not (rows_step or one_token_over_static_cache(input_ids, kv_cache, logits_indices)):
        return None
    return chain_plan(model)


def forward(model: nn.Module, plan: list[dict], input_ids: torch.Tensor, positions: torch.Tensor,
            kv_cache: StaticKVCache, last_only: bool = False) -> torch.Tensor:
    """Logits [1, T, vocab] (or [1, 1, vocab] with `last_only`) of T new tokens at `positions` [T], as
    LlamaForCausalLM.forward computes them."""
    dtype = model.dtype
    T = input_ids.shape[1]
    h = model.model.embed_tokens(input_ids).view(T, -1).float()
    cos, sin = model.model.rotary_emb(positions, dtype)
    # where attention reads the q|k|v accumulator itself, the gate|up finishing kernel zeroes it after
    folded = ops.accumulate_into_attention_applies(h, cos, kv_cache.keys[0])
    for i, (layer, products) in enumerate(zip(model.model.layers, plan)):
        attn, group_size = layer.self_attn, products["group_size"]
        if T == 1:
            h = ops.int4_accumulated_attention_o(h, products["qkv"], products["o"], group_size, dtype,
                                                 attn.num_heads, cos, sin, attn.rotary[0].inv_freq,
                                                 kv_cache.keys[i], kv_cache.values[i], positions)
        else:  # ops decides, as for one token, whether attention reads the q|k|v accumulator itself (`folded`)
            out = ops.int4_accumulated_attention(h, products["qkv"], group_size, dtype, attn.num_heads, cos, sin,
                                                 attn.rotary[0].inv_freq, kv_cache.keys[i], kv_cache.values[i],
                                                 positions)
            h = ops.int4_accumulate(h, out.transpose(1, 2).reshape(T, -1), products["o"], group_size)
        h = ops.int4_accumulated_mlp(h, products["gate_up"], products["down"], group_size, dtype, len(plan), i,
                                     zero_qkv=T * products["qkv"].scales.shape[1] if folded else 0)
    if last_only:
        h = h[-1:]
    head = plan[-1].get("next")  # the int4 head with the final norm (decode_chain.chain_plan), or None
    if head is not None and ops.int4_accumulate_head:
        return ops.int4_accumulated_norm(h, head, plan[-1]["group_size"], dtype).unsqueeze(0)
    return model.lm_head(model.model.norm(h.to(dtype))).unsqueeze(0)
