"""Round-to-nearest (RTN): the baseline quantizer, and the primitives GPTQ and AWQ share with it.

One group = `group_size` consecutive input channels of one output row, with its own scale and integer
zero point: W_hat = scale * (q - zero), q = clamp(round(W / scale) + zero, 0, maxq), maxq = 2^bits - 1.
Conventions follow the GPTQ reference (`quant.py`, `Quantizer.find_params`), which GPTQ checkpoints and
the kernels that read them assume:
- asymmetric: the range [min(w, 0), max(w, 0)] is spread over 0..maxq; it always holds 0, so the zero
  point round(-min / scale) is an integer in 0..maxq and 0.0 stays exactly representable;
- symmetric: the range is [-max|w|, +max|w|], so scale = 2 max|w| / maxq, and the zero point is fixed at
  (maxq + 1) / 2 = 2^(bits-1). The levels then span [-2^(bits-1), 2^(bits-1) - 1] * scale: the top level
  is half a step short of max|w| and the bottom one half a step beyond -max|w|, so every weight is
  still within scale / 2 of a level. (AutoGPTQ, GPTQModel and vLLM's GPTQ kernels all use this;
  the other convention, scale = max|w| / (2^(bits-1) - 1), wastes the level -2^(bits-1).)
"""

from __future__ import annotations

import torch

from llmpress.quant.scheme import QuantizedWeight, QuantScheme


def group_bounds(in_features: int, scheme: QuantScheme) -> list[tuple[int, int]]:
    """[begin, end) input channels of each group, in order. The last group is shorter when
    `group_size` does not divide `in_features` (as in the GPTQ reference, where a new group simply
    starts every `group_size` columns): SmolLM2's hidden size 576 is 4.5 groups of 128."""
    size = in_features if scheme.group_size == -1 else scheme.group_size
    return [(begin, min(begin + size, in_features)) for begin in range(0, in_features, size)]


def group_index(in_features: int, scheme: QuantScheme) -> torch.Tensor:
    """g_idx [in] int32 in natural order: channel i belongs to group i // group_size."""
    size = in_features if scheme.group_size == -1 else scheme.group_size
    return (torch.arange(in_features) // size).to(torch.int32)


def find_scale_zero(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point (both float32 [...]) of each row of w [..., group_len]."""
    w = w.float()
    maxq = scheme.max_level
    if scheme.sym:
        w_max = w.abs().amax(dim=-1)
        w_min = -w_max
    else:
        w_min = w.amin(dim=-1).clamp(max=0.0)
        w_max = w.amax(dim=-1).clamp(min=0.0)
    # An all-zero group would give scale 0 and 0/0 below; the reference widens it to [-1, 1]. Any positive
    # scale is exact for it: every weight lands on the zero point and dequantizes to 0.0.
    empty = (w_min == 0) & (w_max == 0)
    w_min = torch.where(empty, -1.0, w_min)
    w_max = torch.where(empty, 1.0, w_max)
    scale = (w_max - w_min) / maxq
    if scheme.sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-w_min / scale).clamp(0, maxq)
    return scale, zero


def quantize_levels(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer levels q = clamp(round(w / scale) + zero, 0, maxq), as float32 (scale and zero broadcast to w)."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Quantize and dequantize in float32: scale * (q - zero), the value the quantized model computes with."""
    return scale * (quantize_levels(w, scale, zero, maxq) - zero)


def quantize_rtn(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """Round every weight of weight [out, in] to its group's nearest level (no data needed)."""
    assert weight.dim() == 2, f"expected a [out, in] weight, got shape {tuple(weight.shape)}"
    w = weight.detach().float()
    bounds = group_bounds(w.shape[1], scheme)
    scales = torch.empty(w.shape[0], len(bounds), dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    levels = torch.empty_like(w)
    for g, (begin, end) in enumerate(bounds):
        scale, zero = find_scale_zero(w[:, begin:end], scheme)
        levels[:, begin:end] = quantize_levels(w[:, begin:end], scale[:, None], zero[:, None], scheme.max_level)
        scales[:, g], zeros[:, g] = scale, zero
    return QuantizedWeight(qweight=levels.to(torch.uint8), scales=scales, zeros=zeros.to(torch.uint8),
                           g_idx=group_index(w.shape[1], scheme).to(w.device), scheme=scheme)


def split_rows(qw: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """Split a QuantizedWeight of stacked linears (rows q|k|v, or gate|up) back into one per linear.
    Quantization treats every output row on its own, so quantizing the stack is quantizing each."""
    assert sum(sizes) == qw.qweight.shape[0], f"row sizes {sizes} do not add up to {qw.qweight.shape[0]}"
    return [QuantizedWeight(q, s, z, qw.g_idx, qw.scheme)
            for q, s, z in zip(qw.qweight.split(sizes), qw.scales.split(sizes), qw.zeros.split(sizes))]
