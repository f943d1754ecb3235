"""What every quantizer agrees on: the scheme, and the unpacked result for one weight matrix.

Algorithms (rtn.py, gptq.py, awq.py) return `QuantizedWeight`: integer levels, scales and zero
points, never packed bits. Only `format.py` knows a bit layout (GPTQ / AWQ packing).
Dequantization: W[o, i] = scales[o, g(i)] * (qweight[o, i] - zeros[o, g(i)]), g(i) = g_idx[i].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from llmpress.errors import LlmpressError


@dataclass(frozen=True)
class QuantScheme:
    bits: int = 4
    group_size: int = 128  # input channels sharing one scale/zero; -1 = one group per output row
    sym: bool = False  # symmetric: zero point fixed at 2^(bits-1)
    act_order: bool = False  # GPTQ desc_act: quantize columns by decreasing Hessian diagonal

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise LlmpressError(f"--bits must be between 2 and 8, got {self.bits}.")
        if self.group_size != -1 and self.group_size < 1:
            raise LlmpressError(f"--group-size must be positive or -1 (per channel), got {self.group_size}.")

    @property
    def max_level(self) -> int:
        return 2 ** self.bits - 1

    def groups(self, in_features: int) -> int:
        """Number of groups; the last one is partial when in_features is not a multiple of the group size
        (SmolLM2's hidden size 576 at g128: 4 full groups + one of 64). GPTQ's g_idx = i // group_size
        describes that exactly; vLLM, though, only loads checkpoints whose groups all divide evenly."""
        size = self.group_size_for(in_features)
        return -(-in_features // size)

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantizedWeight:
    """The quantized form of one nn.Linear weight [out_features, in_features] (HF layout)."""
    qweight: torch.Tensor  # uint8 [out, in], levels in 0..2^bits-1
    scales: torch.Tensor  # float [out, groups]
    zeros: torch.Tensor  # uint8 [out, groups], integer zero points in 0..2^bits-1
    g_idx: torch.Tensor  # int32 [in], group of each input channel (i // group_size unless act_order)
    scheme: QuantScheme

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat [out, in] in `dtype` (the fake-quantized weight)."""
        g = self.g_idx.long()
        scales = self.scales.float()[:, g]
        zeros = self.zeros.float()[:, g]
        return (scales * (self.qweight.float() - zeros)).to(dtype)
