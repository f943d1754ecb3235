"""LoRA (Hu et al. 2021): a frozen linear plus a trainable low-rank update, y = W x + (alpha/r) B A x.

`LoRALinear` is a drop-in replacement for `nn.Linear` or our `QuantLinear` (QLoRA: the frozen base is
int4, dequantized on the fly). `apply_lora` swaps the target projections and freezes everything else;
`merge_lora` folds B A into the base weight and swaps plain `nn.Linear` layers back in.
Submodule names follow PEFT (`base_layer`, `lora_A`, `lora_B`) so adapter keys map one to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from llmpress.errors import LlmpressError
from llmpress.finetune.frozen_base import frozen_linear_forward
from llmpress.model.fusion import unfuse_projections
from llmpress.quant.linear import QuantLinear

# The decoder's projections by the names Hugging Face and PEFT use (`target_modules`).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")

    def __post_init__(self):
        self.targets = tuple(self.targets)
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise LlmpressError(f"unknown LoRA target {', '.join(unknown)}; choose from {','.join(LORA_TARGETS)}.")
        if not self.targets:
            raise LlmpressError(f"no LoRA targets given; pass --targets with some of {','.join(LORA_TARGETS)}.")
        if self.r < 1:
            raise LlmpressError(f"--r {self.r}: the LoRA rank must be at least 1.")
        if not 0.0 <= self.dropout < 1.0:
            raise LlmpressError(f"--dropout {self.dropout} must be in [0, 1).")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Module):
    """y = base(x) + dropout(x) Aᵀ Bᵀ · alpha/r, with `base` frozen. x: [..., in] -> [..., out].

    A [r, in] starts Kaiming-uniform and B [out, r] at zero (as PEFT does), so a new adapter leaves the
    model's outputs unchanged and training starts from the base model.
    """

    def __init__(self, base: nn.Linear | QuantLinear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.device if isinstance(base, QuantLinear) else base.weight.device
        # Adapters train in float32 whatever the base dtype (PEFT's autocast_adapter_dtype): bf16 updates of
        # size lr*grad would round away against weights of size 1e-2.
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_linear_forward(self.base_layer, x)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return y + (update * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) B A, [out, in] float32: what merging adds to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (dropout off): base weight + delta, in the base dtype."""
        base = self.base_layer
        weight = base.dequantize_weight() if isinstance(base, QuantLinear) else base.weight
        dtype, device = weight.dtype, weight.device
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_((weight.float() + self.delta_weight()).to(dtype))
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def target_names(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Qualified names of the decoder's projections whose last name part is in `targets`."""
    names = []
    for i, layer in enumerate(model.model.layers):
        for parent in ("self_attn", "mlp"):
            for child_name, child in getattr(layer, parent).named_children():
                if child_name in targets:
                    names.append(f"model.layers.{i}.{parent}.{child_name}")
    return names


def apply_lora(model: nn.Module, config: LoRAConfig) -> dict[str, LoRALinear]:
    """Freeze every parameter, then swap each target projection for a LoRALinear (adapters trainable).
    Fused q|k|v and gate|up buffers are dropped first: they would bypass the adapters. Returns name -> module."""
    if lora_modules(model):
        raise LlmpressError("this model already holds LoRA adapters; merge them (merge_lora) before adding new ones.")
    unfuse_projections(model)
    model.requires_grad_(False)
    adapted = {}
    for name in target_names(model, config.targets):
        base = model.get_submodule(name)
        if not isinstance(base, (nn.Linear, QuantLinear)):
            raise LlmpressError(f"{name} is a {type(base).__name__}, which LoRA cannot wrap; "
                                "use a model whose projections are plain or int4-quantized linears.")
        # .train(model.training): a swap into an eval-mode model must not switch dropout on
        adapted[name] = LoRALinear(base, config.r, config.alpha, config.dropout).train(model.training)
        model.set_submodule(name, adapted[name])
    return adapted


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """name -> LoRALinear, names as in the unwrapped model (e.g. "model.layers.0.self_attn.q_proj")."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> int:
    """Replace every LoRALinear by a plain nn.Linear holding base + (alpha/r) B A. Returns how many merged."""
    modules = lora_modules(model)
    for name, module in modules.items():
        model.set_submodule(name, module.merged())
    return len(modules)
