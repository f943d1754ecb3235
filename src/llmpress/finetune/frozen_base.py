"""The frozen base layer's forward for training: gradients flow to the input, never to the weight.

For an int4 `QuantLinear` (QLoRA, Dettmers et al. 2023) the packed weight is dequantized again in
backward instead of being kept alive between forward and backward, as bitsandbytes' MatMul4Bit does:
the CPU reference path would otherwise save every layer's dequantized weight for the backward pass
(a bf16 copy of the model, the memory QLoRA exists to avoid), and the Triton kernel has no backward.
"""

from __future__ import annotations

import torch
from torch import nn

from llmpress.quant.linear import QuantLinear


class _Int4LinearInputGrad(torch.autograd.Function):
    """y = base(x) with dL/dx = dL/dy · W, W dequantized on the fly; no gradient for the packed weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: QuantLinear) -> torch.Tensor:
        ctx.base, ctx.x_dtype = base, x.dtype
        return base(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        weight = ctx.base.dequantize_weight()  # [out, in]
        grad_x = grad_y.to(weight.dtype) @ weight
        return grad_x.to(ctx.x_dtype), None


def frozen_linear_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """base(x) for a frozen nn.Linear or QuantLinear, differentiable with respect to x."""
    if isinstance(base, QuantLinear):
        return _Int4LinearInputGrad.apply(x, base) if x.requires_grad else base(x)
    return base(x)  # nn.Linear: autograd already skips the frozen weight
