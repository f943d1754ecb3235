"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

A few input channels carry much larger activations than the rest, and their weights matter most.
Instead of keeping them in higher precision, AWQ multiplies each input column of a linear by s_i
(and divides its input by s_i, folded into the previous norm or linear, so the float model is
unchanged): Q(W diag(s)) diag(s)^-1 X rounds the salient columns on a finer relative grid (Sec. 3.2).
s = mean|x|^alpha, with alpha chosen on a grid by the output error (Eq. 5). Then each group's clipping
range is shrunk where that lowers the output error (llm-awq `auto_clip`), and the weights are rounded
to nearest (RTN) with those ranges.

Output errors come from the Gram matrix of the inputs, not from replaying them: for inputs X [n, in],
||X W^T - X W_hat^T||_F^2 = tr(dW X^T X dW^T) with dW = W - W_hat, exactly; with H = 2/n X^T X from the
same accumulator GPTQ uses, every candidate costs one [out, in] x [in, in] product whatever n is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmpress.quant.gptq import HessianAccumulator
from llmpress.quant.layer_groups import LLAMA_LINEAR_GROUPS, LLAMA_NO_CLIP, LinearGroup, group_linears
from llmpress.quant.rtn import fake_quantize, find_scale_zero, group_bounds, quantize_rtn
from llmpress.quant.scheme import QuantizedWeight, QuantScheme


@dataclass
class AwqConfig:
    scale_grid: int = 20  # alpha in {0, 1/20, ..., 19/20}; alpha = 0 is plain RTN (llm-awq n_grid)
    clip_grid: int = 20  # clipping range shrinks in steps of 1/clip_grid of max|w| ...
    max_shrink: float = 0.5  # ... down to (1 - max_shrink) max|w| (llm-awq auto_clip)


class ActivationStats(HessianAccumulator):
    """A linear's input statistics: H = 2/n X^T X (for output errors) and mean |x| per channel (for s)."""

    def __init__(self, in_features: int, device: torch.device | str, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, device, dtype)
        self.abs_sum = torch.zeros(in_features, dtype=dtype, device=device)

    def add_batch(self, x: torch.Tensor) -> None:
        super().add_batch(x)
        self.abs_sum += x.reshape(-1, x.shape[-1]).to(self.abs_sum.dtype).abs().sum(dim=0)

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / self.num_tokens


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per output row, tr-form of the output error: sum_ij dW[o,i] H[i,j] dW[o,j]. delta: [out, in]; hessian: [in, in]."""
    return ((delta @ hessian) * delta).sum(dim=1)


def search_scale(weights: list[torch.Tensor], stats: ActivationStats, scheme: QuantScheme,
                 grid: int = 20) -> tuple[torch.Tensor, float]:
    """The input-channel scale s [in] (float32) minimizing the output error of the RTN-quantized, scaled
    linears `weights` (each [out_k, in], one input); also its alpha. Eq. 4-5 and llm-awq `auto_scale`."""
    W = torch.cat([w.detach().float() for w in weights])
    x_mean = stats.abs_mean.float()
    best = (float("inf"), None, 0.0)
    for step in range(grid):
        alpha = step / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        # Centre s around 1 (geometric mean of its extremes), as llm-awq does: only ratios between channels
        # matter to the fold, and this keeps folded norm gains and weights near their original magnitude.
        s = s / (s.max() * s.min()).sqrt()
        W_hat = quantize_rtn(W * s, scheme).dequantize() / s
        error = output_error(W - W_hat, stats.hessian).sum().item()
        if error < best[0]:
            best = (error, s, alpha)
    return best[1], best[2]


def can_fold(layer: nn.Module, group: LinearGroup) -> bool:
    """1/s folds into a norm gain always, into a linear's output rows only if they are the group's inputs."""
    prev = layer.get_submodule(group.prev)
    return prev.weight.dim() == 1 or prev.weight.shape[0] == group_linears(layer, group)[0].weight.shape[1]


@torch.no_grad()
def apply_scale(layer: nn.Module, group: LinearGroup, s: torch.Tensor) -> None:
    """prev's output / s, and the linears' input columns * s: the layer computes the same function."""
    prev = layer.get_submodule(group.prev)
    s = s.to(prev.weight.device)
    if prev.weight.dim() == 1:  # a norm gain: y = gain * normalized(x)
        prev.weight.div_(s.to(prev.weight.dtype))
    else:  # a linear: its output rows
        prev.weight.div_(s.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for linear in group_linears(layer, group):
        linear.weight.mul_(s.to(linear.weight.dtype)[None, :])


def search_clip(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme,
                grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """max_val [out, groups] (float32): the clipping bound of each group of weight [out, in] minimizing that
    group's share of the output error of its RTN-quantized weights (llm-awq `auto_clip_layer`)."""
    W = weight.detach().float()
    bounds = group_bounds(W.shape[1], scheme)
    best_max = torch.empty(W.shape[0], len(bounds), dtype=torch.float32, device=W.device)
    for g, (begin, end) in enumerate(bounds):
        w, H = W[:, begin:end], hessian[begin:end, begin:end].float()
        org_max = w.abs().amax(dim=1, keepdim=True)
        best_err = torch.full((W.shape[0],), float("inf"), device=W.device)
        best_max[:, g] = org_max[:, 0]
        for step in range(int(max_shrink * grid)):
            max_val = org_max * (1 - step / grid)
            clipped = w.clamp(-max_val, max_val)
            scale, zero = find_scale_zero(clipped, scheme)
            # The error is measured against the unclipped weights: clipping is part of the quantization.
            err = output_error(fake_quantize(clipped, scale[:, None], zero[:, None], scheme.max_level) - w, H)
            better = err < best_err
            best_err[better] = err[better]
            best_max[better, g] = max_val[better, 0]
    return best_max


def clip_weight(weight: torch.Tensor, max_val: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """weight [out, in] with each group clamped to [-max_val, max_val] (max_val: [out, groups])."""
    clipped = weight.detach().float().clone()
    for g, (begin, end) in enumerate(group_bounds(weight.shape[1], scheme)):
        bound = max_val[:, g:g + 1]
        clipped[:, begin:end] = clipped[:, begin:end].clamp(-bound, bound)
    return clipped


@torch.no_grad()
def awq_scale_layer(layer: nn.Module, stats: list[ActivationStats], scheme: QuantScheme,
                    config: AwqConfig | None = None,
                    groups: tuple[LinearGroup, ...] = LLAMA_LINEAR_GROUPS) -> list[torch.Tensor | None]:
    """Search and fold the scale of every group of one decoder layer, in table order (stats[k]: inputs of
    groups[k], from the unscaled layer). Returns each group's s (None where it cannot fold)."""
    config = config or AwqConfig()
    scales = []
    for group, group_stats in zip(groups, stats):
        if not can_fold(layer, group):
            scales.append(None)
            continue
        s, _ = search_scale([linear.weight for linear in group_linears(layer, group)], group_stats, scheme,
                            config.scale_grid)
        apply_scale(layer, group, s)
        scales.append(s)
    return scales


@torch.no_grad()
def awq_quantize_layer(layer: nn.Module, stats: list[ActivationStats], scheme: QuantScheme,
                       config: AwqConfig | None = None, groups: tuple[LinearGroup, ...] = LLAMA_LINEAR_GROUPS,
                       no_clip: tuple[str, ...] = LLAMA_NO_CLIP) -> dict[str, QuantizedWeight]:
    """AWQ for one decoder layer: fold scales (in place), then clip and round each linear.
    Returns QuantizedWeight by linear name inside the layer; the layer's float weights are left scaled but
    not quantized (the caller writes the fake-quantized weights back)."""
    config = config or AwqConfig()
    # All folds first: a later group (v -> o) rescales rows of a linear an earlier group (qkv) scaled.
    scales = awq_scale_layer(layer, stats, scheme, config, groups)
    result = {}
    for group, group_stats, s in zip(groups, stats, scales):
        # The linears now see x / s: their input Gram matrix is H / (s s^T).
        hessian = group_stats.hessian if s is None else group_stats.hessian / (s[:, None] * s[None, :])
        for name, linear in zip(group.linears, group_linears(layer, group)):
            weight = linear.weight.detach().float()
            if name not in no_clip:
                weight = clip_weight(weight, search_clip(weight, hessian, scheme, config.clip_grid,
                                                         config.max_shrink), scheme)
            result[name] = quantize_rtn(weight, scheme)
    return result
