"""QuantLinear: a drop-in nn.Linear whose weight is packed integers, and the swap that installs it.

The model never asks whether a layer is quantized (gpt-fast's pattern): `replace_linears` swaps modules,
and forward(x) keeps nn.Linear's contract, x [..., in] -> [..., out].
"""

from __future__ import annotations

import torch
from torch import nn

from llmpress.kernels import ops
from llmpress.model.fusion import unfuse_projections
from llmpress.quant.format import RuntimeQuantWeight, dequantize_runtime, from_runtime, to_runtime
from llmpress.quant.scheme import QuantizedWeight, QuantScheme


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W held in the runtime packed layout (quant/format.py).

    Buffers (runtime layout, not a checkpoint layout: save with `quant.checkpoint.save_quantized`):
    qweight int32 [in*bits/32, out], scales [groups, out] (model dtype), qzeros int32 [groups, out*bits/32]
    (real zero points), g_idx int32 [in] or None, bias [out] or None.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 act_order: bool = False, dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        group_size = in_features if group_size == -1 else group_size
        assert (in_features * bits) % 32 == 0 and (out_features * bits) % 32 == 0, (in_features, out_features, bits)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = -(-in_features // group_size)  # the last group is partial when group_size does not divide in_features
        int32 = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, **int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, **int32))
        self.register_buffer("g_idx", torch.zeros(in_features, **int32) if act_order else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_runtime(cls, rt: RuntimeQuantWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Wrap already-packed runtime tensors (no copy)."""
        module = cls(rt.in_features, rt.out_features, rt.bits, rt.group_size, bias=bias is not None,
                     act_order=rt.g_idx is not None, dtype=rt.scales.dtype, device="meta")
        module.qweight, module.scales, module.qzeros, module.g_idx = rt.qweight, rt.scales, rt.qzeros, rt.g_idx
        if bias is not None:
            module.bias = bias.detach().to(device=rt.qweight.device, dtype=rt.scales.dtype)
        return module

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       dtype: torch.dtype | None = None) -> "QuantLinear":
        """Pack `qw` (on its device) into a QuantLinear whose scales and bias are in `dtype` (default: qw's scales)."""
        return cls.from_runtime(to_runtime(qw, dtype), bias)

    def runtime_weight(self) -> RuntimeQuantWeight:
        return RuntimeQuantWeight(self.qweight, self.scales, self.qzeros, self.g_idx, self.group_size, self.bits)

    def quantized_weight(self, scheme: QuantScheme) -> QuantizedWeight:
        """The unpacked levels, scales and zeros (for saving a model that already holds QuantLinear layers)."""
        return from_runtime(self.runtime_weight(), scheme)

    def dequantize_weight(self) -> torch.Tensor:
        """W [out, in] in the scales' dtype, the weight an nn.Linear would hold."""
        return dequantize_runtime(self.qweight, self.scales, self.qzeros, self.g_idx, self.group_size, self.bits,
                                  self.scales.dtype).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.int4_matmul(x.reshape(-1, self.in_features), self.qweight, self.scales, self.qzeros, self.g_idx,
                   self.group_size, self.bits)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, act_order={self.g_idx is not None}, bias={self.bias is not None}")


def replace_linears(model: nn.Module, quantized: dict[str, QuantizedWeight], dtype: torch.dtype | None = None) -> None:
    """Swap each named nn.Linear (e.g. "model.layers.0.self_attn.q_proj") for a QuantLinear built from `quantized`.

    Fused q|k|v and gate|up buffers are dropped first so they never shadow the quantized layers.
    `dtype` defaults to each replaced layer's weight dtype.
    """
    unfuse_projections(model)
    for name, qw in quantized.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        if tuple(qw.qweight.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"{name}: quantized weight {tuple(qw.qweight.shape)} does not match the layer's "
                             f"{(linear.out_features, linear.in_features)}")
        target_dtype = dtype or linear.weight.dtype
        device = linear.weight.device
        qw = QuantizedWeight(qw.qweight.to(device), qw.scales.to(device), qw.zeros.to(device), qw.g_idx.to(device),
                             qw.scheme)
        bias = None if linear.bias is None else linear.bias.detach().to(target_dtype)
        model.set_submodule(name, QuantLinear.from_quantized(qw, bias=bias, dtype=target_dtype))
