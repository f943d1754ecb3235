"""Fuse projections that read the same input into one matrix (q|k|v, gate|up).

At batch 1 a decode step is a chain of matrix-vector products; one product over the concatenated
matrix reads the same bytes as three but costs one launch and keeps the GPU busier than the small
k/v products do alone. The fused weight is a non-persistent buffer and the original parameters
become views into it: no extra memory, and `state_dict()` keeps Hugging Face names.
Which projections fuse is data, not code.
"""

from __future__ import annotations

import torch
from torch import nn

# (sub-module of a decoder layer, fused attribute prefix, projections in output order)
FUSED_PROJECTIONS = (
    ("self_attn", "qkv", ("q_proj", "k_proj", "v_proj")),
    ("mlp", "gate_up", ("gate_proj", "up_proj")),
)


def fuse_projections(model: nn.Module) -> int:
    """Fuse every group whose members are plain nn.Linear, or int4 layers in the row layout (a type with a
    `fuse_rows` classmethod: quant.linear.QuantLinear, held in `<prefix>_packed` as a one-element tuple, so
    the state dict keeps its names). Adapted layers are left alone. Call after the model is on its final
    device (and, for int4 layers, after `quant.linear.use_row_layouts`). Returns the number of groups fused."""
    fused_groups = 0
    for layer in model.model.layers:
        for parent_name, prefix, names in FUSED_PROJECTIONS:
            parent = getattr(layer, parent_name)
            linears = [getattr(parent, name) for name in names]
            if getattr(parent, f"{prefix}_weight", None) is not None or getattr(parent, f"{prefix}_packed", ()):
                continue
            if any(type(m) is not nn.Linear for m in linears):
                fuse_rows = getattr(type(linears[0]), "fuse_rows", None)
                fused = fuse_rows(linears) if fuse_rows is not None else None
                if fused is not None:
                    setattr(parent, f"{prefix}_packed", (fused,))
                    fused_groups += 1
                continue
            weight = torch.cat([m.weight.detach() for m in linears])
            has_bias = linears[0].bias is not None
            bias = torch.cat([m.bias.detach() for m in linears]) if has_bias else None
            offset = 0
            for m in linears:
                rows = slice(offset, offset + m.out_features)
                m.weight = nn.Parameter(weight[rows], requires_grad=False)
                if has_bias:
                    m.bias = nn.Parameter(bias[rows], requires_grad=False)
                offset += m.out_features
            setattr(parent, f"{prefix}_weight", weight)  # registered (as None) in the module's __init__
            setattr(parent, f"{prefix}_bias", bias)
            fused_groups += 1
    return fused_groups


def unfuse_projections(model: nn.Module) -> None:
    """Drop the fused buffers (before swapping in quantized or LoRA layers); the per-projection views stay valid."""
    for layer in model.model.layers:
        for parent_name, prefix, _ in FUSED_PROJECTIONS:
            parent = getattr(layer, parent_name)
            setattr(parent, f"{prefix}_weight", None)
            setattr(parent, f"{prefix}_bias", None)
            setattr(parent, f"{prefix}_packed", ())
