"""Quantized weights for the format / QuantLinear / checkpoint tests, made without the algorithms in quant/."""

from __future__ import annotations

import torch
from torch import nn

from llmpress.quant.scheme import QuantizedWeight, QuantScheme

LINEAR_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def act_order_g_idx(in_features: int, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """GPTQ desc_act without static groups: columns visited in a random order, grouped in visiting order."""
    order = torch.randperm(in_features, generator=generator)
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_features) // group_size).to(torch.int32)
    return g_idx


def random_quantized(out_features: int, in_features: int, scheme: QuantScheme, seed: int = 0,
                     min_zero: int = 1) -> QuantizedWeight:
    """Random levels, fp16-exact scales and zeros in min_zero..max (v1 GPTQ cannot hold zero 0)."""
    gen = torch.Generator().manual_seed(seed)
    groups = scheme.groups(in_features)
    group_size = scheme.group_size_for(in_features)
    levels = torch.randint(0, 2 ** scheme.bits, (out_features, in_features), generator=gen).to(torch.uint8)
    if scheme.sym:
        zeros = torch.full((out_features, groups), 2 ** (scheme.bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(min_zero, 2 ** scheme.bits, (out_features, groups), generator=gen).to(torch.uint8)
    scales = (torch.rand(out_features, groups, generator=gen) * 0.02 + 1e-3).half().float()
    g_idx = act_order_g_idx(in_features, group_size, gen) if scheme.act_order \
        else (torch.arange(in_features) // group_size).to(torch.int32)
    return QuantizedWeight(levels, scales, zeros, g_idx, scheme)


def rtn(weight: torch.Tensor, scheme: QuantScheme, seed: int = 0) -> QuantizedWeight:
    """Round-to-nearest per group (a few lines, enough for tests); act_order shuffles the group membership.

    Zero points are kept >= 1 so the result also fits the GPTQ v1 layout; scales are fp16-exact so a
    checkpoint (fp16 scales) reproduces the in-memory model bit for bit.
    """
    out_features, in_features = weight.shape
    group_size = scheme.group_size_for(in_features)
    g_idx = act_order_g_idx(in_features, group_size, torch.Generator().manual_seed(seed)) if scheme.act_order \
        else (torch.arange(in_features) // group_size).to(torch.int32)
    groups = scheme.groups(in_features)
    maxq = scheme.max_level
    scales = torch.empty(out_features, groups)
    zeros = torch.empty(out_features, groups)
    for g in range(groups):
        w = weight[:, g_idx == g].float()
        if scheme.sym:
            scale = w.abs().amax(dim=1).clamp(min=1e-8) / (2 ** (scheme.bits - 1) - 0.5)
            zero = torch.full_like(scale, 2 ** (scheme.bits - 1))
        else:
            lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
            scale = ((hi - lo) / maxq).clamp(min=1e-8)
            zero = torch.round(-lo / scale).clamp(1, maxq)
        scales[:, g], zeros[:, g] = scale.half().float(), zero
    g = g_idx.long()
    levels = torch.clamp(torch.round(weight.float() / scales[:, g]) + zeros[:, g], 0, maxq)
    return QuantizedWeight(levels.to(torch.uint8), scales, zeros.to(torch.uint8), g_idx, scheme)


def quantize_model(model: nn.Module, scheme: QuantScheme) -> dict[str, QuantizedWeight]:
    """RTN of every decoder linear of a LlamaForCausalLM: {module name: QuantizedWeight}."""
    return {f"model.layers.{i}.{suffix}": rtn(model.get_submodule(f"model.layers.{i}.{suffix}").weight.detach(),
                                              scheme, seed=i * 7 + j)
            for i in range(len(model.model.layers)) for j, suffix in enumerate(LINEAR_SUFFIXES)}


def fake_quantized_copy(model: nn.Module, quantized: dict[str, QuantizedWeight]) -> nn.Module:
    """A float model whose quantized linears hold the dequantized weights (the fake-quantization reference)."""
    import copy
    fake = copy.deepcopy(model)
    for name, qw in quantized.items():
        fake.get_submodule(name).weight.data = qw.dequantize(fake.get_submodule(name).weight.dtype)
    return fake
