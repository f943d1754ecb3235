"""Which linears of a decoder layer read the same input, and which module produces that input.

Per-architecture facts as data (STYLE 16). Both calibrated quantizers walk this table in order:
- GPTQ quantizes one group at a time, each seeing inputs computed with the groups before it already
  quantized (the reference's "true sequential" order: qkv -> o -> gate/up -> down);
- AWQ multiplies a per-input-channel scale s into the group's linears and folds 1/s into `prev`
  (a norm's gain, or a linear's output rows), which leaves the float model's function unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LinearGroup:
    prev: str  # the module (inside the decoder layer) whose output is the linears' common input
    linears: tuple[str, ...]  # linears reading that input, in the order their outputs are stacked


LLAMA_LINEAR_GROUPS = (
    LinearGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    # o_proj reads softmax(qk^T) v: each of its input channels is one v channel, scaled by whatever
    # scales v_proj's output row. With grouped-query attention v has fewer channels than o_proj has
    # inputs and no fold exists (llm-awq skips it too); AWQ then checks shapes and leaves o_proj unscaled.
    LinearGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    LinearGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    # down_proj reads silu(gate) * up, linear in up's output: scaling up's rows scales down's inputs.
    LinearGroup("mlp.up_proj", ("mlp.down_proj",)),
)

# AWQ leaves these unclipped: their outputs meet in q k^T before the softmax, so a per-output MSE says
# little about the error that matters (llm-awq auto_clip: "due to qk bmm, it is hard to clip precisely").
LLAMA_NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")


def linear_names(groups: tuple[LinearGroup, ...] = LLAMA_LINEAR_GROUPS) -> list[str]:
    """Every quantized linear of a decoder layer, in the table's order."""
    return [name for group in groups for name in group.linears]


def group_linears(layer: nn.Module, group: LinearGroup) -> list[nn.Linear]:
    return [layer.get_submodule(name) for name in group.linears]
